"""Prompt guidance: the logits processor's biases, prompt words as token forms, a model decoding with it."""

import torch
from serving import VOCABULARY, build_model

from tipcap.card import write_model_card
from tipcap.guide import PromptGuide, entity_forms
from tipcap.model import TIPCap
from tipcap.training.data import word_level_tokenizer


def guided(entities, num_beams: int, generated: list[list[int]], vocabulary: int = 10) -> torch.Tensor:
    """The guide's scores for zero scores ``[R, vocabulary]`` after ``generated`` ``[R, t]``."""
    guide = PromptGuide(entities, num_beams, bias=2.5)
    return guide(
        torch.tensor(generated, dtype=torch.long).view(len(generated), -1),
        torch.zeros(len(generated), vocabulary),
    )


def biased(scores: torch.Tensor) -> list[list[int]]:
    return [sorted(torch.nonzero(row == 2.5).flatten().tolist()) for row in scores]


def test_the_guide_begins_unmentioned_entities_and_completes_begun_ones():
    # Input 0: "brown diamond" as (1, 2) or (1, 3) (plural), and "green square" (4, 5); input 1: (6,).
    entities = [[[(1, 2), (1, 3)], [(4, 5)]], [[(6,)]]]
    # Two beams per input: rows 0-1 are input 0's, rows 2-3 input 1's.
    scores = guided(entities, 2, [[], [], [], []])
    assert biased(scores) == [[1, 4], [1, 4], [6], [6]]
    # After "brown": the diamond's forms go on (2 and 3) and it is not begun again; the square may begin.
    # After "brown diamond": the diamond is mentioned, so only the square may begin, and after its 1 the
    # diamond's next token is still guided (it binds a colour named again).
    scores = guided(entities, 2, [[7, 1], [1, 2], [0, 6], [6, 0]])
    assert biased(scores) == [[2, 3, 4], [4], [], []]
    scores = guided(entities, 2, [[1, 2, 0, 1], [4, 5, 1, 3], [0, 0, 0, 0], [0, 0, 6, 6]])
    assert biased(scores) == [[2, 3, 4], [], [6], []]
    # The scores are added to, not replaced.
    guide = PromptGuide(entities, 1, bias=1.0)
    start = torch.arange(20.0).view(2, 10)
    out = guide(torch.zeros(2, 0, dtype=torch.long), start)
    assert torch.equal(
        out - start, torch.tensor([[0.0, 1, 0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0, 0, 0]])
    )


def test_entity_forms_tokenise_each_form_and_drop_unknown_words():
    tokenizer = word_level_tokenizer(["a brown diamond and two brown diamonds .", "a green square ."])
    ids = tokenizer.convert_tokens_to_ids
    forms = {
        "brown diamond": ["brown diamond", "brown diamonds"],
        "green square": ["green square", "green squares"],
    }
    found = entity_forms(
        tokenizer, ["brown diamond", "green square", "giraffe"], forms, tokenizer.unk_token_id
    )
    assert found == [
        [(ids("brown"), ids("diamond")), (ids("brown"), ids("diamonds"))],
        [(ids("green"), ids("square"))],  # "squares" is not in the tokenizer's vocabulary
        [],  # nor is "giraffe"
    ]


def test_a_guided_model_writes_its_prompt_words_and_keeps_its_forms(tmp_path, tiny_clip):
    model = TIPCap.from_pretrained(build_model(tmp_path / "hard", tiny_clip, "hard", seed=0))
    embeddings = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    plain = [r.caption for r in model.caption(embeddings=embeddings, prompts=["yellow star"], num_beams=1)]
    unguided = model.caption(embeddings=embeddings, prompts=["yellow star"], num_beams=1, prompt_guidance=0)
    assert [r.caption for r in unguided] == plain  # the model's own guidance is 0
    assert not all("yellow star" in caption for caption in plain)
    # A bias far above the logits' spread: greedy decoding begins the entity at once and completes it; beam
    # search may name it later (every beam that names it gains the same), but names it.
    greedy = model.caption(embeddings=embeddings, prompts=["yellow star"], num_beams=1, prompt_guidance=100)
    assert all(r.caption.startswith("yellow star") for r in greedy), [r.caption for r in greedy]
    beams = model.caption(embeddings=embeddings, prompts=["yellow star"], num_beams=3, prompt_guidance=100)
    assert all("yellow star" in r.caption for r in beams), [r.caption for r in beams]
    # The forms travel with the model, and its card says how it decodes prompt words.
    assert "| prompt guidance | none (plain decoding) |" in write_model_card(tmp_path / "hard").read_text()
    model.entity_forms["yellow star"] = ["yellow star", "yellow stars"]
    model.config.prompt_guidance = 4.0
    model.save_pretrained(tmp_path / "saved")
    assert "| prompt guidance | 4 |" in write_model_card(tmp_path / "saved").read_text()
    again = TIPCap.from_pretrained(tmp_path / "saved")
    assert again.config.prompt_guidance == 4.0
    assert again.entity_forms == {
        **{name: [name] for name in VOCABULARY},
        "yellow star": ["yellow star", "yellow stars"],
    }
