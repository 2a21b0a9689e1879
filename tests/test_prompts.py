"""Prompts: entity vocabulary and extraction, training prompts, zero-shot entities, prompt interaction."""

import json
import random
import re
import zlib

import pytest
import torch

from tipcap.errors import TipcapError
from tipcap.prompts import (
    PROMPT_TEMPLATES,
    EntityVocabulary,
    PromptInteraction,
    default_vocabulary_path,
    entity_text_embeddings,
    hard_prompt,
    pad_prompt_embeddings,
    sample_training_prompt,
    zero_shot_entities,
)

COCO_CATEGORIES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip


@pytest.fixture(scope="module")
def vocab() -> EntityVocabulary:
    return EntityVocabulary.load()


def slice_captions(path) -> list[str]:
    data = json.loads(path.read_text())
    return [sentence["raw"] for image in data["images"] for sentence in image["sentences"]]


# --- the packaged vocabulary ---------------------------------------------------------------------------


def test_vocabulary_has_the_80_coco_categories_first(vocab):
    assert len(COCO_CATEGORIES) == 80
    assert vocab.names[:80] == COCO_CATEGORIES
    assert len(vocab.names) >= 200
    assert len(set(vocab.names)) == len(vocab.names)
    for name in [
        "street",
        "road",
        "field",
        "grass",
        "water",
        "beach",
        "tree",
        "building",
        "kitchen",
        "plate",
    ]:
        assert name in vocab


def test_every_form_belongs_to_one_entity_and_is_plain_words():
    raw = json.loads(default_vocabulary_path().read_text(encoding="utf-8"))
    assert isinstance(raw["source"], str) and raw["source"]
    owner: dict[str, str] = {}
    for entity in raw["entities"]:
        assert set(entity) == {"name", "forms"}
        assert entity["name"] in entity["forms"]
        for form in entity["forms"]:
            assert re.fullmatch(r"[a-z0-9]+( [a-z0-9]+)*", form), form
            assert owner.setdefault(form, entity["name"]) == entity["name"], (
                f"{form!r} is listed under {owner[form]!r} and {entity['name']!r}"
            )


def test_forms_map_back_to_their_entity(vocab):
    forms = vocab.forms()
    assert forms["puppies"] == "dog"
    assert forms["sofa"] == "couch"
    assert forms["television"] == "tv"
    assert forms["hair dryer"] == "hair drier"
    assert forms["table"] == "dining table"
    for name in vocab.names:
        assert forms[name] == name
        assert vocab.extract(name) == [name]


def test_a_form_under_two_entities_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'pup'"):
        EntityVocabulary([("dog", ["dogs", "pup"]), ("seal", ["pup"])])
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"entities": [{"name": "dog", "forms": ["Dogs"]}, {"name": "dogs"}]}))
    with pytest.raises(TipcapError, match=re.escape(str(path))):
        EntityVocabulary.load(path)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"entities": []}),
        json.dumps([1, 2]),
        json.dumps({"entities": [{"forms": []}]}),
    ],
)
def test_a_malformed_vocabulary_file_names_the_file(tmp_path, content):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(TipcapError, match=re.escape(str(path))):
        EntityVocabulary.load(path)
    with pytest.raises(TipcapError, match="no such file"):
        EntityVocabulary.load(tmp_path / "missing.json")


def test_a_custom_vocabulary_file_loads(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"source": "mine", "entities": [{"name": "yak", "forms": ["yaks"]}]}))
    vocab = EntityVocabulary.load(path)
    assert vocab.names == ["yak"] and vocab.source == "mine"
    assert vocab.extract("Two YAKS and a yak.") == ["yak"]


# --- extraction -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        # plurals and synonyms
        ("Two puppies chase three kittens.", ["dog", "cat"]),
        ("A man and two women ride motorbikes.", ["person", "motorcycle"]),
        ("A jet and an aircraft near the runway", ["airplane", "runway"]),
        ("a sofa facing a television", ["couch", "tv"]),
        ("Her cellphone is next to the phone.", ["cell phone"]),
        ("glazed doughnuts in a box", ["donut", "box"]),
        ("a blow dryer and a toothbrush", ["hair drier", "toothbrush"]),
        ("kids kicking a ball", ["person", "sports ball"]),
        # multi-word entities win over their last word, and plural multi-word forms map to the category
        ("A hot dog stand", ["hot dog"]),
        ("a dog eating a hot dog", ["dog", "hot dog"]),
        ("hot dogs and dogs", ["hot dog", "dog"]),
        ("traffic lights at an intersection", ["traffic light", "intersection"]),
        ("a teddy bear next to a bear", ["teddy bear", "bear"]),
        ("A cat on the toilet bowl.", ["cat", "toilet"]),
        ("a wine glass, a glass and a bowl", ["wine glass", "glass", "bowl"]),
        # case and punctuation
        ("TRAFFIC-LIGHTS!!! and a Stop Sign.", ["traffic light", "stop sign"]),
        ("Dog,frisbee;grass", ["dog", "frisbee", "grass"]),
        # whole words only
        ("A woman skiing past a catalog", ["person"]),
        ("Skiers on skis", ["person", "skis"]),
        # first-mention order, no repeats
        ("Dogs chase a cat while a dog sleeps near another cat.", ["dog", "cat"]),
        ("", []),
        ("nothing to see here", []),
    ],
)
def test_extract(vocab, caption, expected):
    assert vocab.extract(caption) == expected


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A child holding a flowered umbrella and petting a yak.", ["person", "umbrella", "cow"]),
        (
            "Doorway view of a kitchen with a sink, stove, refrigerator and pantry.",
            ["kitchen", "sink", "oven", "refrigerator"],
        ),
        ("A row of parked cars sitting next to parking meters.", ["car", "parking meter"]),
        ("Three teddy bears, each a different color, snuggling together.", ["teddy bear"]),
        ("Three stuffed animals are sitting on a bed. ", ["teddy bear", "bed"]),
        ("a woman standing on skiis while posing for the camera", ["person", "skis", "camera"]),
        ("A bath tub sitting next to a sink in a bathroom.", ["bathtub", "sink", "bathroom"]),
        ("An old station wagon with a surfboard on top of it.", ["car", "surfboard"]),
        ("A man holding a tennis racket playing tennis.", ["person", "tennis racket"]),
        ("The man balances on one leg after serving a tennis ball.", ["person", "sports ball"]),
        ("A cheesy pizza sitting on top of a table.", ["pizza", "dining table"]),
        ("A stop sign installed upside down on a street corner", ["stop sign", "street"]),
    ],
)
def test_extract_real_coco_captions(vocab, coco_slice, caption, expected):
    assert caption in slice_captions(coco_slice)
    assert vocab.extract(caption) == expected


def test_extract_finds_entities_in_most_coco_captions(vocab, coco_slice):
    captions = slice_captions(coco_slice)
    assert len(captions) == 120
    found = [vocab.extract(caption) for caption in captions]
    assert sum(bool(names) for names in found) >= 0.9 * len(captions)
    for names in found:
        assert len(names) == len(set(names))
        assert all(name in vocab for name in names)


# --- training prompts -------------------------------------------------------------------------------------


def draw(entities, names, seed=0, n=20_000, **kwargs):
    rng = random.Random(seed)
    return [sample_training_prompt(entities, names, rng, **kwargs) for _ in range(n)]


def test_training_prompt_statistics(vocab):
    entities = ["dog", "frisbee", "person"]
    drop_all, drop_entity, distractor = 0.5, 0.4, 0.1
    prompts = draw(entities, vocab.names, drop_all=drop_all, drop_entity=drop_entity, distractor=distractor)
    n = len(prompts)
    # Empty: the whole prompt dropped, or every entity dropped and no distractor drawn.
    expected_empty = drop_all + (1 - drop_all) * drop_entity ** len(entities) * (1 - distractor)
    assert abs(sum(not p for p in prompts) / n - expected_empty) < 0.02
    for entity in entities:
        rate = sum(entity in p for p in prompts) / n
        assert abs(rate - (1 - drop_all) * (1 - drop_entity)) < 0.02, entity
    extras = [[w for w in p if w not in entities] for p in prompts]
    assert all(len(e) <= 1 for e in extras)
    assert all(w in vocab for e in extras for w in e)
    assert abs(sum(bool(e) for e in extras) / n - (1 - drop_all) * distractor) < 0.01
    assert len({w for e in extras for w in e}) > 50  # distractors are spread over the vocabulary
    assert all(len(p) == len(set(p)) for p in prompts)


def test_training_prompt_drop_all_alone(vocab):
    prompts = draw(["dog", "cat"], vocab.names, drop_all=0.3, drop_entity=0.0, distractor=0.0)
    assert abs(sum(not p for p in prompts) / len(prompts) - 0.3) < 0.02
    assert all(sorted(p) == ["cat", "dog"] for p in prompts if p)
    assert all(not p for p in draw(["dog"], vocab.names, n=200, drop_all=1.0, distractor=1.0))


def test_training_prompt_is_shuffled_and_truncated(vocab):
    entities = ["dog", "cat", "horse"]
    prompts = draw(entities, vocab.names, n=3000, drop_all=0.0, drop_entity=0.0, distractor=0.0)
    assert all(sorted(p) == sorted(entities) for p in prompts)
    assert abs(sum(p[0] == "dog" for p in prompts) / len(prompts) - 1 / 3) < 0.04
    many = vocab.names[:12]
    for p in draw(many, vocab.names, n=500, drop_all=0.0, drop_entity=0.0, distractor=1.0, max_words=8):
        assert len(p) == 8 and len(set(p)) == 8
        assert sum(w not in many for w in p) <= 1
    assert draw(many, vocab.names, n=5, drop_all=0.0, max_words=0) == [[]] * 5


def test_training_prompt_is_deterministic(vocab):
    entities = ["dog", "frisbee", "person", "grass"]
    assert draw(entities, vocab.names, seed=7, n=500) == draw(entities, vocab.names, seed=7, n=500)
    assert draw(entities, vocab.names, seed=7, n=500) != draw(entities, vocab.names, seed=8, n=500)


def test_distractor_never_a_ground_truth_entity():
    names = ["dog", "cat", "horse"]
    prompts = draw(["dog", "cat"], names, n=2000, drop_all=0.0, drop_entity=1.0, distractor=1.0)
    assert all(p == ["horse"] for p in prompts)
    # No candidate left: no distractor, no error.
    assert draw(names, names, n=50, drop_all=0.0, drop_entity=1.0, distractor=1.0) == [[]] * 50


def test_training_prompt_rejects_bad_probabilities(vocab):
    with pytest.raises(ValueError, match="drop_all"):
        sample_training_prompt(["dog"], vocab.names, random.Random(0), drop_all=1.5)


# --- text embeddings and zero-shot entities ---------------------------------------------------------------


class FakeEncoder:
    """Deterministic pseudo-random vectors per text, of varying length (so normalisation matters)."""

    def __init__(self, dim: int = 24):
        self.dim = dim
        self.calls: list[list[str]] = []

    def vector(self, text: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        return torch.randn(self.dim, generator=generator) * (1 + len(text))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.stack([self.vector(t) for t in texts])


def test_entity_text_embeddings_is_the_normalised_template_mean():
    encoder = FakeEncoder()
    names = ["dog", "hot dog", "traffic light"]
    out = entity_text_embeddings(encoder, names)
    assert len(encoder.calls) == 1
    assert sorted(encoder.calls[0]) == sorted(t.format(n) for n in names for t in PROMPT_TEMPLATES)
    assert out.shape == (3, encoder.dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    for i, name in enumerate(names):
        vectors = [encoder.vector(t.format(name)) for t in PROMPT_TEMPLATES]
        mean = torch.stack([v / v.norm() for v in vectors]).mean(dim=0)
        torch.testing.assert_close(out[i], mean / mean.norm())
    single = entity_text_embeddings(FakeEncoder(), ["dog"], templates=("{}",))
    vector = encoder.vector("dog")
    torch.testing.assert_close(single[0], vector / vector.norm())


def test_entity_text_embeddings_with_a_real_clip(tiny_clip, vocab):
    from tipcap.clip import ClipEncoder, ClipSpec

    encoder = ClipEncoder.load(ClipSpec(str(tiny_clip), "none"), device="cpu")
    out = entity_text_embeddings(lambda xs: encoder.encode_texts(xs).embeddings, vocab.names[:20])
    assert out.shape == (20, encoder.dim)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(20))
    assert torch.isfinite(out).all()


def orthonormal(count: int, dim: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, count, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()  # [count, dim]


def test_zero_shot_entities_picks_the_nearest_names():
    names = ["dog", "cat", "car", "tree", "pizza", "boat", "bed", "clock"]
    entities = orthonormal(len(names), 32)
    noise = 0.05 * torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    images = 3.0 * (entities[[3, 5, 0]] + noise)  # unnormalised on purpose
    assert zero_shot_entities(images, entities, names, top_k=1) == [["tree"], ["boat"], ["dog"]]
    top3 = zero_shot_entities(images, entities, names, top_k=3)
    assert [row[0] for row in top3] == ["tree", "boat", "dog"]
    assert all(len(row) == 3 and len(set(row)) == 3 for row in top3)
    assert zero_shot_entities(images, entities, names, top_k=3, threshold=0.5) == [
        ["tree"],
        ["boat"],
        ["dog"],
    ]
    assert zero_shot_entities(images, entities, names, top_k=3, threshold=1.01) == [[], [], []]
    assert all(len(row) == len(names) for row in zero_shot_entities(images, entities, names, top_k=100))


def test_zero_shot_entities_orders_best_first_and_thresholds():
    names = ["dog", "cat", "car", "tree"]
    entities = orthonormal(len(names), 16)
    image = (0.8 * entities[2] + 0.6 * entities[0]).unsqueeze(0)  # cosines: car 0.8, dog 0.6, others 0
    assert zero_shot_entities(image, entities, names, top_k=2) == [["car", "dog"]]
    # temperature 100: p(dog) = e^60 / (e^80 + e^60 + 2) ≈ 2e-9
    assert zero_shot_entities(image, entities, names, top_k=2, threshold=1e-3) == [["car"]]
    # temperature 10: p(dog) = e^6 / (e^8 + e^6 + 2) ≈ 0.12
    assert zero_shot_entities(image, entities, names, top_k=4, threshold=0.1, temperature=10.0) == [
        ["car", "dog"]
    ]


def test_zero_shot_entities_checks_shapes():
    entities = orthonormal(4, 16)
    with pytest.raises(ValueError, match="names"):
        zero_shot_entities(torch.randn(2, 16), entities, ["a", "b", "c"])
    with pytest.raises(ValueError, match="dimensions"):
        zero_shot_entities(torch.randn(2, 8), entities, ["a", "b", "c", "d"])


def test_hard_prompt():
    # ViECap's template, with its "something" when no entity is kept.
    assert hard_prompt(["dog", "frisbee"]) == "There are dog, frisbee in image."
    assert hard_prompt(["hot dog"]) == "There are hot dog in image."
    assert hard_prompt([]) == "There are something in image."


def test_pad_prompt_embeddings():
    names = ["dog", "cat", "car"]
    table = torch.arange(1.0, 10.0).view(3, 3)
    embeddings, mask = pad_prompt_embeddings([["car", "dog"], [], ["cat"]], table, names)
    assert embeddings.shape == (3, 2, 3) and mask.shape == (3, 2) and mask.dtype == torch.bool
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    assert torch.equal(embeddings[0], table[[2, 0]])
    assert torch.equal(embeddings[2, 0], table[1])
    assert not embeddings[~mask].any()
    empty, empty_mask = pad_prompt_embeddings([[], []], table, names)
    assert empty.shape == (2, 0, 3) and empty_mask.shape == (2, 0)
    with pytest.raises(KeyError, match="zebra"):
        pad_prompt_embeddings([["zebra"]], table, names)


# --- prompt interaction module ----------------------------------------------------------------------------

CLIP_DIM, WIDTH, K, P = 16, 32, 5, 4


@pytest.fixture
def pim() -> PromptInteraction:
    torch.manual_seed(0)
    return PromptInteraction(CLIP_DIM, WIDTH, layers=2, heads=4).eval()


def mixed_batch():
    """Four rows: all words real, some words real, no words (garbage at padding), some words real."""
    generator = torch.Generator().manual_seed(3)
    prefix = torch.randn(4, K, WIDTH, generator=generator)
    prompts = torch.randn(4, P, CLIP_DIM, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    prompts[~mask] = 1e4 * torch.randn(int((~mask).sum()), CLIP_DIM, generator=generator)
    return prefix, prompts, mask


def test_pim_with_a_closed_gate_is_the_identity():
    torch.manual_seed(0)
    closed = PromptInteraction(CLIP_DIM, WIDTH, layers=2, heads=4, gate_init=0.0).eval()
    prefix, prompts, mask = mixed_batch()
    assert torch.equal(closed(prefix, prompts, mask), prefix)
    assert torch.equal(closed(prefix, prompts), prefix)
    assert torch.equal(closed(prefix, None), prefix)


def test_pim_trains_its_attention_from_the_first_step(pim):
    # The gate starts open, so the cross-attention gets gradient at initialisation (at a closed gate
    # it gets none and prompts are never learned).
    assert pim.gate.item() > 0.1
    prefix, prompts, mask = mixed_batch()
    weights = torch.randn(prefix.shape, generator=torch.Generator().manual_seed(5))
    (pim(prefix, prompts, mask) * weights).sum().backward()
    assert pim.gate.grad is not None and pim.gate.grad.abs().item() > 1e-6
    assert pim.project.weight.grad.abs().max().item() > 1e-6
    for name, parameter in pim.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


def test_pim_with_an_open_gate(pim):
    with torch.no_grad():
        pim.gate.fill_(1.0)
    prefix, prompts, mask = mixed_batch()
    out = pim(prefix, prompts, mask)
    assert out.shape == prefix.shape and torch.isfinite(out).all()
    for row in (0, 1, 3):
        assert (out[row] - prefix[row]).abs().max() > 1e-3, row
    assert torch.equal(out[2], prefix[2])
    assert torch.equal(pim(prefix, None), prefix)
    assert torch.equal(pim(prefix, prompts, torch.zeros(4, P, dtype=torch.bool)), prefix)
    assert torch.equal(pim(prefix, prompts[:, :0], mask[:, :0]), prefix)
    # Padding is ignored: each row equals the row computed alone from its real words only.
    for row in (0, 1, 3):
        alone = pim(prefix[row : row + 1], prompts[row, mask[row]].unsqueeze(0))
        torch.testing.assert_close(out[row : row + 1], alone, rtol=1e-5, atol=1e-5)
    # A mask of None means every position is a real word.
    torch.testing.assert_close(pim(prefix[:1], prompts[:1]), out[:1], rtol=1e-5, atol=1e-5)
    # The words matter, and their order does not (no positions).
    other = pim(prefix[:1], torch.randn(1, P, CLIP_DIM))
    assert (other - out[:1]).abs().max() > 1e-3
    torch.testing.assert_close(pim(prefix[:1], prompts[:1, [3, 1, 0, 2]]), out[:1], rtol=1e-5, atol=1e-5)


def test_pim_gradients_are_finite_with_all_masked_rows(pim):
    with torch.no_grad():
        pim.gate.fill_(0.5)
    pim.train()
    prefix, prompts, mask = mixed_batch()
    prefix.requires_grad_(True)
    out = pim(prefix, prompts, mask)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(prefix.grad).all()
    torch.testing.assert_close(prefix.grad[2], 2 * prefix[2].detach() / out.numel())  # identity row
    for name, parameter in pim.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert pim.gate.grad.abs().item() > 0


def test_pim_attention_never_sees_a_row_without_keys(pim):
    # A softmax over no keys is NaN in PyTorch's math attention path (need_weights=True, older versions),
    # even where the fused path happens to return zeros: all-masked rows must get a dummy key.
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["key_padding_mask"].clone())

    for block in pim.blocks:
        block.attn.register_forward_pre_hook(record, with_kwargs=True)
    prefix, prompts, mask = mixed_batch()
    pim(prefix, prompts, mask)
    assert len(seen) == len(pim.blocks)
    for ignore in seen:
        assert not ignore.all(dim=1).any()
        assert torch.equal(ignore[[0, 1, 3]], ~mask[[0, 1, 3]])


def test_pim_checks_shapes(pim):
    prefix, prompts, mask = mixed_batch()
    with pytest.raises(ValueError, match="prompts"):
        pim(prefix, prompts[:2], mask[:2])
    with pytest.raises(ValueError, match="prompt_mask"):
        pim(prefix, prompts, mask[:, :2])
    with pytest.raises(ValueError, match="prefix"):
        pim(prefix[..., :8], prompts, mask)
