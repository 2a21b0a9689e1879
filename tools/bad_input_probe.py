"""Probe the command line with bad inputs and faults, each probe its own ``tipcap`` process.

Builds small valid fixtures in a temporary folder (a tiny random CLIP, the COCO test slice with small JPEGs,
caption and image stores, a gap file, a 20-step model, a tiny toy world), then runs every command against
missing, empty, truncated, wrong-schema, non-UTF-8, NaN/Inf, zero and negative inputs, damaged stores, gap
files and model folders, escaping image paths and two writers into one store. With ``--ro DIR`` (a read-only
mount) and ``--full DIR`` (a small, full mount) it also writes onto them; without, those probes are skipped.

Sections named after the findings of the trust-boundary issue (each probe's name starts with its class):

- ``H1 silent hub endpoint``: HF_ENDPOINT on a local listener that accepts and never answers; push, hub
  models for caption and evaluate, a hub language model for train, a hub-hosted CLIP tag: refused naming
  HF_ENDPOINT and the probe's deadline (a hang at 90 s).
- ``W1 closed hub endpoint`` / ``W1 serving hub mirror``: HF_ENDPOINT on a closed local port (refused, "cannot
  be reached") and on a local HTTP server answering 404 (probed on its own port: the refusal is the
  mirror's answer, not "unreachable").
- ``W5 card``: a model evaluated on 8 of 12 images with a random-weight scorer: the card says so, no NaN.
- ``W6 chair coverage``: instances for 1 of 12 images: success, a warning, the coverage in metrics.json.
- ``T5 positions``, ``T7 large numbers``, ``W7 bool as number``: configs refused at validation.
- ``W8 one run folder``: two trainings into one --out at once: one trains, the other is refused naming a lock.
- ``W9 resume identity``: --resume over another run's checkpoints: refused, or a model of its own config.
- ``http``: ``tipcap serve`` on the fixture model, sent cross-origin and foreign-Host requests, wrong content
  types, lone surrogates, deep JSON, numbers as prompt words, thin images, formats outside PNG, JPEG, GIF,
  BMP, TIFF and WebP, oversize bodies: each answered 4xx with a JSON error, never 500, the server up after.

``--only`` (repeatable) runs the probes whose name contains it: ``--only H1 --only W1 --only http/``.

Each probe is classed:

- ``clean``: a bad input refused with a non-zero exit, no traceback, and exactly one ``Error:`` line, last
  on stderr; or a probe whose input deserves success (a warning and a skip) that exits 0 and passes its
  check of the result;
- ``traceback``: a Python traceback;
- ``hang``: still running at the timeout;
- ``silent``: exit 0 for a bad input, or an expected success whose check fails;
- ``messy``: a non-zero exit without exactly one final ``Error:`` line (neither clean nor a traceback), or a
  refusal whose line fails the probe's check (refused for another reason than the one probed).

An HTTP probe is ``clean`` for a 4xx answer with a JSON ``{"error"}`` (a 200 for a valid request) while the
server still answers; ``traceback`` for a 5xx, a traceback in the server's log or a server that died;
``silent`` for a 2xx or 3xx to a bad request; ``messy`` for a 4xx without a JSON error; ``hang`` for no
answer.

Usage (as root for the mounts)::

    mount -t tmpfs -o ro,size=1m tmpfs /mnt/ro-probe
    mount -t tmpfs -o size=64k tmpfs /mnt/full-probe
    python tools/bad_input_probe.py --ro /mnt/ro-probe --full /mnt/full-probe --report probe.json

Prints the counts per class, overall and per section (a probe's name up to its first ``/``), and each
non-clean probe with its last stderr line; writes a JSON report.
"""

from __future__ import annotations

import argparse
import atexit
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
    env: dict[str, str | None] | None = None  # changes to the environment (None: unset the variable)


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

    def popen(self, args: list[str], env: dict[str, str | None] | None = None) -> subprocess.Popen:
        command = ["nice", "-n", "10", sys.executable, "-m", "tipcap.cli", *args]
        environment = {**self.env, **(env or {})}
        return subprocess.Popen(
            command,
            cwd=self.work,
            env={key: value for key, value in environment.items() if value is not None},
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

    def run(
        self, args: list[str], timeout: float | None = None, env: dict[str, str | None] | None = None
    ) -> tuple[int | None, str, str]:
        return self.wait(self.popen(args, env), timeout or self.timeout)

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
        problem = probe.check(code, out, err) if probe.check else None
        return ("messy", f"refused for another reason: {problem}") if problem else ("clean", "")
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
    code, out, err = runner.run(probe.args, probe.timeout, probe.env)
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
        self.cleanup: list[Callable[[], None]] = []  # run when the probes are done (servers to stop)
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
            self.hub_endpoints,
            self.card_contents,
            self.chair_coverage,
            self.config_limits,
            self.run_folders,
            self.http_surface,
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
                check=stdout_has("wrote") if expect == "ok" else error_has("no checkpoint", "can be loaded"),
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

    # -- H1, W1: the hub's endpoint --
    def hub_endpoints(self) -> None:
        """H1: an endpoint that accepts connections and never answers must be refused within the probe's
        deadline, by every command that reaches the hub; W1: HF_ENDPOINT's scheme, host and port are
        probed, so a local mirror that serves is asked (and its answer reported), a closed port refused."""
        f = self.f
        d = self.p("hub")
        photo = f["pics"] / "img_0000.jpg"

        def commands(out: Path) -> dict[str, list]:
            """The commands that reach the hub, each writing under ``out`` (one folder per endpoint, since
            two probes run at once and a run folder takes one training)."""
            return {
                "push": ["push", "--model", f["model"], "--repo", "owner/tiny"],
                "caption --model owner/x": ["caption", photo, "--model", "someone/x"],
                "evaluate --model owner/x": [
                    "evaluate", "--data", COCO_SLICE, "--split", "val", "--model", "someone/x",
                    "--image-store", f["images"], "--out", out / "eval"],
                "train model.language_model owner/x": [
                    "train", "--config", TINY_YAML, "--set", f"data.train_texts={f['texts']}", "--set",
                    "model.language_model=someone/lm", "--set", "model.language_model_config=null", "--set",
                    "model.tokenizer=null", "--out", out / "train"],
                "embed texts with a hub-hosted CLIP tag": [
                    "embed", "texts", "--corpus", COCO_SLICE, "--clip", "ViT-B-32", "--pretrained",
                    "laion2b_s34b_b79k", "--out", out / "texts", "--no-progress"],
            }  # fmt: skip

        # huggingface_hub reads TRANSFORMERS_OFFLINE as HF_HUB_OFFLINE: both unset, so that the hub is probed.
        hub = {
            "HF_HUB_OFFLINE": None,
            "TRANSFORMERS_OFFLINE": None,
            "HF_HUB_CACHE": str(self.p("hub/empty-cache")),
        }
        silent, mirror, closed = endpoints()
        for name, args in commands(d / "silent").items():
            self.add(f"H1 silent hub endpoint/{name}", args, env={**hub, "HF_ENDPOINT": silent}, timeout=90,
                     check=error_has("did not answer within", f"{silent} (HF_ENDPOINT)"))  # fmt: skip
        for name, args in commands(d / "closed").items():
            self.add(f"W1 closed hub endpoint/{name}", args, env={**hub, "HF_ENDPOINT": closed}, timeout=90,
                     check=error_has("cannot be reached", f"{closed} (HF_ENDPOINT)"))  # fmt: skip
        # A mirror that serves: the probe passes and the mirror's answer (404 to all) is what is reported.
        for name in ("caption --model owner/x", "evaluate --model owner/x"):
            self.add(f"W1 serving hub mirror/{name}", commands(d / "mirror")[name],
                     env={**hub, "HF_ENDPOINT": mirror}, timeout=90,
                     check=error_lacks("cannot be reached", "did not answer"))  # fmt: skip

    # -- W5: the model card --
    def card_contents(self) -> None:
        """W5: a model evaluated on 8 of the 12 val images with a random-weight scorer: its card gives the
        count, names the scorer and says it and the model's CLIP have random weights, and holds no NaN."""
        f = self.f
        d = self.p("card")
        model = copy(f["model"], d / "model")
        root = copy(f["coco"], d / "images")
        val = [e for e in json.loads(COCO_SLICE.read_text())["images"] if e["split"] == "val"]
        for entry in val[:4]:
            (root / entry["filepath"] / entry["filename"]).unlink()
        self.add(
            "W5 card/evaluated on part of the split with a random scorer",
            ["evaluate", "--model", model, "--data", COCO_SLICE, "--split", "val", "--images", root,
             "--metrics", "bleu,cider", "--beams", 1, "--score-clip", f["clip"], "--score-pretrained", "none",
             "--out", d / "eval"],
            expect="ok",
            check=card_check(model / "README.md", [
                "| 8 of 12 |", "CLIP-S scorer", "clip (random weights, seed 0)", "a CLIP with random weights",
                "scored on 8 of the split's 12 images", "**Its CLIP has random weights**"]),
        )  # fmt: skip

    # -- W6: CHAIR's coverage --
    def chair_coverage(self) -> None:
        """W6: an instance file annotating 1 of the 12 val images: CHAIR on that one, a warning, and the
        coverage in metrics.json."""
        f = self.f
        d = self.p("chair")
        val = [e["cocoid"] for e in json.loads(COCO_SLICE.read_text())["images"] if e["split"] == "val"]
        instances = d / "instances.json"
        instances.write_text(json.dumps({
            "images": [{"id": val[0]}], "categories": [{"id": 1, "name": "person"}],
            "annotations": [{"id": 1, "image_id": val[0], "category_id": 1}],
        }))  # fmt: skip
        out = d / "eval"
        self.add(
            "W6 chair coverage/instances for 1 of 12 images",
            ["evaluate", "--method", "retrieval", "--texts", f["texts"], "--image-store", f["images"],
             "--data", COCO_SLICE, "--split", "val", "--metrics", "bleu", "--instances", instances,
             "--out", out],
            expect="ok",
            check=all_of(stdout_has("annotates 1 of the 12 evaluated images"),
                         json_check(out / "metrics.json", lambda m: (m["hallucination"]["annotated_images"],
                                    m["hallucination"]["left_out_images"], m["hallucination"]["captions"])
                                    == (1, 11, 1), "hallucination record without the coverage")),
        )  # fmt: skip

    # -- T5, T7, W7: limits checked when the config is read --
    def config_limits(self) -> None:
        """T5: prefix and caption lengths beyond the language model's positions; T7: numbers too large for
        the seed or the prefix; W7: a boolean where a number belongs. Each refused at config validation."""
        f = self.f
        d = self.p("limits")
        good = ["train", "--config", TINY_YAML, "--set", f"data.train_texts={f['texts']}", "--set",
                f"data.gap={f['gap']}", "--set", "train.max_steps=2", "--no-progress"]  # fmt: skip
        for name, value in [
            ("T5 positions/train prefix 120 + 30 tokens over 128 positions", "model.prefix_length=120"),
            ("T5 positions/train max_caption_tokens 500 over 128 positions", "model.max_caption_tokens=500"),
            ("T7 large numbers/train seed 99999999999999999999", "train.seed=99999999999999999999"),
            ("T7 large numbers/train prefix_length 100000", "model.prefix_length=100000"),
            ("W7 bool as number/train max_steps true", "train.max_steps=true"),
            ("W7 bool as number/train batch_size true", "train.batch_size=true"),
        ]:
            self.add(name, [*good, "--set", value, "--out", d / name.split("/")[1].replace(" ", "-")])
        self.add(
            "T5 positions/ablate n_positions 8",
            ["ablate", f["grid"], "--plan", "--set", "decoder.model.language_model_config.n_positions=8",
             "--out", d / "ablate"],
        )  # fmt: skip
        # A model folder saved with more caption tokens than its positions hold (as an older version let
        # train write): refused when it is loaded.
        model = copy(f["model"], d / "model-500-tokens")
        config = json.loads((model / "config.json").read_text())
        config["model"]["max_caption_tokens"] = 500
        (model / "config.json").write_text(json.dumps(config))
        self.add(
            "T5 positions/caption with a model of 500 caption tokens",
            ["caption", f["pics"], "--model", model],
        )

    # -- W8, W9: run folders --
    def run_folders(self) -> None:
        """W8: two trainings into one --out at once; W9: a run's --resume from a folder holding another
        run's checkpoints."""
        d = self.p("runs")
        for trial in range(2):
            self.add(f"W8 one run folder/two trainings at once trial {trial}", [], expect="ok",
                     runner=self.two_trainings(d / f"two-{trial}"))  # fmt: skip
        b = ["model.prefix_length=4", "train.checkpoint_every=2", "train.max_steps=4"]
        fresh_then_resume = [([], []), ([], ["--resume"])]
        for name, a, steps in [
            # B trains its 4 steps into A's folder, then resumes with the same config: from its own
            # checkpoint at step 4, not from A's newer one at step 8.
            ("fresh run then --resume over another seed's checkpoints",
             ["model.prefix_length=4", "train.seed=1"], fresh_then_resume),
            ("fresh run then --resume over another shape's checkpoints", ["model.prefix_length=2"],
             fresh_then_resume),
            # B resumes straight away in a folder of A's checkpoints: of another shape, or of another seed.
            ("--resume over another shape's checkpoints", ["model.prefix_length=2"], [([], ["--resume"])]),
            ("--resume over another seed's checkpoints", ["model.prefix_length=4", "train.seed=1"],
             [([], ["--resume"])]),
        ]:  # fmt: skip
            folder = d / name.replace(" ", "-").replace("'", "")
            self.add(f"W9 resume identity/{name}", [], expect="ok",
                     runner=self.resume_over_another_run(folder, a, b, steps))  # fmt: skip

    def train_args(self, out: Path, extra: list[str]) -> list[str]:
        f = self.f
        sets = [f"data.train_texts={f['texts']}", f"data.gap={f['gap']}", *extra]
        return ["train", "--config", str(TINY_YAML), *[a for s in sets for a in ("--set", s)],
                "--out", str(out), "--no-progress"]  # fmt: skip

    def two_trainings(self, out: Path) -> Callable[[Probe, dict], dict]:
        """Both at once: one trains, the other is refused in one line naming the folder's lock."""

        def run(probe: Probe, context: dict) -> dict:
            runner = context["runner"]
            args = self.train_args(out, ["train.max_steps=40", "train.checkpoint_every=10"])
            processes = [runner.popen(args) for _ in range(2)]
            results = [runner.wait(p, 600) for p in processes]
            for code, stdout, stderr in results:
                if code is None:
                    return {"outcome": "hang", "code": None, "last_line": last_line(stdout, stderr)}
                if "Traceback" in stderr:
                    return {"outcome": "traceback", "code": code, "last_line": last_line(stdout, stderr)}
            codes = sorted(code for code, _, _ in results)
            if codes == [0, 0]:
                return {"outcome": "silent", "code": 0, "last_line": "",
                        "detail": "both trained into one run folder"}  # fmt: skip
            refused = [(code, out_, err) for code, out_, err in results if code != 0]
            if codes[0] != 0 or len(refused) != 1:
                return {"outcome": "messy", "code": codes[-1], "last_line": last_line(*refused[0][1:]),
                        "detail": "neither trained"}  # fmt: skip
            code, stdout, stderr = refused[0]
            outcome, _ = classify(Probe("second", [], "error"), code, stdout, stderr)
            line = last_line(stdout, stderr)
            if outcome == "clean" and "lock" not in line.lower():
                return {"outcome": "messy", "code": code, "last_line": line, "detail": "no lock named"}
            return {"outcome": outcome, "code": code, "last_line": line}

        return run

    def resume_over_another_run(
        self, out: Path, a: list[str], b: list[str], steps: list[tuple[list[str], list[str]]]
    ) -> Callable[[Probe, dict], dict]:
        """Run A (settings ``a``, checkpoints at steps 4 and 8) in ``out``, then run B's ``steps`` (settings
        ``b`` plus each step's, and its flags) there: a clean refusal, or B's model equal to the one the
        same steps give in an empty folder (A's checkpoints unused; training is seeded, so it repeats)."""

        def run(probe: Probe, context: dict) -> dict:
            runner = context["runner"]
            first = self.train_args(out, [*a, "train.max_steps=8", "train.checkpoint_every=4"])
            code, stdout, stderr = runner.run(first, timeout=600)
            if code != 0:
                return {"outcome": "messy", "code": code, "last_line": last_line(stdout, stderr),
                        "detail": "run A failed"}  # fmt: skip
            for extra, flags in steps:
                code, stdout, stderr = runner.run([*self.train_args(out, [*b, *extra]), *flags], timeout=600)
                if code != 0:  # a refusal (or worse) ends the probe
                    outcome, detail = classify(Probe("b", [], "error"), code, stdout, stderr)
                    return {"outcome": outcome, "code": code, "last_line": last_line(stdout, stderr),
                            "detail": detail}  # fmt: skip
            reference = out.with_name(out.name + "-reference")
            for extra, flags in steps:
                code, stdout, stderr = runner.run([*self.train_args(reference, [*b, *extra]), *flags], 600)
                if code != 0 and flags:  # --resume with nothing to resume from: the fresh run
                    code, stdout, stderr = runner.run(self.train_args(reference, [*b, *extra]), 600)
                if code != 0:
                    return {"outcome": "messy", "code": code, "last_line": last_line(stdout, stderr),
                            "detail": "the reference run failed"}  # fmt: skip
            if not same_weights(out / "model", reference / "model"):
                return {
                    "outcome": "silent",
                    "code": 0,
                    "last_line": "",
                    "detail": "B's model differs from B's run in an empty folder: A's checkpoints used",
                }
            return {"outcome": "clean", "code": 0, "last_line": ""}

        return run

    # -- the HTTP surface of tipcap serve --
    def http_surface(self) -> None:
        """``tipcap serve`` on the fixture model, sent what no page of its own sends: every answer must be a
        4xx with a JSON error (never a 500), and the server must stay up."""
        server = Served(self.f["model"])
        self.cleanup.append(server.stop)
        png = image_bytes((40, 30), "PNG")
        api = {"Content-Type": "application/json"}
        caption = {"method": "model", "prompt": [], "beams": 1}

        def add(name: str, method: str, path: str, body: bytes | Callable[[], bytes], headers: dict,
                expect: str = "error") -> None:  # fmt: skip
            self.add(f"http/{name}", [], expect=expect, runner=server.probe(method, path, body, headers))

        add("valid upload", "POST", "/api/images?name=a.png", png, {"Content-Type": "image/png"}, "ok")
        add("cross-origin text/plain caption", "POST", "/api/caption", json.dumps(caption).encode(),
            {"Content-Type": "text/plain", "Origin": "http://evil.example"})  # fmt: skip
        add(
            "text/plain caption, no origin",
            "POST",
            "/api/caption",
            json.dumps(caption).encode(),
            {"Content-Type": "text/plain"},
        )
        add(
            "cross-origin upload",
            "POST",
            "/api/images?name=a.png",
            png,
            {"Content-Type": "image/png", "Origin": "http://evil.example"},
        )
        add("foreign Host", "GET", "/api/methods", b"", {"Host": "evil.example"})
        add(
            "foreign Host on an upload",
            "POST",
            "/api/images?name=a.png",
            png,
            {"Content-Type": "image/png", "Host": "rebind.evil.example:8000"},
        )
        add(
            "form body to caption",
            "POST",
            "/api/caption",
            b"image_id=x&method=model",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        add(
            "multipart upload",
            "POST",
            "/api/images?name=a.png",
            b"--b\r\nContent-Disposition: form-data; name=f\r\n\r\nx\r\n--b--\r\n",
            {"Content-Type": "multipart/form-data; boundary=b"},
        )
        add("upload declared text/html", "POST", "/api/images?name=a.png", png, {"Content-Type": "text/html"})
        add("no content type", "POST", "/api/caption", json.dumps(caption).encode(), {})
        add("json not an object", "POST", "/api/caption", b"[1, 2]", api)
        add("json truncated", "POST", "/api/caption", b'{"image_id": ', api)
        add("json not utf-8", "POST", "/api/caption", '{"image_id": "caf\u00e9"}'.encode("latin-1"), api)
        add(
            "lone surrogate in a prompt word",
            "POST",
            "/api/caption",
            server.with_image({**caption, "prompt": ["dog\ud800"]}),
            api,
        )
        add(
            "lone surrogate in a jsonl caption",
            "POST",
            "/api/jsonl",
            b'{"results": [{"image": "a.png", "caption": "a \\udc80 dog", "prompt": []}]}',
            api,
        )
        add("deep json nesting", "POST", "/api/caption", b"[" * 100_000 + b"]" * 100_000, api)
        add(
            "deep json nesting in jsonl",
            "POST",
            "/api/jsonl",
            b'{"results": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
            api,
        )
        for name, prompt in (
            ("numbers as prompt", [1, 2]),
            ("a number as prompt", 5),
            ("a dict as prompt", {"a": 1}),
            ("null prompt words", [None]),
        ):
            add(f"{name}", "POST", "/api/caption", server.with_image({**caption, "prompt": prompt}), api)
        add("beams as a string", "POST", "/api/caption", server.with_image({**caption, "beams": "5"}), api)
        add("beams 10**30", "POST", "/api/caption", server.with_image({**caption, "beams": 10**30}), api)
        add("beams true", "POST", "/api/caption", server.with_image({**caption, "beams": True}), api)
        add(
            "unknown image id",
            "POST",
            "/api/caption",
            server.with_image({**caption, "image_id": "nope"}),
            api,
        )
        add("unknown method", "POST", "/api/caption", server.with_image({**caption, "method": "bogus"}), api)
        add("jsonl results a number", "POST", "/api/jsonl", b'{"results": 5}', api)
        add(
            "jsonl caption a number",
            "POST",
            "/api/jsonl",
            b'{"results": [{"image": "a", "caption": 5, "prompt": []}]}',
            api,
        )
        for size in ((1, 2000), (2000, 1), (1, 21), (21, 1), (1, 1)):
            for kind in ("PNG", "GIF"):
                add(
                    f"thin image {size[0]}x{size[1]} {kind}",
                    "POST",
                    "/api/images?name=t.png",
                    image_bytes(size, kind),
                    {"Content-Type": "application/octet-stream"},
                    "ok" if size == (1, 1) else "error",  # tiny, not thin: CLIP's resize takes it
                )
        for kind in ("ICO", "PPM", "PCX", "TGA", "EPS", "PDF", "IM", "SGI"):
            add(
                f"format {kind}",
                "POST",
                f"/api/images?name=x.{kind.lower()}",
                image_bytes((40, 30), kind),
                {"Content-Type": "application/octet-stream"},
            )
        add(
            "svg",
            "POST",
            "/api/images?name=x.svg",
            b'<svg xmlns="http://www.w3.org/2000/svg"/>',
            {"Content-Type": "image/svg+xml"},
        )
        add(
            "truncated png",
            "POST",
            "/api/images?name=t.png",
            png[: len(png) // 2],
            {"Content-Type": "image/png"},
        )
        add("empty upload", "POST", "/api/images?name=e.png", b"", {"Content-Type": "image/png"})
        add(
            "oversize upload",
            "POST",
            "/api/images?name=big.png",
            b"\x89PNG" + os.urandom(200_000),
            {"Content-Type": "image/png"},
        )
        add("oversize json", "POST", "/api/caption", b'{"x": "' + b"a" * 2_000_000 + b'"}', api)
        add(
            "decompression bomb",
            "POST",
            "/api/images?name=bomb.png",
            bomb_png(),
            {"Content-Type": "image/png"},
        )


# --- stand-ins for a hub endpoint, and checks of refusals -----------------------------------------------

_HELD = contextlib.ExitStack()
"""The probes' stand-ins (tests/endpoints.py), kept open for the life of this process."""
# Closed while their threads still run: at finalisation a server's shutdown would wait on a frozen thread.
atexit.register(_HELD.close)


def endpoints() -> tuple[str, str, str]:
    """The URLs of a silent endpoint (it accepts connections and never answers: a captive portal, a silent
    firewall), of a hub mirror that answers 404 to everything, and of a port where nothing listens."""
    sys.path.insert(0, str(ROOT / "tests"))
    import endpoints as stand_ins  # the tests' own, so that the probe and the tests ask the same servers

    mirror, _ = _HELD.enter_context(stand_ins.answering(404))
    return _HELD.enter_context(stand_ins.silent()), mirror, _HELD.enter_context(stand_ins.closed())


def error_has(*needles: str) -> Check:
    """A check of a refusal: its ``Error:`` line names each of ``needles``."""

    def check(code: int, out: str, err: str) -> str | None:
        line = last_line(out, err)
        missing = [n for n in needles if n not in line]
        return f"the error lacks {missing}" if missing else None

    return check


def error_lacks(*needles: str) -> Check:
    """A check of a refusal: its ``Error:`` line names none of ``needles``."""

    def check(code: int, out: str, err: str) -> str | None:
        line = last_line(out, err)
        found = [n for n in needles if n in line]
        return f"the error says {found}" if found else None

    return check


def all_of(*checks: Check) -> Check:
    def check(code: int, out: str, err: str) -> str | None:
        return next((p for p in (c(code, out, err) for c in checks) if p), None)

    return check


def json_check(path: Path, test: Callable[[dict], bool], what: str) -> Check:
    def check(code: int, out: str, err: str) -> str | None:
        try:
            return None if test(json.loads(path.read_text())) else f"{path}: {what}"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{path}: {what} ({e!r})"

    return check


def card_check(path: Path, needles: list[str]) -> Check:
    """A model card whose YAML header holds no NaN and whose text says each of ``needles``."""

    def check(code: int, out: str, err: str) -> str | None:
        if not path.is_file():
            return f"{path}: no card"
        text = path.read_text()
        header = text.split("\n---\n")[0].lower()
        if ".nan" in header or ".inf" in header:
            return f"{path}: a NaN or Inf in the model-index"
        missing = [n for n in needles if n not in text]
        return f"{path}: the card lacks {missing}" if missing else None

    return check


# --- the HTTP surface -------------------------------------------------------------------------------------


def image_bytes(size: tuple[int, int], kind: str) -> bytes:
    """An image of ``size`` saved by Pillow as ``kind``."""
    import io

    from PIL import Image

    mode = "RGB" if kind not in ("GIF", "IM") else "L"
    buffer = io.BytesIO()
    Image.new(mode, size, 120).save(buffer, format=kind)
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A small PNG file of 196 megapixels (over twice Pillow's limit)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (14000, 14000)).save(buffer, format="PNG")
    return buffer.getvalue()


class Served:
    """``tipcap serve`` of one model, started by its first probe and stopped when the probes end; each
    probe sends one request, and is clean when the answer is a 4xx with a JSON error (a 2xx for a valid
    input) and the server still answers afterwards."""

    def __init__(self, model: Path, max_upload_mb: float = 0.05):
        import threading

        self.model, self.max_upload_mb = model, max_upload_mb
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.failed: str | None = None
        self.stderr: list[str] = []
        self.method = ""
        self.image_id: str | None = None

    def start(self, runner: Runner) -> str | None:
        """Start the server once; why it did not start, else ``None``."""
        import re
        import select
        import threading

        with self.lock:
            if self.process is not None or self.failed is not None:
                return self.failed
            args = ["serve", "--model", str(self.model), "--port", "0", "--device", "cpu",
                    "--max-upload-mb", str(self.max_upload_mb)]  # fmt: skip
            self.process = runner.popen(args)
            ready, _, _ = select.select([self.process.stdout], [], [], 180)
            line = self.process.stdout.readline() if ready else ""
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            # Read both pipes for the server's life, so that its logging never blocks on a full pipe.
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr), daemon=True).start()
            threading.Thread(target=self._read, args=(self.process.stdout, []), daemon=True).start()
            if found is None:
                self.failed = f"serve printed {line!r}"
                self.stop()
                return self.failed
            self.port = int(found.group(1))
            self.method = json.loads(self.request("GET", "/api/methods", b"", {})[1])["default"]
            return None

    @staticmethod
    def _read(pipe, lines: list[str]) -> None:
        for line in pipe:
            lines.append(line)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def request(self, method: str, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            connection.request(method, path, body=body, headers={"Host": f"127.0.0.1:{self.port}", **headers})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def alive(self) -> bool:
        try:
            return self.process.poll() is None and self.request("GET", "/api/methods", b"", {})[0] == 200
        except OSError:
            return False

    def with_image(self, payload: dict) -> Callable[[], bytes]:
        """A caption request for an image uploaded once (unless ``payload`` names an image) to the server's
        default method (unless ``payload`` names another than ``model``)."""

        def body() -> bytes:
            with self.lock:
                if self.image_id is None:
                    upload = image_bytes((40, 30), "PNG")
                    _, data = self.request(
                        "POST", "/api/images?name=a.png", upload, {"Content-Type": "image/png"}
                    )
                    self.image_id = json.loads(data)["image_id"]
            method = self.method if payload.get("method") == "model" else payload.get("method")
            return json.dumps({"image_id": self.image_id, **payload, "method": method}).encode()

        return body

    def probe(
        self, method: str, path: str, body: bytes | Callable[[], bytes], headers: dict
    ) -> Callable[[Probe, dict], dict]:
        def run(probe: Probe, context: dict) -> dict:
            failed = self.start(context["runner"])
            if failed is not None:
                return {
                    "outcome": "messy",
                    "code": None,
                    "last_line": failed,
                    "detail": "serve did not start",
                }
            before = len(self.stderr)
            try:
                status, data = self.request(method, path, body() if callable(body) else body, headers)
            except TimeoutError:
                return {"outcome": "hang", "code": None, "last_line": f"{method} {path}: no answer"}
            except OSError as e:
                status, data = None, repr(e).encode()
            crashed = any("Traceback" in line for line in self.stderr[before:])
            answer = data.decode("utf-8", "replace")[:200]
            line = f"HTTP {status}: {answer}"
            if not self.alive():
                return {"outcome": "traceback" if crashed else "messy", "code": status, "last_line": line,
                        "detail": "the server stopped answering"}  # fmt: skip
            if crashed or status is None or status >= 500:
                return {"outcome": "traceback", "code": status, "last_line": line}
            if probe.expect == "ok":
                outcome = "clean" if status == 200 else "messy"
                return {"outcome": outcome, "code": status, "last_line": line}
            if status < 400:
                return {"outcome": "silent", "code": status, "last_line": line, "detail": "accepted"}
            try:
                error = json.loads(data).get("error")
            except (ValueError, AttributeError):
                error = None
            if not isinstance(error, str) or not error:
                return {"outcome": "messy", "code": status, "last_line": line, "detail": "no JSON error"}
            return {"outcome": "clean", "code": status, "last_line": line}

        return run


def same_weights(a: Path, b: Path) -> bool:
    """Whether two model folders hold equal tensors under equal names."""
    import torch
    from safetensors.torch import load_file

    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


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


CLASSES = ("clean", "traceback", "hang", "silent", "messy")


def section_counts(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """Each section's count per class; a probe's section is its name up to the first ``/``."""
    sections: dict[str, Counter] = {}
    for o in outcomes:
        sections.setdefault(o.name.split("/")[0], Counter())[o.outcome] += 1
    return {section: {name: found.get(name, 0) for name in CLASSES} for section, found in sections.items()}


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
    for stop in builder.cleanup:
        stop()
    outcomes.sort(key=lambda o: [p.name for p in probes].index(o.name))
    counts = Counter(o.outcome for o in outcomes)
    print(f"\n{len(outcomes)} probes in {time.monotonic() - start:.0f} s")
    for name in CLASSES:
        print(f"  {name:9s} {counts.get(name, 0)}")
    sections = section_counts(outcomes)
    print("\nper section (" + ", ".join(CLASSES) + "):")
    for section, found in sections.items():
        print(f"  {section:40s} " + " ".join(f"{found[name]:4d}" for name in CLASSES))
    bad = [o for o in outcomes if o.outcome != "clean"]
    if bad:
        print("\nnot clean:")
        for o in bad:
            print(f"  [{o.outcome}] {o.name}: {o.last_line}" + (f" ({o.detail})" if o.detail else ""))
    report = {
        "counts": {n: counts.get(n, 0) for n in CLASSES},
        "sections": sections,
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
