"""tipcap's beam search (tipcap/beam_search.py) against transformers' generate, its reference: the same tokens
on tiny random models, with and without prompts and guidance, for beams 1, 3 and 5; and its cache."""

import pytest
import torch
from click.testing import CliRunner
from serving import VOCABULARY, build_model, tiny_decoder
from transformers.cache_utils import DynamicLayer

from tipcap.beam_search import BeamCacheLayer
from tipcap.cli import main
from tipcap.config import EvalConfig
from tipcap.model import TIPCap


def random_model(prompt: str, seed: int, weight_std: float | None = None) -> TIPCap:
    """An untrained decoder; ``weight_std`` redraws the language model's matrices wider, so that its
    captions end at varied steps rather than mostly at the first or the last."""

    def embed_names(names: list[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(len(names), 32), dim=-1)

    model = tiny_decoder(prompt, seed, embed_names, layers=2, prefix_length=3, max_caption_tokens=10).eval()
    if weight_std is not None:
        with torch.no_grad():
            for weight in model.language_model.parameters():
                if weight.dim() == 2:
                    weight.normal_(0, weight_std)
    return model


def both_searches(model: TIPCap, inputs: torch.Tensor, **options) -> tuple[list[str], list[str]]:
    return (
        model.decode_text_side(inputs, search="tipcap", **options),
        model.decode_text_side(inputs, search="transformers", **options),
    )


@pytest.mark.parametrize("prompt", ["none", "pim", "hard"])
def test_tipcap_search_writes_generates_captions(prompt):
    lengths = set()
    for seed, weight_std in ((0, None), (1, 0.3)):
        model = random_model(prompt, seed, weight_std)
        for batch in (1, 6):
            inputs = torch.randn(batch, 32, generator=torch.Generator().manual_seed(seed))
            words = [VOCABULARY[i % 5 : i % 5 + i % 3] for i in range(batch)] if prompt != "none" else None
            for num_beams in (1, 3, 5):
                for guidance, max_new_tokens in ((0.0, None), (2.0, 4)):
                    ours, reference = both_searches(
                        model, inputs, prompts=words, num_beams=num_beams, max_new_tokens=max_new_tokens,
                        prompt_guidance=guidance,
                    )  # fmt: skip
                    assert ours == reference, (seed, batch, num_beams, guidance, max_new_tokens)
                    lengths |= {len(caption.split()) for caption in ours}
    # The captions ended at the last step (10 tokens) and at most steps before it.
    assert 10 in lengths and len(lengths) >= 7


def test_tied_candidates_are_ranked_alike():
    """Two tokens whose embeddings (and so logits, tied to them) are equal tie at every step; both
    searches rank tied candidates by torch.topk over tensors of the same shape and values."""
    model = random_model("none", 3, weight_std=0.3)
    ids = model.tokenizer.convert_tokens_to_ids(["circle", "square"])
    with torch.no_grad():
        embeddings = model.language_model.get_input_embeddings().weight
        # Longer than the others' too, so that the tied tokens are among the best candidates.
        embeddings[ids[0]] *= 3
        embeddings[ids[1]] = embeddings[ids[0]]
    inputs = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    for num_beams in (1, 3, 5):
        ours, reference = both_searches(model, inputs, num_beams=num_beams)
        assert ours == reference
    assert any("circle" in caption or "square" in caption for caption in ours)


def test_beam_cache_reorders_and_drops_rows_in_place_as_a_dynamic_cache_does_by_copies():
    generator = torch.Generator().manual_seed(0)
    batch, beams, heads, dim = 2, 3, 2, 4
    context = torch.randn(batch, heads, 5, dim, generator=generator)
    ours, reference = BeamCacheLayer(capacity=9, rows=batch * beams), DynamicLayer()
    keys, values = ours.update(context, -context)
    assert torch.equal(keys, context) and torch.equal(values, -context)
    reference.update(context.repeat_interleave(beams, dim=0), -context.repeat_interleave(beams, dim=0))
    buffers = (ours.keys.data_ptr(), ours.values.data_ptr())
    for step in range(3):
        new = torch.randn(batch * beams, heads, 1, dim, generator=generator)
        keys, values = ours.update(new, 2 * new)
        expected = reference.update(new, 2 * new)
        assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])
        rows = torch.tensor([2, 0, 0, 4, 5, 3]) if step % 2 else torch.tensor([1, 1, 2, 3, 3, 3])
        ours.reorder_slots(rows, start=5)
        reference.reorder_cache(rows)
        assert ours.get_seq_length() == reference.get_seq_length() == 6 + step
        filled = ours.get_seq_length()
        assert torch.equal(ours.keys[:, :, :filled], reference.keys)
        assert torch.equal(ours.values[:, :, :filled], reference.values)
    # Inputs leave the batch: their rows go, the others move to the front of the same buffers.
    kept = torch.tensor([0, 1, 2])
    ours.keep_rows(kept)
    reference.batch_select_indices(kept)
    new = torch.randn(3, heads, 1, dim, generator=generator)
    keys, values = ours.update(new, new)
    assert torch.equal(keys, reference.update(new, new)[0]) and keys.shape[0] == 3
    assert (ours.keys.data_ptr(), ours.values.data_ptr()) == buffers


def test_caption_command_takes_either_search(tmp_path, tiny_clip, image_folder):
    assert EvalConfig().search == "tipcap"
    model = build_model(tmp_path / "model", tiny_clip, "none", seed=4)
    command = ["caption", "--model", str(model), str(image_folder)]
    outputs = {}
    for search in ("tipcap", "transformers"):
        out = tmp_path / f"{search}.jsonl"
        result = CliRunner().invoke(main, [*command, "--search", search, "--beams", "3", "--out", str(out)])
        assert result.exit_code == 0, result.output
        outputs[search] = out.read_text()
    assert outputs["tipcap"] == outputs["transformers"] and outputs["tipcap"].count("\n") >= 3
    result = CliRunner().invoke(
        main, ["caption", "--model", str(model), str(image_folder), "--search", "vllm"]
    )
    assert result.exit_code == 2 and "'vllm' is not one of 'tipcap', 'transformers'" in result.output
