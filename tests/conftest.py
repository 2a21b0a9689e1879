"""Shared fixtures: tiny CLIP configs, a slice of real COCO captions, small image folders.

Everything is offline: ``HF_HUB_OFFLINE`` is set before any Hugging Face client is imported, so a test
that reaches for the hub fails at once instead of retrying for minutes.
"""

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tipcap.cli import main
from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.config import load_config
from tipcap.data import load_image
from tipcap.toy.world1 import object_mentions
from tipcap.toy.world2_claims import claim_f1
from tipcap.toy.world2_grammar import perturb
from tipcap.training.loop import train

DATA = Path(__file__).parent / "data"
TINY_CONFIG = Path(__file__).parent.parent / "experiments" / "tiny.yaml"
COCO_SLICE = DATA / "coco_karpathy_slice.json"


TINY_GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 64, "n_positions": 64}
"""A one-layer GPT-2 for decoders that tests train in seconds."""


def tiny_clip_config(text_width: int = 32, text_layers: int = 2, embed_dim: int = 32) -> dict:
    """An open_clip model config small enough to build in a fraction of a second."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": text_width,
            "heads": 2,
            "layers": text_layers,
        },
    }


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """Path of a tiny open_clip model-config JSON."""
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.json"
    path.write_text(json.dumps(tiny_clip_config()))
    return path


@pytest.fixture(scope="session")
def other_clip(tmp_path_factory) -> Path:
    """A second tiny config with a different text tower."""
    path = tmp_path_factory.mktemp("clip") / "other-clip.json"
    path.write_text(json.dumps(tiny_clip_config(text_width=48, text_layers=1)))
    return path


@pytest.fixture
def coco_slice() -> Path:
    """24 real COCO images' captions in Karpathy's schema (12 val, 12 restval)."""
    return COCO_SLICE


def write_images(folder: Path, count: int, corrupt: int = 0) -> list[Path]:
    """Write ``count`` small valid JPEGs and ``corrupt`` truncated ones; return all paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:03d}.jpg"
        Image.new("RGB", (40, 30), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(path)
        paths.append(path)
    for i in range(corrupt):
        path = folder / f"broken_{i:03d}.jpg"
        good = paths[0].read_bytes()
        path.write_bytes(good[: len(good) // 3])
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def coco_images(tmp_path_factory) -> Path:
    """Small generated images named like the slice's COCO files (an image root for the slice)."""
    root = tmp_path_factory.mktemp("coco")
    for number, image in enumerate(json.loads(COCO_SLICE.read_text())["images"]):
        path = root / image["filepath"] / image["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), ((41 * number) % 256, (83 * number) % 256, 120)).save(path)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A folder of six valid JPEGs and one truncated JPEG."""
    write_images(tmp_path / "images", 6, corrupt=1)
    return tmp_path / "images"


def run(*args):
    """Invoke the command line in-process."""
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="session")
def coco_texts(tmp_path_factory, tiny_clip) -> Path:
    """A caption store of the 120 COCO captions of the test slice, embedded with the tiny CLIP."""
    out = tmp_path_factory.mktemp("train") / "texts"
    result = run("embed", "texts", "--corpus", COCO_SLICE, "--clip", tiny_clip, "--pretrained", "none",
                 "--out", out, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def karpathy_image_id(entry: dict) -> int | str:
    """A Karpathy entry's image id as the protocol keys it: ``cocoid``, else the file name's stem (a number
    when it is one)."""
    stem = Path(entry["filename"]).stem
    return entry.get("cocoid", int(stem) if stem.isdigit() else stem)


def karpathy_references(path: Path, split: str) -> dict:
    """Each image's raw reference captions in a Karpathy file's ``split``, keyed as the protocol keys them."""
    document = json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())
    return {
        karpathy_image_id(entry): [sentence["raw"] for sentence in entry["sentences"]]
        for entry in document["images"]
        if entry["split"] == split
    }


def pycocoevalcap_cider(predictions: list[dict], references: dict) -> float:
    """CIDEr of ``[{"image_id", "caption"}]`` against ``{image_id: [captions]}``, by pycocoevalcap only."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({p["image_id"]: [{"caption": p["caption"]}] for p in predictions})
    gts = tokenizer.tokenize(
        {p["image_id"]: [{"caption": c} for c in references[p["image_id"]]] for p in predictions}
    )
    return float(Cider().compute_score(gts, res)[0])


def grid_row_folder(out: Path, row: dict) -> Path:
    """Where the evaluation behind a row of an ablation's ``results.csv`` wrote its files."""
    seed = f"-seed{row['seed']}" if row["seed"] != "" else ""
    return out / "eval" / f"{row['cell']}{seed}-{row['eval_prompt']}"


def grid_row_cider(out: Path, row: dict, references: dict) -> float:
    """pycocoevalcap's CIDEr of the predictions behind a row of an ablation's ``results.csv``."""
    predictions = json.loads((grid_row_folder(out, row) / "predictions.json").read_text())
    return pycocoevalcap_cider(predictions, references)


def assert_toy_row_recomputed(out: Path, row: dict, karpathy: Path) -> None:
    """A toy-world grid row's object F1, CHAIR, CLIP-S, RefCLIP-S and claim F1s recomputed from its
    evaluation's per_image.json and the scenes of ``karpathy``: per image, object F1 = 2 · right pairs /
    (pairs named + pairs in the scene) over distinct (colour, shape) pairs, CHAIR from each mention of a
    pair (repeats included) absent from the scene, each figure the mean over the images (CHAIR-i over the
    mentions); the claim F1s (world 2 only, else empty) as the mean of each caption's."""
    document = json.loads(karpathy.read_text())
    scenes = {karpathy_image_id(e): e["objects"] for e in document["images"] if e["split"] == "test"}
    per_image = json.loads((grid_row_folder(out, row) / "per_image.json").read_text())
    assert per_image and {p["image_id"] for p in per_image} <= scenes.keys()
    f1, hallucinating, mentions, hallucinated = [], 0, 0, 0
    for p in per_image:
        truth = {(o["colour"], o["shape"]) for o in scenes[p["image_id"]]}
        named = object_mentions(p["prediction"])
        f1.append(2 * len(set(named) & truth) / (len(set(named)) + len(truth)))
        wrong = [pair for pair in named if pair not in truth]
        mentions, hallucinated, hallucinating = (
            len(named) + mentions,
            len(wrong) + hallucinated,
            hallucinating + bool(wrong),
        )
    expected = {
        "object_f1": sum(f1) / len(f1),
        "CHAIR-s": hallucinating / len(per_image),
        "CHAIR-i": hallucinated / mentions if mentions else None,
    }
    for name in ("CLIP-S", "RefCLIP-S"):  # empty where the scorer CLIP was skipped
        scores = [p.get(name) for p in per_image]
        expected[name] = None if None in scores else sum(scores) / len(scores)
    claims = (
        [claim_f1(p["prediction"], scenes[p["image_id"]]) for p in per_image]
        if document.get("world") == 2
        else None
    )
    for aspect in ("colour", "shape", "size", "relation"):
        expected[f"{aspect}_f1"] = sum(c[aspect] for c in claims) / len(claims) if claims else None
    for name, value in expected.items():
        found = None if row[name] == "" else float(row[name])
        assert (found is None) == (value is None), (name, row)
        # CLIP-S and RefCLIP-S are float32 means: to float32's precision.
        tolerance = {"rel": 1e-6} if "CLIP-S" in name else {"abs": 1e-9}
        assert value is None or found == pytest.approx(value, **tolerance), (name, value, row)


def recounted_claim_accuracy(karpathy: Path, clip: ClipSpec) -> float:
    """A world-2 CLIP's claim accuracy counted afresh: how many validation captions its image prefers to the
    caption with one claim made false (drawn in caption order from ``random.Random(0)``), over all of them."""
    encoder = ClipEncoder.load(clip, device="cpu")
    val = [e for e in json.loads(karpathy.read_text())["images"] if e["split"] == "val"]
    pixels = [encoder.preprocess(load_image(karpathy.parent / e["filepath"] / e["filename"])) for e in val]
    captions = [s["raw"] for e in val for s in e["sentences"]]
    owner = [i for i, e in enumerate(val) for _ in e["sentences"]]
    rng = random.Random(0)
    images = encoder.encode_images(torch.stack(pixels))[owner]
    true = encoder.encode_texts(captions).embeddings
    false = encoder.encode_texts([perturb(caption, rng) for caption in captions]).embeddings
    wins = sum(float(i @ t) > float(i @ f) for i, t, f in zip(images, true, false, strict=True))
    return wins / len(captions)


ANIMALS = ["dog", "cat", "horse", "sheep", "cow", "bird", "elephant", "zebra"]
PLACES = ["grass", "beach", "street", "field", "snow", "road"]
LOOKS = ["black", "white", "brown", "small", "large"]


@pytest.fixture(scope="session")
def prompt_model(tmp_path_factory, tiny_clip):
    """A tiny prompt-trained decoder: 200 template captions, a noisy isotropic gap so that prompts matter.

    Returns the data folder, the 40 held-out (look, animal, place) combinations and the model directory.
    """
    root = tmp_path_factory.mktemp("prompts")
    combos = [(look, animal, place) for look in LOOKS for animal in ANIMALS for place in PLACES]
    random.Random(0).shuffle(combos)
    held_out, training = combos[:40], combos[40:]
    for name, rows in (("train", training), ("held_out", held_out)):
        (root / f"{name}.txt").write_text(
            "".join(f"a {look} {animal} on the {place}.\n" for look, animal, place in rows)
        )
        result = run("embed", "texts", "--corpus", root / f"{name}.txt", "--clip", tiny_clip,
                     "--pretrained", "none", "--out", root / name, "--no-progress")  # fmt: skip
        assert result.exit_code == 0, result.output
    result = run("fit-gap", "--setting", "text-only", "--kind", "isotropic", "--sigma2", "0.05",
                 "--texts", root / "train", "--out", root / "gap.safetensors")  # fmt: skip
    assert result.exit_code == 0, result.output
    overrides = [f"data.train_texts={root / 'train'}", f"data.gap={root / 'gap.safetensors'}",
                 "model.prompt=pim", "train.max_steps=800", "train.batch_size=32",
                 "train.lr=1e-3"]  # fmt: skip
    model_dir = train(load_config(TINY_CONFIG, overrides), root / "run", progress=False)
    return root, held_out, model_dir


@pytest.fixture(scope="session")
def plain_model(tmp_path_factory, prompt_model):
    """A tiny decoder trained without prompts (50 steps) on :func:`prompt_model`'s captions and gap."""
    root = prompt_model[0]
    overrides = [f"data.train_texts={root / 'train'}", f"data.gap={root / 'gap.safetensors'}",
                 "train.max_steps=50", "train.batch_size=32"]  # fmt: skip
    return train(
        load_config(TINY_CONFIG, overrides), tmp_path_factory.mktemp("plain") / "run", progress=False
    )


COCO_260 = DATA / "coco_karpathy_260.json.gz"


def write_coco_tree(
    karpathy: Path, root: Path, missing: list[int], corrupt: list[int]
) -> dict[str, list[str]]:
    """Small JPEGs named like the files a Karpathy file lists (``filepath/filename`` under ``root``).

    The entries at positions ``missing`` get no file and those at ``corrupt`` a truncated one. Returns the
    relative paths of both kinds.
    """
    from tipcap.io import load_json

    entries = load_json(karpathy)["images"]
    paths = {"missing": [], "corrupt": []}
    for position, entry in enumerate(entries):
        relative = Path(entry.get("filepath", "")) / entry["filename"]
        if position in missing:
            paths["missing"].append(relative.as_posix())
            continue
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        colour = ((37 * position) % 256, (91 * position) % 256, (53 * position) % 256)
        Image.new("RGB", (40, 30), colour).save(root / relative, quality=85)
        if position in corrupt:
            data = (root / relative).read_bytes()
            (root / relative).write_bytes(data[: len(data) // 3])
            paths["corrupt"].append(relative.as_posix())
    return paths


@pytest.fixture(scope="session")
def coco_tree(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """The 260-image COCO slice as an image tree: 3 images missing (2 train, 1 val), 2 truncated (1 each)."""
    root = tmp_path_factory.mktemp("coco") / "images"
    return root, write_coco_tree(COCO_260, root, missing=[0, 120, 259], corrupt=[1, 258])


@pytest.fixture(scope="session")
def prepared_coco(tmp_path_factory, coco_tree) -> Path:
    """``tipcap prepare coco`` output for :func:`coco_tree`."""
    out = tmp_path_factory.mktemp("prepared") / "coco"
    result = run("prepare", "coco", "--karpathy", COCO_260, "--images", coco_tree[0], "--out", out,
                 "--workers", 0, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, coco_texts) -> Path:
    """A tiny decoder trained for 20 steps on :func:`coco_texts` with a text-only isotropic gap."""
    root = tmp_path_factory.mktemp("tiny-model")
    result = run("fit-gap", "--setting", "text-only", "--kind", "isotropic", "--texts", coco_texts,
                 "--out", root / "gap.safetensors")  # fmt: skip
    assert result.exit_code == 0, result.output
    overrides = [f"data.train_texts={coco_texts}", f"data.gap={root / 'gap.safetensors'}",
                 "train.max_steps=20", "train.checkpoint_every=20"]  # fmt: skip
    return train(load_config(TINY_CONFIG, overrides), root / "run", progress=False)


def write_nocaps(folder: Path, missing: tuple[int, ...] = (), corrupt: tuple[int, ...] = ()) -> Path:
    """A NoCaps validation annotation file in the official schema (nocaps.org/download, with each image's
    ``domain``) over nine small JPEGs, three per domain, with five COCO captions each; returns its path.

    The images at positions ``missing`` get no file and those at ``corrupt`` a truncated one.
    """
    captions = [e["sentences"] for e in json.loads(COCO_SLICE.read_text())["images"]]
    domains = ["in-domain", "near-domain", "out-domain"]
    images, annotations = [], []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for index in range(9):
        open_images_id = f"{0x0013EA2087020901 + 7919 * index:016x}"
        images.append({
            "id": index, "open_images_id": open_images_id, "height": 30, "width": 40,
            "coco_url": f"https://s3.amazonaws.com/nocaps/val/{open_images_id}.jpg",
            "file_name": f"{open_images_id}.jpg", "license": 0, "date_captured": "2018-11-06 11:04:33",
            "domain": domains[index % 3],
        })  # fmt: skip
        for sentence in captions[index]:
            annotations.append({"image_id": index, "id": len(annotations), "caption": sentence["raw"]})
        if index in missing:
            continue
        path = folder / "images" / f"{open_images_id}.jpg"
        Image.new("RGB", (40, 30), ((61 * index) % 256, (29 * index) % 256, (97 * index) % 256)).save(path)
        if index in corrupt:
            path.write_bytes(path.read_bytes()[:200])
    document = {
        "licenses": [],
        "info": {"url": "http://nocaps.org", "date_created": "2018/11/06", "version": "0.1",
                 "description": "nocaps validation dataset", "contributor": "nocaps team", "year": 2018},
        "images": images,
        "annotations": annotations,
    }  # fmt: skip
    path = folder / "nocaps_val_4500_captions.json"
    path.write_text(json.dumps(document))
    return path


QUICK_DEMO = "quick_demo"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests that read the quick demo last, so that the demo (started beside the others by
    :func:`_quick_demo_process`) has had the whole session to finish."""
    items.sort(key=lambda item: QUICK_DEMO in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session", autouse=True)
def _quick_demo_process(request, tmp_path_factory):
    """Start the default demo (world 2, ``--quick``) at the session's first test when a selected test reads
    it, from an empty cache as a user runs it: a fresh interpreter, so that its CPU arithmetic is pinned.

    It runs at the lowest CPU priority beside the other tests: it takes the cores they leave idle and never
    slows them, and pinned arithmetic gives the same bytes however its threads are scheduled. Yields the
    command, its output folder, its cache, the process and the files that hold its stdout and stderr."""
    if not any(QUICK_DEMO in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.mktemp("quick-demo")
    out, cache = root / "demo", root / "cache"
    command = [sys.executable, "-m", "tipcap.cli", "demo", "--quick", "--out", str(out),
               "--cache", str(cache), "--no-progress"]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    stdout, stderr = root / "stdout.txt", root / "stderr.txt"
    with stdout.open("w") as out_file, stderr.open("w") as err_file:
        process = subprocess.Popen(["nice", "-n", "19", *command], env=environment, stdout=out_file,
                                   stderr=err_file)  # fmt: skip
    yield command, out, cache, process, stdout, stderr
    if process.poll() is None:  # the session ended early (-x, a keyboard interrupt)
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def quick_demo(_quick_demo_process) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The default demo's run (see :func:`_quick_demo_process`), waited for. Returns its output folder, its
    cache and the finished process (its output is checked by the tests that use it)."""
    command, out, cache, process, stdout, stderr = _quick_demo_process
    process.wait()
    result = subprocess.CompletedProcess(command, process.returncode, stdout.read_text(), stderr.read_text())
    return out, cache, result
