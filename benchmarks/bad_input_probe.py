"""Probe the command line with bad inputs and faults, each probe its own ``tipcap`` process.

Builds small valid fixtures in a temporary folder (a tiny random CLIP, the COCO test slice with small JPEGs,
caption and image stores, a gap file, a 20-step model, a tiny toy world), then runs every command against
missing, empty, truncated, wrong-schema, non-UTF-8, NaN/Inf, zero and negative inputs, damaged stores, gap
files and model folders, escaping image paths and two writers into one store. With ``--ro DIR`` (a read-only
mount) and ``--full DIR`` (a small, full mount) it also writes onto them; without, those probes are skipped.

Each probe is classed:

- ``clean``: a bad input refused with a non-zero exit, no traceback, and exactly one ``Error:`` line, last
  on stderr; or a probe whose input deserves success (a warning and a skip) that exits 0 and passes its
  check of the result;
- ``traceback``: a Python traceback;
- ``hang``: still running at the timeout;
- ``silent``: exit 0 for a bad input, or an expected success whose check fails;
- ``messy``: a non-zero exit without exactly one final ``Error:`` line (neither clean nor a traceback).

Usage (as root for the mounts)::

    mount -t tmpfs -o ro,size=1m tmpfs /mnt/ro-probe
    mount -t tmpfs -o size=64k tmpfs /mnt/full-probe
    python benchmarks/bad_input_probe.py --ro /mnt/ro-probe --full /mnt/full-probe --report probe.json

Prints the counts per class and each non-clean probe with its last stderr line; writes a JSON report.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tipcap.config import GAP_KINDS, SETTINGS, check_gap_kind
from tipcap.errors import TipcapError

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "experiments" / "tiny.yaml"
COCO_SLICE = ROOT / "tests" / "data" / "coco_karpathy_slice.json"

Check = Callable[[int, str, str], "str | None"]
"""A check of an expected success: (exit code, stdout, stderr) → None, or what is wrong."""


@dataclass
class Probe:
    """One process to run: its arguments, and whether its input is bad (``expect='error'``) or fine."""

    name: str
    args: list[str]
    expect: str = "error"
    check: Check | None = None
    timeout: float | None = None
    runner: Callable[[Probe, dict], dict] | None = None  # a probe that runs its own processes


@dataclass
class Outcome:
    name: str
    outcome: str
    exit_code: int | None
    seconds: float
    last_line: str
    detail: str = ""
    args: list[str] = field(default_factory=list)


def tiny_clip_config(
    image_size: int = 32, patch_size: int = 8, text_width: int = 32, embed_dim: int = 32
) -> dict:
    """An open_clip model config small enough to build in a fraction of a second."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": 1,
            "width": 32,
            "patch_size": patch_size,
            "head_width": 16,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": 2, "layers": 2},
    }


# --- running ----------------------------------------------------------------------------------------------


class Runner:
    """Runs ``python -m tipcap.cli`` niced and offline in the work folder; kills its process group at a
    timeout."""

    def __init__(self, work: Path, timeout: float):
        self.work = work
        self.timeout = timeout
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "XDG_CACHE_HOME": str(work / "xdg-cache"),
            "PYTHONWARNINGS": "ignore",
        }

    def popen(self, args: list[str]) -> subprocess.Popen:
        command = ["nice", "-n", "10", sys.executable, "-m", "tipcap.cli", *args]
        return subprocess.Popen(
            command,
            cwd=self.work,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )

    def wait(self, process: subprocess.Popen, timeout: float) -> tuple[int | None, str, str]:
        """(exit code or None at the timeout, stdout, stderr)."""
        try:
            out, err = process.communicate(timeout=timeout)
            return process.returncode, out, err
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            return None, out, err

    def run(self, args: list[str], timeout: float | None = None) -> tuple[int | None, str, str]:
        return self.wait(self.popen(args), timeout or self.timeout)

    def must(self, args: list[str]) -> str:
        """Run a fixture-building command that must succeed; return its stdout."""
        code, out, err = self.run(args, timeout=1800)
        if code != 0:
            sys.exit(f"fixture command failed ({code}): tipcap {' '.join(args)}\n{out}\n{err}")
        return out


def classify(probe: Probe, code: int | None, out: str, err: str) -> tuple[str, str]:
    """The probe's class and, for a failed check, what failed."""
    if code is None:
        return "hang", ""
    if "Traceback" in out or "Traceback" in err:
        return "traceback", ""
    if code == 0:
        if probe.expect == "error":
            return "silent", "exit 0 for a bad input"
        problem = probe.check(code, out, err) if probe.check else None
        return ("silent", problem) if problem else ("clean", "")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    if lines and lines[-1].startswith("Error:") and len(errors) == 1 and code > 0:
        if probe.expect == "ok":
            return "messy", "refused an input that should succeed"
        return "clean", ""
    return "messy", f"exit {code}"


def last_line(out: str, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()] or out.strip().splitlines() or [""]
    return lines[-1][:300]


def execute(probe: Probe, runner: Runner, context: dict) -> Outcome:
    start = time.monotonic()
    if probe.runner is not None:
        result = probe.runner(probe, context)
        return Outcome(
            probe.name,
            result["outcome"],
            result.get("code"),
            time.monotonic() - start,
            result.get("last_line", ""),
            result.get("detail", ""),
            probe.args,
        )
    code, out, err = runner.run(probe.args, probe.timeout)
    outcome, detail = classify(probe, code, out, err)
    return Outcome(
        probe.name, outcome, code, time.monotonic() - start, last_line(out, err), detail, probe.args
    )


# --- damaging files ---------------------------------------------------------------------------------------


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def copy(source: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def shard_of(store: Path) -> Path:
    return sorted(store.glob("embeddings*.safetensors"))[0]


def poison_row(store: Path, row: int, value: float = math.nan) -> None:
    """Overwrite one row of a store's first shard in place, at the same size (as a fault on disk would)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shard = shard_of(store)
    with safe_open(shard, framework="pt") as f:
        metadata, embeddings = f.metadata(), f.get_tensor("embeddings")
    embeddings[row] = value
    save_file({"embeddings": embeddings}, shard, metadata=metadata)


def rewrite_safetensors(path: Path, change: Callable[[dict], dict]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        names = f.keys()
        tensors = {name: f.get_tensor(name) for name in names}
    save_file(change(tensors), path, metadata=metadata)


def set_first(tensors: dict, name: str, value: float) -> dict:
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    return tensors


def write_images(folder: Path, count: int, size: tuple[int, int] = (40, 30), seed: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:04d}.jpg"
        Image.new("RGB", size, ((37 * i + seed) % 256, (91 * i) % 256, (53 * i) % 256)).save(path)
        paths.append(path)
    return paths


# --- fixtures ---------------------------------------------------------------------------------------------


def build_fixtures(runner: Runner) -> dict:
    """The valid inputs every probe damages a copy of."""
    w = runner.work
    f: dict = {"w": w}
    f["clip"] = w / "clip.json"
    f["clip"].write_text(json.dumps(tiny_clip_config()))
    f["clip64"] = w / "clip64.json"
    f["clip64"].write_text(json.dumps(tiny_clip_config(embed_dim=64)))
    f["slice"] = COCO_SLICE
    f["coco"] = w / "coco"
    from PIL import Image

    document = json.loads(COCO_SLICE.read_text())
    for number, image in enumerate(document["images"]):
        path = f["coco"] / image["filepath"] / image["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), ((53 * number) % 256, (97 * number) % 256, 31)).save(path)
    f["pics"] = w / "pics"
    write_images(f["pics"], 4)
    clip = ["--clip", str(f["clip"]), "--pretrained", "none", "--no-progress"]
    f["texts"], f["images"], f["texts64"] = w / "texts", w / "images", w / "texts64"
    runner.must(["embed", "texts", "--corpus", str(COCO_SLICE), "--out", str(f["texts"]), *clip])
    runner.must(
        [
            "embed",
            "images",
            "--images",
            str(COCO_SLICE),
            "--image-root",
            str(f["coco"]),
            "--workers",
            "0",
            "--out",
            str(f["images"]),
            *clip,
        ]
    )
    runner.must(
        [
            "embed",
            "texts",
            "--corpus",
            str(COCO_SLICE),
            "--out",
            str(f["texts64"]),
            "--clip",
            str(f["clip64"]),
            "--pretrained",
            "none",
            "--no-progress",
        ]
    )
    f["gap"], f["gap64"] = w / "gap.safetensors", w / "gap64.safetensors"
    runner.must(
        [
            "fit-gap",
            "--setting",
            "few-pairs",
            "--texts",
            str(f["texts"]),
            "--images",
            str(f["images"]),
            "--out",
            str(f["gap"]),
        ]
    )
    runner.must(["fit-gap", "--setting", "text-only", "--kind", "isotropic", "--texts", str(f["texts64"]),
                 "--out", str(f["gap64"])])  # fmt: skip
    f["model"] = train_model(runner, w / "run", [])
    f["model2"] = train_model(runner, w / "run2", ["model.prefix_length=2", "train.max_steps=2"])
    f["world"] = w / "world"
    runner.must(
        [
            "toyworld",
            "--out",
            str(f["world"]),
            "--train",
            "20",
            "--val",
            "3",
            "--test",
            "3",
            "--image-size",
            "16",
        ]
    )
    f["world_images"] = w / "world-images"
    runner.must(
        [
            "embed",
            "images",
            "--images",
            str(f["world"] / "toyworld.json"),
            "--image-root",
            str(f["world"]),
            "--out",
            str(f["world_images"]),
            *clip,
            "--workers",
            "0",
        ]
    )
    f["preds"] = w / "predictions.json"
    val = [image for image in document["images"] if image["split"] == "val"]
    f["preds"].write_text(
        json.dumps([{"image_id": i["cocoid"], "caption": "a dog on the grass."} for i in val])
    )
    f["grid"] = w / "grid.yaml"
    f["grid"].write_text(json.dumps(grid_config(f)))
    return f


TRAIN_SETS = ["train.max_steps=20", "train.checkpoint_every=10", "train.log_every=10", "train.warmup_steps=2"]
"""The fixture model's training settings (besides its data)."""


def train_model(runner: Runner, out: Path, extra: list[str]) -> Path:
    f_texts, f_gap = runner.work / "texts", runner.work / "gap.safetensors"
    sets = [f"data.train_texts={f_texts}", f"data.gap={f_gap}", *TRAIN_SETS, *extra]
    text = runner.must(
        [
            "train",
            "--config",
            str(TINY_YAML),
            *[a for s in sets for a in ("--set", s)],
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    return Path(text.strip().splitlines()[-1].split()[1])


def grid_config(f: dict) -> dict:
    world = f["world"]
    decoder = {
        "model": {
            "clip_dim": 32,
            "language_model_config": {
                "model_type": "gpt2",
                "n_layer": 1,
                "n_head": 2,
                "n_embd": 32,
                "n_positions": 64,
            },
            "tokenizer": "word-level",
            "prefix_length": 2,
            "pim_heads": 2,
            "pim_layers": 1,
        },
        "train": {
            "max_steps": 4,
            "batch_size": 8,
            "lr": 3e-3,
            "warmup_steps": 1,
            "log_every": 2,
            "checkpoint_every": 4,
        },
    }
    return {
        "few_pairs": 5,
        "seeds": [0],
        "decoder": decoder,
        "eval": {"beams": 1, "metrics": ["bleu", "cider"]},
        "cells": [
            {"name": "none", "kind": "none"},
            {"name": "gaussian", "kind": "gaussian", "setting": "few-pairs"},
        ],
        "karpathy": str(world / "toyworld.json"),
        "web_pairs": str(world / "web_pairs.jsonl"),
        "vocabulary": str(world / "entities.json"),
        "embed": {"model": str(f["clip"]), "pretrained": "none"},
    }


# --- checks of expected successes -------------------------------------------------------------------------


def stdout_has(*needles: str) -> Check:
    def check(code: int, out: str, err: str) -> str | None:
        missing = [n for n in needles if n not in out + err]
        return f"output lacks {missing}" if missing else None

    return check


def file_check(path: Path, test: Callable[[Path], bool], what: str) -> Check:
    def check(code: int, out: str, err: str) -> str | None:
        return None if path.exists() and test(path) else f"{path}: {what}"

    return check


def jsonl_lines(path: Path, count: int) -> Check:
    def test(p: Path) -> bool:
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        return len(rows) == count and all(isinstance(r.get("caption"), str) and r["caption"] for r in rows)

    return file_check(path, test, f"not {count} captioned lines")


# --- the probes -------------------------------------------------------------------------------------------


class Probes:
    """Builds the probe list; ``p(dir)`` is a fresh per-probe folder."""

    def __init__(self, f: dict, ro: Path | None, full: Path | None):
        self.f, self.ro, self.full = f, ro, full
        self.items: list[Probe] = []
        self.base = f["w"] / "p"
        self.base.mkdir(exist_ok=True)

    def p(self, name: str) -> Path:
        path = self.base / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add(self, name: str, args: list, **kw) -> None:
        assert not any(item.name == name for item in self.items), name
        self.items.append(Probe(name, [str(a) for a in args], **kw))

    # bad files of every kind, written into the probe's folder
    def bad_files(self, folder: Path, suffix: str = ".json") -> dict[str, Path]:
        files = {
            "missing": folder / f"missing{suffix}",
            "empty": folder / f"empty{suffix}",
            "truncated": folder / f"truncated{suffix}",
            "not-utf8": folder / f"latin1{suffix}",
            "binary": folder / f"binary{suffix}",
            "a-folder": folder / f"folder{suffix}",
        }
        files["empty"].write_bytes(b"")
        files["truncated"].write_bytes(COCO_SLICE.read_bytes()[:3000])
        files["not-utf8"].write_bytes('{"images": [{"filename": "caf\u00e9.jpg"}]}\n'.encode("latin-1"))
        files["binary"].write_bytes(bytes(range(256)) * 8)
        files["a-folder"].mkdir(exist_ok=True)
        return files

    def ro_full(
        self, name: str, build: Callable[[Path], list], kinds: tuple[str, ...] = ("ro", "full")
    ) -> None:
        """Probes writing into a read-only mount and a full disk (skipped without the mounts)."""
        for kind in kinds:
            mount = self.ro if kind == "ro" else self.full
            if mount is not None:
                self.add(f"{name}/{kind}-disk", build(mount / name.replace("/", "-")))

    def build(self) -> list[Probe]:
        for part in (
            self.prepare,
            self.embed_texts,
            self.embed_images,
            self.fit_gap,
            self.train,
            self.caption,
            self.score,
            self.evaluate,
            self.ablate,
            self.toyworld,
            self.demo,
            self.writers,
        ):
            part()
        return self.items

    # -- prepare --
    def prepare(self) -> None:
        f = self.f
        for dataset in ("coco", "flickr30k"):
            d = self.p(f"prepare-{dataset}")
            base = ["prepare", dataset, "--images", f["coco"], "--workers", 0, "--no-progress"]
            for kind, path in self.bad_files(d).items():
                self.add(f"prepare {dataset}/karpathy {kind}", [*base, "--karpathy", path, "--out", d / kind])
            for kind, doc in {
                "list": [1, 2],
                "images-not-list": {"images": 5},
                "entry-no-filename": {"images": [{"split": "val", "sentences": []}]},
                "entry-not-dict": {"images": ["x.jpg"]},
                "no-images": {"images": []},
                "sentences-not-list": {"images": [{"filename": "a.jpg", "split": "val", "sentences": 3}]},
                "bad-split": {"images": [{"filename": "a.jpg", "split": "nope", "sentences": []}]},
            }.items():
                path = d / f"{kind}.json"
                path.write_text(json.dumps(doc))
                self.add(f"prepare {dataset}/karpathy {kind}", [*base, "--karpathy", path, "--out", d / kind])
            gz = d / "broken.json.gz"
            gz.write_bytes(b"\x1f\x8b\x08\x00garbage")
            self.add(f"prepare {dataset}/karpathy broken-gz", [*base, "--karpathy", gz, "--out", d / "gz"])
        d = self.p("prepare")
        ok = ["prepare", "coco", "--karpathy", COCO_SLICE, "--no-progress", "--workers", 0]
        self.add("prepare/images missing", [*ok, "--images", d / "nope", "--out", d / "o1"])
        (d / "afile").write_text("x")
        self.add("prepare/images is a file", [*ok, "--images", d / "afile", "--out", d / "o2"])
        self.add("prepare/images empty folder", [*ok, "--images", self.p("prepare/empty"), "--out", d / "o3"])
        self.add("prepare/workers -1", [*ok, "--images", f["coco"], "--out", d / "o4", "--workers", -1])
        self.add("prepare/workers abc", [*ok[:-1], "abc", "--images", f["coco"], "--out", d / "o5"])
        self.add("prepare/out is a file", [*ok, "--images", f["coco"], "--out", d / "afile"])
        self.add("prepare/out below a file", [*ok, "--images", f["coco"], "--out", d / "afile" / "x"])
        self.add(
            "prepare/valid slice",
            [*ok, "--images", f["coco"], "--out", d / "good"],
            expect="ok",
            check=file_check(d / "good" / "report.json", Path.is_file, "no report.json"),
        )
        escaping = d / "escaping.json"
        entries = json.loads(COCO_SLICE.read_text())["images"][:3]
        entries[1] = {**entries[1], "filepath": "../../../../../../etc", "filename": "passwd"}
        entries[2] = {**entries[2], "filepath": "/etc", "filename": "hostname"}
        escaping.write_text(json.dumps({"images": entries}))
        self.add(
            "prepare/escaping paths reported",
            [
                "prepare",
                "coco",
                "--karpathy",
                escaping,
                "--images",
                f["coco"],
                "--out",
                d / "esc",
                "--workers",
                0,
                "--no-progress",
            ],
            expect="ok",
            check=stdout_has("outside root: 2"),
        )
        self.ro_full("prepare", lambda out: [*ok, "--images", f["coco"], "--out", out])

    # -- embed texts --
    def embed_texts(self) -> None:
        f = self.f
        d = self.p("embed-texts")
        clip = ["--clip", f["clip"], "--pretrained", "none", "--no-progress"]
        base = ["embed", "texts", *clip]
        good = ["embed", "texts", "--corpus", COCO_SLICE, *clip]
        for kind, path in self.bad_files(d).items():
            self.add(f"embed texts/corpus {kind}", [*base, "--corpus", path, "--out", d / kind])
        corpora = {
            "number.json": "5",
            "list-of-ints.json": "[1, 2, 3]",
            "dict-of-ints.json": '{"a.jpg": 5}',
            "dict-empty-lists.json": '{"a.jpg": []}',
            "karpathy-no-sentences.json": '{"images": [{"filename": "a.jpg", "split": "train"}]}',
            "bad-line.jsonl": '{"image": "a.jpg", "caption": "a dog."}\n{"image": \n',
            "no-caption.jsonl": '{"image": "a.jpg"}\n',
            "caption-number.jsonl": '{"image": "a.jpg", "caption": 5}\n',
            "blank.txt": "\n\n   \n",
            "empty-captions.jsonl": '{"image": "a.jpg", "caption": ""}\n',
            "null.json": "null",
        }
        for name, text in corpora.items():
            (d / name).write_text(text)
            self.add(
                f"embed texts/corpus {name}", [*base, "--corpus", d / name, "--out", d / name.split(".")[0]]
            )
        (d / "latin1.txt").write_bytes("a caf\u00e9 on the street.\n".encode("latin-1"))
        self.add("embed texts/corpus not-utf8 text", [*base, "--corpus", d / "latin1.txt", "--out", d / "l1"])
        self.add("embed texts/split absent from corpus", [*good, "--split", "test", "--out", d / "nosplit"])
        for flag, value in [
            ("--batch-size", 0),
            ("--batch-size", -1),
            ("--batch-size", "abc"),
            ("--shard-size", 0),
            ("--shard-size", -1),
            ("--seed", "abc"),
            ("--split", "bogus"),
            ("--period", "bogus"),
            ("--precision", "fp8"),
            ("--device", "blah"),
            ("--device", "cuda:7"),
        ]:
            self.add(f"embed texts/{flag} {value}", [*good, flag, value, "--out", d / f"o{flag}{value}"])
        # CLIP specs
        (d / "clip-truncated.json").write_text(json.dumps(tiny_clip_config())[:40])
        (d / "clip-wrong.json").write_text(json.dumps({"embed_dim": 32}))
        (d / "clip-list.json").write_text("[1, 2]")
        (d / "clip-zero.json").write_text(json.dumps(tiny_clip_config(embed_dim=0)))
        (d / "weights.bin").write_bytes(b"not weights")
        for name, spec in [
            ("missing", d / "no-clip.json"),
            ("truncated", d / "clip-truncated.json"),
            ("wrong-schema", d / "clip-wrong.json"),
            ("list", d / "clip-list.json"),
            ("embed-dim-0", d / "clip-zero.json"),
            ("unknown-name", "ViT-Nope-99"),
        ]:
            self.add(
                f"embed texts/clip {name}",
                [
                    "embed",
                    "texts",
                    "--corpus",
                    COCO_SLICE,
                    "--clip",
                    spec,
                    "--pretrained",
                    "none",
                    "--no-progress",
                    "--out",
                    d / name,
                ],
            )
        self.add(
            "embed texts/pretrained missing file",
            [
                "embed",
                "texts",
                "--corpus",
                COCO_SLICE,
                "--clip",
                f["clip"],
                "--pretrained",
                d / "nope.bin",
                "--out",
                d / "pm",
                "--no-progress",
            ],
        )
        self.add(
            "embed texts/pretrained garbage file",
            [
                "embed",
                "texts",
                "--corpus",
                COCO_SLICE,
                "--clip",
                f["clip"],
                "--pretrained",
                d / "weights.bin",
                "--out",
                d / "pg",
                "--no-progress",
            ],
        )
        self.add(
            "embed texts/pretrained tag offline",
            [
                "embed",
                "texts",
                "--corpus",
                COCO_SLICE,
                "--clip",
                "ViT-B-32",
                "--pretrained",
                "openai",
                "--out",
                d / "pt",
                "--no-progress",
            ],
        )
        (d / "afile").write_text("x")
        self.add("embed texts/out is a file", [*good, "--out", d / "afile"])
        self.add("embed texts/out below a file", [*good, "--out", d / "afile" / "s"])
        # damaged stores, rebuilt by a rerun (expected success) — and a store of another kind
        for name, damage in [
            ("meta.json", "truncate"),
            ("meta.json", "delete"),
            ("ids.json", "truncate"),
            ("ids.json", "delete"),
            ("captions.json", "truncate"),
            ("captions.json", "delete"),
            ("shard", "truncate"),
            ("shard", "delete"),
            ("shard", "nan"),
        ]:
            store = copy(f["texts"], d / f"damaged-{name}-{damage}")
            damage_store(store, name, damage)
            self.add(
                f"embed texts/rerun over store with {name} {damage}",
                [*good, "--out", store],
                expect="ok",
                check=same_store(store, f["texts"]),
            )
        images_store = copy(f["images"], d / "image-store")
        self.add(
            "embed texts/out is an image store",
            [*good, "--out", images_store],
            expect="ok",
            check=same_store(images_store, f["texts"]),
        )
        self.ro_full("embed texts", lambda out: [*good, "--out", out])

    # -- embed images --
    def embed_images(self) -> None:
        f = self.f
        d = self.p("embed-images")
        clip = ["--clip", f["clip"], "--pretrained", "none", "--no-progress", "--workers", 0]
        base = ["embed", "images", *clip]
        good = [*base, "--images", COCO_SLICE, "--image-root", f["coco"]]
        for kind, path in self.bad_files(d).items():
            if kind != "a-folder":
                self.add(
                    f"embed images/images {kind}",
                    [*base, "--images", path, "--image-root", f["coco"], "--out", d / kind],
                )
        empty = self.p("embed-images/empty")
        self.add("embed images/empty folder", [*base, "--images", empty, "--out", d / "empty-out"])
        corrupt = self.p("embed-images/corrupt")
        for i in range(3):
            (corrupt / f"bad{i}.jpg").write_bytes(b"not a jpeg")
        self.add("embed images/all unreadable", [*base, "--images", corrupt, "--out", d / "corrupt-out"])
        mixed = self.p("embed-images/mixed")
        write_images(mixed, 3)
        (mixed / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
        (mixed / "notes.txt").write_text("not an image")
        self.add(
            "embed images/one unreadable skipped",
            [*base, "--images", mixed, "--out", d / "mixed-out"],
            expect="ok",
            check=stdout_has("1 unreadable"),
        )
        bomb = self.p("embed-images/bomb")
        write_images(bomb, 2)
        from PIL import Image

        Image.new("1", (14000, 14000)).save(bomb / "bomb.png")  # 196 Mpx: over twice PIL's limit
        self.add(
            "embed images/decompression bomb skipped",
            [*base, "--images", bomb, "--out", d / "bomb-out"],
            expect="ok",
            check=stdout_has("1 unreadable"),
        )
        self.add(
            "embed images/image-root missing",
            [*base, "--images", COCO_SLICE, "--image-root", d / "nope", "--out", d / "noroot"],
        )
        self.add(
            "embed images/image-root wrong",
            [*base, "--images", COCO_SLICE, "--image-root", mixed, "--out", d / "wrongroot"],
        )
        for flag, value in [
            ("--limit", 0),
            ("--limit", -1),
            ("--limit", "abc"),
            ("--limit", "0%"),
            ("--limit", "200%"),
            ("--limit", "nan"),
            ("--limit", "1.5"),
            ("--limit", "-5%"),
            ("--batch-size", 0),
            ("--batch-size", -3),
            ("--workers", -1),
            ("--shard-size", 0),
            ("--shard-size", -1),
            ("--split", "bogus"),
            ("--device", "blah"),
        ]:
            self.add(f"embed images/{flag} {value}", [*good, flag, value, "--out", d / f"o{flag}{value}"])
        self.add(
            "embed images/limit above count",
            [*good, "--limit", 1000, "--out", d / "lim"],
            expect="ok",
            check=stdout_has("24"),
        )
        # escaping paths
        root = self.p("embed-images/root")
        write_images(root / "val", 2)
        outside = write_images(self.p("embed-images/outside"), 1)
        listing = d / "escaping.jsonl"
        names = [
            "val/img_0000.jpg",
            "../outside/img_0000.jpg",
            str(outside[0]),
            "../../../../../../etc/passwd",
        ]
        listing.write_text("".join(json.dumps({"image": n, "caption": "a dog."}) + "\n" for n in names))
        self.add(
            "embed images/escaping paths refused",
            [*base, "--images", listing, "--image-root", root, "--out", d / "esc"],
        )
        self.add(
            "embed images/escaping paths allowed",
            [*base, "--images", listing, "--image-root", root, "--allow-outside", "--out", d / "esc-ok"],
            expect="ok",
            check=stdout_has("1 unreadable"),
        )
        kjson = d / "escaping-karpathy.json"
        entries = json.loads(COCO_SLICE.read_text())["images"][:2]
        entries[1] = {**entries[1], "filepath": "/etc", "filename": "hostname"}
        kjson.write_text(json.dumps({"images": entries}))
        self.add(
            "embed images/karpathy absolute path",
            [*base, "--images", kjson, "--image-root", f["coco"], "--out", d / "esc2"],
        )
        # a failed store is not reused
        store = copy(f["images"], d / "damaged-images")
        damage_store(store, "shard", "truncate")
        self.add(
            "embed images/rerun over damaged store",
            [*good, "--out", store],
            expect="ok",
            check=same_store(store, f["images"]),
        )
        (d / "afile").write_text("x")
        self.add("embed images/out is a file", [*good, "--out", d / "afile"])
        self.ro_full("embed images", lambda out: [*good, "--out", out])

    # -- fit-gap --
    def fit_gap(self) -> None:
        f = self.f
        d = self.p("fit-gap")
        t, i = f["texts"], f["images"]
        for setting in SETTINGS:
            for kind in GAP_KINDS:
                out = d / f"{setting}-{kind}.safetensors"
                args = ["fit-gap", "--setting", setting, "--kind", kind, "--texts", t, "--out", out]
                if setting != "text-only":
                    args += ["--images", i]
                try:
                    check_gap_kind(kind, setting, None, "gap")
                except TipcapError:  # a kind the setting cannot fit: refused in one line
                    self.add(f"fit-gap/{setting} {kind} refused", args)
                    continue
                self.add(
                    f"fit-gap/{setting} {kind} valid",
                    args,
                    expect="ok",
                    check=file_check(out, Path.is_file, "no gap file"),
                )
            if setting != "text-only":
                self.add(
                    f"fit-gap/{setting} without --images",
                    ["fit-gap", "--setting", setting, "--texts", t, "--out", d / f"{setting}-noimg.st"],
                )
        # damaged stores as --texts and --images
        for which in ("texts", "images"):
            for name, damage in [
                ("meta.json", "truncate"),
                ("meta.json", "delete"),
                ("meta.json", "wrong-schema"),
                ("ids.json", "truncate"),
                ("ids.json", "delete"),
                ("ids.json", "wrong-length"),
                ("shard", "truncate"),
                ("shard", "delete"),
                ("shard", "nan"),
                ("shard", "inf"),
                ("shard", "zero-row"),
            ]:
                if which == "images" and name == "captions.json":
                    continue
                store = copy(f[which], d / f"{which}-{name}-{damage}")
                damage_store(store, name, damage)
                stores = {"texts": t, "images": i, which: store}
                out = d / f"{which}-{name}-{damage}.safetensors"
                expect = "ok" if damage == "zero-row" else "error"
                self.add(
                    f"fit-gap/--{which} store with {name} {damage}",
                    [
                        "fit-gap",
                        "--setting",
                        "few-pairs",
                        "--texts",
                        stores["texts"],
                        "--images",
                        stores["images"],
                        "--out",
                        out,
                    ],
                    expect=expect,
                    timeout=60,
                )
        for setting in ("web-pairs", "unpaired"):
            store = copy(i, d / f"nan-{setting}")
            damage_store(store, "shard", "nan")
            self.add(
                f"fit-gap/{setting} image store nan row",
                [
                    "fit-gap",
                    "--setting",
                    setting,
                    "--texts",
                    t,
                    "--images",
                    store,
                    "--out",
                    d / f"nan-{setting}.st",
                ],
            )
        store = copy(t, d / "nan-text-only")
        damage_store(store, "shard", "nan")
        for kind in ("none", "memory", "isotropic"):
            self.add(
                f"fit-gap/text-only {kind} nan row",
                [
                    "fit-gap",
                    "--setting",
                    "text-only",
                    "--kind",
                    kind,
                    "--texts",
                    store,
                    "--out",
                    d / f"nan-to-{kind}.st",
                ],
            )
        self.add(
            "fit-gap/texts not a store",
            ["fit-gap", "--setting", "text-only", "--texts", self.p("fit-gap/e"), "--out", d / "e.st"],
        )
        self.add(
            "fit-gap/texts missing",
            ["fit-gap", "--setting", "text-only", "--texts", d / "nope", "--out", d / "m.st"],
        )
        self.add(
            "fit-gap/texts is an image store",
            ["fit-gap", "--setting", "few-pairs", "--texts", i, "--images", i, "--out", d / "ii.st"],
        )
        self.add(
            "fit-gap/images is a caption store",
            ["fit-gap", "--setting", "few-pairs", "--texts", t, "--images", t, "--out", d / "tt.st"],
        )
        self.add(
            "fit-gap/stores of different CLIPs",
            [
                "fit-gap",
                "--setting",
                "few-pairs",
                "--texts",
                f["texts64"],
                "--images",
                i,
                "--out",
                d / "mix.st",
            ],
        )
        self.add(
            "fit-gap/stores without shared ids",
            [
                "fit-gap",
                "--setting",
                "few-pairs",
                "--texts",
                t,
                "--images",
                f["world_images"],
                "--out",
                d / "noid.st",
            ],
        )
        base = ["fit-gap", "--setting", "text-only", "--texts", t]
        # dict.fromkeys: each (flag, value, kind) once.
        for flag, value, kind in dict.fromkeys(
            [
                ("--sigma2", 0, "isotropic"),
                ("--sigma2", -1, "isotropic"),
                ("--sigma2", "nan", "isotropic"),
                ("--sigma2", "inf", "isotropic"),
                ("--sigma2", "nan", "isotropic"),
                ("--sigma2", "-inf", "isotropic"),
                ("--sigma2", "abc", "isotropic"),
                ("--tau", 0, "memory"),
                ("--tau", -1, "memory"),
                ("--tau", "nan", "memory"),
                ("--tau", "inf", "memory"),
                ("--memory-size", 0, "memory"),
                ("--memory-size", -1, "memory"),
                ("--drop-quantile", 1, "isotropic"),
                ("--drop-quantile", -0.1, "isotropic"),
                ("--drop-quantile", "nan", "isotropic"),
                ("--seed", "abc", "isotropic"),
                ("--device", "blah", "isotropic"),
                ("--device", "cuda:7", "isotropic"),
                ("--kind", "bogus", "isotropic"),
            ]
        ):
            self.add(
                f"fit-gap/{kind} {flag} {value}",
                [*base, "--kind", kind, flag, value, "--out", d / f"{kind}{flag}{value}.st"],
            )
        self.add("fit-gap/learnable memory", [*base, "--kind", "memory", "--learnable", "--out", d / "lm.st"])
        self.add("fit-gap/learnable none", [*base, "--kind", "none", "--learnable", "--out", d / "ln.st"])
        self.add(
            "fit-gap/memory-size above count",
            [*base, "--kind", "memory", "--memory-size", 100000, "--out", d / "ms.st"],
            expect="ok",
            check=file_check(d / "ms.st", Path.is_file, "no gap"),
        )
        # --mu-from: bad gap files
        for name, path in self.bad_gaps(self.p("fit-gap/gaps")).items():
            self.add(
                f"fit-gap/mu-from {name}",
                [*base, "--kind", "gaussian", "--mu-from", path, "--out", d / f"mu-{name}.st"],
            )
        self.add(
            "fit-gap/mu-from with few-pairs",
            [
                "fit-gap",
                "--setting",
                "few-pairs",
                "--texts",
                t,
                "--images",
                i,
                "--mu-from",
                f["gap"],
                "--out",
                d / "mf.st",
            ],
        )
        (d / "afile").write_text("x")
        self.add("fit-gap/out is a folder", [*base, "--out", self.p("fit-gap/outdir")])
        self.add("fit-gap/out below a file", [*base, "--out", d / "afile" / "g.st"])
        self.add("fit-gap/plot below a file", [*base, "--out", d / "pl.st", "--plot", d / "afile" / "p.png"])
        self.ro_full("fit-gap", lambda out: [*base, "--out", out / "gap.safetensors"])
        self.ro_full(
            "fit-gap plot", lambda out: [*base, "--out", d / f"{out.name}.st", "--plot", out / "g.png"]
        )

    def bad_gaps(self, d: Path) -> dict[str, Path]:
        f = self.f
        gaps = {"missing": d / "missing.safetensors", "empty": d / "empty.safetensors"}
        gaps["empty"].write_bytes(b"")
        for name in ("truncated", "nan-mu", "inf-L", "wrong-shape", "not-a-gap", "other-dim", "json"):
            gaps[name] = d / f"{name}.safetensors"
        shutil.copy(f["gap"], gaps["truncated"])
        truncate(gaps["truncated"])
        for name, change in [
            ("nan-mu", lambda ts: set_first(ts, "mu", math.nan)),
            ("inf-L", lambda ts: set_first(ts, "scale_tril", math.inf)),
            ("wrong-shape", lambda ts: {**ts, "mu": ts["mu"][:5]}),
        ]:
            shutil.copy(f["gap"], gaps[name])
            rewrite_safetensors(gaps[name], change)
        import torch
        from safetensors.torch import save_file

        save_file({"weights": torch.zeros(3)}, gaps["not-a-gap"])
        shutil.copy(f["gap64"], gaps["other-dim"])
        gaps["json"].write_text('{"mu": [0, 0]}')
        return gaps

    # -- train --
    def train(self) -> None:
        f = self.f
        d = self.p("train")
        data = ["--set", f"data.train_texts={f['texts']}", "--set", f"data.gap={f['gap']}"]
        quick = [
            "--set",
            "train.max_steps=2",
            "--set",
            "train.checkpoint_every=2",
            "--set",
            "train.log_every=1",
            "--set",
            "train.warmup_steps=0",
        ]
        good = ["train", "--config", TINY_YAML, *data, *quick, "--no-progress"]
        for kind, path in self.bad_files(d, ".yaml").items():
            self.add(f"train/config {kind}", ["train", "--config", path, *data, "--out", d / kind])
        configs = {
            "list.yaml": "- 1\n- 2\n",
            "scalar.yaml": "42\n",
            "bad-yaml.yaml": "model: {clip_dim: 32\n",
            "unknown-key.yaml": TINY_YAML.read_text() + "\nbogus: 1\n",
            "unknown-nested.yaml": TINY_YAML.read_text().replace(
                "  prompt: none", "  prompt: none\n  nope: 3"
            ),
            "tab.yaml": "model:\n\tclip_dim: 32\n",
            "section-not-map.yaml": "model: 5\n",
        }
        for name, text in configs.items():
            (d / name).write_text(text)
            self.add(f"train/config {name}", ["train", "--config", d / name, *data, "--out", d / name])
        for value in [
            "train.batch_size=0",
            "train.batch_size=-1",
            "train.accumulate=0",
            "train.log_every=0",
            "train.checkpoint_every=0",
            "train.lr=-1",
            "train.lr=nan",
            "train.lr=inf",
            "train.lr=abc",
            "model.prefix_length=0",
            "model.prefix_length=-1",
            "train.max_steps=0",
            "train.max_steps=-5",
            "train.keep_checkpoints=-1",
            "train.epochs=0",
            "train.epochs=-1",
            "train.warmup_steps=-1",
            "train.weight_decay=nan",
            "train.weight_decay=-1",
            "train.precision=fp8",
            "train.schedule=bogus",
            "train.seed=abc",
            "train.kl_weight=nan",
            "train.kl_weight=-1",
            "model.clip_dim=0",
            "model.clip_dim=64",
            "model.projector=bogus",
            "model.prompt=bogus",
            "model.pim_heads=0",
            "model.max_caption_tokens=0",
            "model.max_caption_tokens=-1",
            "model.tokenizer=/nonexistent/tok",
            "model.language_model_config={model_type: gpt2, n_embd: 0}",
            "model.language_model_config={model_type: bogus}",
            "model.language_model_config=5",
            "bogus=1",
            "train.bogus=1",
            "train=5",
            "noequals",
            "=5",
            "train.lr=",
            "data.train_texts=/nonexistent",
            "data.train_texts=",
            "data.gap=/nonexistent.st",
            "train.grad_clip=-1",
            "train.grad_clip=nan",
        ]:
            key = value.replace("/", "_")
            self.add(f"train/--set {value}", [*good, "--set", value, "--out", d / key])
        self.add(
            "train/unused vocabulary warned about",
            [*good, "--set", "model.vocabulary=/nonexistent.json", "--out", d / "vocab"],
            expect="ok",
            check=stdout_has("model.vocabulary"),
        )
        for name, damage in [
            ("meta.json", "truncate"),
            ("ids.json", "delete"),
            ("captions.json", "truncate"),
            ("captions.json", "delete"),
            ("captions.json", "short"),
            ("captions.json", "not-list"),
            ("shard", "truncate"),
            ("shard", "nan"),
            ("shard", "inf"),
        ]:
            store = copy(f["texts"], d / f"store-{name}-{damage}")
            damage_store(store, name, damage)
            self.add(
                f"train/train_texts store with {name} {damage}",
                [
                    "train",
                    "--config",
                    TINY_YAML,
                    "--set",
                    f"data.train_texts={store}",
                    *quick,
                    "--out",
                    d / f"r-{name}-{damage}",
                    "--no-progress",
                ],
            )
        self.add(
            "train/train_texts is an image store",
            [
                "train",
                "--config",
                TINY_YAML,
                "--set",
                f"data.train_texts={f['images']}",
                *quick,
                "--out",
                d / "r-img",
                "--no-progress",
            ],
        )
        self.add(
            "train/train_texts of another width",
            [
                "train",
                "--config",
                TINY_YAML,
                "--set",
                f"data.train_texts={f['texts64']}",
                *quick,
                "--out",
                d / "r-64",
                "--no-progress",
            ],
        )
        for name, path in self.bad_gaps(self.p("train/gaps")).items():
            self.add(
                f"train/gap {name}",
                [
                    "train",
                    "--config",
                    TINY_YAML,
                    "--set",
                    f"data.train_texts={f['texts']}",
                    "--set",
                    f"data.gap={path}",
                    *quick,
                    "--out",
                    d / f"g-{name}",
                    "--no-progress",
                ],
            )
        (d / "afile").write_text("x")
        self.add("train/out is a file", [*good, "--out", d / "afile"])
        self.add("train/out below a file", [*good, "--out", d / "afile" / "r"])
        self.add(
            "train/resume with nothing to resume",
            [*good, "--resume", "--out", d / "fresh"],
            expect="ok",
            check=file_check(d / "fresh", Path.is_dir, "no run"),
        )
        # resuming the fixture's finished run (same config) after damaging its checkpoints
        sets = [a for s in TRAIN_SETS for a in ("--set", s)]
        fixture_data = ["--set", f"data.train_texts={f['texts']}", "--set", f"data.gap={f['gap']}"]
        for damage, expect in [
            ("newest-truncated", "ok"),
            ("newest-weights-deleted", "ok"),
            ("all-truncated", "error"),
            ("all-nan", "error"),
        ]:
            run = copy(f["model"].parent, d / f"resume-{damage}")
            damage_checkpoints(run, damage)
            self.add(
                f"train/resume from checkpoints {damage}",
                [
                    "train",
                    "--config",
                    TINY_YAML,
                    *fixture_data,
                    *sets,
                    "--resume",
                    "--out",
                    run,
                    "--no-progress",
                ],
                expect=expect,
                check=stdout_has("wrote"),
            )
        self.ro_full("train", lambda out: [*good, "--out", out])

    # -- caption --
    def caption(self) -> None:
        f = self.f
        d = self.p("caption")
        m = f["model"]
        pics = f["pics"]
        self.add(
            "caption/valid",
            ["caption", pics, "--model", m, "--beams", 1, "--out", d / "ok.jsonl"],
            expect="ok",
            check=jsonl_lines(d / "ok.jsonl", 4),
        )
        self.add(
            "caption/prompt on a prompt-free model",
            ["caption", pics, "--model", m, "--beams", 1, "--prompt", "dog", "--out", d / "pr.jsonl"],
            expect="ok",
            check=jsonl_lines(d / "pr.jsonl", 4),
        )
        self.add(
            "caption/auto-prompt on a prompt-free model",
            ["caption", pics, "--model", m, "--beams", 1, "--auto-prompt", "--out", d / "ap.jsonl"],
            expect="ok",
            check=jsonl_lines(d / "ap.jsonl", 4),
        )
        for name, damaged in self.bad_models(self.p("caption/models")).items():
            self.add(f"caption/model {name}", ["caption", pics, "--model", damaged, "--beams", 1])
        self.add("caption/model missing", ["caption", pics, "--model", d / "nope"])
        self.add("caption/model empty folder", ["caption", pics, "--model", self.p("caption/empty-model")])
        self.add("caption/model is a run folder", ["caption", pics, "--model", m.parent])
        self.add("caption/model is a store", ["caption", pics, "--model", f["texts"]])
        self.add("caption/input missing", ["caption", d / "nope.jpg", "--model", m])
        self.add("caption/input empty folder", ["caption", self.p("caption/empty"), "--model", m])
        corrupt = self.p("caption/corrupt")
        (corrupt / "a.jpg").write_bytes(b"nope")
        (corrupt / "b.png").write_bytes(b"")
        self.add("caption/all inputs unreadable", ["caption", corrupt, "--model", m])
        keep = d / "keep.jsonl"
        keep.write_text('{"image": "x", "caption": "kept"}\n')
        self.add("caption/failed run keeps --out", ["caption", corrupt, "--model", m, "--out", keep])
        (d / "text.txt").write_text("hello")
        self.add("caption/input a text file", ["caption", d / "text.txt", "--model", m])
        self.add(
            "caption/one unreadable among good",
            ["caption", pics, corrupt / "a.jpg", "--model", m, "--beams", 1, "--out", d / "mix.jsonl"],
            expect="ok",
            check=jsonl_lines(d / "mix.jsonl", 4),
        )
        for flag, value in [
            ("--beams", 0),
            ("--beams", -1),
            ("--beams", "abc"),
            ("--batch-size", 0),
            ("--batch-size", -1),
            ("--device", "blah"),
            ("--device", "cuda:7"),
        ]:
            self.add(f"caption/{flag} {value}", ["caption", pics, "--model", m, flag, value])
        self.add(
            "caption/out is a folder",
            ["caption", pics, "--model", m, "--beams", 1, "--out", self.p("caption/outdir")],
        )
        (d / "afile").write_text("x")
        self.add(
            "caption/out below a file",
            ["caption", pics, "--model", m, "--beams", 1, "--out", d / "afile" / "c.jsonl"],
        )
        self.ro_full(
            "caption", lambda out: ["caption", pics, "--model", m, "--beams", 1, "--out", out / "c.jsonl"]
        )

    def bad_models(self, d: Path) -> dict[str, Path]:
        f = self.f
        m = f["model"]
        models = {}

        def variant(name: str) -> Path:
            models[name] = copy(m, d / name)
            return models[name]

        truncate(variant("weights truncated") / "model.safetensors")
        (variant("weights missing") / "model.safetensors").unlink()
        truncate(variant("config truncated") / "config.json")
        (variant("config missing") / "config.json").unlink()
        (variant("config a list") / "config.json").write_text("[1, 2]")
        (variant("config not utf8") / "config.json").write_bytes(b'{"format": "caf\xe9"}')
        config = json.loads((m / "config.json").read_text())
        (variant("config wrong format") / "config.json").write_text(json.dumps({**config, "format": 999}))
        (variant("config model a string") / "config.json").write_text(json.dumps({**config, "model": "x"}))
        bad_model = {**config, "model": {**config["model"], "prefix_length": 0}}
        (variant("config prefix_length 0") / "config.json").write_text(json.dumps(bad_model))
        bad_model = {**config, "model": {**config["model"], "projector": "bogus"}}
        (variant("config projector bogus") / "config.json").write_text(json.dumps(bad_model))
        bad_model = {**config, "model": {**config["model"], "language_model_config": {"model_type": "bert"}}}
        (variant("config language model of another type") / "config.json").write_text(json.dumps(bad_model))
        (variant("config entity_names a number") / "config.json").write_text(
            json.dumps({**config, "entity_names": 5})
        )
        (variant("config clip a string") / "config.json").write_text(json.dumps({**config, "clip": "x"}))
        shutil.copy(
            f["model2"] / "model.safetensors", variant("weights of another shape") / "model.safetensors"
        )
        rewrite_safetensors(
            variant("weights nan") / "model.safetensors", lambda ts: set_first(ts, sorted(ts)[0], math.nan)
        )
        (variant("tokenizer.json bad") / "tokenizer.json").write_text("{not json")
        (variant("tokenizer.json missing") / "tokenizer.json").unlink()
        (variant("tokenizer.json empty object") / "tokenizer.json").write_text("{}")
        truncate(variant("gap truncated") / "gap.safetensors")
        rewrite_safetensors(
            variant("gap nan mu") / "gap.safetensors", lambda ts: set_first(ts, "mu", math.nan)
        )
        shutil.copy(f["gap64"], variant("gap of another width") / "gap.safetensors")
        clip_dir = m / "clip"
        if clip_dir.is_dir():
            for path in variant("clip folder emptied").joinpath("clip").iterdir():
                path.unlink()
            for path in variant("clip config truncated").joinpath("clip").glob("*.json"):
                truncate(path)
        return models

    # -- score --
    def score(self) -> None:
        f = self.f
        d = self.p("score")
        good = ["score", "--references", COCO_SLICE, "--split", "val", "--metrics", "bleu"]
        self.add(
            "score/valid",
            [*good, "--predictions", f["preds"], "--out", d / "ok"],
            expect="ok",
            check=file_check(d / "ok", Path.is_dir, "no metrics"),
        )
        for kind, path in self.bad_files(d).items():
            self.add(f"score/predictions {kind}", [*good, "--predictions", path, "--out", d / f"p-{kind}"])
            self.add(
                f"score/references {kind}",
                [
                    "score",
                    "--references",
                    path,
                    "--predictions",
                    f["preds"],
                    "--metrics",
                    "bleu",
                    "--out",
                    d / f"r-{kind}",
                ],
            )
        for name, doc in {
            "dict": {"a": 1},
            "ints": [1, 2],
            "no-caption": [{"image_id": 184613}],
            "caption-number": [{"image_id": 184613, "caption": 5}],
            "empty-list": [],
            "unknown-ids": [{"image_id": 1, "caption": "a dog."}],
            "null": None,
        }.items():
            (d / f"{name}.json").write_text(json.dumps(doc))
            self.add(
                f"score/predictions {name}",
                [*good, "--predictions", d / f"{name}.json", "--out", d / f"pp-{name}"],
            )
        (d / "duplicates.json").write_text(json.dumps([{"image_id": 184613, "caption": "a dog."}] * 2))
        self.add(
            "score/duplicate predictions reported",
            [*good, "--predictions", d / "duplicates.json", "--out", d / "dup"],
            expect="ok",
            check=stdout_has("1 duplicate prediction"),
        )
        for name, doc in {
            "no-annotations": {"images": []},
            "annotations-ints": {"annotations": [1]},
            "list": [1],
        }.items():
            (d / f"ref-{name}.json").write_text(json.dumps(doc))
            self.add(
                f"score/references {name}",
                [
                    "score",
                    "--references",
                    d / f"ref-{name}.json",
                    "--predictions",
                    f["preds"],
                    "--metrics",
                    "bleu",
                    "--out",
                    d / f"rr-{name}",
                ],
            )
        for value in ("bogus", "", ",", "bleu,bogus"):
            self.add(
                f"score/--metrics {value!r}",
                [
                    "score",
                    "--references",
                    COCO_SLICE,
                    "--split",
                    "val",
                    "--predictions",
                    f["preds"],
                    "--metrics",
                    value,
                    "--out",
                    d / f"m{value}",
                ],
            )
        self.add(
            "score/--split test has no images",
            [
                *good[:3],
                "--split",
                "test",
                "--metrics",
                "bleu",
                "--predictions",
                f["preds"],
                "--out",
                d / "st",
            ],
        )
        (d / "afile").write_text("x")
        self.add("score/out is a file", [*good, "--predictions", f["preds"], "--out", d / "afile"])
        self.ro_full("score", lambda out: [*good, "--predictions", f["preds"], "--out", out])

    # -- evaluate --
    def evaluate(self) -> None:
        f = self.f
        d = self.p("evaluate")
        retrieval = [
            "evaluate",
            "--data",
            COCO_SLICE,
            "--split",
            "val",
            "--method",
            "retrieval",
            "--texts",
            f["texts"],
            "--image-store",
            f["images"],
            "--metrics",
            "bleu",
        ]
        model = [
            "evaluate",
            "--data",
            COCO_SLICE,
            "--split",
            "val",
            "--model",
            f["model"],
            "--image-store",
            f["images"],
            "--metrics",
            "bleu",
            "--beams",
            1,
        ]
        self.add(
            "evaluate/retrieval valid",
            [*retrieval, "--out", d / "r-ok"],
            expect="ok",
            check=file_check(d / "r-ok" / "metrics.json", Path.is_file, "no metrics"),
        )
        self.add(
            "evaluate/model valid",
            [*model, "--out", d / "m-ok"],
            expect="ok",
            check=file_check(d / "m-ok" / "metrics.json", Path.is_file, "no metrics"),
        )
        self.add(
            "evaluate/model from images",
            [
                "evaluate",
                "--data",
                COCO_SLICE,
                "--split",
                "val",
                "--model",
                f["model"],
                "--images",
                f["coco"],
                "--metrics",
                "bleu",
                "--beams",
                1,
                "--out",
                d / "mi-ok",
            ],
            expect="ok",
            check=file_check(d / "mi-ok" / "metrics.json", Path.is_file, "no metrics"),
        )
        for kind, path in self.bad_files(d).items():
            self.add(
                f"evaluate/data {kind}",
                [
                    "evaluate",
                    "--data",
                    path,
                    "--split",
                    "val",
                    "--method",
                    "retrieval",
                    "--texts",
                    f["texts"],
                    "--image-store",
                    f["images"],
                    "--metrics",
                    "bleu",
                    "--out",
                    d / f"d-{kind}",
                ],
            )
        self.add(
            "evaluate/retrieval without --texts",
            [
                "evaluate",
                "--data",
                COCO_SLICE,
                "--split",
                "val",
                "--method",
                "retrieval",
                "--image-store",
                f["images"],
                "--out",
                d / "nt",
            ],
        )
        self.add(
            "evaluate/model without --model",
            [
                "evaluate",
                "--data",
                COCO_SLICE,
                "--split",
                "val",
                "--image-store",
                f["images"],
                "--out",
                d / "nm",
            ],
        )
        self.add(
            "evaluate/neither images nor store",
            ["evaluate", "--data", COCO_SLICE, "--split", "val", "--model", f["model"], "--out", d / "ns"],
        )
        self.add(
            "evaluate/split test has no images",
            [*model[:3], "--split", "test", *model[5:], "--out", d / "test"],
        )
        self.add(
            "evaluate/images root missing",
            [
                "evaluate",
                "--data",
                COCO_SLICE,
                "--split",
                "val",
                "--model",
                f["model"],
                "--images",
                d / "nope",
                "--out",
                d / "ir",
            ],
        )
        self.add(
            "evaluate/image store of another dataset",
            [
                *model[:5],
                "--model",
                f["model"],
                "--image-store",
                f["world_images"],
                "--metrics",
                "bleu",
                "--out",
                d / "wi",
            ],
        )
        for name, damage in [
            ("shard", "nan"),
            ("shard", "truncate"),
            ("ids.json", "delete"),
            ("meta.json", "truncate"),
        ]:
            store = copy(f["images"], d / f"img-{name}-{damage}")
            damage_store(store, name, damage)
            self.add(
                f"evaluate/image store with {name} {damage}",
                [
                    *retrieval[:-4],
                    "--image-store",
                    store,
                    "--metrics",
                    "bleu",
                    "--out",
                    d / f"i-{name}-{damage}",
                ],
            )
            store = copy(f["texts"], d / f"txt-{name}-{damage}")
            damage_store(store, name, damage)
            self.add(
                f"evaluate/retrieval texts with {name} {damage}",
                [
                    "evaluate",
                    "--data",
                    COCO_SLICE,
                    "--split",
                    "val",
                    "--method",
                    "retrieval",
                    "--texts",
                    store,
                    "--image-store",
                    f["images"],
                    "--metrics",
                    "bleu",
                    "--out",
                    d / f"t-{name}-{damage}",
                ],
            )
        for name, damaged in list(self.bad_models(self.p("evaluate/models")).items())[:6]:
            self.add(
                f"evaluate/model {name}",
                [*model[:5], "--model", damaged, *model[7:], "--out", d / f"bm-{name}"],
            )
        for flag, value in [
            ("--beams", 0),
            ("--batch-size", 0),
            ("--metrics", "bogus"),
            ("--metrics", ""),
            ("--split", "bogus"),
            ("--device", "blah"),
            ("--prompt", "bogus"),
        ]:
            self.add(f"evaluate/{flag} {value!r}", [*model, flag, value, "--out", d / f"f{flag}{value}"])
        self.add(
            "evaluate/auto prompt on prompt-free model",
            [*model, "--prompt", "auto", "--out", d / "ap"],
            expect="ok",
            check=file_check(d / "ap" / "metrics.json", Path.is_file, "no metrics"),
        )
        (d / "afile").write_text("x")
        self.add("evaluate/out is a file", [*retrieval, "--out", d / "afile"])
        self.ro_full("evaluate", lambda out: [*retrieval, "--out", out])

    # -- ablate --
    def ablate(self) -> None:
        f = self.f
        d = self.p("ablate")
        grid = json.loads(f["grid"].read_text())
        for kind, path in self.bad_files(d, ".yaml").items():
            self.add(f"ablate/config {kind}", ["ablate", path, "--out", d / f"c-{kind}"])
        variants = {
            "list": [1],
            "no cells": {**grid, "cells": []},
            "cell bad kind": {**grid, "cells": [{"name": "x", "kind": "bogus"}]},
            "cell no name": {**grid, "cells": [{"kind": "none"}]},
            "cell bad name": {**grid, "cells": [{"name": "../x", "kind": "none"}]},
            "duplicate cells": {**grid, "cells": [{"name": "x", "kind": "none"}] * 2},
            "few_pairs 0": {**grid, "few_pairs": 0},
            "few_pairs -1": {**grid, "few_pairs": -1},
            "few_pairs 0%": {**grid, "few_pairs": "0%"},
            "few_pairs 200%": {**grid, "few_pairs": "200%"},
            "few_pairs nan": {**grid, "few_pairs": float("nan")},
            "seeds empty": {**grid, "seeds": []},
            "seeds strings": {**grid, "seeds": ["a"]},
            "eval beams 0": {**grid, "eval": {"beams": 0}},
            "decoder lr nan": {**grid, "decoder": {**grid["decoder"], "train": {"lr": float("nan")}}},
            "decoder batch 0": {**grid, "decoder": {**grid["decoder"], "train": {"batch_size": 0}}},
            "unknown key": {**grid, "bogus": 1},
            "karpathy missing": {**grid, "karpathy": str(d / "nope.json")},
            "web_pairs missing": {
                **grid,
                "cells": [{"name": "w", "kind": "gaussian", "setting": "web-pairs"}],
                "web_pairs": str(d / "nope.jsonl"),
            },
            "vocabulary missing": {
                **grid,
                "cells": [{"name": "p", "kind": "none", "prompt": "pim"}],
                "vocabulary": str(d / "nope.json"),
            },
            "embed model missing": {**grid, "embed": {"model": str(d / "nope.json"), "pretrained": "none"}},
            "cell set unknown stage": {
                **grid,
                "cells": [{"name": "x", "kind": "none", "set": {"embed.model": 1}}],
            },
            "cell set bad value": {
                **grid,
                "cells": [{"name": "x", "kind": "none", "set": {"eval.beams": -1}}],
            },
            "karpathy truncated": {**grid, "karpathy": str(d / "truncated.yaml")},
        }
        for name, doc in variants.items():
            path = d / f"{name.replace(' ', '-')}.json"
            path.write_text(json.dumps(doc))
            self.add(f"ablate/{name}", ["ablate", path, "--out", d / f"o-{name.replace(' ', '-')}", "--plan"])
        for value in ("bogus=1", "noequals", "seeds=[", "eval.beams=0", "few_pairs=-3"):
            self.add(f"ablate/--set {value}", ["ablate", f["grid"], "--set", value, "--out", d / f"s{value}"])
        self.add("ablate/typo then fixed", [], runner=self.typo_then_fixed(d), expect="ok")
        (d / "afile").write_text("x")
        self.add("ablate/out is a file", ["ablate", f["grid"], "--plan", "--out", d / "afile"])
        self.ro_full("ablate", lambda out: ["ablate", f["grid"], "--plan", "--out", out])

    def typo_then_fixed(self, d: Path) -> Callable[[Probe, dict], dict]:
        """ablate with a mistyped karpathy path, then the corrected command into the same --out."""

        def run(probe: Probe, context: dict) -> dict:
            runner, grid = context["runner"], self.f["grid"]
            out = d / "typo"
            code1, _, err1 = runner.run(
                ["ablate", grid, "--plan", "--out", str(out), "--set", f"karpathy={d / 'typo.json'}"]
            )
            code2, out2, err2 = runner.run(["ablate", str(grid), "--plan", "--out", str(out)], timeout=600)
            first, _ = classify(Probe("first", [], "error"), code1, "", err1)
            second, detail = classify(Probe("second", [], "ok"), code2, out2, err2)
            outcome = first if first != "clean" else second
            return {
                "outcome": outcome,
                "code": code2,
                "last_line": last_line(out2, err2 if code2 else err1),
                "detail": detail,
            }

        return run

    # -- toyworld --
    def toyworld(self) -> None:
        d = self.p("toyworld")
        base = ["toyworld", "--train", 5, "--val", 1, "--test", 1, "--image-size", 8]
        for flag, value in [
            ("--train", 0),
            ("--train", -1),
            ("--val", -1),
            ("--test", -1),
            ("--image-size", 0),
            ("--image-size", 7),
            ("--image-size", -8),
            ("--web-mismatch", 1.5),
            ("--web-mismatch", -0.1),
            ("--web-mismatch", "nan"),
            ("--seed", "abc"),
            ("--train", "abc"),
        ]:
            self.add(f"toyworld/{flag} {value}", [*base, flag, value, "--out", d / f"{flag}{value}"])
        self.add(
            "toyworld/zero val and test",
            ["toyworld", "--train", 5, "--val", 0, "--test", 0, "--image-size", 8, "--out", d / "zero"],
            expect="ok",
            check=file_check(d / "zero" / "toyworld.json", Path.is_file, "no karpathy file"),
        )
        (d / "afile").write_text("x")
        self.add("toyworld/out is a file", [*base, "--out", d / "afile"])
        self.add("toyworld/out below a file", [*base, "--out", d / "afile" / "w"])
        self.ro_full("toyworld", lambda out: [*base, "--out", out])

    # -- demo --
    def demo(self) -> None:
        d = self.p("demo")
        (d / "afile").write_text("x")
        self.add("demo/--seed abc", ["demo", "--quick", "--seed", "abc", "--out", d / "s"])
        self.add("demo/--bogus", ["demo", "--bogus"])
        self.add(
            "demo/cache is a file",
            ["demo", "--quick", "--no-progress", "--cache", d / "afile", "--out", d / "c"],
        )
        self.add(
            "demo/out is a file",
            ["demo", "--quick", "--no-progress", "--cache", d / "cache", "--out", d / "afile"],
        )
        self.ro_full(
            "demo cache",
            lambda out: ["demo", "--quick", "--no-progress", "--cache", out, "--out", d / out.name],
        )

    # -- two writers --
    def writers(self) -> None:
        d = self.p("writers")
        a, b = d / "a.txt", d / "b.txt"
        a.write_text("".join(f"a photo of a red thing number {i}.\n" for i in range(200)))
        b.write_text("".join(f"a blue object, picture {i}.\n" for i in range(150)))
        for trial in range(3):
            for same in (False, True):
                name = f"two writers/{'same' if same else 'different'} inputs trial {trial}"
                self.add(
                    name, [], runner=self.two_writers(d / f"t{trial}{same}", a, a if same else b), expect="ok"
                )

    def two_writers(self, folder: Path, a: Path, b: Path) -> Callable[[Probe, dict], dict]:
        def run(probe: Probe, context: dict) -> dict:
            runner, clip = context["runner"], self.f["clip"]
            args = [
                "embed",
                "texts",
                "--clip",
                str(clip),
                "--pretrained",
                "none",
                "--shard-size",
                "10",
                "--no-progress",
            ]
            references = []
            for number, corpus in enumerate((a, b)):
                reference = folder / f"reference{number}"
                runner.run([*args, "--corpus", str(corpus), "--out", str(reference)], timeout=300)
                references.append(store_bytes(reference))
            out = folder / "store"
            processes = [runner.popen([*args, "--corpus", str(c), "--out", str(out)]) for c in (a, b)]
            results = [runner.wait(p, 300) for p in processes]
            for code, stdout, stderr in results:
                if code is None:
                    return {"outcome": "hang", "code": None, "last_line": last_line(stdout, stderr)}
                if "Traceback" in stderr:
                    return {"outcome": "traceback", "code": code, "last_line": last_line(stdout, stderr)}
                if code != 0:
                    outcome, _ = classify(Probe("w", [], "error"), code, stdout, stderr)
                    if outcome != "clean":
                        return {"outcome": outcome, "code": code, "last_line": last_line(stdout, stderr)}
            if store_bytes(out) not in references:
                return {
                    "outcome": "silent",
                    "code": 0,
                    "last_line": "",
                    "detail": "store equals no clean build",
                }
            return {"outcome": "clean", "code": 0, "last_line": ""}

        return run


def store_bytes(path: Path) -> dict[str, bytes]:
    skip = ("build.lock",)
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and p.name not in skip}


def same_store(store: Path, reference: Path) -> Check:
    def check(code: int, out: str, err: str) -> str | None:
        return None if store_bytes(store) == store_bytes(reference) else f"{store} differs from a clean build"

    return check


def damage_store(store: Path, name: str, damage: str) -> None:
    """Damage one file of a store: truncate, delete, write NaN/Inf/zero into a row, or change its schema."""
    path = shard_of(store) if name == "shard" else store / name
    if damage == "truncate":
        truncate(path)
    elif damage == "delete":
        path.unlink()
    elif damage in ("nan", "inf", "zero-row"):
        poison_row(store, 3, {"nan": math.nan, "inf": math.inf, "zero-row": 0.0}[damage])
    elif damage == "wrong-schema":
        path.write_text(json.dumps({"format": "x", "rows": "many"}))
    elif damage == "wrong-length":
        ids = json.loads(path.read_text())
        path.write_text(json.dumps(ids[:-3]))
    elif damage == "short":
        captions = json.loads(path.read_text())
        path.write_text(json.dumps(captions[:-5]))
    elif damage == "not-list":
        path.write_text(json.dumps({"a": 1}))
    else:
        raise ValueError(damage)


def damage_checkpoints(run: Path, damage: str) -> None:
    """Damage the newest checkpoint of a run folder, or all of them."""
    checkpoints = sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir())
    targets = checkpoints[-1:] if damage.startswith("newest") else checkpoints
    for checkpoint in targets:
        weights = checkpoint / "model.safetensors"
        if damage.endswith("truncated"):
            truncate(weights)
            truncate(checkpoint / "trainer.pt")
        elif damage.endswith("deleted"):
            weights.unlink()
        elif damage.endswith("nan"):
            rewrite_safetensors(
                weights,
                lambda ts: {
                    k: v.clone().fill_(math.nan) if v.is_floating_point() else v for k, v in ts.items()
                },
            )


# --- main -------------------------------------------------------------------------------------------------


def fill_disk(mount: Path) -> None:
    """Fill a mount to the last byte, so that any write into it fails with ENOSPC."""
    with contextlib.suppress(OSError), (mount / ".filler").open("wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ro", type=Path, default=None, help="A read-only mount to write into.")
    parser.add_argument("--full", type=Path, default=None, help="A small writable mount, filled up first.")
    parser.add_argument("--jobs", type=int, default=2, help="Probes run at once.")
    parser.add_argument("--timeout", type=float, default=60, help="Seconds before a probe counts as a hang.")
    parser.add_argument("--report", type=Path, default=Path("bad_input_probe.json"), help="JSON report.")
    parser.add_argument(
        "--only",
        action="append",
        help="Run only probes whose name contains this (repeatable; with --rerun's).",
    )
    parser.add_argument(
        "--rerun", type=Path, default=None, help="Run only the probes not clean in this report."
    )
    parser.add_argument("--keep", action="store_true", help="Keep the work folder.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tipcap-probe-"))
    runner = Runner(work, args.timeout)
    start = time.monotonic()
    print(f"building fixtures in {work} ...", flush=True)
    fixtures = build_fixtures(runner)
    if args.ro is not None:
        args.ro.mkdir(parents=True, exist_ok=True)
    if args.full is not None:
        fill_disk(args.full)
    builder = Probes(fixtures, args.ro, args.full)
    probes = builder.build()
    if args.only or args.rerun:
        names = set()
        if args.rerun:
            previous = json.loads(args.rerun.read_text())["probes"]
            names = {p["name"] for p in previous if p["outcome"] != "clean"}
        probes = [p for p in probes if p.name in names or any(part in p.name for part in args.only or [])]
    print(f"fixtures ready in {time.monotonic() - start:.0f} s; running {len(probes)} probes", flush=True)
    context = {"runner": runner}
    outcomes: list[Outcome] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(execute, probe, runner, context): probe for probe in probes}
        for future in concurrent.futures.as_completed(futures):
            outcome = future.result()
            outcomes.append(outcome)
            if outcome.outcome != "clean":
                print(f"  {outcome.outcome:9s} {outcome.name}: {outcome.last_line}", flush=True)
    outcomes.sort(key=lambda o: [p.name for p in probes].index(o.name))
    counts = Counter(o.outcome for o in outcomes)
    print(f"\n{len(outcomes)} probes in {time.monotonic() - start:.0f} s")
    for name in ("clean", "traceback", "hang", "silent", "messy"):
        print(f"  {name:9s} {counts.get(name, 0)}")
    bad = [o for o in outcomes if o.outcome != "clean"]
    if bad:
        print("\nnot clean:")
        for o in bad:
            print(f"  [{o.outcome}] {o.name}: {o.last_line}" + (f" ({o.detail})" if o.detail else ""))
    report = {
        "counts": {n: counts.get(n, 0) for n in ("clean", "traceback", "hang", "silent", "messy")},
        "total": len(outcomes),
        "mounts": {"ro": str(args.ro), "full": str(args.full)},
        "probes": [o.__dict__ for o in outcomes],
    }
    args.report.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.report}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
