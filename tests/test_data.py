"""Corpus readers, caption normalisation, image listing/loading and subsampling (tipcap.data)."""

import gzip
import json
import re
from pathlib import Path

import pytest
from conftest import write_images
from PIL import Image

from tipcap.data import (
    ImageError,
    ImageRef,
    list_images,
    load_image,
    normalize_caption,
    read_captions,
    subsample,
)
from tipcap.errors import TipcapError


def _slice_entries(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["images"]


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _expected(path: Path, splits: set[str] | None) -> list[tuple[int, str]]:
    """(cocoid, whitespace-collapsed raw caption) in file order, for entries whose split is in ``splits``."""
    return [
        (entry["cocoid"], _collapse(sentence["raw"]))
        for entry in _slice_entries(path)
        if splits is None or entry["split"] in splits
        for sentence in entry["sentences"]
    ]


def _pairs(corpus) -> list[tuple[object, str]]:
    return [(c.image_id, c.text) for c in corpus.captions]


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- Karpathy split files -----------------------------------------------------------------------------


def test_karpathy_slice_fixture_shape(coco_slice):
    entries = _slice_entries(coco_slice)
    assert [e["split"] for e in entries].count("val") == 12
    assert [e["split"] for e in entries].count("restval") == 12


@pytest.mark.parametrize(
    ("split", "members", "count"),
    [("train", {"train", "restval"}, 60), ("val", {"val"}, 60), (None, None, 120)],
)
def test_karpathy_split_selection_ids_and_order(coco_slice, split, members, count):
    corpus = read_captions(coco_slice, split=split, period="keep")
    assert corpus.format == "karpathy"
    assert corpus.split == split
    assert len(corpus) == count
    assert corpus.empty_skipped == 0
    assert _pairs(corpus) == _expected(coco_slice, members)


def test_karpathy_train_is_exactly_restval(coco_slice):
    train = read_captions(coco_slice, split="train")
    restval = read_captions(coco_slice, split="restval")
    val = read_captions(coco_slice, split="val")
    assert _pairs(train) == _pairs(restval)
    assert {c.image_id for c in train.captions}.isdisjoint(c.image_id for c in val.captions)
    # Spot-check real cocoids: first val image and first restval image of the slice.
    assert val.captions[0].image_id == 184613
    assert train.captions[0].image_id == 196
    assert all(isinstance(c.image_id, int) for c in train.captions)


def test_karpathy_default_period_policy_normalises_real_captions(coco_slice):
    kept = read_captions(coco_slice, period="keep")
    added = read_captions(coco_slice)  # default policy is "add"
    assert added.period == "add"
    assert len(added) == len(kept) == 120
    for k, a in zip(kept.captions, added.captions, strict=True):
        assert a.image_id == k.image_id
        assert a.text.endswith(".") and not a.text.endswith("..")
        assert "  " not in a.text and a.text == a.text.strip()
        assert a.text[:-1] == k.text.rstrip(". ")
    # The slice has real captions without a final period and with trailing spaces.
    raw = [s["raw"] for e in _slice_entries(coco_slice) for s in e["sentences"]]
    assert "a bath tub sitting next to a sink " in raw
    assert "a bath tub sitting next to a sink." in [c.text for c in added.captions]


@pytest.mark.parametrize("split", ["train", "val", None])
def test_karpathy_gzip_gives_identical_results(coco_slice, tmp_path, split):
    gz = tmp_path / "coco_karpathy_slice.json.gz"
    gz.write_bytes(gzip.compress(coco_slice.read_bytes()))
    plain = read_captions(coco_slice, split=split)
    packed = read_captions(gz, split=split)
    assert packed.format == "karpathy"
    assert _pairs(packed) == _pairs(plain)
    assert packed.empty_skipped == plain.empty_skipped


def test_karpathy_flickr_style_numeric_filename_gives_int_id(tmp_path):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(
        json.dumps(
            {
                "dataset": "flickr30k",
                "images": [
                    {
                        "filename": "1000092795.jpg",
                        "split": "train",
                        "sentences": [{"raw": "Two young guys with shaggy hair ."}, {"raw": "Two friends"}],
                    },
                    {"filename": "holiday_pic.jpg", "split": "test", "sentences": [{"raw": "A beach"}]},
                ],
            }
        )
    )
    corpus = read_captions(path)
    assert _pairs(corpus) == [
        (1000092795, "Two young guys with shaggy hair."),
        (1000092795, "Two friends."),
        ("holiday_pic", "A beach."),
    ]
    assert type(corpus.captions[0].image_id) is int
    assert _pairs(read_captions(path, split="test")) == [("holiday_pic", "A beach.")]


def test_karpathy_unknown_split_name_is_refused(coco_slice):
    with pytest.raises(TipcapError, match="bogus"):
        read_captions(coco_slice, split="bogus")


def test_karpathy_split_with_no_images_is_an_error(coco_slice):
    with pytest.raises(TipcapError, match="no captions") as info:
        read_captions(coco_slice, split="test")
    assert str(coco_slice) in str(info.value)


# --- Other corpus formats -------------------------------------------------------------------------------


def test_json_map_ids_are_keys_in_file_order(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(
        json.dumps({"b/2.jpg": ["A  dog\truns", "A second   caption."], "a/1.jpg": "Just one string"})
    )
    corpus = read_captions(path)
    assert corpus.format == "json-map"
    assert _pairs(corpus) == [
        ("b/2.jpg", "A dog runs."),
        ("b/2.jpg", "A second caption."),
        ("a/1.jpg", "Just one string."),
    ]


def test_json_map_gzip(tmp_path):
    path = tmp_path / "captions.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"x.jpg": ["one", "two"]}).encode()))
    assert _pairs(read_captions(path, period="keep")) == [("x.jpg", "one"), ("x.jpg", "two")]


def test_json_map_with_non_string_captions_is_an_error(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"a.jpg": ["fine", 3]}))
    with pytest.raises(TipcapError, match=r"'a\.jpg'") as info:
        read_captions(path)
    assert str(path) in str(info.value)


def test_jsonl_pairs_ids_are_image_strings(tmp_path):
    path = _write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"image": "imgs/0001.jpg", "caption": "a cat on a mat"},
            {"image": "imgs/0002.jpg", "caption": "Is it raining?"},
            {"image": 17, "caption": "numeric image name"},
            {"image": "imgs/0001.jpg", "caption": "  another   cat.  "},
        ],
    )
    corpus = read_captions(path)
    assert corpus.format == "jsonl"
    assert _pairs(corpus) == [
        ("imgs/0001.jpg", "a cat on a mat."),
        ("imgs/0002.jpg", "Is it raining?"),
        ("17", "numeric image name."),
        ("imgs/0001.jpg", "another cat."),
    ]


def test_jsonl_gzip_and_blank_lines(tmp_path):
    text = '{"image": "a.jpg", "caption": "x"}\n\n   \n{"image": "b.jpg", "caption": "y"}\n'
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(gzip.compress(text.encode()))
    corpus = read_captions(path, period="strip")
    assert _pairs(corpus) == [("a.jpg", "x"), ("b.jpg", "y")]
    assert corpus.empty_skipped == 0  # blank JSONL lines are not records


def test_jsonl_record_missing_caption_names_line_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "pairs.jsonl", [{"image": "a.jpg", "caption": "ok"}, {"image": "b.jpg"}])
    with pytest.raises(TipcapError, match=r"line 2 .*'caption'") as info:
        read_captions(path)
    assert str(path) in str(info.value)


def test_text_corpus_ids_none_and_blank_lines_are_empty(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("A dog.\n\nTwo   cats\tsleeping\n   \nWhat is this?\n", encoding="utf-8")
    corpus = read_captions(path)
    assert corpus.format == "text"
    assert _pairs(corpus) == [(None, "A dog."), (None, "Two cats sleeping."), (None, "What is this?")]
    assert corpus.empty_skipped == 2


def test_text_corpus_gzip(tmp_path):
    path = tmp_path / "captions.txt.gz"
    path.write_bytes(gzip.compress(b"first line\nsecond line.\n"))
    assert [c.text for c in read_captions(path, period="strip").captions] == ["first line", "second line"]


# --- Normalisation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "period", "expected"),
    [
        ("  a   dog \t on\n a mat  ", "keep", "a dog on a mat"),
        ("a dog", "add", "a dog."),
        ("a dog.", "add", "a dog."),
        ("a dog...", "add", "a dog."),
        ("a dog . . ", "add", "a dog."),
        ("is it a dog?", "add", "is it a dog?"),
        ("what a dog!", "add", "what a dog!"),
        ("is it a dog?.", "add", "is it a dog?"),
        ("a dog.", "strip", "a dog"),
        ("a dog ..  ", "strip", "a dog"),
        ("a dog", "strip", "a dog"),
        ("is it a dog?", "strip", "is it a dog?"),
        ("a dog.", "keep", "a dog."),
        ("a dog", "keep", "a dog"),
        ("a dog...", "keep", "a dog..."),
        ("Mr. Smith's dog", "add", "Mr. Smith's dog."),
        ("", "add", ""),
        ("   \t\n ", "keep", ""),
        ("...", "add", ""),
        ("...", "strip", ""),
    ],
)
def test_normalize_caption(raw, period, expected):
    assert normalize_caption(raw, period) == expected


def test_normalize_caption_default_is_add():
    assert normalize_caption("a  dog") == "a dog."


def test_period_policy_applies_to_corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one.\ntwo\nthree?\n")
    assert [c.text for c in read_captions(path, period="add").captions] == ["one.", "two.", "three?"]
    assert [c.text for c in read_captions(path, period="strip").captions] == ["one", "two", "three?"]
    assert [c.text for c in read_captions(path, period="keep").captions] == ["one.", "two", "three?"]


# --- Errors -----------------------------------------------------------------------------------------------


def test_truncated_karpathy_json_names_file_line_and_column(coco_slice, tmp_path):
    text = coco_slice.read_text(encoding="utf-8")
    cut = text[: len(text) // 2]
    path = tmp_path / "cut.json"
    path.write_text(cut, encoding="utf-8")
    with pytest.raises(TipcapError) as info:
        read_captions(path, split="val")
    message = str(info.value)
    assert str(path) in message
    match = re.search(r"line (\d+), column (\d+)", message)
    assert match, message
    # JSON strings hold no raw newlines, so the error lies on the last line of the cut file.
    assert int(match.group(1)) == cut.count("\n") + 1


def test_truncated_gzip_json_is_a_tipcap_error(coco_slice, tmp_path):
    packed = gzip.compress(coco_slice.read_bytes())
    path = tmp_path / "cut.json.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(TipcapError) as info:
        read_captions(path)
    assert str(path) in str(info.value)


def test_karpathy_entry_missing_sentences_names_field_and_entry(coco_slice, tmp_path):
    document = json.loads(coco_slice.read_text(encoding="utf-8"))
    filename = document["images"][3]["filename"]
    del document["images"][3]["sentences"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(document))
    with pytest.raises(TipcapError) as info:
        read_captions(path)
    message = str(info.value)
    assert str(path) in message
    assert "'sentences'" in message
    assert "images[3]" in message
    assert filename in message


def test_karpathy_sentence_missing_raw_names_entry(coco_slice, tmp_path):
    document = json.loads(coco_slice.read_text(encoding="utf-8"))
    del document["images"][14]["sentences"][2]["raw"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(document))
    with pytest.raises(TipcapError) as info:
        read_captions(path, split="train")
    message = str(info.value)
    assert str(path) in message
    assert "images[14]" in message and "sentences[2]" in message and "'raw'" in message


def test_jsonl_line_that_is_not_json_names_line_number(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"image": "a.jpg", "caption": "ok"}\n'
        "\n"
        '{"image": "b.jpg", "caption": "ok"}\n'
        '{"image": "c.jpg", "caption": \n'
    )
    with pytest.raises(TipcapError) as info:
        read_captions(path)
    message = str(info.value)
    assert str(path) in message
    assert re.search(r"\bline 4\b", message), message


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("map.json", json.dumps({"a.jpg": ["a caption"]})),
        ("pairs.jsonl", json.dumps({"image": "a.jpg", "caption": "a caption"}) + "\n"),
        ("plain.txt", "a caption\n"),
    ],
)
def test_split_for_non_karpathy_corpus_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    read_captions(path)  # fine without a split
    with pytest.raises(TipcapError) as info:
        read_captions(path, split="val")
    assert str(path) in str(info.value)
    assert "split" in str(info.value)


@pytest.mark.parametrize("name", ["captions.csv", "captions", "captions.tsv.gz"])
def test_unknown_suffix_is_an_error(tmp_path, name):
    path = tmp_path / name
    path.write_text("a caption\n")
    with pytest.raises(TipcapError) as info:
        read_captions(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["missing.json", "missing.json.gz", "missing.jsonl", "missing.txt"])
def test_missing_file_is_an_error(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(TipcapError) as info:
        read_captions(path)
    assert str(path) in str(info.value)


def test_json_that_is_neither_karpathy_nor_map_is_an_error(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps(["a caption", "another"]))
    with pytest.raises(TipcapError) as info:
        read_captions(path)
    assert str(path) in str(info.value)


# --- Empty captions -----------------------------------------------------------------------------------


def _karpathy_with_empties(tmp_path: Path) -> Path:
    path = tmp_path / "empties.json"
    path.write_text(
        json.dumps(
            {
                "images": [
                    {
                        "filename": "COCO_val2014_000000000042.jpg",
                        "cocoid": 42,
                        "split": "val",
                        "sentences": [{"raw": "A dog."}, {"raw": "   "}, {"raw": "A cat"}],
                    },
                    {
                        "filename": "COCO_val2014_000000000043.jpg",
                        "cocoid": 43,
                        "split": "val",
                        "sentences": [{"raw": ""}, {"raw": "A bird."}],
                    },
                ]
            }
        )
    )
    return path


def test_empty_captions_skipped_and_counted(tmp_path):
    corpus = read_captions(_karpathy_with_empties(tmp_path))
    assert _pairs(corpus) == [(42, "A dog."), (42, "A cat."), (43, "A bird.")]
    assert corpus.empty_skipped == 2


def test_empty_captions_strict_names_entry(tmp_path):
    path = _karpathy_with_empties(tmp_path)
    with pytest.raises(TipcapError) as info:
        read_captions(path, strict=True)
    message = str(info.value)
    assert str(path) in message
    assert "image 42" in message and "caption 1" in message


def test_strict_without_empties_reads_everything(coco_slice):
    assert len(read_captions(coco_slice, strict=True)) == 120


def test_period_only_caption_is_empty_unless_kept(tmp_path):
    path = tmp_path / "dots.txt"
    path.write_text("a dog\n...\n")
    added = read_captions(path, period="add")
    assert [c.text for c in added.captions] == ["a dog."] and added.empty_skipped == 1
    kept = read_captions(path, period="keep")
    assert [c.text for c in kept.captions] == ["a dog", "..."] and kept.empty_skipped == 0


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("pairs.jsonl", '{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", "caption": " "}\n', "line 2"),
        ("plain.txt", "first\nsecond\n\nfourth\n", "line 3"),
        ("map.json", json.dumps({"a.jpg": ["x"], "b.jpg": ["y", ""]}), "'b.jpg'"),
    ],
)
def test_strict_empty_caption_names_entry_in_every_format(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_text(content)
    assert read_captions(path).empty_skipped == 1
    with pytest.raises(TipcapError) as info:
        read_captions(path, strict=True)
    assert str(path) in str(info.value)
    assert where in str(info.value)


def test_corpus_of_only_empty_captions_is_an_error(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n\n")
    with pytest.raises(TipcapError) as info:
        read_captions(path)
    assert str(path) in str(info.value)


# --- Images ---------------------------------------------------------------------------------------------


def test_list_images_folder_fixture(image_folder):
    refs = list_images(image_folder)
    ids = [r.image_id for r in refs]
    assert ids == ["broken_000.jpg"] + [f"img_{i:03d}.jpg" for i in range(6)]
    assert all(r.path == image_folder / r.image_id for r in refs)


def test_list_images_recursive_relative_posix_ids_sorted(tmp_path):
    root = tmp_path / "photos"
    write_images(root / "b", 2)
    write_images(root / "a" / "deep", 1)
    write_images(root, 1)
    Image.new("L", (8, 8)).save(root / "b" / "GREY.PNG")
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "folder.jpg").mkdir()  # a directory with an image suffix is not an image
    refs = list_images(root)
    ids = [r.image_id for r in refs]
    assert ids == ["a/deep/img_000.jpg", "b/GREY.PNG", "b/img_000.jpg", "b/img_001.jpg", "img_000.jpg"]
    assert ids == sorted(ids)
    for ref in refs:
        assert isinstance(ref.image_id, str)
        assert ref.path == root / Path(*ref.image_id.split("/"))
        assert ref.path.is_file()


def test_list_images_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(TipcapError) as info:
        list_images(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)


def test_list_images_folder_with_split_is_an_error(image_folder):
    with pytest.raises(TipcapError, match="split"):
        list_images(image_folder, split="val")


def test_list_images_karpathy_val_paths_and_ids(coco_slice, tmp_path):
    root = tmp_path / "coco"
    refs = list_images(coco_slice, image_root=root, split="val")
    val = [e for e in _slice_entries(coco_slice) if e["split"] == "val"]
    assert len(refs) == 12
    assert [r.image_id for r in refs] == [e["cocoid"] for e in val]
    assert [r.path for r in refs] == [root / e["filepath"] / e["filename"] for e in val]
    assert refs[0].path == root / "val2014" / "COCO_val2014_000000184613.jpg"
    assert refs[0].image_id == 184613


def test_list_images_karpathy_train_and_default_root(coco_slice):
    refs = list_images(coco_slice, split="train")
    assert [r.image_id for r in refs] == [
        e["cocoid"] for e in _slice_entries(coco_slice) if e["split"] == "restval"
    ]
    assert all(r.path.parent == coco_slice.parent / "val2014" for r in refs)
    assert len(list_images(coco_slice)) == 24


def test_list_images_ids_match_caption_ids(coco_slice):
    image_ids = [r.image_id for r in list_images(coco_slice, split="val")]
    caption_ids = list(dict.fromkeys(c.image_id for c in read_captions(coco_slice, split="val").captions))
    assert image_ids == caption_ids


def test_list_images_from_json_map_and_jsonl(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"x/1.jpg": ["a"], "y/2.jpg": ["b", "c"]}))
    refs = list_images(tmp_path / "map.json", image_root=tmp_path / "imgs")
    assert [(r.image_id, r.path) for r in refs] == [
        ("x/1.jpg", tmp_path / "imgs" / "x/1.jpg"),
        ("y/2.jpg", tmp_path / "imgs" / "y/2.jpg"),
    ]
    _write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"image": "b.jpg", "caption": "1"},
            {"image": "a.jpg", "caption": "2"},
            {"image": "b.jpg", "caption": "3"},
        ],
    )
    refs = list_images(tmp_path / "pairs.jsonl")
    assert [(r.image_id, r.path) for r in refs] == [
        ("b.jpg", tmp_path / "b.jpg"),
        ("a.jpg", tmp_path / "a.jpg"),
    ]
    with pytest.raises(TipcapError):
        list_images(tmp_path / "pairs.jsonl", split="val")


def test_list_images_from_text_corpus_is_an_error(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a caption\n")
    with pytest.raises(TipcapError) as info:
        list_images(path)
    assert str(path) in str(info.value)


def test_load_image_valid_returns_rgb(image_folder):
    image = load_image(image_folder / "img_003.jpg")
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == (40, 30)


def test_load_image_converts_other_modes_to_rgb(tmp_path):
    for mode, name in (("L", "grey.png"), ("RGBA", "alpha.png"), ("P", "palette.gif")):
        Image.new(mode, (5, 7)).save(tmp_path / name)
        image = load_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (5, 7)


def test_load_image_truncated_jpeg_raises_image_error(image_folder):
    path = image_folder / "broken_000.jpg"
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert isinstance(info.value, TipcapError)
    assert str(path) in str(info.value)


def test_load_image_missing_file_raises_image_error(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_load_image_not_an_image_raises_image_error(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_text("this is text, not a JPEG")
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_load_image_reads_only_the_listed_formats(tmp_path):
    path = tmp_path / "disguised.png"
    Image.new("RGB", (5, 7)).save(path, format="PPM")  # Pillow reads PPM, by its bytes, whatever the name
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: not a PNG, JPEG, GIF, BMP, TIFF or WebP image"
    for format in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        Image.new("RGB", (5, 7)).save(path, format=format)
        assert load_image(path).size == (5, 7)


def test_image_error_is_a_tipcap_error():
    assert issubclass(ImageError, TipcapError)


# --- Subsampling ----------------------------------------------------------------------------------------


@pytest.fixture
def forty_refs(tmp_path):
    write_images(tmp_path / "many", 40)
    refs = list_images(tmp_path / "many")
    assert len(refs) == 40
    return refs


def test_subsample_percent_keeps_half_in_order(forty_refs):
    kept = subsample(forty_refs, "50%", seed=0)
    assert len(kept) == 20
    positions = [forty_refs.index(r) for r in kept]
    assert positions == sorted(positions)
    assert len(set(positions)) == 20


def test_subsample_is_seeded(forty_refs):
    first = subsample(forty_refs, "50%", seed=0)
    again = subsample(forty_refs, "50%", seed=0)
    other = subsample(forty_refs, "50%", seed=1)
    assert first == again
    assert other != first
    assert len(other) == 20


def test_subsample_count(forty_refs):
    kept = subsample(forty_refs, "3", seed=0)
    assert len(kept) == 3
    assert all(r in forty_refs for r in kept)
    positions = [forty_refs.index(r) for r in kept]
    assert positions == sorted(positions)


@pytest.mark.parametrize("limit", [None, "40", "500", "100%"])
def test_subsample_no_op_limits_keep_everything(forty_refs, limit):
    assert subsample(forty_refs, limit, seed=0) == forty_refs


@pytest.mark.parametrize("limit", ["abc", "abc%", "", "%", "1.5", "0", "0%", "-3"])
def test_subsample_bad_limit_is_an_error(forty_refs, limit):
    with pytest.raises(TipcapError):
        subsample(forty_refs, limit, seed=0)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("latin1.txt", b"caf\xe9\n"),
        ("broken.txt.gz", gzip.compress(b"a dog.\n")[:12]),
        ("plain.jsonl.gz", b'{"image": "a.jpg", "caption": "a dog."}\n'),
    ],
)
def test_undecodable_files_are_tipcap_errors(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TipcapError, match="cannot be read as UTF-8 text") as raised:
        read_captions(path)
    assert str(path) in str(raised.value)


def test_byte_order_mark_and_upper_case_gz(tmp_path):
    path = tmp_path / "captions.txt.GZ"
    path.write_bytes(gzip.compress("\ufeffA dog.\n".encode()))
    assert [c.text for c in read_captions(path).captions] == ["A dog."]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("pairs.jsonl", '{"image": "a.jpg", "caption": null}\n', "'caption' is not a string"),
        ("k.json", '{"images": [{"filename": "a.jpg", "sentences": [{"raw": null}]}]}', "'raw' string field"),
        ("k.json", '{"images": [{"filename": "a.jpg", "cocoid": "x", "sentences": []}]}', "'cocoid' is not"),
        ("k.json", '{"images": [{"filename": 5, "sentences": []}]}', "'filename' string field"),
    ],
)
def test_mistyped_fields_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TipcapError, match=message):
        read_captions(path)


def test_infinite_percentage_limit_is_refused():
    images = [ImageRef(i, Path(f"{i}.jpg")) for i in range(4)]
    with pytest.raises(TipcapError, match="--limit"):
        subsample(images, "inf%")
