"""Training: memorisation, exact save/load, resume after SIGKILL, torchrun, prompt interaction."""

import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ANIMALS
from safetensors.torch import load_file

from tipcap.cli import main
from tipcap.config import load_config
from tipcap.model import TIPCap
from tipcap.store import EmbeddingStore
from tipcap.training.loop import train

ROOT = Path(__file__).parent.parent
TINY = ROOT / "experiments" / "tiny.yaml"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " .").replace(",", " ,").split())


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, coco_texts) -> Path:
    """A tiny decoder trained text-only for 300 steps on the 120 captions."""
    out = tmp_path_factory.mktemp("run") / "memorise"
    config = load_config(TINY, [f"data.train_texts={coco_texts}"])
    train(config, out, progress=False)
    return out


@pytest.mark.slow
def test_tiny_model_memorises_its_captions(memorised, coco_texts):
    records = [json.loads(line) for line in (memorised / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[0] > 3.0 and losses[-1] < 0.05, losses
    model = TIPCap.from_pretrained(memorised / "model")
    store = EmbeddingStore.open(coco_texts)
    rows = random.Random(0).sample(range(len(store)), 12)
    generated = model.decode_text_side(store.gather(torch.tensor(rows)).float())
    captions = store.captions()
    assert [normalise(g) for g in generated] == [normalise(captions[r]) for r in rows]


@pytest.mark.slow
def test_save_and_load_give_identical_logits_and_no_pickles(memorised, coco_texts, tmp_path):
    model = TIPCap.from_pretrained(memorised / "model")
    model.save_pretrained(tmp_path / "copy")
    again = TIPCap.from_pretrained(tmp_path / "copy")
    store = EmbeddingStore.open(coco_texts)
    embeddings = store.gather(torch.arange(6)).float()
    ids = torch.randint(0, len(model.tokenizer), (6, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        first = model(embeddings, ids, mask).logits
        second = again(embeddings, ids, mask).logits
    assert torch.equal(first, second)
    files = [path for path in (memorised / "model").rglob("*") if path.is_file()]
    assert (memorised / "model" / "clip" / "tiny-clip.json") in files  # the model carries its CLIP's config
    for path in files:
        assert path.suffix in (".json", ".safetensors", ".txt", ".md"), f"unexpected file {path.name}"
        assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks like a pickle"


@pytest.mark.slow
def test_incompatible_model_directory_is_refused(memorised, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(memorised / "model", copy)
    document = json.loads((copy / "config.json").read_text())
    document["format"] = 99
    (copy / "config.json").write_text(json.dumps(document))
    result = run("train", "--help")
    assert result.exit_code == 0
    from tipcap.errors import TipcapError

    with pytest.raises(TipcapError, match="model format 99"):
        TIPCap.from_pretrained(copy)


def _train_command(store: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tipcap.cli", "train", "--config", str(TINY),
            "--set", f"data.train_texts={store}", "--set", "train.max_steps=160",
            "--set", "train.checkpoint_every=40", "--out", str(out), "--no-progress", *extra]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("batching", [[], ["--set", "train.packing=true"]], ids=["bucketed", "packed"])
def test_resume_after_sigkill_matches_uninterrupted_run(coco_texts, tmp_path, batching):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_train_command(coco_texts, reference, *batching), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    process = subprocess.Popen(_train_command(coco_texts, out, *batching), env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # a guard against a hang, generous for a loaded machine
    while not (out / "checkpoints" / "step-00000080").is_dir():
        assert process.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "model").exists()

    resume = _train_command(coco_texts, out, *batching, "--resume")
    subprocess.run(resume, check=True, env=env, capture_output=True)
    resumed = load_file(out / "model" / "model.safetensors")
    expected = load_file(reference / "model" / "model.safetensors")
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] >= 80
    # The log holds each step once, with the uninterrupted run's losses.
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference_log = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [r["step"] for r in reference_log]
    assert [r.get("loss") for r in logged] == [r.get("loss") for r in reference_log]


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["false", "true"])
def test_torchrun_two_cpu_processes_agree(coco_texts, tmp_path, packing):
    out = tmp_path / "ddp"
    port = 29500 + (os.getpid() + (packing == "true") * 487) % 1000
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(port), "-m", "tipcap.cli", "train", "--config", str(TINY),
               "--set", f"data.train_texts={coco_texts}", "--set", "train.max_steps=30",
               "--set", "train.batch_size=8", "--set", f"train.packing={packing}",
               "--out", str(out), "--no-progress"]  # fmt: skip
    result = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    checksums = next(r["rank_checksums"] for r in records if "rank_checksums" in r)
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert (out / "model" / "model.safetensors").is_file()


def test_non_finite_loss_stops_with_a_message(coco_texts, tmp_path):
    result = run("train", "--config", TINY, "--set", f"data.train_texts={coco_texts}",
                 "--set", "train.lr=1e30", "--set", "train.max_steps=50", "--set", "train.warmup_steps=0",
                 "--out", tmp_path / "nan", "--no-progress")  # fmt: skip
    assert result.exit_code == 1 and "non-finite training loss" in result.stderr
    assert "Traceback" not in result.output


def test_bad_config_key_is_named(coco_texts, tmp_path):
    result = run("train", "--config", TINY, "--set", "train.lrr=1", "--out", tmp_path / "x")
    assert result.exit_code == 1 and "config key 'train.lrr' is unknown" in result.stderr


def _train_args(store: Path, out: Path, *overrides: str) -> list:
    """``tipcap train`` of the tiny config on ``store`` into ``out``, with ``--set`` overrides."""
    return ["train", "--config", TINY, "--set", f"data.train_texts={store}", "--out", out, "--no-progress",
            *(x for o in overrides for x in ("--set", o))]  # fmt: skip


def one_error_line(result) -> str:
    """The one line a refused command prints (exit 1, no traceback)."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_a_folder_held_by_a_training_is_refused_and_free_again_when_its_holder_is_gone(coco_texts, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with (out / "train.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running training holds its folder
        refused = run(*_train_args(coco_texts, out, "train.max_steps=2"))
    assert one_error_line(refused) == (
        f"Error: {out}: another training is writing into this folder (it holds {out / 'train.lock'}); wait "
        "for it to end, or train into another --out."
    )
    assert [p.name for p in out.iterdir()] == ["train.lock"]  # refused before it wrote anything
    # The lock file of a holder that is gone (as a killed run leaves it) holds nothing.
    result = run(*_train_args(coco_texts, out, "train.max_steps=2"))
    assert result.exit_code == 0, result.output
    assert not (out / "train.lock").exists()


@pytest.mark.slow
def test_two_trainings_into_one_folder_one_is_refused(coco_texts, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # Far more steps than the test waits for: it is still training when the second starts.
    first = subprocess.Popen(_train_command(coco_texts, out, "--set", "train.max_steps=1000000"), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 600  # a guard against a hang, generous for a loaded machine
        while not (out / "metrics.jsonl").is_file():
            assert first.poll() is None, "the first training ended before the second started"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        second = run(*_train_args(coco_texts, out, "train.max_steps=2"))
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    assert f"another training is writing into this folder (it holds {out / 'train.lock'})" in one_error_line(
        second
    )
    assert not (out / "model").exists()


@pytest.fixture(scope="module")
def older_run(tmp_path_factory, coco_texts) -> Path:
    """A finished run of seed 1 and 6 steps, with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("older") / "run"
    result = run(
        *_train_args(coco_texts, out, "train.seed=1", "train.max_steps=6", "train.checkpoint_every=3")
    )
    assert result.exit_code == 0, result.output
    return out


def test_a_fresh_run_refuses_a_folder_holding_another_runs_checkpoints(older_run, coco_texts, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(older_run, out)
    checkpoints = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    # Started there, seed 2 would keep the older run's steps 3 and 6 over its own step 2.
    refused = run(
        *_train_args(coco_texts, out, "train.seed=2", "train.max_steps=2", "train.checkpoint_every=3")
    )
    assert one_error_line(refused) == (
        f"Error: {out} holds checkpoints of another run (checkpoints/step-00000003: another config or other "
        "inputs); continue that run with its own config and --resume, or train this one into another --out "
        f"(or delete {out / 'checkpoints'} first)."
    )
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == checkpoints
    # The run that wrote them may start there afresh: it redoes its own checkpoints.
    again = run(
        *_train_args(coco_texts, out, "train.seed=1", "train.max_steps=6", "train.checkpoint_every=3")
    )
    assert again.exit_code == 0, again.output


def test_resume_refuses_a_checkpoint_of_another_run(older_run, coco_texts, tmp_path):
    out = tmp_path / "run"
    args = _train_args(coco_texts, out, "train.seed=2", "train.max_steps=2", "train.checkpoint_every=3")
    assert run(*args).exit_code == 0
    weights = (out / "model" / "model.safetensors").read_bytes()
    # The older run's last checkpoint beside this run's own step 2, as a fresh run used to leave them.
    stale = out / "checkpoints" / "step-00000006"
    shutil.copytree(older_run / "checkpoints" / stale.name, stale)
    line = one_error_line(run(*args, "--resume"))
    assert line.startswith(
        f"Error: --resume: {stale} is not this run's checkpoint (its state.json records run "
    )
    assert (out / "model" / "model.safetensors").read_bytes() == weights
    shutil.rmtree(stale)
    resumed = run(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] == 2


@pytest.mark.slow
def test_rows_without_prompt_words_take_the_prompt_free_path(prompt_model):
    root, _, _ = prompt_model
    config = load_config(TINY, [f"data.train_texts={root / 'train'}", "model.prompt=pim"])
    from tipcap.training.setup import build_training

    model = build_training(config, torch.device("cpu")).model.eval()
    embeddings = EmbeddingStore.open(root / "train").gather(torch.arange(4)).float()
    ids = torch.randint(0, len(model.tokenizer), (4, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = model(embeddings, ids, mask).logits
        empty = model(embeddings, ids, mask, [[], [], [], []]).logits
        mixed = model(embeddings, ids, mask, [["dog"], [], ["cat", "grass"], []]).logits
    assert torch.equal(plain, empty)
    assert torch.equal(mixed[[1, 3]], plain[[1, 3]])
    # The gate starts open, so words change the prefix from the first step.
    assert (mixed[[0, 2]] - plain[[0, 2]]).abs().max() > 1e-4


@pytest.mark.slow
def test_projector_input_is_standardised_on_the_training_embeddings(memorised, coco_texts):
    model = TIPCap.from_pretrained(memorised / "model")
    embeddings = EmbeddingStore.open(coco_texts).embeddings().float()
    standardised = (embeddings - model.input_mean) / model.input_scale
    assert standardised.mean(0).abs().max() < 1e-3
    assert abs(standardised.pow(2).mean().item() - 1.0) < 1e-3
    # Without the statistics the inputs would share most of their length.
    assert (model.input_mean.norm() / embeddings.norm(dim=1).mean()).item() > 0.3


@pytest.mark.slow
def test_trained_prompts_steer_held_out_captions(prompt_model):
    root, held_out, model_dir = prompt_model
    model = TIPCap.from_pretrained(model_dir)
    embeddings = EmbeddingStore.open(root / "held_out").embeddings().float()
    truth = [animal for _, animal, _ in held_out]
    wrong = [ANIMALS[(ANIMALS.index(a) + 3) % len(ANIMALS)] for a in truth]

    def share(captions: list[str], animals: list[str]) -> float:
        hits = [animal in caption.split() for caption, animal in zip(captions, animals, strict=True)]
        return sum(hits) / len(hits)

    def captions(prompts: list[list[str]] | None) -> list[str]:
        results = model.caption(embeddings=embeddings, prompts=prompts, num_beams=1)
        return [result.caption for result in results]

    unprompted = share(captions(None), truth)
    prompted = share(captions([[a] for a in truth]), truth)
    steered = share(captions([[a] for a in wrong]), wrong)
    # The noisy gap leaves the embedding weakly informative, so the prompt must carry the animal.
    assert prompted >= 0.85 and prompted >= unprompted + 0.3, (prompted, unprompted)
    assert steered >= 0.7, steered


def token_loss(model_dir: Path, texts: Path) -> float:
    """The model's mean loss per caption token over a caption store, one caption at a time."""
    model = TIPCap.from_pretrained(model_dir)
    store = EmbeddingStore.open(texts)
    embeddings = store.embeddings().float()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row, caption in enumerate(store.captions()):
            words = model.tokenizer(caption, add_special_tokens=False)["input_ids"]
            ids = torch.tensor(
                [[*words[: model.config.max_caption_tokens - 1], model.tokenizer.eos_token_id]]
            )
            loss = model(embeddings[row : row + 1], ids, torch.ones_like(ids)).loss
            total += float(loss) * ids.shape[1]
            tokens += ids.shape[1]
    return total / tokens


def test_validation_loss_is_logged_each_epoch(coco_texts, tmp_path):
    config = load_config(TINY, [f"data.train_texts={coco_texts}", f"data.val_texts={coco_texts}",
                                "train.max_steps=16", "train.log_every=4"])  # fmt: skip
    train(config, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if "val_loss" in r]
    assert [r["epoch"] for r in validation] == [0, 1]
    assert validation[1]["val_loss"] < validation[0]["val_loss"]
    assert validation[1]["val_loss"] == pytest.approx(
        token_loss(tmp_path / "run" / "model", coco_texts), rel=1e-4
    )
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-00000008",
        "step-00000016",
    ]


def test_ranks_weigh_their_loss_by_their_share_of_the_steps_tokens(coco_texts, tmp_path):
    from tipcap.training.data import epoch_batches
    from tipcap.training.distributed import Distributed
    from tipcap.training.loop import Trainer
    from tipcap.training.setup import build_training

    config = load_config(TINY, [f"data.train_texts={coco_texts}", "train.batch_size=4", "train.accumulate=2"])
    cpu = torch.device("cpu")
    trainer = Trainer(config, build_training(config, cpu), tmp_path, Distributed(0, 1, cpu), progress=False)
    # The bookkeeping of rank 0 of two (DDP itself is exercised by the torchrun test).
    trainer.env = Distributed(0, 2, cpu)
    data = trainer.train_data
    per_rank = [epoch_batches(data, 4, 0, 3, rank, 2) for rank in (0, 1)]
    expected = [
        sum(len(data.token_ids[r]) for batches in per_rank for rows in batches[i : i + 2] for r in rows)
        for i in range(0, len(per_rank[0]), 2)
    ]
    assert trainer._step_tokens(3, trainer._groups(3, 0)) == expected
    # Rank 0's share differs from one half in some steps, so equal weights would be wrong there.
    own = [
        sum(len(data.token_ids[r]) for rows in per_rank[0][i : i + 2] for r in rows) for i in range(0, 8, 2)
    ]
    assert any(abs(o / e - 0.5) > 0.02 for o, e in zip(own, expected[:4], strict=True))


def test_a_prompt_module_added_to_a_trained_decoder_starts_from_its_weights(
    prompt_model, plain_model, tmp_path
):
    """train.init_from: the prompt-free decoder's weights carry over; with lr 0 (nothing trained) the new
    model captions without words exactly as the decoder it started from, and its prompt words reach it."""
    root, _, _ = prompt_model
    result = run("train", "--config", TINY, "--set", f"data.train_texts={root / 'train'}",
                 "--set", f"data.gap={root / 'gap.safetensors'}", "--set", "model.prompt=pim",
                 "--set", f"train.init_from={plain_model}", "--set", "train.lr=0",
                 "--set", "train.max_steps=2", "--set", "train.batch_size=8",
                 "--out", tmp_path / "tuned", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    started = load_file(plain_model / "model.safetensors")
    tuned = load_file(tmp_path / "tuned" / "model" / "model.safetensors")
    assert started.keys() < tuned.keys()
    assert all(torch.equal(started[name], tuned[name]) for name in started)
    added = {name.split(".")[0] for name in tuned.keys() - started.keys()}
    assert added == {"prompt_interaction", "entity_embeddings"}
    record = json.loads((tmp_path / "tuned" / "provenance.json").read_text())
    digest = hashlib.sha256((plain_model / "model.safetensors").read_bytes()).hexdigest()
    assert record["inputs"]["init_from"] == digest
    embeddings = EmbeddingStore.open(root / "held_out").embeddings()[:6].float()
    before, after = TIPCap.from_pretrained(plain_model), TIPCap.from_pretrained(tmp_path / "tuned" / "model")
    plain = [r.caption for r in before.caption(embeddings=embeddings, num_beams=2)]
    assert [r.caption for r in after.caption(embeddings=embeddings, num_beams=2)] == plain
    worded = after.caption(embeddings=embeddings, num_beams=2, prompts=[["dog", "grass"]] * 6)
    assert all(r.prompt == ["dog", "grass"] for r in worded)


def test_a_decoder_of_another_shape_cannot_be_started_from(prompt_model, plain_model, tmp_path):
    root, _, _ = prompt_model
    data = ["--set", f"data.train_texts={root / 'train'}", "--set", f"data.gap={root / 'gap.safetensors'}"]
    result = run("train", "--config", TINY, *data, "--set", "model.prefix_length=3", "--set",
                 f"train.init_from={plain_model}", "--out", tmp_path / "x", "--no-progress")  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"train.init_from {plain_model}: its " in result.stderr
    assert "differ only in the prompt module" in result.stderr
    missing = run("train", "--config", TINY, *data, "--set", f"train.init_from={tmp_path}",
                  "--out", tmp_path / "y", "--no-progress")  # fmt: skip
    assert missing.exit_code == 1 and f"train.init_from {tmp_path}: no model.safetensors" in missing.stderr


def test_a_frozen_start_trains_the_prompt_module_alone(prompt_model, plain_model, tmp_path):
    """train.freeze_init: after real training steps every weight copied from the prompt-free decoder is
    unchanged, and the prompt module's have moved from where the same run at lr 0 leaves them;
    freeze_init without init_from is refused by name."""
    root, _, _ = prompt_model
    data = ["--set", f"data.train_texts={root / 'train'}", "--set", f"data.gap={root / 'gap.safetensors'}"]

    def frozen(lr: str) -> dict[str, torch.Tensor]:
        result = run("train", "--config", TINY, *data, "--set", "model.prompt=pim",
                     "--set", f"train.init_from={plain_model}", "--set", "train.freeze_init=true",
                     "--set", f"train.lr={lr}", "--set", "train.max_steps=5", "--set", "train.warmup_steps=0",
                     "--out", tmp_path / f"lr{lr}", "--no-progress")  # fmt: skip
        assert result.exit_code == 0, result.output
        return load_file(tmp_path / f"lr{lr}" / "model" / "model.safetensors")

    started, trained, initial = load_file(plain_model / "model.safetensors"), frozen("1e-2"), frozen("0")
    assert all(torch.equal(started[name], trained[name]) for name in started)
    module = [name for name in trained if name.startswith("prompt_interaction.") and "word_mean" not in name]
    assert module and all(not torch.equal(trained[name], initial[name]) for name in module)
    refused = run(
        "train", "--config", TINY, *data, "--set", "train.freeze_init=true", "--out", tmp_path / "x"
    )
    assert refused.exit_code == 1 and "train.freeze_init: trains the prompt module alone" in refused.stderr
