"""Caption metrics: ``tipcap score`` and ``evaluation.metrics`` against pycocoevalcap's own COCOEvalCap.

Predictions are real COCO captions: for each of 100 Karpathy ``val`` images one human caption is held out as
the "prediction" and the others are the references. METEOR starts a Java process that loads for seconds, so
the reference computation runs once per module.
"""

import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from tipcap import __version__
from tipcap.cli import main
from tipcap.errors import TipcapError
from tipcap.evaluation import metrics as ev
from tipcap.evaluation import references as refs
from tipcap.io import write_json_atomic

SLICE = Path(__file__).parent / "data" / "coco_eval_slice.json"
COCOEVALCAP_NAMES = {
    "Bleu_1": "BLEU-1",
    "Bleu_2": "BLEU-2",
    "Bleu_3": "BLEU-3",
    "Bleu_4": "BLEU-4",
    "METEOR": "METEOR",
    "ROUGE_L": "ROUGE-L",
    "CIDEr": "CIDEr",
}
ALL_BUT_SPICE = list(COCOEVALCAP_NAMES.values())


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_json(path: Path, document) -> Path:
    path.write_text(json.dumps(document))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The slice as prediction and reference files: COCO results, COCO annotations, Karpathy (val+restval)."""
    root = tmp_path_factory.mktemp("score")
    images = json.loads(SLICE.read_text())["images"]
    val = [image for image in images if image["split"] == "val"]
    predictions = [{"image_id": image["cocoid"], "caption": image["sentences"][0]["raw"]} for image in val]
    references = {image["cocoid"]: [s["raw"] for s in image["sentences"][1:]] for image in val}
    annotations = [
        {"id": number, "image_id": image_id, "caption": caption}
        for number, (image_id, caption) in enumerate(
            ((i, c) for i, captions in references.items() for c in captions), start=1
        )
    ]
    coco = {"images": [{"id": image["cocoid"], "file_name": image["filename"]} for image in val]}
    karpathy = {
        "dataset": "coco",
        "images": [{**image, "sentences": image["sentences"][1:]} for image in images],
    }
    return SimpleNamespace(
        predictions=write_json(root / "predictions.json", predictions),
        coco=write_json(root / "captions_val.json", {**coco, "annotations": annotations}),
        karpathy=write_json(root / "dataset_coco.json", karpathy),
        prediction_list=predictions,
        references=references,
        restval_ids=[image["cocoid"] for image in images if image["split"] == "restval"],
    )


class _NoSpice:
    """Stands in for pycocoevalcap's Spice inside COCOEvalCap.evaluate (offline it would try to download)."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


@pytest.fixture(scope="module")
def expected(data):
    """What pycocoevalcap's COCOEvalCap computes through pycocotools COCO objects, SPICE stubbed out."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    coco = COCO(str(data.coco))
    results = coco.loadRes(str(data.predictions))
    evaluator = coco_eval.COCOEvalCap(coco, results)
    evaluator.params["image_id"] = results.getImgIds()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(coco_eval, "Spice", _NoSpice)
        evaluator.evaluate()
    metrics = {ours: evaluator.eval[theirs] for theirs, ours in COCOEVALCAP_NAMES.items()}
    # Human captions against four other human captions: far from trivial scores either way.
    assert 0 < metrics["BLEU-4"] < metrics["BLEU-1"] < 1 and 0.3 < metrics["CIDEr"] < 3
    per_image = {image_id: scores["CIDEr"] for image_id, scores in evaluator.imgToEval.items()}
    return SimpleNamespace(metrics=metrics, per_image=per_image)


def assert_matches_cocoevalcap(metrics: dict, expected, names=ALL_BUT_SPICE) -> None:
    assert sorted(metrics) == sorted(names)
    for name in names:
        tolerance = 1e-4 if name == "METEOR" else 1e-6
        assert metrics[name] == pytest.approx(expected.metrics[name], abs=tolerance), name


@pytest.fixture
def evaluate_log(caplog, monkeypatch):
    """Records of the ``tipcap.evaluation.metrics`` logger, whatever the CLI did to the ``tipcap``
    logger before."""
    logger = logging.getLogger("tipcap.evaluation.metrics")
    monkeypatch.setattr(logger, "propagate", False)  # only the handler below: each record once
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def java_children() -> set[int]:
    """Java processes whose parent is this test process (zombies included)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if name == "java" and int(rest[1]) == os.getpid():
            children.add(int(stat.parent.name))
    return children


# ------------------------------------------------------------------------------------------------------
# Acceptance: the numbers of COCOEvalCap
# ------------------------------------------------------------------------------------------------------


def test_score_captions_reproduces_cocoevalcap_and_skips_spice(
    data, expected, tmp_path, monkeypatch, evaluate_log
):
    monkeypatch.setattr(ev, "_spice_dir", lambda: tmp_path)  # an empty folder: no SPICE jar, no CoreNLP
    references = refs.load_references(data.coco)
    matched, report = refs.match_predictions(refs.load_predictions(data.predictions), references)
    assert report["scored_images"] == 100 and list(matched) == list(references)
    before = java_children()
    result = ev.score_captions(matched, references)
    assert_matches_cocoevalcap(result["metrics"], expected)
    assert result["per_image"].keys() == expected.per_image.keys()
    for image_id, cider in expected.per_image.items():
        assert result["per_image"][image_id]["CIDEr"] == pytest.approx(cider, abs=1e-6)
    messages = warnings_of(evaluate_log)
    assert len(messages) == 1 and messages[0].startswith("SPICE skipped: ") and "\n" not in messages[0]
    assert "spice-1.0.jar" in messages[0] and "stanford-corenlp-3.6.0.jar" in messages[0]
    assert "SPICE" in result["skipped"] and "SPICE" not in result["metrics"]
    if Path("/proc/self/stat").exists():
        assert java_children() <= before, "METEOR's Java process was left running"


def test_cli_score_reproduces_cocoevalcap_and_writes_metrics_json(
    data, expected, tmp_path, monkeypatch, evaluate_log
):
    monkeypatch.setattr(ev, "_spice_dir", lambda: tmp_path / "no-spice")
    predictions = tmp_path / "run7.json"
    shutil.copy(data.predictions, predictions)
    command = ["tipcap", "score", "--predictions", str(predictions), "--references", str(data.coco)]
    monkeypatch.setattr(sys, "argv", command)
    result = run(*command[1:])  # default --metrics: all five, SPICE included
    assert result.exit_code == 0, result.output
    path = tmp_path / "run7.metrics.json"
    assert result.stdout.rstrip().endswith(f"wrote {path}")
    document = json.loads(path.read_text())
    assert_matches_cocoevalcap(document["metrics"], expected)
    assert [entry["image_id"] for entry in document["per_image"]] == list(expected.per_image)
    for entry in document["per_image"]:
        assert entry["CIDEr"] == pytest.approx(expected.per_image[entry["image_id"]], abs=1e-6)
    assert "stanford-corenlp" in document["skipped"]["SPICE"]
    messages = warnings_of(evaluate_log)
    assert len(messages) == 1 and messages[0] == f"SPICE skipped: {document['skipped']['SPICE']}"
    assert document["matching"] == {
        "predictions": 100,
        "reference_images": 100,
        "scored_images": 100,
        **{k: {"count": 0, "ids": []} for k in ("unknown_images", "duplicates", "no_reference_captions")},
        "unpredicted": {"count": 0, "ids": []},
    }
    assert document["command"] == command
    assert document["versions"]["tipcap"] == __version__
    assert document["versions"]["pycocoevalcap"] == importlib.metadata.version("pycocoevalcap")
    assert document["versions"]["python"] == platform.python_version()
    assert document["versions"]["torch"] == importlib.metadata.version("torch")
    assert document["predictions"] == str(predictions) and document["split"] is None
    # The terminal: the summary line, no problem lines, a table row per metric with the written value.
    lines = result.stdout.splitlines()
    assert lines[0] == "scored 100 images: 100 predictions, 100 reference images"
    assert "not scored" not in result.stdout
    for name, value in document["metrics"].items():
        assert any(line.split()[:2] == [name, f"{value:.4f}"] for line in lines), name
    assert any(line.split() == ["SPICE", "skipped"] for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run7.json", "run7.metrics.json"]  # no temp file


def test_karpathy_split_and_coco_annotations_give_the_same_scores(data, expected, tmp_path):
    coco = refs.load_references(data.coco)
    karpathy_val = refs.load_references(data.karpathy, "val")
    assert karpathy_val == coco and list(karpathy_val) == list(coco)  # same captions, same order
    assert list(refs.load_references(data.karpathy, "train")) == data.restval_ids  # train includes restval
    assert len(refs.load_references(data.karpathy)) == 110
    result = run(
        "score", "--predictions", data.predictions, "--references", data.karpathy, "--split", "val",
        "--metrics", "cider, BLEU,rouge", "--out", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert_matches_cocoevalcap(
        document["metrics"], expected, ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    )
    assert document["split"] == "val" and document["skipped"] == {}


# ------------------------------------------------------------------------------------------------------
# Nothing silently dropped
# ------------------------------------------------------------------------------------------------------


def test_unknown_duplicate_and_missing_predictions_are_reported(data, tmp_path):
    ids = list(data.references)
    dropped = [ids[10], ids[20], ids[30]]
    predictions = [p for p in data.prediction_list if p["image_id"] not in dropped]
    predictions.insert(5, {"image_id": 0, "caption": "an image that is not in the references"})
    predictions.append({"image_id": ids[1], "caption": "a second caption for the same image"})
    predictions.append({"image_id": "not-an-image", "caption": "another stranger"})
    predictions.append({"image_id": ids[0], "caption": "a second caption for the first image"})
    path = write_json(tmp_path / "preds.json", predictions)
    result = run("score", "--predictions", path, "--references", data.coco, "--metrics", "bleu,cider")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "preds.metrics.json").read_text())["matching"]
    assert (
        report["predictions"] == 101 and report["reference_images"] == 100 and report["scored_images"] == 97
    )
    assert report["unknown_images"] == {"count": 2, "ids": [0, "not-an-image"]}
    assert report["duplicates"] == {"count": 2, "ids": [ids[1], ids[0]]}
    assert report["unpredicted"] == {"count": 3, "ids": dropped}
    assert report["no_reference_captions"] == {"count": 0, "ids": []}
    out = result.stdout
    assert "2 predictions for images not in the references, not scored (ids: 0, not-an-image)" in out
    assert f"2 duplicate predictions, only each image's first is scored (ids: {ids[1]}, {ids[0]})" in out
    assert f"3 reference images without a prediction, not scored (ids: {', '.join(map(str, dropped))})" in out
    assert "without reference captions" not in out
    scored = [
        entry["image_id"] for entry in json.loads((tmp_path / "preds.metrics.json").read_text())["per_image"]
    ]
    assert scored == [i for i in ids if i not in dropped]


def test_match_predictions_keeps_first_duplicate_and_lists_at_most_ten_ids():
    references = {i: [f"caption {i}"] for i in range(30)} | {"empty": []}
    predictions = [{"image_id": i, "caption": f"first {i}"} for i in range(20, 0, -1)]
    predictions += [{"image_id": i, "caption": f"second {i}"} for i in range(1, 13)]
    predictions += [{"image_id": 99, "caption": "x"}, {"image_id": 99, "caption": "y"}]
    predictions += [{"image_id": "empty", "caption": "z"}]
    matched, report = refs.match_predictions(predictions, references)
    assert list(matched) == list(range(1, 21)) and all(matched[i] == f"first {i}" for i in matched)
    assert report["duplicates"] == {"count": 12, "ids": list(range(1, 11))}
    assert report["unknown_images"] == {"count": 2, "ids": [99]}
    assert report["no_reference_captions"] == {"count": 1, "ids": ["empty"]}
    assert report["unpredicted"] == {"count": 10, "ids": [0, *range(21, 30)]}
    text = refs.format_report(report)
    assert "12 duplicate predictions, only each image's first is scored (ids: 1, 2, 3" in text
    assert text.count(", ...)") == 1  # only the duplicates have more ids than the ten listed
    assert "1 prediction for an image without reference captions, not scored (ids: empty)" in text


def test_coco_image_without_annotations_is_kept_as_empty(tmp_path):
    path = write_json(
        tmp_path / "refs.json",
        {"images": [{"id": 1}, {"id": 2}], "annotations": [{"image_id": 1, "caption": "A cat."}]},
    )
    assert refs.load_references(path) == {1: ["A cat."], 2: []}


# ------------------------------------------------------------------------------------------------------
# SPICE, tokenisation, output helpers
# ------------------------------------------------------------------------------------------------------


def test_spice_availability_names_the_missing_jars(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "_spice_dir", lambda: tmp_path)
    reason = ev.spice_unavailable()
    assert (
        "spice-1.0.jar" in reason and "lib/stanford-corenlp-3.6.0.jar" in reason and str(tmp_path) in reason
    )
    (tmp_path / "lib").mkdir()
    for name in ("spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar"):
        (tmp_path / name).touch()
    assert "lib/stanford-corenlp-3.6.0-models.jar" in ev.spice_unavailable()
    (tmp_path / "lib/stanford-corenlp-3.6.0-models.jar").touch()
    assert ev.spice_unavailable() is None


def test_failing_spice_is_one_warning_and_other_metrics_stay(tmp_path, monkeypatch, evaluate_log):
    monkeypatch.setattr(ev, "spice_unavailable", lambda: None)

    def crash(gts, res):
        raise subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])

    monkeypatch.setattr(ev, "_run_spice", crash)
    result = ev.score_captions(
        {1: "a dog runs on the grass"}, {1: ["a dog runs on grass", "a dog on a lawn"]}, ["spice", "bleu"]
    )
    assert list(result["metrics"]) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]
    messages = warnings_of(evaluate_log)
    assert len(messages) == 1 and messages[0].startswith("SPICE skipped: SPICE failed (CalledProcessError:")
    assert result["skipped"]["SPICE"] == messages[0].removeprefix("SPICE skipped: ")


def test_carriage_return_in_a_caption_does_not_shift_later_images():
    # pycocoevalcap writes one caption per line for Java's tokenizer, which also breaks lines at "\r".
    captions = {
        1: "a man rides a red bike\rdown the road",
        2: "two dogs play with a ball",
        3: "a cat sleeps on a bed",
    }
    references = {1: ["a man rides a red bike down the road"], 2: [captions[2]], 3: [captions[3]]}
    result = ev.score_captions(captions, references, ["bleu"])
    assert result["metrics"]["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_the_java_tokenizer_prints_nothing_to_the_terminal(capfd):
    """pycocoevalcap's tokenizer writes "PTBTokenizer tokenized ..." to the process's stderr per call."""
    captions = {1: "a man rides a red bike", 2: "two dogs play with a ball"}
    ev.score_captions(captions, {1: [captions[1]], 2: [captions[2]]}, ["bleu"])
    assert "PTBTokenizer" not in capfd.readouterr().err


def test_check_metrics_and_format_table():
    assert ev.check_metrics(["CIDEr", " bleu", "cider", ""]) == ("bleu", "cider")
    with pytest.raises(TipcapError, match="unknown metric 'blue'"):
        ev.check_metrics(["blue", "cider"])
    table = ev.format_table({"BLEU-4": 0.31234, "CIDEr": 1.0456}, {"SPICE": "no jars"}).splitlines()
    assert table[0].split() == ["metric", "score", "x100"]
    assert [row.split() for row in table[1:]] == [
        ["BLEU-4", "0.3123", "31.2"],
        ["CIDEr", "1.0456", "104.6"],
        ["SPICE", "skipped"],
    ]


def test_metrics_path_and_atomic_write(tmp_path):
    assert ev.metrics_path("runs/a/predictions.json") == Path("runs/a/predictions.metrics.json")
    assert ev.metrics_path("p.JSON.gz") == Path("p.metrics.json")
    assert ev.metrics_path("p.json", tmp_path) == tmp_path / "metrics.json"
    path = tmp_path / "deep" / "metrics.json"
    write_json_atomic(path, {"metrics": {"SPICE": float("nan"), "CIDEr": 1.5}})
    assert json.loads(path.read_text()) == {"metrics": {"SPICE": None, "CIDEr": 1.5}}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


# ------------------------------------------------------------------------------------------------------
# User errors: one line, naming the file or flag
# ------------------------------------------------------------------------------------------------------

BAD_INPUTS = [
    ("predictions", '[{"image_id": 1, "capt', [], "not valid JSON at line 1, column"),
    ("predictions", '[{"image_id": 1, "caption": "ok"}, {"image_id": 2}]', [],
     "entry [1] (image 2) has no 'caption'"),
    ("predictions", '[{"caption": "no id"}]', [], "entry [0] has no 'image_id'"),
    ("predictions", '{"annotations": []}', [], "not a COCO results file"),
    ("predictions", None, [], "no such file"),
    ("references", '{"info": {}}', [], "neither a COCO caption annotation file"),
    ("references", '{"images": [{"id": 1}], "annotations": [{"image_id": 1}]}', [],
     "annotations[0] has no 'caption'"),
    ("references", '{"images": [{"id": 1}], "annotations": [{"image_id": 2, "caption": "x"}]}', [],
     "image_id 2 is not listed in 'images'"),
    ("references", '{"images": [{"filename": "a.jpg", "split": "val", "sentences": [{"raw": 3}]}]}', [],
     "sentences[0] has no 'raw' string field"),
    ("references", "", [], "not valid JSON"),
    ("references", None, [], "no such file"),
    ("coco", None, ["--split", "val"], "has no splits: drop --split val"),
    ("karpathy", None, ["--split", "test"], "no reference captions in split 'test'"),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "text", "extra", "message"), BAD_INPUTS)
def test_malformed_inputs_give_one_error_line_naming_the_file(data, tmp_path, bad, text, extra, message):
    predictions, references = data.predictions, data.coco
    if bad == "predictions":
        predictions = tmp_path / "preds.json"
    elif bad == "references":
        references = tmp_path / "refs.json"
    elif bad == "karpathy":
        references = data.karpathy
    named = predictions if bad == "predictions" else references
    if text is not None:
        named.write_text(text)
    result = run("score", "--predictions", predictions, "--references", references, *extra)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr and str(named) in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_unknown_metric_names_the_flag(data):
    result = run(
        "score", "--predictions", data.predictions, "--references", data.coco, "--metrics", "bleu,blue"
    )
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == (
        "Error: --metrics 'bleu,blue': unknown metric 'blue'; use any of bleu, meteor, rouge, cider, spice."
    )


def test_no_prediction_matching_any_reference_is_an_error(data, tmp_path):
    as_strings = [{**p, "image_id": str(p["image_id"])} for p in data.prediction_list]
    path = write_json(tmp_path / "preds.json", as_strings)
    result = run("score", "--predictions", path, "--references", data.coco)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "100 predictions for images not in the references, not scored" in result.stdout
    error = result.stderr.strip()
    assert error.startswith(f"Error: {path}: none of its 100 predictions") and "image_id: '" in error
    assert not (tmp_path / "preds.metrics.json").exists()
