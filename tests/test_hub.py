"""Model cards, `tipcap push`, and `TIPCap.from_pretrained` with a hub name (offline: the hub's cache)."""

import json
import os
import shutil
import subprocess
import sys

import endpoints
import httpx2
import huggingface_hub
import pytest
import torch
from conftest import TINY_CONFIG, run
from huggingface_hub import ModelCard
from huggingface_hub.utils._http import default_client_factory

import tipcap.hub
from tipcap import TIPCap
from tipcap.card import record_evaluation, write_model_card
from tipcap.errors import TipcapError
from tipcap.gap import Gap
from tipcap.gap.report import gap_report
from tipcap.io import load_json
from tipcap.training.setup import corpus_dataset

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_trained_model_has_a_hub_model_card(tiny_model):
    card = ModelCard.load(tiny_model / "README.md")
    assert card.data.library_name == "tipcap"
    # transformers.pipeline("image-to-text") cannot load it: no pipeline tag offers it, and the card says how.
    assert card.data.pipeline_tag is None and "TIPCap.from_pretrained" in card.text
    assert "`transformers.pipeline` and `AutoModel` cannot load it" in card.text
    assert {"gap-isotropic", "setting-text-only"} <= set(card.data.tags)
    assert card.data.get("license") is None  # not claimed: it depends on data and weights
    report = gap_report(Gap.load(tiny_model / "gap.safetensors"))
    row = (f"| text-only | isotropic | 32 | {report['mu_norm']:.4f} | {report['sigma_trace']:.4f} | "
           f"{report['effective_rank']:.1f} |")  # fmt: skip
    assert row in card.text
    record = load_json(tiny_model / "provenance.json")
    assert "max_steps: 20" in card.text and record["inputs"]["train_texts"] in card.text
    assert "Not evaluated yet" in card.text and not card.data.eval_results


def test_saving_removes_the_card_of_the_weights_it_replaces(tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    record_evaluation(folder, nocaps_document("openai", 0.5), "nocaps", "val", "beams 5")
    model = TIPCap.from_pretrained(folder, device="cpu")
    model.save_pretrained(folder)
    assert not (folder / "README.md").exists()  # its figures were the old weights'
    model.save_pretrained(tmp_path / "copy")
    card = ModelCard.load(write_model_card(tmp_path / "copy"))
    assert "no training record" in card.text and "isotropic" in card.text and not card.data.eval_results


def test_the_card_names_the_training_data_set_the_runs_provenance_records(tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    record = load_json(folder / "provenance.json")
    assert record["dataset"] is None  # the test slice's corpus names no data set
    # The card reads the folder alone: the caption store its record names is not opened.
    store = tmp_path / "store"
    store.mkdir()
    (store / "meta.json").write_text(json.dumps({"source": {"corpus": "/data/dataset_coco.json"}}))
    record["config"]["data"]["train_texts"] = str(store)
    for dataset, named in ((None, None), ("coco", ["coco"]), ("flickr30k", ["flickr30k"]), ("nocaps", None)):
        (folder / "provenance.json").write_text(json.dumps({**record, "dataset": dataset}))
        assert ModelCard.load(write_model_card(folder)).data.datasets == named


def test_training_records_the_data_set_its_corpus_names(tmp_path):
    assert corpus_dataset("/data/dataset_flickr30k.json.gz") == "flickr30k"
    assert corpus_dataset(tmp_path / "prepared" / "corpus" / "train.json") is None  # no report.json
    (tmp_path / "prepared" / "corpus").mkdir(parents=True)
    (tmp_path / "prepared" / "report.json").write_text(json.dumps({"dataset": "coco"}))
    assert corpus_dataset(tmp_path / "prepared" / "corpus" / "train.json") == "coco"
    assert corpus_dataset(None) is None


@pytest.fixture
def hub_cache(tiny_model, tmp_path, monkeypatch):
    """A Hugging Face cache holding the tiny model as the hub model ``owner/tiny`` at :data:`COMMIT`."""
    cache = tmp_path / "hub-cache"
    repo = cache / "models--owner--tiny"
    shutil.copytree(tiny_model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_from_pretrained_loads_a_hub_name_from_the_cache_offline(tiny_model, hub_cache):
    local = TIPCap.from_pretrained(tiny_model, device="cpu")
    for name, revision in (("owner/tiny", None), (f"owner/tiny@{COMMIT}", None), ("owner/tiny", "main")):
        hub = TIPCap.from_pretrained(name, device="cpu", revision=revision)
        for key, tensor in local.state_dict().items():
            assert torch.equal(tensor, hub.state_dict()[key]), key
    v = torch.nn.functional.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    expected = [r.caption for r in local.caption(embeddings=v, num_beams=1)]
    assert [r.caption for r in hub.caption(embeddings=v, num_beams=1)] == expected


def test_a_local_folder_wins_over_the_hub_name(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "tiny").mkdir(parents=True)
    with pytest.raises(TipcapError, match=r"owner/tiny: not a tipcap model directory"):
        TIPCap.from_pretrained("owner/tiny", device="cpu")


def test_uncached_hub_model_fails_at_once_offline(hub_cache):
    with pytest.raises(TipcapError, match=r"owner/other.*not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        TIPCap.from_pretrained("owner/other", device="cpu")
    with pytest.raises(TipcapError, match=r"revision v2.*HF_HUB_OFFLINE"):
        TIPCap.from_pretrained("owner/tiny@v2", device="cpu")


def test_pull_and_push_offline_fail_in_one_line(tiny_model, hub_cache, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    pulled = run("caption", tmp_path / "photo.png", "--model", "owner/other")
    assert pulled.exit_code == 1 and len(pulled.output.strip().splitlines()) == 1
    assert "HF_HUB_OFFLINE is set" in pulled.output and "hf download owner/other" in pulled.output
    pushed = run("push", "--model", tiny_model, "--repo", "owner/tiny")
    assert pushed.exit_code == 1 and len(pushed.output.strip().splitlines()) == 1
    assert pushed.output.startswith("Error: cannot push") and "HF_HUB_OFFLINE is set" in pushed.output


def test_push_without_network_fails_at_once(tiny_model, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with endpoints.closed() as url:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        with pytest.raises(TipcapError, match=rf"{url} \(HF_ENDPOINT\) cannot be reached"):
            tipcap.hub.push_model(tiny_model, "owner/tiny")


def test_push_publishes_the_folder_with_its_card(tiny_model, tmp_path, monkeypatch):
    calls = {}

    class Commit:
        commit_url = "https://huggingface.co/owner/tiny/commit/1"

    def create_repo(self, repo_id, **options):
        calls["create"] = (repo_id, options)

    def upload_folder(self, **options):
        calls["upload"] = options
        return Commit()

    folder = shutil.copytree(tiny_model, tmp_path / "model")
    (folder / "README.md").unlink()  # a folder saved before cards existed gets one
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    with endpoints.answering() as (url, _):  # a hub mirror that serves, where HF_ENDPOINT points
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        result = run("push", "--model", folder, "--repo", "owner/tiny", "--private")
    assert result.exit_code == 0, result.output
    assert calls["create"] == ("owner/tiny", {"private": True, "exist_ok": True})
    assert calls["upload"]["repo_id"] == "owner/tiny" and calls["upload"]["folder_path"] == folder
    assert (folder / "README.md").is_file() and Commit.commit_url in result.output
    assert run("push", "--model", folder, "--repo", "not a name").exit_code == 1


@pytest.fixture
def no_network(monkeypatch):
    """The hub's endpoint refuses connections and HF_HUB_OFFLINE is unset; returns the list of URLs
    requested from the hub for models (each answered 404 at once, where an unreachable hub would be retried
    for about a minute). huggingface_hub's requests of its own, about no model, are answered and not
    listed."""
    requests = []

    def answer(request):
        if "/api/" not in request.url.path or request.url.path.startswith("/api/models/"):
            requests.append(str(request.url))
        return httpx2.Response(404)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(answer)))
    with endpoints.closed() as url:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        yield requests
    huggingface_hub.set_client_factory(default_client_factory)


def test_training_a_language_model_named_on_the_hub_fails_at_once_without_network(
    coco_texts, tmp_path, no_network
):
    overrides = [f"data.train_texts={coco_texts}", "model.language_model_config=null", "model.tokenizer=null"]
    result = run("train", "--config", TINY_CONFIG, *(x for o in overrides for x in ("--set", o)),
                 "--out", tmp_path / "run")  # fmt: skip
    assert no_network == []  # nothing was asked of the hub, so nothing was retried
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith("Error: model.language_model 'gpt2': no such folder, and not in the Hugging Face cache")
    )
    assert "(HF_ENDPOINT) cannot be reached" in result.output and "hf download gpt2" in result.output
    # A tokenizer named on its own goes through the same check.
    result = run("train", "--config", TINY_CONFIG, "--set", f"data.train_texts={coco_texts}",
                 "--set", "model.tokenizer=owner/tokenizer", "--out", tmp_path / "run")  # fmt: skip
    assert no_network == [] and result.exit_code == 1
    assert "Error: model.tokenizer 'owner/tokenizer': no such folder" in result.output


def test_a_hub_mirror_named_by_hf_endpoint_is_asked_where_it_serves(hub_cache, monkeypatch):
    """The probe goes to HF_ENDPOINT's scheme, host and port (here plain HTTP on a local port), and a
    mirror that serves is asked for the model, whose absence it reports, instead of called unreachable."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with endpoints.answering(404) as (url, asked):
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        with pytest.raises(TipcapError) as raised:
            TIPCap.from_pretrained("owner/other", device="cpu")
    assert asked[0] == "HEAD /" and any("owner/other" in request for request in asked[1:]), asked
    assert "cannot be reached" not in str(raised.value) and "owner/other" in str(raised.value)
    with endpoints.closed() as url:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        with pytest.raises(TipcapError, match=rf"{url} \(HF_ENDPOINT\) cannot be reached"):
            TIPCap.from_pretrained("owner/other", device="cpu")


def silent_hub_command(args: list, tmp_path) -> subprocess.CompletedProcess:
    """``tipcap ARGS`` in a fresh process whose HF_ENDPOINT accepts connections and never answers, with
    HF_HUB_OFFLINE unset and an empty hub cache; a hang fails the test after 60 s."""
    environment = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    environment["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")
    with endpoints.silent() as url:
        environment["HF_ENDPOINT"] = url
        command = [sys.executable, "-m", "tipcap.cli", *(str(a) for a in args)]
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
    assert f"the hub endpoint {url} (HF_ENDPOINT) did not answer within 4 s" in errors[0], errors[0]
    return result


@pytest.mark.slow
def test_push_to_a_silent_hub_endpoint_fails_in_one_line(tiny_model, tmp_path):
    result = silent_hub_command(["push", "--model", tiny_model, "--repo", "owner/tiny"], tmp_path)
    assert result.stderr.startswith("Error: cannot push")


@pytest.mark.slow
def test_a_hub_model_from_a_silent_hub_endpoint_fails_in_one_line(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    result = silent_hub_command(["caption", tmp_path / "photo.png", "--model", "someone/x"], tmp_path)
    assert "someone/x" in result.stderr and "hf download someone/x" in result.stderr


def nocaps_document(scorer_weights: str, chair_i: float) -> dict:
    """A metrics.json document of 8 of NoCaps val's 4,500 images, with CLIP-S from a scorer of the given
    weights, CHAIR on the 5 images the instance file annotates, and the given CHAIR-i."""
    identity = {"model": "ViT-B-32", "pretrained": scorer_weights}
    if scorer_weights == "none":
        identity["init_seed"] = 0
    return {
        "metrics": {"CIDEr": 0.25, "CLIP-S": 0.61, "RefCLIP-S": 0.66, "CHAIR-i": chair_i, "CHAIR-s": 0.0},
        "domains": {
            "in-domain": {"images": 3, "metrics": {"CIDEr": 0.3, "CLIP-S": 0.6}},
            "out-domain": {"images": 5, "metrics": {"CIDEr": 0.2, "CLIP-S": 0.62}},
        },
        "matching": {"predictions": 8, "reference_images": 4500, "scored_images": 8},
        "scorer": {"clip": {"model": "ViT-B-32", "pretrained": scorer_weights, "init_seed": 0},
                   "identity": identity},
        "hallucination": {"evaluated_images": 8, "annotated_images": 5, "left_out_images": 3},
    }  # fmt: skip


def test_the_card_says_what_the_metrics_file_says(tiny_model, tmp_path):
    """A random scorer, 8 images of 4,500, CHAIR on 5 of them, a NaN CHAIR-i and a random CLIP are all on
    the card; the NaN is in neither the model-index nor the table."""
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    record_evaluation(folder, nocaps_document("none", float("nan")), "nocaps", "val", "random scorer")
    record_evaluation(folder, nocaps_document("openai", 0.5), "nocaps", "val", "trained scorer")
    card = ModelCard.load(folder / "README.md")
    header = (folder / "README.md").read_text().split("\n---\n")[0]
    assert "nan" not in header.lower() and "inf" not in header.lower()
    results = {(r.metric_config, r.dataset_config, r.metric_type): r for r in card.data.eval_results}
    assert ("random scorer", None, "chair-i") not in results
    assert ("trained scorer", None, "chair-i") in results
    random_clip_s = results["random scorer", None, "clip-s"]
    assert random_clip_s.metric_name == "CLIP-S (random scorer)"
    scorer = "ViT-B-32 (random weights, seed 0)"
    assert random_clip_s.metric_args == {"scorer": scorer, "random_weights": True}
    assert results["trained scorer", None, "clip-s"].metric_args["scorer"] == "ViT-B-32 (openai)"
    assert results["trained scorer", None, "clip-s"].metric_name == "CLIP-S"
    assert random_clip_s.dataset_args["images"] == 8 and random_clip_s.dataset_args["split_images"] == 4500
    assert results["random scorer", "out-domain", "cider"].dataset_args == {"images": 5}
    assert results["trained scorer", None, "chair-s"].metric_args == {"images": 5}
    text = card.text
    assert "| nocaps | val | all | 8 of 4,500 | random scorer |" in text
    assert "| nocaps | val | out-domain | 5 | trained scorer |" in text
    assert f"{scorer} |" in text and "ViT-B-32 (openai) |" in text
    assert f"CLIP-S and RefCLIP-S by {scorer}: a CLIP with random weights" in text
    assert "CLIP-S and RefCLIP-S by ViT-B-32 (openai)" not in text
    assert "nocaps val (random scorer): scored on 8 of the split's 4,500 images" in text
    assert "(trained scorer): CHAIR on the 5 of the 8 images that the instance file annotates" in text
    assert "nocaps val (random scorer): CHAIR-i left out: no caption mentions an object" in text
    assert "(trained scorer): CHAIR-i left out" not in text
    assert "| nan |" not in text.lower()
    # The tiny model's own CLIP has random weights too.
    assert "with random weights (pretrained none, seed 0)" in text
    assert "**Its CLIP has random weights**" in text
