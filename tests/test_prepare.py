"""`tipcap prepare`: a Karpathy file checked against a generated image tree; files the later steps read."""

import json

import pytest
from conftest import COCO_260, run, write_coco_tree
from PIL import Image

from tipcap.data.prepare import prepare_dataset
from tipcap.errors import TipcapError
from tipcap.evaluation.references import load_references
from tipcap.io import load_json


def test_prepare_coco_reports_problems_and_writes_files(coco_tree, prepared_coco, tiny_clip, tmp_path):
    root, bad = coco_tree
    result = run("prepare", "coco", "--karpathy", COCO_260, "--images", root, "--out", tmp_path / "again",
                 "--workers", 2, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "missing: 3" in result.stdout and "corrupt: 2" in result.stdout
    for path in bad["missing"] + bad["corrupt"]:
        assert path in result.stdout
    assert "Truncated" in result.stdout  # the decoder's reason, not just "corrupt"
    report = json.loads((prepared_coco / "report.json").read_text())
    assert report["splits"]["train"] == {"listed": 200, "captions": 1001, "found": 198, "missing": 2,
                                         "corrupt": 1, "usable": 197}  # fmt: skip
    assert report["splits"]["val"] == {"listed": 60, "captions": 300, "found": 59, "missing": 1,
                                       "corrupt": 1, "usable": 58}  # fmt: skip
    assert report["splits"]["test"]["listed"] == 0
    assert sorted(p["path"] for p in report["problems"]["missing"]) == sorted(bad["missing"])
    assert sorted(p["path"] for p in report["problems"]["corrupt"]) == sorted(bad["corrupt"])
    assert not any(
        report["problems"][kind] for kind in ("misnamed", "duplicate_id", "no_split", "no_captions")
    )
    # Two processes and one give the same report.
    assert json.loads((tmp_path / "again" / "report.json").read_text())["problems"] == report["problems"]

    unusable = {p.split("/")[-1] for p in bad["missing"] + bad["corrupt"]}
    dataset = load_json(prepared_coco / "dataset.json")["images"]
    assert len(dataset) == 255 and not unusable & {e["filename"] for e in dataset}
    corpus = load_json(prepared_coco / "corpus" / "train.json")["images"]
    assert len(corpus) == 200 and {e["split"] for e in corpus} == {"restval"}  # text needs no image
    images = load_json(prepared_coco / "images" / "val.json")["images"]
    assert len(images) == 58 and not unusable & {e["filename"] for e in images}
    assert not (prepared_coco / "corpus" / "test.json").exists()
    assert not (prepared_coco / "references" / "test.json").exists()

    references = load_references(prepared_coco / "references" / "val.json")
    assert len(references) == 60 and sum(len(c) for c in references.values()) == 300
    assert references == load_references(COCO_260, "val")  # the same references, in COCO's format

    # The files feed the later commands as they are.
    texts = run("embed", "texts", "--corpus", prepared_coco / "corpus" / "val.json", "--clip", tiny_clip,
                "--pretrained", "none", "--out", tmp_path / "text-store", "--no-progress")  # fmt: skip
    assert texts.exit_code == 0 and "300 caption embeddings" in texts.stdout, texts.output
    pictures = run("embed", "images", "--images", prepared_coco / "images" / "val.json", "--image-root", root,
                   "--clip", tiny_clip, "--pretrained", "none", "--workers", 0,
                   "--out", tmp_path / "image-store", "--no-progress")  # fmt: skip
    assert pictures.exit_code == 0 and "58 image embeddings" in pictures.stdout, pictures.output
    assert "0 unreadable images skipped" in pictures.stdout
    predictions = [
        {"image_id": image_id, "caption": captions[0]} for image_id, captions in references.items()
    ]
    (tmp_path / "predictions.json").write_text(json.dumps(predictions))
    scored = run("score", "--predictions", tmp_path / "predictions.json", "--references",
                 prepared_coco / "references" / "val.json", "--metrics", "bleu,cider")  # fmt: skip
    assert scored.exit_code == 0 and "CIDEr" in scored.stdout, scored.output


def _entry(filename, split, cocoid=None, filepath=None, captions=("a dog on the grass.",)):
    entry = {"filename": filename, "split": split, "sentences": [{"raw": c} for c in captions]}
    if cocoid is not None:
        entry["cocoid"] = cocoid
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def _picture(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (200, 10, 10)).save(path)


def test_naming_duplicates_and_unlisted_files(tmp_path):
    root = tmp_path / "images"
    entries = [
        _entry("COCO_val2014_000000000001.jpg", "test", 1, "val2014"),
        _entry("COCO_val2014_000000000002.jpg", "val", 3, "val2014"),  # cocoid disagrees with the name
        _entry("COCO_val2014_000000000004.jpg", "train", 4, "train2014"),  # folder disagrees with the name
        _entry("COCO_val2014_000000000001.jpg", "test", 1, "val2014"),  # the same image again
        _entry("COCO_val2014_000000000005.jpg", "extra", 5, "val2014"),  # not a Karpathy split
        _entry("COCO_val2014_000000000006.jpg", "val", 6, "val2014", captions=()),
    ]
    for entry in entries:
        _picture(root / entry["filepath"] / entry["filename"])
    _picture(root / "val2014" / "COCO_val2014_000000000009.jpg")  # on disk, not in the file
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": entries}))
    report = prepare_dataset("coco", tmp_path / "dataset_coco.json", root, tmp_path / "out", workers=0,
                             progress=False)  # fmt: skip
    problems = {kind: [p["image_id"] for p in found] for kind, found in report.problems.items()}
    assert problems == {"missing": [], "corrupt": [], "misnamed": [3, 4], "duplicate_id": [1],
                        "no_split": [5], "no_captions": [6], "outside_root": []}  # fmt: skip
    assert "cocoid 3 differs" in report.problems["misnamed"][0]["reason"]
    assert report.unlisted["count"] == 2  # image 9, and image 5 (whose entry has no usable split)
    assert "val2014/COCO_val2014_000000000009.jpg" in report.unlisted["examples"]
    assert [e["cocoid"] for e in load_json(tmp_path / "out" / "dataset.json")["images"]] == [1, 3, 4]
    assert "no captions: 1" in report.summary() and "unlisted: 2 image files" in report.summary()


def test_flickr30k_layout_and_stale_outputs(tmp_path):
    root = tmp_path / "flickr"
    entries = [_entry(f"{1000 + i}.jpg", split) for i, split in enumerate(["train", "train", "val", "test"])]
    for entry in entries:
        _picture(root / entry["filename"])
    karpathy = tmp_path / "dataset_flickr30k.json"
    karpathy.write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    report = prepare_dataset("flickr30k", karpathy, root, tmp_path / "out", workers=0, progress=False)
    assert [c.usable for c in report.splits.values()] == [2, 1, 1]
    assert not any(report.problems.values()) and report.unlisted == {
        "folders": ["."],
        "count": 0,
        "examples": [],
    }
    references = load_json(tmp_path / "out" / "references" / "test.json")
    assert references["images"] == [{"id": 1003, "file_name": "1003.jpg"}]  # numeric ids, as in results files

    # Rerun without the test split: its files, which would describe other data, go.
    karpathy.write_text(json.dumps({"dataset": "flickr30k", "images": entries[:3]}))
    prepare_dataset("flickr30k", karpathy, root, tmp_path / "out", workers=0, progress=False)
    assert not (tmp_path / "out" / "references" / "test.json").exists()
    assert not (tmp_path / "out" / "images" / "test.json").exists()
    assert (tmp_path / "out" / "references" / "val.json").is_file()


def test_user_mistakes_are_one_line(coco_tree, tmp_path):
    root, _ = coco_tree
    wrong = run("prepare", "flickr30k", "--karpathy", COCO_260, "--images", root, "--out", tmp_path / "o")
    assert wrong.exit_code == 1 and "is the 'coco' split file, not 'flickr30k'" in wrong.stderr
    assert "prepare it with `tipcap prepare coco`" in wrong.stderr and "Traceback" not in wrong.output
    toy = tmp_path / "world" / "toyworld.json"
    toy.parent.mkdir()
    toy.write_text(json.dumps({"dataset": "toyworld", "images": []}))
    world = run("prepare", "coco", "--karpathy", toy, "--images", root, "--out", tmp_path / "o")
    assert world.exit_code == 1 and len(world.stderr.strip().splitlines()) == 1
    assert "a toy world's split file, which needs no prepare step" in world.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = run("prepare", "coco", "--karpathy", COCO_260, "--images", empty, "--out", tmp_path / "o",
                  "--workers", 0, "--no-progress")  # fmt: skip
    assert nothing.exit_code == 1 and f"--images {empty}: none of the 260 images" in nothing.stderr
    assert not (tmp_path / "o" / "report.json").exists()
    with pytest.raises(TipcapError, match="no such folder"):
        prepare_dataset("coco", COCO_260, tmp_path / "absent", tmp_path / "o")


def test_truncated_and_missing_files_are_told_apart(tmp_path):
    karpathy = tmp_path / "k.json"
    karpathy.write_text(json.dumps({"images": [_entry(f"COCO_val2014_00000000000{i}.jpg", "val", i, "val2014")
                                               for i in range(1, 4)]}))  # fmt: skip
    paths = write_coco_tree(karpathy, tmp_path / "images", missing=[0], corrupt=[2])
    report = prepare_dataset(
        "coco", karpathy, tmp_path / "images", tmp_path / "out", workers=0, progress=False
    )
    assert [p["path"] for p in report.problems["missing"]] == paths["missing"]
    assert [p["path"] for p in report.problems["corrupt"]] == paths["corrupt"]
    assert vars(report.splits["val"]) == {"listed": 3, "captions": 3, "found": 2, "missing": 1, "corrupt": 1,
                                          "usable": 1}  # fmt: skip
