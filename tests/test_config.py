"""Experiment configs: every shipped file validates; mistakes name the key; values round-trip."""

import dataclasses
import itertools
import re
import shlex
import typing
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union

import pytest
import yaml

from tipcap.config import (
    DataConfig,
    EmbedConfig,
    EvalConfig,
    ExperimentConfig,
    GapConfig,
    ModelConfig,
    SyntheticGapConfig,
    TrainConfig,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from tipcap.errors import TipcapError
from tipcap.evaluation.registry import prompt_modes
from tipcap.grid import expand, load_ablation
from tipcap.grid.config import AblationConfig, Cell
from tipcap.grid.recipes import load_recipe

EXPERIMENTS = Path(__file__).parent.parent / "experiments"
SHIPPED = sorted(EXPERIMENTS.rglob("*.yaml"))
GRIDS = [p for p in SHIPPED if "cells" in yaml.safe_load(p.read_text())]
RECIPES = [p for p in SHIPPED if p.parent.name == "reproduce"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_shipped_configs_validate(path):
    """Ablation grids (files with cells) through load_ablation, reproduction recipes through load_recipe,
    experiment configs through load_config."""
    if path in RECIPES:
        assert load_recipe(path).name == path.stem
        return
    if path in GRIDS:
        ablation = load_ablation(path)
        assert ablation.cells and all(job.name for job in expand(ablation))
        if path.parent.name == "cross_domain":
            source, target = path.stem.split("_to_")
            assert source in ablation.karpathy and target in ablation.eval_karpathy
        return
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    if path.parent.name in ("coco", "flickr30k"):
        assert config.model.clip_dim == 512 and config.model.prefix_length == 10
        assert config.train.batch_size == 80 and config.train.lr == 2e-5
        assert path.parent.name in config.data.train_texts
        assert (
            (config.data.gap is None) == (path.stem == "supervised") == (config.data.train_images is not None)
        )


SINGLE_RUNS = [p for p in SHIPPED if p.parent.name in ("coco", "flickr30k") and p not in GRIDS]
READ_FLAGS = ("--karpathy", "--images", "--corpus", "--texts", "--mu-from", "--config")


@pytest.mark.parametrize("path", SINGLE_RUNS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_a_single_run_config_lists_the_commands_that_build_its_inputs(path):
    """The commands at the top of each run's config build every store and gap it reads, each from the raw
    data or from what an earlier one wrote, and end with the command that trains it."""
    lines = [line.removeprefix("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    commands = [shlex.split(line) for line in lines if line.startswith("tipcap ")]
    written: list[str] = []
    for command in commands:
        flags = dict(itertools.pairwise(command))
        for flag in READ_FLAGS:
            read = flags.get(flag)
            if read is not None and flag != "--config":
                raw = read.startswith("data/") or re.fullmatch(r"dataset_\w+\.json", read)
                assert raw or any(read.startswith(out) for out in written), f"{path}: {flag} {read}"
        written.append(flags["--out"])
    config = load_config(path)
    reads = [config.data.train_texts, config.data.val_texts, config.data.train_images, config.data.val_images,
             config.data.gap]  # fmt: skip
    assert [r for r in reads if r and r not in written] == [], path
    # A supervised decoder is validated on the image embeddings of the validation captions, which train
    # refuses to go without.
    assert (config.data.train_images is None) == (config.data.val_images is None), path
    assert commands[-1][:4] == ["tipcap", "train", "--config", str(path.relative_to(EXPERIMENTS.parent))]


def test_shipped_grids_cover_the_settings_baselines_and_sweep():
    """Both data sets: four settings, every baseline, the upper bound, a 0.1/1/10% sweep; both directions."""
    names = {str(p.relative_to(EXPERIMENTS)) for p in GRIDS}
    assert names == {f"{d}/{g}.yaml" for d in ("coco", "flickr30k") for g in ("grid", "few_pairs_sweep")} | {
        "cross_domain/coco_to_flickr30k.yaml", "cross_domain/flickr30k_to_coco.yaml",
        "cross_domain/coco_to_nocaps.yaml", "toyworld_full.yaml", "toyworld_factors.yaml",
        "toyworld2_factors.yaml", "toyworld2_controls.yaml", "toyworld2_prompts.yaml",
        "toyworld2_prompts_guided.yaml", "toyworld2_prompts_tuned.yaml", "toyworld2_prompts_frozen.yaml",
        "synthetic_gap.yaml", "synthetic_gap_isotropic.yaml", "synthetic_gap_null.yaml",
        "synthetic_gap_dose.yaml", "synthetic_gap_twin.yaml", "gap_prediction.yaml",
    }  # fmt: skip
    # The factor grids declare each setting's chain none → mean-shift → matched → diagonal → gaussian as a
    # family (Holm within it, equivalence within ±0.05 CIDEr), and compare the baselines outside it.
    chain = [
        ("mean-shift", "none"),
        ("mean-isotropic-matched", "mean-shift"),
        ("diagonal", "mean-isotropic-matched"),
        ("gaussian", "diagonal"),
        ("gaussian", "mean-isotropic-matched"),
    ]

    def steps(setting: str) -> list[list[str]]:
        return [[a if a == "none" else f"{a}-{setting}" for a in pair] for pair in chain]

    world2 = load_ablation(EXPERIMENTS / "toyworld2_factors.yaml")
    assert list(world2.families) == ["factor-chain"]
    family = world2.families["factor-chain"]
    assert (family.metric, family.margin, family.comparisons) == ("CIDEr", 0.05, steps("few-pairs"))
    for pair in (["mean-isotropic-few-pairs", "none"], ["supervised", "retrieval"],
                 ["gaussian-few-pairs", "mean-isotropic-few-pairs"]):  # fmt: skip
        assert pair in world2.compare
    # The controls grid: its shape questions declared before it runs, each bridged kind's noise scale chosen
    # on validation scenes (never the test split), and enough seeds for a seed-level sign-flip test.
    controls = load_ablation(EXPERIMENTS / "toyworld2_controls.yaml")
    assert list(controls.families) == ["factor-chain", "shape-controls"]
    assert controls.families["shape-controls"].comparisons == [
        ["gaussian", "rotated"], ["norm-matched", "matched"], ["gaussian", "norm-matched"],
        ["matched-tangential", "matched"],
    ]  # fmt: skip
    kinds = {cell.name: cell.kind for cell in controls.cells}
    assert kinds["rotated"] == "rotated" and kinds["norm-matched"] == "norm-matched"
    selecting = {cell.name for cell in controls.cells if cell.select}
    assert selecting == {"matched", "diagonal", "gaussian", "rotated", "norm-matched"}
    assert controls.select_split == "val" != controls.eval_split and len(controls.seeds) >= 6
    # The prompt grid: its questions declared, the guided cell decoding the unguided cell's decoders.
    prompts = load_ablation(EXPERIMENTS / "toyworld2_prompts.yaml")
    assert prompts.families["prompts"].comparisons == [
        ["pim:oracle", "gaussian"], ["pim:none", "gaussian"], ["pim-guided:oracle", "pim:oracle"],
    ]  # fmt: skip
    assert prompts.families["prompts"].margin == 0.05 and len(prompts.seeds) >= 3
    guided = {cell.name: cell for cell in prompts.cells}["pim-guided"]
    assert guided.decoders == "pim" and guided.set["eval.prompt_guidance"] == 4
    world1 = load_ablation(EXPERIMENTS / "toyworld_factors.yaml")
    for setting in ("few-pairs", "unpaired", "web-pairs"):
        family = world1.families[f"factor-chain-{setting}"]
        assert family.margin == 0.05
        assert family.comparisons == steps(setting)
        assert not any(pair in world1.compare for pair in family.comparisons)
    baselines = {"none", "isotropic", "mean-shift", "close", "memory", "retrieval", "template"}
    for data in ("coco", "flickr30k"):
        grid = load_ablation(EXPERIMENTS / data / "grid.yaml")
        assert {c.kind for c in grid.cells} == {
            "supervised",
            "gaussian",
            "mean-isotropic-matched",  # Σ's total variance without its shape, against the Gaussian
            *baselines,
        } and grid.few_pairs == "1%"
        assert ["gaussian-few-pairs", "mean-isotropic-matched"] in grid.compare
        gaussian = {(c.setting, c.prompt) for c in grid.cells if c.kind == "gaussian"}
        # In text-only the Gaussian has no covariance to fit: that row is isotropic, listed once.
        assert gaussian == {(s, p) for s in ("few-pairs", "web-pairs", "unpaired") for p in ("none", "pim")}
        assert {(c.kind, c.prompt) for c in grid.cells if c.setting == "text-only"} >= {
            ("isotropic", "none"), ("isotropic", "pim")
        }  # fmt: skip
        hard = [c for c in grid.cells if c.prompt == "hard"]
        assert len(hard) == 1 and hard[0].eval_prompts == ["auto"]
        # ViECap's training prompts: entities masked at 0.4, never the whole prompt, no distractor.
        assert hard[0].set == {"train.prompt_drop_all": 0.0, "train.prompt_distractor": 0.0}
        sweep = load_ablation(EXPERIMENTS / data / "few_pairs_sweep.yaml")
        assert sweep.few_pairs == ["0.1%", "1%", "10%"]
        assert {job.few_pairs for job in expand(sweep)} == {None, "0.1%", "1%", "10%"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "config key 'train.lrr' is unknown"),
        ("model.prompt=soft", "config key 'model.prompt': input should be 'none', 'pim' or 'hard'"),
        ("train.epochs=2.5", "config key 'train.epochs': input should be a valid integer"),
        ("train.lr=fast", "config key 'train.lr': input should be a valid number"),
        ("data=3", "config key 'data': input should be a dictionary"),
        ("train.batch_size=0", "config key 'train.batch_size': input should be greater than or equal to 1"),
        ("train.lr=.nan", "config key 'train.lr': input should be a finite number"),
        ("train.max_steps=0", "config key 'train.max_steps': input should be greater than or equal to 1"),
        ("train.lr", "expected key=value"),
        # A boolean is no number, though pydantic's lax mode reads true as 1: one step of training.
        ("train.max_steps=true", "config key 'train.max_steps': input should be a number, not true or false"),
        ("train.lr=false", "config key 'train.lr': input should be a number, not true or false"),
        # Seeds end in torch.manual_seed, whose 64 bits the derived per-step seeds must fit.
        ("train.seed=99999999999999999999", "config key 'train.seed': input should be less than 4294967296"),
        ("train.seed=-1", "config key 'train.seed': input should be greater than or equal to 0"),
        # Every length against the language model's 128 positions (tiny.yaml: prefix 4, captions 30).
        (
            "model.prefix_length=120",
            "model.prefix_length 120 + model.max_caption_tokens 30 = 150 positions, more than the 128 of "
            "model.language_model_config.n_positions; lower these keys",
        ),
        ("model.max_caption_tokens=500", "model.prefix_length 4 + model.max_caption_tokens 500 = 504"),
        ("model.prefix_length=100000", "model.prefix_length 100000 + model.max_caption_tokens 30 = 100030"),
    ],
)
def test_mistakes_name_the_key(override, message):
    with pytest.raises(TipcapError, match=re.escape(message)):
        load_config(EXPERIMENTS / "tiny.yaml", [override])


def test_an_evaluation_prompt_mode_is_built_in_or_a_world_s_prompt_source():
    """none and auto are built in; the toy worlds' entry point adds the modes drawn from their scenes."""
    assert prompt_modes() == ("none", "auto", "oracle", "oracle-one", "oracle-missing", "wrong")
    assert from_dict(EvalConfig, {"prompt": "oracle-missing"}, "eval").prompt == "oracle-missing"
    message = (
        "config key 'eval.prompt': input should be 'none', 'auto', 'oracle', 'oracle-one', 'oracle-missing'"
    )
    with pytest.raises(TipcapError, match=re.escape(f"{message} or 'wrong' (given: 'user').")):
        from_dict(EvalConfig, {"prompt": "user"}, "eval")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seedz=[1]", "config key 'seedz' is unknown"),
        ("eval.beams=wide", "config key 'eval.beams': input should be a valid integer"),
        ("eval.beams=0", "config key 'eval.beams': input should be greater than or equal to 1"),
        ("seeds=[0, x]", "config key 'seeds[1]': input should be a valid integer"),
        ("decoder.train.lr=fast", "config key 'decoder.train.lr': input should be a valid number"),
        ("few_pairs=lots", "config key 'few_pairs': expected a number of images"),
        ("few_pairs=[1%, 0%]", "config key 'few_pairs': expected a number of images (200), a percentage"),
        ("cells=[{name: a, colour: red}]", "config key 'cells[0].colour' is unknown"),
        ("cells=[{name: a, kind: magic}]", "config key 'cells[0].kind': 'magic' is not one of"),
        ("cells=[{name: a, setting: web}]", "config key 'cells[0].setting': 'web' is not one of"),
        (
            "cells=[{name: a, prompt: soft}]",
            "config key 'cells[0].prompt': input should be 'none', 'pim' or 'hard'",
        ),
        ("cells=[{name: a, eval_prompts: [user]}]", "config key 'cells[0].eval_prompts[0]'"),
        (
            "cells=[{name: a, few_pairs: 5}]",
            "config key 'cells[0].few_pairs': applies to few-pairs cells only",
        ),
        (
            "cells=[{name: a, kind: retrieval, prompt: pim}]",
            "config key 'cells[0]': retrieval takes no prompt",
        ),
        (
            "cells=[{name: a, kind: supervised, setting: unpaired}]",
            "config key 'cells[0].setting': supervised",
        ),
        ("cells=[{name: a/b}]", "config key 'cells[0].name': 'a/b' is not a plain name"),
        ("cells=[{name: a, kind: none}, {name: a, kind: none}]", "cell name 'a' is used twice"),
        ("cells=[]", "no cells to run"),
        ("eval.metrics=[bleu]", "config key 'eval.metrics': ['bleu'] must include cider"),
        ("eval.metrics=[cider, wer]", "config key 'eval.metrics[1]'"),
        (
            "cells=[{name: a, set: {gap.sigma2: -1}}]",
            "config key 'cells[0].set.gap.sigma2': input should be greater than 0",
        ),
        ("web_pairs=null", "config key 'cells[11]': a web-pairs cell needs web_pairs"),
        ("seeds=[0, true]", "config key 'seeds[1]': input should be a number, not true or false"),
        (
            "decoder.model.language_model_config.n_positions=8",
            "decoder.model.prefix_length 10 + decoder.model.max_caption_tokens 40 = 50 positions, more than "
            "the 8 of decoder.model.language_model_config.n_positions",
        ),
        (
            "cells=[{name: a, kind: none, set: {model.language_model_config: {n_positions: 60}, "
            "model.prompt: pim, model.pim_tokens: true, model.max_prompt_words: 12}}]",
            "cells[0].set.model.prefix_length 10 + cells[0].set.model.max_prompt_words 12 (one position each "
            "with pim_tokens) + cells[0].set.model.max_caption_tokens 40 = 62 positions, more than the 60 of",
        ),
    ],
)
def test_ablation_mistakes_name_the_key(override, message):
    grid = EXPERIMENTS / "coco" / "grid.yaml"
    with pytest.raises(TipcapError, match=re.escape(message)):
        load_ablation(grid, [override])


def test_overrides_parse_yaml_values_and_round_trip(tmp_path):
    config = load_config(
        EXPERIMENTS / "tiny.yaml", ["train.lr=1e-4", "data.val_texts=null", "train.max_steps=7"]
    )
    assert config.train.lr == 1e-4 and config.data.val_texts is None and config.train.max_steps == 7
    save_config(config, tmp_path / "config.yaml")
    assert to_dict(load_config(tmp_path / "config.yaml")) == to_dict(config)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(TipcapError, match="no such file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(TipcapError, match="not valid YAML"):
        load_config(bad)


def numeric_keys(cls: type) -> list[str]:
    """The keys of a config dataclass whose value is a number (or may be one: ``Positive | None``)."""

    def numeric(annotation: Any) -> bool:
        if typing.get_origin(annotation) is Annotated:
            return numeric(typing.get_args(annotation)[0])
        if typing.get_origin(annotation) in (Union, UnionType):
            return any(numeric(member) for member in typing.get_args(annotation))
        return annotation in (int, float)

    hints = typing.get_type_hints(cls, include_extras=True)
    return [f.name for f in dataclasses.fields(cls) if numeric(hints[f.name])]


CONFIG_CLASSES = (EmbedConfig, GapConfig, ModelConfig, DataConfig, TrainConfig, EvalConfig,
                  SyntheticGapConfig, AblationConfig, Cell)  # fmt: skip


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda cls: cls.__name__)
def test_no_numeric_key_takes_a_boolean(cls):
    keys = numeric_keys(cls)
    assert keys or cls is DataConfig
    required = {"name": "a"} if cls is Cell else {}
    for key in keys:
        with pytest.raises(TipcapError, match=f"config key '{key}': input should be a number, not true"):
            from_dict(cls, {**required, key: True})
