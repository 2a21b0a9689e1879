"""NoCaps: `tipcap prepare nocaps` on a file in the official schema, and scores per domain."""

import json
import re
import shutil

import pytest
from conftest import pycocoevalcap_cider, run, write_nocaps
from huggingface_hub import ModelCard

from tipcap.evaluation.references import read_references

DOMAINS = ["in-domain", "near-domain", "out-domain"]


@pytest.fixture(scope="module")
def prepared_nocaps(tmp_path_factory):
    """The small NoCaps file (image 4, near-domain, missing; image 8, out-domain, truncated), prepared."""
    root = tmp_path_factory.mktemp("nocaps")
    annotations = write_nocaps(root, missing=(4,), corrupt=(8,))
    result = run("prepare", "nocaps", "--annotations", annotations, "--images", root / "images",
                 "--out", root / "prepared", "--workers", 0, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    return root, result.stdout


def test_prepare_nocaps_checks_images_and_keeps_domains(prepared_nocaps):
    root, stdout = prepared_nocaps
    assert "missing: 1" in stdout and "corrupt: 1" in stdout
    assert "7 of the 4,500 published validation images are usable" in stdout
    report = json.loads((root / "prepared" / "report.json").read_text())
    assert report["domains"]["in-domain"] == {"listed": 3, "captions": 15, "found": 3, "missing": 0,
                                              "corrupt": 0, "usable": 3}  # fmt: skip
    assert report["domains"]["near-domain"]["missing"] == 1
    assert report["domains"]["out-domain"]["corrupt"] == 1
    assert [p["image_id"] for p in report["problems"]["missing"]] == [4]

    dataset = json.loads((root / "prepared" / "dataset.json").read_text())
    assert [e["image_id"] for e in dataset["images"]] == [0, 1, 2, 3, 5, 6, 7]  # NoCaps ids, usable only
    assert [e["domain"] for e in dataset["images"]][:3] == DOMAINS
    karpathy = read_references(root / "prepared" / "dataset.json", "val")
    coco = read_references(root / "prepared" / "references" / "val.json")
    official = read_references(root / "nocaps_val_4500_captions.json")
    assert karpathy.dataset == coco.dataset == "nocaps"
    assert official.captions == coco.captions  # every image with captions, as the official file
    assert karpathy.captions == {i: coco.captions[i] for i in karpathy.captions}
    assert coco.domains == official.domains and coco.domains[4] == "near-domain"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["images"][2].pop("domain"), r"images\[2\] \(.+\.jpg\) has no 'domain' field"),
        (lambda d: d["images"][0].update(domain="far-domain"), "domain 'far-domain' is not one of"),
        (lambda d: d.pop("annotations"), "has no 'annotations'.*validation file"),
        (lambda d: d["annotations"][3].update(image_id=99), "name image ids not listed in 'images'"),
    ],
)
def test_prepare_nocaps_refuses_bad_files_in_one_line(tmp_path, change, message):
    annotations = write_nocaps(tmp_path)
    document = json.loads(annotations.read_text())
    change(document)
    annotations.write_text(json.dumps(document))
    result = run("prepare", "nocaps", "--annotations", annotations, "--images", tmp_path / "images",
                 "--out", tmp_path / "out", "--workers", 0)  # fmt: skip
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert str(annotations) in result.output
    assert result.output.startswith("Error: ") and re.search(message, result.output)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_prepare_nocaps_missing_images_and_broken_json_in_one_line(tmp_path):
    annotations = write_nocaps(tmp_path, missing=tuple(range(9)))
    nothing = run("prepare", "nocaps", "--annotations", annotations, "--images", tmp_path / "images",
                  "--out", tmp_path / "out", "--workers", 0, "--no-progress")  # fmt: skip
    assert nothing.exit_code == 1 and len(nothing.output.strip().splitlines()) == 1
    assert "none of the 9 images" in nothing.output and ".jpg" in nothing.output
    no_folder = run("prepare", "nocaps", "--annotations", annotations, "--images", tmp_path / "nowhere",
                    "--out", tmp_path / "out")  # fmt: skip
    assert no_folder.exit_code == 1 and "nowhere: no such folder" in no_folder.output
    annotations.write_text(annotations.read_text()[:500])
    broken = run("prepare", "nocaps", "--annotations", annotations, "--images", tmp_path / "images",
                 "--out", tmp_path / "out")  # fmt: skip
    assert broken.exit_code == 1 and len(broken.output.strip().splitlines()) == 1
    assert "not valid JSON" in broken.output


def _domain_predictions(out, domain):
    per_image = json.loads((out / "per_image.json").read_text())
    rows = [row for row in per_image if row["domain"] == domain]
    return [{"image_id": row["image_id"], "caption": row["prediction"]} for row in rows], rows


@pytest.mark.slow
def test_evaluate_and_score_report_every_metric_per_domain(prepared_nocaps, coco_texts, tiny_clip, tmp_path):
    root, _ = prepared_nocaps
    out = tmp_path / "eval"
    result = run("evaluate", "--data", root / "prepared" / "dataset.json", "--split", "val",
                 "--images", root / "images", "--method", "retrieval", "--texts", coco_texts,
                 "--metrics", "bleu,rouge,cider", "--score-clip", tiny_clip, "--score-pretrained", "none",
                 "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "per domain" in result.stdout and "near-domain" in result.stdout
    document = json.loads((out / "metrics.json").read_text())
    assert list(document["domains"]) == DOMAINS
    assert [document["domains"][d]["images"] for d in DOMAINS] == [3, 2, 2]
    official = read_references(root / "nocaps_val_4500_captions.json").captions
    for domain in DOMAINS:
        scores = document["domains"][domain]["metrics"]
        assert set(scores) == set(document["metrics"])  # every metric, CLIP-S and RefCLIP-S included
        predictions, rows = _domain_predictions(out, domain)
        # CIDEr of the domain's images scored on their own, as the NoCaps evaluation does.
        assert scores["CIDEr"] == pytest.approx(pycocoevalcap_cider(predictions, official), abs=1e-9)
        for name in ("CLIP-S", "RefCLIP-S"):
            assert scores[name] == pytest.approx(sum(r[name] for r in rows) / len(rows))

    # `score` against the prepared COCO-format references gives the same figures per domain.
    scored = run("score", "--predictions", out / "predictions.json", "--references",
                 root / "prepared" / "references" / "val.json", "--metrics", "bleu,rouge,cider",
                 "--out", tmp_path / "score")  # fmt: skip
    assert scored.exit_code == 0, scored.output
    again = json.loads((tmp_path / "score" / "metrics.json").read_text())
    for domain in DOMAINS:
        expected = {k: v for k, v in document["domains"][domain]["metrics"].items() if "CLIP" not in k}
        assert again["domains"][domain]["metrics"] == pytest.approx(expected)


@pytest.mark.slow
def test_evaluate_puts_the_figures_on_the_model_card(prepared_nocaps, tiny_model, tmp_path):
    root, _ = prepared_nocaps
    model = shutil.copytree(tiny_model, tmp_path / "model")  # the session's model keeps its card as trained
    args = ["evaluate", "--model", model, "--data", root / "prepared" / "dataset.json", "--split", "val",
            "--images", root / "images", "--metrics", "bleu,cider", "--beams", 1]  # fmt: skip
    first = run(*args, "--out", tmp_path / "greedy")
    assert first.exit_code == 0, first.output
    document = json.loads((tmp_path / "greedy" / "metrics.json").read_text())
    card = ModelCard.load(model / "README.md")
    results = card.data.eval_results
    assert {(r.dataset_type, r.dataset_split, r.dataset_config) for r in results} == {
        ("nocaps", "val", domain) for domain in [None, *DOMAINS]
    }
    cider = {r.dataset_config: r.metric_value for r in results if r.metric_type == "cider"}
    assert cider[None] == round(100 * document["metrics"]["CIDEr"], 2)
    assert cider["out-domain"] == round(100 * document["domains"]["out-domain"]["metrics"]["CIDEr"], 2)
    assert "| nocaps | val | out-domain | 2 | model, prompt none, beams 1 |" in card.text

    # Another decoding setting adds rows; the same setting again replaces its own.
    assert run(*args[:-2], "--beams", 2, "--out", tmp_path / "beam").exit_code == 0
    assert run(*args, "--out", tmp_path / "greedy-again").exit_code == 0
    settings = [r.metric_config for r in ModelCard.load(model / "README.md").data.eval_results]
    assert len(settings) == 2 * len(results)
    assert set(settings) == {"model, prompt none, beams 1", "model, prompt none, beams 2"}
