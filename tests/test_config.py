"""Experiment configs: every shipped file validates; mistakes name the key; values round-trip."""

from pathlib import Path

import pytest
import yaml

from tipcap.config import ExperimentConfig, load_config, save_config, to_dict
from tipcap.errors import TipcapError
from tipcap.experiments import load_ablation

EXPERIMENTS = Path(__file__).parent.parent / "experiments"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    if "cells" in yaml.safe_load(path.read_text()):
        ablation = load_ablation(path, ["karpathy=world/toyworld.json", "clip_model=world/clip/toyclip.json"])
        assert ablation.cells and all(cell.name for cell in ablation.cells)
        return
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    if path.parent.name == "coco":
        assert config.model.clip_dim == 512 and config.model.prefix_length == 10
        assert config.train.batch_size == 80 and config.train.lr == 2e-5 and config.data.gap


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "config key 'train.lrr' is unknown"),
        ("model.prompt=soft", "config key 'model.prompt': expected 'none' | 'pim' | 'hard'"),
        ("train.epochs=2.5", "config key 'train.epochs': expected int"),
        ("train.lr=fast", "config key 'train.lr': expected float"),
        ("data=3", "config key 'data': expected DataConfig"),
        ("train.lr", "expected key=value"),
    ],
)
def test_mistakes_name_the_key(override, message):
    with pytest.raises(TipcapError, match=message.replace("|", r"\|").replace("(", r"\(")):
        load_config(EXPERIMENTS / "tiny.yaml", [override])


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
