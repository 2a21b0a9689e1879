"""The README's walk-through "From COCO to Table 1", read out of the README and run as written, at toy size.

The commands come from the code block marked ``<!-- coco-walkthrough -->``. They run in an empty folder that
holds what the README asks for and nothing else (``dataset_coco.json``, COCO's images under ``data/coco``,
the repository's ``experiments/``), so a command that reads something no earlier command built fails. The
model names and sizes are swapped for tiny ones through the flags and ``--set`` overrides the README names
for a toy-size run; every path stays as written.
"""

import json
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import COCO_260, run, tiny_clip_config, write_coco_tree

from tipcap.io import load_json

ROOT = Path(__file__).parent.parent
MARK = "<!-- coco-walkthrough -->"

TOY_DECODER = [
    "model.clip_dim=32",
    "model.tokenizer=word-level",
    "model.language_model_config={model_type: gpt2, n_layer: 2, n_head: 4, n_embd: 128}",
    "train.max_steps=20",
]
"""The README's toy-size decoder for ``train``: experiments/tiny.yaml's, at the tiny CLIP's width."""
GRID_CELLS = ["none", "gaussian-few-pairs", "retrieval"]
"""The cells of experiments/coco/grid.yaml that the toy-size ``ablate`` keeps (web pairs are not here)."""


def readme_commands() -> list[list[str]]:
    """The commands of the README's marked code block, continuation lines joined, comments left out."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count(MARK) == 1, f"the README marks one code block with {MARK}"
    block = text.split(MARK, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def at_toy_size(command: list[str], clip: Path) -> list[str]:
    """``command`` with the tiny CLIP for ViT-B-32 and the README's toy-size overrides; paths as written."""
    swapped = [str(clip) if word == "ViT-B-32" else "none" if word == "openai" else word for word in command]
    verb = swapped[1]
    if verb == "train":
        swapped += [x for value in TOY_DECODER for x in ("--set", value)]
    elif verb == "evaluate":
        swapped += ["--score-clip", str(clip), "--score-pretrained", "none", "--beams", "1",
                    "--metrics", "bleu,rouge,cider"]  # fmt: skip
    elif verb == "ablate":
        shipped = yaml.safe_load((ROOT / "experiments" / "coco" / "grid.yaml").read_text())
        cells = [cell for cell in shipped["cells"] if cell["name"] in GRID_CELLS]
        language = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 64}
        decoder = {
            "model": {"clip_dim": 32, "tokenizer": "word-level", "prefix_length": 2, "max_caption_tokens": 24,
                      "language_model_config": language},
            "train": {"max_steps": 6, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 6},
        }  # fmt: skip
        overrides = [
            f"embed.model={clip}", "embed.pretrained=none", "seeds=[0]", f"decoder={json.dumps(decoder)}",
            f"cells={json.dumps(cells)}", "compare=[]", f"eval.score_clip={clip}",
            "eval.score_pretrained=none", "eval.beams=1", "eval.metrics=[bleu, rouge, cider]",
            "eval.threshold=null",  # a random CLIP is sure of no entity
        ]  # fmt: skip
        swapped += [x for value in overrides for x in ("--set", value)]
    return swapped


def coco_folder(folder: Path) -> None:
    """What the README asks for, from 260 real COCO images' captions: ``dataset_coco.json`` (its 60 val
    images split into 30 val and 30 test, which the sample lacks) and a generated JPEG for each under
    ``data/coco``."""
    document = load_json(COCO_260)
    val = [entry for entry in document["images"] if entry["split"] == "val"]
    for entry in val[len(val) // 2 :]:
        entry["split"] = "test"
    (folder / "dataset_coco.json").write_text(json.dumps(document))
    write_coco_tree(folder / "dataset_coco.json", folder / "data" / "coco", missing=[], corrupt=[])
    (folder / "experiments").symlink_to(ROOT / "experiments")


@pytest.mark.slow
def test_the_readme_walks_from_coco_to_table_1(tmp_path, monkeypatch):
    commands = readme_commands()
    assert [command[:2] for command in commands] == [
        ["tipcap", "prepare"], ["tipcap", "embed"], ["tipcap", "embed"], ["tipcap", "embed"],
        ["tipcap", "fit-gap"], ["tipcap", "train"], ["tipcap", "evaluate"], ["tipcap", "evaluate"],
        ["tipcap", "ablate"],
    ]  # fmt: skip
    clip = tmp_path / "tiny-clip.json"
    clip.write_text(json.dumps(tiny_clip_config()))
    folder = tmp_path / "repository"
    folder.mkdir()
    coco_folder(folder)
    monkeypatch.chdir(folder)
    for command in commands:
        result = run(*at_toy_size(command, clip)[1:])
        assert result.exit_code == 0, f"{shlex.join(command)}\n{result.output}"
    # What each step was to build, where the next one read it.
    for built in ("prepared/coco/dataset.json", "stores/coco/train-text/meta.json",
                  "stores/coco/val-text/meta.json", "stores/coco/train-images-1pct/meta.json",
                  "gaps/coco/few-pairs.safetensors", "gaps/coco/few-pairs.png",
                  "runs/coco/few_pairs/model/model.safetensors", "eval/coco/few_pairs/metrics.json",
                  "eval/coco/retrieval/metrics.json", "runs/coco/grid/table.md"):  # fmt: skip
        assert Path(built).is_file(), built
    data = yaml.safe_load(Path("runs/coco/few_pairs/config.yaml").read_text())["data"]
    read = (data["train_texts"], data["val_texts"], data["gap"])
    assert read == ("stores/coco/train-text", "stores/coco/val-text", "gaps/coco/few-pairs.safetensors")
    scored = load_json(Path("eval/coco/few_pairs/metrics.json"))
    assert scored["matching"]["scored_images"] == 30  # the test split
    rows = (Path("runs/coco/grid") / "results.csv").read_text().splitlines()
    assert sorted(row.split(",")[0] for row in rows[1:]) == sorted(GRID_CELLS)
