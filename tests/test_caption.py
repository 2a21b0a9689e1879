"""Captioning through the model (`TIPCap.caption`) and `tipcap caption`: the gap inside the model, images or
embeddings, prompts, corrupt files, batching, and model directories that travel."""

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run

from tipcap.clip import ClipSpec
from tipcap.gap import Gap
from tipcap.model import TIPCap
from tipcap.prompts import prompt_word_embeddings
from tipcap.store import EmbeddingStore

# The tests here read decoders trained for hundreds of steps (conftest's prompt_model and plain_model).
pytestmark = pytest.mark.slow


def test_caption_folder_with_a_corrupt_image(prompt_model, image_folder):
    _, _, model_dir = prompt_model
    result = run("caption", image_folder, "--model", model_dir, "--beams", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6 and all(line.split("\t")[1].strip() for line in lines)
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "broken_000.jpg" in skipped[0] and "Traceback" not in result.output


def test_model_captions_images_and_embeddings_as_the_command_does(prompt_model, image_folder, tmp_path):
    _, _, model_dir = prompt_model
    out = tmp_path / "captions.jsonl"
    assert run("caption", image_folder, "--model", model_dir, "--out", out).exit_code == 0
    command = [json.loads(line) for line in out.read_text().splitlines()]

    model = TIPCap.from_pretrained(model_dir, device="cpu")
    paths = sorted(image_folder.glob("img_*.jpg"))
    from_images = model.caption(images=paths)
    assert [(r.image, r.caption) for r in from_images] == [(c["image"], c["caption"]) for c in command]

    # The same images' CLIP embeddings: the model carries them across its gap itself.
    embeddings, readable, failures = model.pipeline.embed_images(paths)
    assert readable == list(range(6)) and not failures and embeddings.shape == (6, model.config.clip_dim)
    from_embeddings = model.caption(embeddings=embeddings)
    assert [r.caption for r in from_embeddings] == [r.caption for r in from_images]
    assert all(r.image is None for r in from_embeddings)


def test_caption_applies_the_models_gap_and_decode_text_side_does_not(prompt_model):
    root, _, model_dir = prompt_model
    model = TIPCap.from_pretrained(model_dir, device="cpu")
    embeddings = EmbeddingStore.open(root / "held_out").embeddings().float()[:16]
    mu = embeddings.mean(0)
    model.gap = Gap("mean-shift", mu, torch.zeros(len(mu), len(mu)), clip=model.gap.clip)
    shifted = torch.nn.functional.normalize(embeddings - mu, dim=-1)
    captions = [r.caption for r in model.caption(embeddings=embeddings, num_beams=2)]
    assert captions == model.decode_text_side(shifted, num_beams=2)
    assert captions != model.decode_text_side(embeddings, num_beams=2)


def test_unreadable_images_become_per_image_errors(prompt_model, image_folder):
    _, _, model_dir = prompt_model
    model = TIPCap.from_pretrained(model_dir, device="cpu")
    results = model.caption(images=sorted(image_folder.iterdir()), num_beams=1)
    assert [r.error is not None for r in results] == [True] + [False] * 6  # broken_000.jpg sorts first
    assert results[0].caption is None and "broken_000.jpg" in results[0].error


def test_streamed_batches_and_workers_give_the_captions_of_one_batch(prompt_model, image_folder):
    _, _, model_dir = prompt_model
    model = TIPCap.from_pretrained(model_dir, device="cpu")
    paths = sorted(image_folder.iterdir())  # broken_000.jpg first, then six images
    words = [["zebra"], ["dog"], [], ["horse", "grass"], ["cat"], [], ["sheep"]]
    timings: dict[str, float] = {}
    streamed = model.caption(
        images=paths, prompts=words, num_beams=2, batch_size=2, workers=2, timings=timings
    )
    whole = model.caption(images=paths, prompts=words, num_beams=2, batch_size=64, workers=0)
    assert [(r.image, r.caption, r.prompt, r.error) for r in streamed] == [
        (r.image, r.caption, r.prompt, r.error) for r in whole
    ]
    assert streamed[0].error is not None and [r.prompt for r in streamed[1:]] == words[1:]
    assert set(timings) == {"decoding", "clip", "generation"} and timings["generation"] > 0


def test_prompt_changes_the_caption(prompt_model, image_folder, tmp_path):
    _, _, model_dir = prompt_model
    plain, prompted = tmp_path / "plain.jsonl", tmp_path / "prompted.jsonl"
    assert run("caption", image_folder, "--model", model_dir, "--out", plain).exit_code == 0
    result = run("caption", image_folder, "--model", model_dir, "--prompt", "zebra", "--out", prompted)
    assert result.exit_code == 0, result.output
    before = [json.loads(line) for line in plain.read_text().splitlines()]
    after = [json.loads(line) for line in prompted.read_text().splitlines()]
    assert [r["image"] for r in before] == [r["image"] for r in after]
    assert all(r["prompt"] == ["zebra"] for r in after)
    assert sum("zebra" in r["caption"].split() for r in after) >= 5
    assert sum("zebra" in r["caption"].split() for r in before) < sum(
        "zebra" in r["caption"].split() for r in after
    )


def test_auto_prompts_are_the_top_entities_of_the_models_vocabulary(prompt_model, image_folder):
    _, _, model_dir = prompt_model
    model = TIPCap.from_pretrained(model_dir, device="cpu")
    paths = sorted(image_folder.glob("img_*.jpg"))
    results = model.caption(images=paths, auto_prompt=True, top_k=2, threshold=None, num_beams=1)
    embeddings, _, _ = model.pipeline.embed_images(paths)
    names, table = model.pipeline.entity_vocabulary()
    assert names == model.entity_names and table.shape == (len(names), model.config.clip_dim)
    scores = (
        torch.nn.functional.normalize(embeddings, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    )
    expected = [[names[i] for i in row] for row in scores.topk(2, dim=-1).indices.tolist()]
    assert [r.prompt for r in results] == expected


def test_a_model_without_prompts_reports_no_prompt_words(plain_model, image_folder, caplog):
    model = TIPCap.from_pretrained(plain_model, device="cpu")
    paths = sorted(image_folder.glob("img_*.jpg"))
    plain = model.caption(images=paths, num_beams=1)
    # The command line's handler stops the package's logger from propagating once any command ran in this
    # process (the fixture's did): listen on the logger itself, whatever ran before.
    package_logger = logging.getLogger("tipcap")
    package_logger.addHandler(caplog.handler)
    try:
        prompted = model.caption(images=paths, prompts=["zebra"], num_beams=1)
    finally:
        package_logger.removeHandler(caplog.handler)
    assert [r.prompt for r in prompted] == [[]] * 6
    assert [r.caption for r in prompted] == [r.caption for r in plain]
    assert "trained without prompts" in caplog.text


def test_batched_captions_equal_one_at_a_time(prompt_model):
    root, _, model_dir = prompt_model
    model = TIPCap.from_pretrained(model_dir, device="cpu")
    embeddings = EmbeddingStore.open(root / "held_out").embeddings().float()[:12]
    for beams in (1, 4):
        batched = [r.caption for r in model.caption(embeddings=embeddings, num_beams=beams, batch_size=12)]
        single = [model.caption(embeddings=row[None], num_beams=beams)[0].caption for row in embeddings]
        assert batched == single


def test_unknown_prompt_words_are_encoded_with_clip(prompt_model):
    root, _, model_dir = prompt_model
    model = TIPCap.from_pretrained(model_dir, device="cpu")
    embeddings = EmbeddingStore.open(root / "held_out").embeddings().float()[:2]
    results = model.caption(embeddings=embeddings, prompts=[["unicorn"], []], num_beams=1)
    assert [r.prompt for r in results] == [["unicorn"], []] and all(r.caption for r in results)
    known = model.caption(embeddings=embeddings[:1], prompts=[["dog"]], num_beams=1)
    vectors, _ = prompt_word_embeddings(
        [["unicorn"]], model.entity_embeddings, model.entity_names, model.pipeline.encode_texts
    )
    assert torch.isfinite(vectors).all()
    assert known[0].prompt == ["dog"]


def test_a_moved_model_directory_loads_its_clip_without_the_original_files(
    prompt_model, image_folder, tiny_clip, tmp_path
):
    _, _, model_dir = prompt_model
    model = TIPCap.from_pretrained(model_dir, device="cpu")
    paths = sorted(image_folder.glob("img_*.jpg"))
    expected = [r.caption for r in model.caption(images=paths, num_beams=2)]
    # Train-time CLIP config in a folder of its own, which is deleted once the model is saved.
    source = tmp_path / "clip-source"
    source.mkdir()
    shutil.copyfile(tiny_clip, source / tiny_clip.name)
    model.clip_spec = ClipSpec(str(source / tiny_clip.name), "none", 0)
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(source)
    shutil.move(tmp_path / "saved", tmp_path / "moved")
    document = json.loads((tmp_path / "moved" / "config.json").read_text())
    assert document["clip"]["model"] == f"clip/{tiny_clip.name}"
    assert '"/' not in (tmp_path / "moved" / "config.json").read_text()  # no absolute path at all
    moved = TIPCap.from_pretrained(tmp_path / "moved", device="cpu")
    assert [r.caption for r in moved.caption(images=paths, num_beams=2)] == expected


def test_the_package_exports_the_model_without_importing_torch():
    code = (
        "import sys, tipcap; assert 'torch' not in sys.modules; "
        "from tipcap import TIPCap; print(TIPCap.__name__)"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "TIPCap"


def test_hard_prompt_models_find_auto_prompts_in_their_own_vocabulary(tiny_clip, image_folder):
    from tipcap.config import ModelConfig
    from tipcap.training.data import word_level_tokenizer

    tokenizer = word_level_tokenizer(["a red circle above a blue square ."])
    language_model = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64,
                      "vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip
    config = ModelConfig(clip_dim=32, language_model_config=language_model, prompt="hard", prefix_length=2)
    vocabulary = ["red circle", "blue square", "green triangle"]
    model = TIPCap.build(config, tokenizer, entity_names=vocabulary, clip_spec=ClipSpec(str(tiny_clip)))
    paths = sorted(image_folder.glob("img_*.jpg"))
    results = model.caption(images=paths, auto_prompt=True, top_k=2, threshold=None)
    assert all(len(r.prompt) == 2 and set(r.prompt) <= set(vocabulary) for r in results)
