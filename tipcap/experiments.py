"""Ablations: a grid of gap kinds × data settings × prompt modes × seeds under one protocol.

Every step goes through the library functions behind the commands (``embed``, ``fit-gap``, ``train``,
``evaluate``) and is cached in the output directory: stores, gap files, trained models and evaluations
are reused when present, so a grid that was interrupted finishes only its missing cells on a rerun.

Outputs: ``results.csv`` (one row per cell, seed and evaluation prompt mode), ``table.md`` (mean ± std
over seeds) and ``cider.png`` (CIDEr per method).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tipcap.clip import ClipSpec
from tipcap.config import ExperimentConfig, apply_overrides, from_dict
from tipcap.embed import embed_images, embed_texts
from tipcap.errors import TipcapError
from tipcap.gap import fit_gap, join_pairs, plot_gap
from tipcap.protocol import evaluate_split
from tipcap.store import EmbeddingStore
from tipcap.train import train

COLUMNS = ("cell", "kind", "setting", "prompt", "eval_prompt", "seed", "CIDEr", "BLEU-4", "ROUGE-L",
           "CLIPScore", "object_f1")  # fmt: skip


@dataclass
class Cell:
    """One method: a gap kind fitted in a setting (or ``supervised``), trained with prompts or not."""

    name: str
    kind: str = "gaussian"
    setting: str = "text-only"
    prompt: str = "none"
    eval_prompts: list[str] = field(default_factory=lambda: ["none"])


@dataclass
class AblationConfig:
    """A grid over one data set (a Karpathy file whose images lie under ``image_root``)."""

    karpathy: str = ""
    image_root: str | None = None
    web_pairs: str | None = None
    vocabulary: str | None = None
    clip_model: str = ""
    clip_pretrained: str = "none"
    few_pairs: int = 200
    eval_split: str = "test"
    beams: int = 1
    metrics: list[str] = field(default_factory=lambda: ["bleu", "rouge", "cider"])
    seeds: list[int] = field(default_factory=lambda: [0])
    decoder: dict[str, Any] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)


def load_ablation(path: str | Path, overrides: list[str] | None = None) -> AblationConfig:
    """Read an ablation YAML, apply ``key=value`` overrides, and validate it like experiment configs."""
    path = Path(path)
    if not path.is_file():
        raise TipcapError(f"{path}: no such ablation config.")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    config = from_dict(AblationConfig, apply_overrides(data, overrides or []))
    from_dict(
        ExperimentConfig, {**config.decoder, "data": {}}, "decoder"
    )  # a bad decoder fails now, not later
    if not config.cells:
        raise TipcapError(f"{path}: no cells to run.")
    if not config.karpathy or not config.clip_model:
        raise TipcapError(f"{path}: set karpathy and clip_model (in the file or with --set).")
    return config


def _objects(karpathy: Path) -> dict[Any, list[str]]:
    """Ground-truth (colour, shape) names per image id, where the file records its scenes' objects."""
    from tipcap.data.karpathy import image_id_of

    document = json.loads(karpathy.read_text(encoding="utf-8"))
    return {
        image_id_of(entry): [f"{o['colour']} {o['shape']}" for o in entry["objects"]]
        for entry in document["images"]
        if "objects" in entry
    }


class Ablation:
    """Runs an :class:`AblationConfig` into ``out``, reusing everything already there."""

    def __init__(self, config: AblationConfig, out: str | Path, progress: bool = True):
        self.config = config
        self.out = Path(out)
        self.progress = progress
        self.clip = ClipSpec(config.clip_model, config.clip_pretrained)
        self.karpathy = Path(config.karpathy)
        self.root = Path(config.image_root) if config.image_root else self.karpathy.parent
        self.objects = _objects(self.karpathy)
        self._checked: set[Path] = set()

    # -- cached steps ---------------------------------------------------------------------------

    def _texts(self, name: str, corpus: Path, split: str | None) -> Path:
        out = self.out / "stores" / name
        # Checking a store re-reads and hashes its inputs: do it once per run, not once per cell.
        if out not in self._checked:
            embed_texts(corpus, self.clip, out, split=split, progress=self.progress)
            self._checked.add(out)
        return out

    def _images(self, name: str, source: Path, split: str | None, limit: str | None = None) -> Path:
        out = self.out / "stores" / name
        if out not in self._checked:
            root = self.root if source == self.karpathy else source.parent
            embed_images(
                source, self.clip, out, image_root=root, split=split, limit=limit, progress=self.progress
            )
            self._checked.add(out)
        return out

    def stores_for(self, setting: str) -> tuple[Path, Path | None]:
        """(caption store, image store) from which a setting's gap is fitted."""
        texts = self._texts("train-text", self.karpathy, "train")
        if setting == "few-pairs":
            return texts, self._images("train-images-few", self.karpathy, "train", str(self.config.few_pairs))
        if setting == "unpaired":
            return texts, self._images("train-images", self.karpathy, "train")
        if setting == "web-pairs":
            if not self.config.web_pairs:
                raise TipcapError("a web-pairs cell needs web_pairs (a JSONL of image-caption pairs).")
            web = Path(self.config.web_pairs)
            return self._texts("web-text", web, None), self._images("web-images", web, None)
        return texts, None

    def gap(self, kind: str, setting: str) -> Path | None:
        """The gap file of a kind and setting, fitted once (``None`` for ``none``-free supervised runs)."""
        path = self.out / "gaps" / f"{kind}-{setting}.safetensors"
        if not path.is_file():
            texts, images = self.stores_for(setting)
            texts_store = EmbeddingStore.open(texts)
            images_store = EmbeddingStore.open(images) if images else None
            gap = fit_gap(setting, texts_store, images_store, kind=kind)
            gap.save(path)
            if kind == "gaussian" and images_store is not None:
                plot_gap(gap, join_pairs(texts_store, images_store), path.with_suffix(".png"))
        return path

    def model(self, cell: Cell, seed: int) -> Path:
        """Train (or reuse, or resume) the cell's decoder for one seed."""
        run = self.out / "runs" / f"{cell.name}-seed{seed}"
        if (run / "model" / "config.json").is_file():
            return run / "model"
        texts = self._texts("train-text", self.karpathy, "train")
        data: dict[str, Any] = {"train_texts": str(texts)}
        if cell.kind == "supervised":
            data["train_images"] = str(self._images("train-images", self.karpathy, "train"))
        else:
            data["gap"] = str(self.gap(cell.kind, cell.setting))
        decoder = json.loads(json.dumps(self.config.decoder))
        decoder.setdefault("model", {}).update({"prompt": cell.prompt, "vocabulary": self.config.vocabulary})
        decoder.setdefault("train", {})["seed"] = seed
        config = from_dict(ExperimentConfig, {**decoder, "data": data})
        return train(config, run, resume=(run / "checkpoints").is_dir(), progress=self.progress)

    def evaluate(self, cell: Cell, seed: int, eval_prompt: str) -> dict[str, Any]:
        """Evaluate one trained cell (cached), with object F1 beside the caption metrics."""
        from tipcap.data.toyworld import object_f1

        out = self.out / "eval" / f"{cell.name}-seed{seed}-{eval_prompt}"
        if not (out / "metrics.json").is_file():
            test_store = self._images(
                f"{self.config.eval_split}-images", self.karpathy, self.config.eval_split
            )
            evaluate_split(
                self.karpathy, self.config.eval_split, out, model_dir=self.model(cell, seed),
                image_store=test_store, prompt=eval_prompt, oracle_prompts=self.objects,
                beams=self.config.beams, metrics=self.config.metrics,
            )  # fmt: skip
        metrics = json.loads((out / "metrics.json").read_text())["metrics"]
        per_image = json.loads((out / "per_image.json").read_text())
        scored = [r for r in per_image if r["image_id"] in self.objects]
        f1 = statistics.mean(object_f1(r["prediction"], [
            {"colour": name.split()[0], "shape": name.split()[1]} for name in self.objects[r["image_id"]]
        ]) for r in scored) if scored else float("nan")  # fmt: skip
        return {
            "cell": cell.name, "kind": cell.kind, "setting": cell.setting, "prompt": cell.prompt,
            "eval_prompt": eval_prompt, "seed": seed, "CIDEr": metrics.get("CIDEr"),
            "BLEU-4": metrics.get("BLEU-4"), "ROUGE-L": metrics.get("ROUGE-L"),
            "CLIPScore": metrics.get("CLIPScore"), "object_f1": f1,
        }  # fmt: skip

    # -- the grid -------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Run every cell × seed × evaluation prompt mode; write the CSV, the table and the plot."""
        rows = []
        for cell in self.config.cells:
            for seed in self.config.seeds:
                for eval_prompt in cell.eval_prompts:
                    rows.append(self.evaluate(cell, seed, eval_prompt))
                    self._write_csv(rows)
        (self.out / "table.md").write_text(markdown_table(rows), encoding="utf-8")
        plot_cider(rows, self.out / "cider.png")
        return rows

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.out / "results.csv.tmp"
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.out / "results.csv")


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["cell"], row["eval_prompt"]), []).append(row)
    return groups


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Mean ± std over seeds of each method (and evaluation prompt mode)."""
    lines = [
        "| method | prompt at test | seeds | CIDEr | BLEU-4 | CLIPScore | object F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for (cell, prompt), group in _groups(rows).items():
        values = {k: [float(r[k]) for r in group] for k in ("CIDEr", "BLEU-4", "CLIPScore", "object_f1")}
        cells = " | ".join(_mean_std(values[k]) for k in ("CIDEr", "BLEU-4", "CLIPScore", "object_f1"))
        lines.append(f"| {cell} | {prompt} | {len(group)} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_cider(rows: list[dict[str, Any]], path: Path) -> None:
    """A bar chart of CIDEr per method (mean over seeds, with the spread as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    labels = [cell if prompt == "none" else f"{cell} [{prompt}]" for cell, prompt in groups]
    means = [statistics.mean(float(r["CIDEr"]) for r in g) for g in groups.values()]
    spreads = [statistics.stdev(float(r["CIDEr"]) for r in g) if len(g) > 1 else 0.0 for g in groups.values()]
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4.5))
    axis.bar(range(len(labels)), means, yerr=spreads, capsize=4, color="tab:blue")
    axis.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    axis.set_ylabel("CIDEr")
    axis.set_title("CIDEr per method (mean over seeds)")
    figure.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    os.replace(tmp, path)


def run_ablation(
    config_path: str | Path, out: str | Path, overrides: list[str] | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """Load an ablation config and run it into ``out``."""
    return Ablation(load_ablation(config_path, overrides), out, progress=progress).run()


@dataclass(frozen=True)
class DemoScale:
    """Sizes of the demo's world, CLIP and grid."""

    train: int
    val: int
    test: int
    clip_steps: int
    clip_batch: int
    clip_config: dict[str, Any]
    grid: str


def demo_scale(quick: bool) -> DemoScale:
    """The full demo, or the reduced one (``--quick``) that finishes in a few minutes on a laptop CPU."""
    from tipcap.toyclip import TOYCLIP_CONFIG

    if not quick:
        return DemoScale(20_000, 500, 500, 1_200, 64, TOYCLIP_CONFIG, "toyworld.yaml")
    return DemoScale(2_000, 100, 100, 400, 64, TOYCLIP_CONFIG, "toyworld_quick.yaml")


def run_demo(
    out: str | Path, cache: str | Path, seed: int = 0, quick: bool = False, progress: bool = True
) -> list[dict[str, Any]]:
    """The whole pipeline offline: a toy world and its CLIP (cached by seed and size), then the core grid.

    Writes the grid's files into ``out`` plus ``gap.png`` (the few-pairs Gaussian gap) and returns its rows.
    """
    import hashlib
    import importlib.resources
    import shutil

    from tipcap.data.toyworld import write_toyworld
    from tipcap.toyclip import train_toyclip

    scale = demo_scale(quick)
    key = hashlib.sha256(json.dumps([seed, scale.train, scale.val, scale.test]).encode()).hexdigest()[:10]
    world = Path(cache) / f"toyworld-{key}"
    karpathy = world / "toyworld.json"
    if not karpathy.is_file():
        write_toyworld(world, seed=seed, train=scale.train, val=scale.val, test=scale.test)
    clip_key = hashlib.sha256(
        json.dumps([scale.clip_config, scale.clip_steps, scale.clip_batch, seed]).encode()
    )
    clip_dir = world / f"clip-{clip_key.hexdigest()[:10]}"
    weights = clip_dir / "toyclip.safetensors"
    if not weights.is_file():
        train_toyclip(karpathy, clip_dir, steps=scale.clip_steps, batch_size=scale.clip_batch, seed=seed,
                      config=scale.clip_config, progress=progress)  # fmt: skip
    grid = importlib.resources.files("tipcap") / "resources" / scale.grid
    overrides = [
        f"karpathy={karpathy}", f"web_pairs={world / 'web_pairs.jsonl'}",
        f"vocabulary={world / 'entities.json'}", f"clip_model={clip_dir / 'toyclip.json'}",
        f"clip_pretrained={weights}", f"seeds=[{seed}]",
    ]  # fmt: skip
    rows = run_ablation(Path(str(grid)), out, overrides, progress=progress)
    gap_plot = Path(out) / "gaps" / "gaussian-few-pairs.png"
    if gap_plot.is_file():
        shutil.copyfile(gap_plot, Path(out) / "gap.png")
    return rows
