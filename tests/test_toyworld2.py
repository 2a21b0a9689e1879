"""Toy world 2: its scenes and grammar, test scenes new to the training captions, claims checked against
scenes, and the stop rule that keeps the toy CLIP's geometry like a real CLIP's."""

import json
import math

import pytest
import torch
from conftest import recounted_claim_accuracy, run
from PIL import Image
from safetensors.torch import load_file

from tipcap.data import list_images, load_image, read_captions
from tipcap.toy.gap_shapes import GapShape
from tipcap.toy.plugin import object_f1
from tipcap.toy.world1 import ShapeObject
from tipcap.toy.world2 import GENERATOR_VERSION, full_description, relation, render, scene_relations
from tipcap.toy.world2_claims import ASPECTS, claim_agreement, claim_f1, mean_claim_f1
from tipcap.toy.world2_grammar import Claims, Group, Relation, parse


def make_world(path, seed=0, train=150, val=20, test=20):
    result = run("toyworld", "--out", path, "--version", 2, "--seed", seed, "--train", train, "--val", val,
                 "--test", test)  # fmt: skip
    assert result.exit_code == 0, result.output
    return path / "toyworld.json"


def scenes(karpathy, split=None):
    entries = json.loads(karpathy.read_text())["images"]
    return [e for e in entries if split is None or e["split"] == split]


def objects_of(entry):
    return [ShapeObject(**o) for o in entry["objects"]]


def test_world_2_is_deterministic_and_readable(tmp_path):
    first = make_world(tmp_path / "a")
    assert first.read_bytes() == make_world(tmp_path / "b").read_bytes()
    # The images too: their grain comes from a generator per image, not from process-wide state.
    for image in (tmp_path / "a" / "images").iterdir():
        assert image.read_bytes() == (tmp_path / "b" / "images" / image.name).read_bytes(), image.name
    assert first.read_bytes() != make_world(tmp_path / "c", seed=1).read_bytes()
    document = json.loads(first.read_text())
    assert document["world"] == 2 and document["generator"] == GENERATOR_VERSION
    assert len(read_captions(first, split="train")) == 750
    images = list_images(first, split="test")
    assert len(images) == 20 and load_image(images[0].path).size == (48, 48)
    # Each object lies inside the 16-pixel patch of its cell (radius at most 0.13 of the side).
    for entry in document["images"]:
        for o in entry["objects"]:
            for centre in (o["x"], o["y"]):
                assert int((centre - 0.13) * 3) == int((centre + 0.13) * 3), (entry["filename"], o)
    counts = {len(e["objects"]) for e in document["images"]}
    assert counts == {1, 2, 3, 4}
    counted = [
        e for e in document["images"] if any(g.count > 1 for g in parse(e["sentences"][0]["raw"]).groups)
    ]
    assert counted, "some scenes repeat an object and say so with a count"
    for entry in document["images"]:
        assert len({s["raw"] for s in entry["sentences"]}) == 5


def test_world_2_is_the_default_and_world_1_stays_available(tmp_path):
    for version, flag in ((2, []), (1, ["--version", 1])):
        out = tmp_path / f"w{version}"
        result = run("toyworld", "--out", out, "--train", 20, "--val", 2, "--test", 2, *flag)
        assert result.exit_code == 0, result.output
        karpathy = out / "toyworld.json"
        assert json.loads(karpathy.read_text()).get("world") == (2 if version == 2 else None)
        assert load_image(list_images(karpathy)[0].path).size == ((48, 48) if version == 2 else (32, 32))


def test_no_test_scene_is_fully_described_by_a_training_caption(tmp_path):
    karpathy = make_world(tmp_path / "w", train=1500, val=50, test=50)
    train = scenes(karpathy, "train")
    stated = {parse(s["raw"]) for e in train for s in e["sentences"]}
    stated |= {full_description(objects_of(e)) for e in train}
    held_out = scenes(karpathy, "val") + scenes(karpathy, "test")
    assert len(held_out) == 100
    assert not [e for e in held_out if full_description(objects_of(e)) in stated]
    # The rule has bite: drawn freely, scenes of one or two objects often repeat what earlier captions say.
    earlier = {parse(s["raw"]) for e in train[:1000] for s in e["sentences"]}
    assert sum(full_description(objects_of(e)) in earlier for e in train[1000:]) > 10


def test_every_caption_of_the_grammar_states_only_what_holds(tmp_path):
    karpathy = make_world(tmp_path / "w")
    sized = related = 0
    for entry in scenes(karpathy):
        for sentence in entry["sentences"]:
            agreement = claim_agreement(sentence["raw"], entry["objects"])
            claims = parse(sentence["raw"])
            for aspect in ("colour", "shape"):
                assert agreement[aspect].f1 == 1.0, (aspect, sentence["raw"])
            assert object_f1(sentence["raw"], entry["objects"]) == 1.0, sentence["raw"]
            if any(g.size for g in claims.groups):
                sized += 1
                assert agreement["size"].f1 == 1.0, sentence["raw"]
            if claims.relations:
                related += 1
                assert agreement["relation"].precision == 1.0, sentence["raw"]
            assert sum(g.count for g in claims.groups) == len(entry["objects"]), sentence["raw"]
    assert sized > 100 and related > 100


def test_parse_reads_counts_sizes_and_canonical_relations():
    claims = parse("A big orange star is under the Blue Ring, and two little green crosses.")
    assert claims == Claims(
        frozenset(
            {
                Group(1, "orange", "star", "large"),
                Group(1, "blue", "ring", None),
                Group(2, "green", "cross", "small"),
            }
        ),
        frozenset({Relation(("blue", "ring"), "above", ("orange", "star"))}),
    )
    assert parse("a red circle sits to the right of a blue square.").relations == {
        Relation(("blue", "square"), "left of", ("red", "circle"))
    }
    assert parse("a red circle beside a blue square.") == parse("a blue square is next to a red circle.")
    # Only a relation's words between two mentions make a relation.
    assert parse("a red circle and a blue square.").relations == frozenset()


def test_claims_are_checked_against_the_scene():
    scene = [
        ShapeObject("red", "circle", "small", 0.2, 0.2),
        ShapeObject("blue", "star", "large", 0.5, 0.2),
        ShapeObject("green", "ring", "large", 0.5, 0.8),
    ]
    assert relation(scene[0], scene[1]) == "next to" and relation(scene[1], scene[2]) == "above"
    assert relation(scene[0], scene[2]) == "above" and len(scene_relations(scene)) == 3
    right = claim_f1("a small red circle is next to a big blue star, with a green ring.", scene)
    assert right["size"] == pytest.approx(2 * (2 / 3) / (1 + 2 / 3))
    assert object_f1("a small red circle is next to a big blue star, with a green ring.", scene) == 1.0
    assert right["relation"] == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))
    wrong = claim_agreement("a large red circle is under a blue star and a yellow cross.", scene)
    assert wrong["colour"].precision == pytest.approx(2 / 3) and wrong["colour"].recall == pytest.approx(
        2 / 3
    )
    assert wrong["shape"].f1 == pytest.approx(2 / 3) and wrong["size"].f1 == 0.0
    assert wrong["relation"].f1 == 0.0
    means = mean_claim_f1(["a red circle.", "nothing here."], [scene, scene])
    assert set(means) == set(ASPECTS) and means["colour"] == pytest.approx(0.5 * 0.5)


def test_render_draws_what_the_scene_says():
    star = [ShapeObject("red", "star", "large", 0.5, 0.5)]
    ring = [ShapeObject("red", "ring", "large", 0.5, 0.5)]
    image = render(star, background="gray", grain=0.0)
    assert image.size == (48, 48) and image.getpixel((24, 24)) == (220, 40, 40)
    assert render(ring, background="gray", grain=0.0).getpixel((24, 24)) == (200, 200, 200)
    assert render(star, background="gray", grain=0.0).tobytes() != render(ring, grain=0.0).tobytes()
    assert isinstance(image, Image.Image)


def test_stop_rule_verdicts():
    from tipcap.toy.clip import StopRule

    rule = StopRule(recall_at_1=0.8)
    assert rule.verdict({"matched_cosine": 0.3, "within_modality_cosine": 0.5, "recall_at_1": 0.5}) is None
    assert (
        rule.verdict({"matched_cosine": 0.3, "within_modality_cosine": 0.5, "recall_at_1": 0.8}) == "recall"
    )
    assert (
        rule.verdict({"matched_cosine": 0.5, "within_modality_cosine": 0.5, "recall_at_1": 0.9}) == "geometry"
    )
    # A calibrated CLIP stops once its matched cosine reaches the target, before the recall it would reach.
    calibrated = StopRule(recall_at_1=0.8, matched_cosine=0.3)
    figures = {"matched_cosine": 0.29, "within_modality_cosine": 0.5, "recall_at_1": 0.5}
    assert calibrated.verdict(figures) is None
    assert calibrated.verdict({**figures, "matched_cosine": 0.3}) == "matched"
    assert calibrated.verdict({**figures, "matched_cosine": 0.3, "recall_at_1": 0.9}) == "matched"
    assert calibrated.verdict({**figures, "matched_cosine": 0.5}) == "geometry"


def test_toyworld_gap_profile_sets_the_shape_and_the_stop(tmp_path, monkeypatch):
    """--gap-profile vit-b-32 trains the CLIP with the profile's offset and stops it at the profile's matched
    cosine, checked every few steps; a knob given beside it changes that knob alone."""
    import dataclasses

    import tipcap.demo
    from tipcap.toy.gap_shapes import PROFILES, GapShape

    calls = []
    monkeypatch.setattr(tipcap.demo, "train_demo_clip", lambda *args, **kwargs: calls.append(kwargs))
    result = run("toyworld", "--out", tmp_path / "w", "--train", 4, "--val", 2, "--test", 0, "--clip",
                 "--gap-profile", "vit-b-32", "--gap-axes", "4")  # fmt: skip
    assert result.exit_code == 0, result.output
    profile = PROFILES["vit-b-32"]
    assert calls[0]["gap"] == dataclasses.replace(profile.shape, axes=4)
    stop = calls[0]["stop"]
    assert (stop.matched_cosine, stop.every) == (profile.matched_cosine, profile.check_every)
    assert stop.recall_at_1 == tipcap.demo.demo_scale(quick=False).stop.recall_at_1
    # --clip-check-every checks the demo's rule more often, or the profile's.
    run("toyworld", "--out", tmp_path / "w", "--train", 4, "--val", 2, "--test", 0, "--clip",
        "--clip-check-every", "5", "--gap-anisotropy", "4")  # fmt: skip
    assert calls[1]["stop"] == dataclasses.replace(tipcap.demo.demo_scale(quick=False).stop, every=5)
    assert calls[1]["gap"] == GapShape(anisotropy=4.0)
    run("toyworld", "--out", tmp_path / "w", "--train", 4, "--val", 2, "--test", 0, "--clip",
        "--clip-check-every", "3", "--gap-profile", "vit-b-32")  # fmt: skip
    assert (calls[2]["stop"].every, calls[2]["stop"].matched_cosine) == (3, profile.matched_cosine)


@pytest.mark.slow
def test_toy_clip_stops_by_its_rule(tmp_path, tiny_clip, monkeypatch):
    """Recall reached: no more steps; geometry flipped: the weights of the previous check are kept; else all
    steps run. Each reason is recorded in the report."""
    import tipcap.toy.clip as toyclip

    karpathy = make_world(tmp_path / "w", train=40, val=5, test=0)
    config = json.loads(tiny_clip.read_text())
    config["vision_cfg"]["image_size"] = 48

    def train(name, rule, steps=4):
        spec, report = toyclip.train_toyclip(karpathy, tmp_path / name, steps=steps, batch_size=8,
                                             config=config, stop=rule, progress=False)  # fmt: skip
        return load_file(spec.pretrained), report

    initial, report = train("recall", toyclip.StopRule(every=1, recall_at_1=0.0, held_out=5))
    assert (report.steps, report.stop_reason) == (0, "recall")
    trained, report = train("steps", toyclip.StopRule(every=2, recall_at_1=1.1, held_out=5))
    assert (report.steps, report.stop_reason) == (4, "steps")
    assert any(not (trained[k] == initial[k]).all() for k in initial)
    report_file = json.loads((tmp_path / "steps" / "toyclip_report.json").read_text())
    assert {"trace_sigma", "effective_rank", "text_cosine", "stop_reason"} <= set(report_file)

    real = toyclip.figures
    checks = []

    def flipping(images, texts, owner):
        result = real(images, texts, owner)
        checks.append((images, texts))
        return {**result, "within_modality_cosine": -2.0} if len(checks) == 3 else result

    monkeypatch.setattr(toyclip, "figures", flipping)
    after_two, report = train("geometry", toyclip.StopRule(every=1, recall_at_1=1.1, held_out=5))
    assert (report.steps, report.stop_reason) == (1, "geometry")

    # Each check reads both towers as they are then, not as they were at the first check: a run that
    # stops by recall at its third check saved the weights that check read.
    def recalled(images, texts, owner):
        checks.append((images, texts))
        return {**real(images, texts, owner), "recall_at_1": float(len(checks) == 3)}

    checks.clear()
    monkeypatch.setattr(toyclip, "figures", recalled)
    _, report = train("late-recall", toyclip.StopRule(every=1, recall_at_1=0.5, held_out=5))
    assert (report.steps, report.stop_reason) == (2, "recall")
    from tipcap.clip import ClipEncoder, ClipSpec

    late = tmp_path / "late-recall"
    saved = ClipEncoder.load(
        ClipSpec(str(late / "toyclip.json"), str(late / "toyclip.safetensors")), device="cpu"
    )
    captions = [s["raw"] for e in scenes(karpathy, "val")[:5] for s in e["sentences"]]
    assert torch.allclose(checks[2][1], saved.encode_texts(captions).embeddings, atol=1e-5)
    monkeypatch.setattr(toyclip, "figures", real)
    one_step, _ = train("one-step", None, steps=1)
    assert all((after_two[k] == one_step[k]).all() for k in one_step)


def test_world_2_captions_fit_the_demo_decoders(tmp_path):
    """The demo's decoders keep max_caption_tokens − 1 word-level tokens before the end of text: every
    caption of the grammar must fit, or decoders would learn truncated captions."""
    import importlib.resources
    import re

    import yaml

    from tipcap.demo import demo_scale

    karpathy = make_world(tmp_path / "w", train=400, val=0, test=0)
    longest = max(
        len(re.findall(r"\w+|[^\w\s]+", s["raw"])) for e in scenes(karpathy) for s in e["sentences"]
    )
    for quick in (True, False):
        grid = importlib.resources.files("tipcap") / "resources" / demo_scale(quick, version=2).grid
        model = yaml.safe_load(grid.read_text())["decoder"]["model"]
        assert (
            longest <= model["max_caption_tokens"] - 1 <= model["language_model_config"]["n_positions"] - 20
        )


def val_embeddings(spec, karpathy):
    """The val split's scenes, their image embeddings ``[N, d]`` and their captions' ``[M, d]`` by a CLIP."""
    from tipcap.clip import ClipEncoder

    encoder = ClipEncoder.load(spec, device="cpu")
    entries = scenes(karpathy, "val")
    images = encoder.encode_images(
        torch.stack([encoder.preprocess(load_image(karpathy.parent / e["filepath"] / e["filename"]))
                     for e in entries])
    )  # fmt: skip
    texts = encoder.encode_texts([s["raw"] for e in entries for s in e["sentences"]]).embeddings
    return entries, images, texts


def test_built_modality_gap_fixes_the_geometry(tmp_path, tiny_clip):
    """With the towers' last layers built, every image embedding has the same component along the image
    tower's modality direction, every caption along the text tower's, the two directions are orthogonal,
    so matched pairs sit below pairs of images; training leaves the built layers as they were."""
    from tipcap.toy.clip import figures, train_toyclip

    karpathy = make_world(tmp_path / "w", train=40, val=8, test=0)
    config = json.loads(tiny_clip.read_text())
    config["vision_cfg"]["image_size"] = 48
    spec, report = train_toyclip(karpathy, tmp_path / "clip", steps=3, batch_size=8, config=config,
                                 gap=GapShape(1.0), progress=False)  # fmt: skip
    weights = load_file(spec.pretrained)
    assert torch.equal(weights["visual.ln_post.bias"], torch.ones(32))
    assert torch.equal(weights["ln_final.weight"], torch.ones(32))
    image_direction = torch.ones(32) @ weights["visual.proj"] / 32**0.5
    text_direction = torch.ones(32) @ weights["text_projection"] / 32**0.5
    assert abs(float(image_direction @ text_direction)) < 1e-5

    entries, images, texts = val_embeddings(spec, karpathy)
    assert torch.allclose(images @ image_direction, torch.full((len(images),), 2**-0.5), atol=1e-4)
    assert torch.allclose(texts @ text_direction, torch.full((len(texts),), 2**-0.5), atol=1e-4)
    owner = torch.tensor([i for i, e in enumerate(entries) for _ in e["sentences"]])
    measured = figures(images, texts, owner)
    assert measured["matched_cosine"] < 0.5 <= measured["within_modality_cosine"]
    assert report.matched_cosine == pytest.approx(measured["matched_cosine"], abs=1e-4)


def test_gap_shape_puts_the_mean_on_privileged_axes_and_decays_the_image_scale(tmp_path, tiny_clip):
    """GapShape(axes=4): each tower's modality direction (the all-ones LayerNorm bias through the projection)
    lies on its own two coordinates, the projection stays orthogonal, and the images' and captions' means
    differ mostly there; anisotropy sets the image LayerNorm's scale to exp(-a j / W) of mean square 1."""
    from tipcap.toy.clip import train_toyclip

    karpathy = make_world(tmp_path / "w", train=40, val=8, test=0)
    config = json.loads(tiny_clip.read_text())
    config["vision_cfg"]["image_size"] = 48
    shape = GapShape(1.0, axes=4, anisotropy=2.0)
    spec, report = train_toyclip(karpathy, tmp_path / "clip", steps=3, batch_size=8, config=config,
                                 gap=shape, progress=False)  # fmt: skip
    assert report.gap == {"offset": 1.0, "axes": 4, "anisotropy": 2.0}
    weights = load_file(spec.pretrained)
    for name in ("visual.proj", "text_projection"):
        assert torch.allclose(weights[name].T @ weights[name], torch.eye(32), atol=1e-5)
    image_direction = torch.ones(32) @ weights["visual.proj"] / 32**0.5
    text_direction = torch.ones(32) @ weights["text_projection"] / 32**0.5
    assert torch.allclose(image_direction, torch.tensor([2**-0.5] * 2 + [0.0] * 30), atol=1e-5)
    assert torch.allclose(text_direction, torch.tensor([0.0] * 2 + [2**-0.5] * 2 + [0.0] * 28), atol=1e-5)
    decay = [math.exp(-2.0 * j / 32) for j in range(32)]
    rms = math.sqrt(sum(x * x for x in decay) / 32)
    assert torch.allclose(weights["visual.ln_post.weight"], torch.tensor([x / rms for x in decay]), atol=1e-6)
    assert torch.equal(weights["ln_final.weight"], torch.ones(32))

    _, images, texts = val_embeddings(spec, karpathy)
    mean_gap = images.mean(0) - texts.mean(0)
    assert float(mean_gap[:4].square().sum() / mean_gap.square().sum()) > 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--gap-axes", "4"], "add --clip"),
        (["--gap-profile", "vit-b-32"], "add --clip"),
        (["--clip-check-every", "5"], "add --clip"),
        (["--version", "1", "--clip", "--clip-check-every", "5"], "add --clip"),
        (["--clip", "--gap-axes", "3"], "gap axes 3: give 0 (random axes)"),
    ],
)
def test_toyworld_refuses_a_gap_shape_it_cannot_build(tmp_path, options, message):
    result = run("toyworld", "--out", tmp_path / "w", "--train", 4, "--val", 2, "--test", 0, *options)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_perturb_makes_one_claim_false():
    """A hard negative is the caption with one shape, one size or one relation (not "next to", which has no
    inverse) replaced: the rest of the words and every colour stay, and what it claims is false."""
    import difflib
    import random

    from tipcap.toy.world2_grammar import perturb

    rng = random.Random(0)
    captions = [
        "a small red circle is to the left of a blue star, and two green rings.",
        "a red cross sits under a big green ring, and a yellow diamond.",
        "there are two pink crosses.",
        "a green star next to a red ring.",
    ]
    shapes = {"circle", "star", "rings", "cross", "ring", "diamond", "crosses"}
    changed = set()
    for caption in captions:
        truth = parse(caption)
        for _ in range(20):
            negative = perturb(caption, rng)
            claims = parse(negative)
            assert claims != truth, negative
            assert {g.colour for g in claims.groups} == {g.colour for g in truth.groups}, negative
            before, after = caption.split(), negative.split()
            opcodes = difflib.SequenceMatcher(a=before, b=after).get_opcodes()
            edits = [op for op in opcodes if op[0] != "equal"]
            assert len(edits) == 1, (caption, negative)
            replaced = set(before[edits[0][1] : edits[0][2]])
            sizes = {"small", "big"}
            changed.add("shape" if replaced & shapes else "size" if replaced & sizes else "relation")
    assert changed == {"shape", "size", "relation"}
    assert all("next to" in perturb("a green star next to a red ring.", rng) for _ in range(10))


def test_loss_with_negatives_counts_the_negatives():
    """A negative identical to its image's caption costs the image half its choice; distinct ones cost
    nothing at a large scale."""
    from tipcap.toy.clip import _loss_with_negatives

    basis = torch.eye(6)
    images, captions = basis[:2], basis[:2]
    far = _loss_with_negatives(images, torch.cat([captions, basis[2:4]]), scale=100.0)
    near = _loss_with_negatives(images, torch.cat([captions, captions]), scale=100.0)
    assert float(far) < 1e-6
    assert float(near) == pytest.approx(torch.log(torch.tensor(2.0)).item() / 2, abs=1e-6)


def test_world_2_clip_reports_its_claim_accuracy(tmp_path, tiny_clip):
    """Trained with hard negatives, the report of a world-2 CLIP gives how often an image prefers its caption
    to the caption with one claim made false; a world-1 CLIP's report leaves it out."""
    from tipcap.toy.clip import train_toyclip
    from tipcap.toy.world2_grammar import perturb

    karpathy = make_world(tmp_path / "w", train=40, val=8, test=0)
    config = json.loads(tiny_clip.read_text())
    config["vision_cfg"]["image_size"] = 48
    spec, report = train_toyclip(karpathy, tmp_path / "clip", steps=2, batch_size=8, config=config,
                                 negatives=perturb, scale_warmup=2, progress=False)  # fmt: skip
    saved = json.loads((tmp_path / "clip" / "toyclip_report.json").read_text())
    assert report.claim_accuracy == saved["claim_accuracy"] == recounted_claim_accuracy(karpathy, spec)
    world1 = tmp_path / "w1"
    made = run("toyworld", "--out", world1, "--version", 1, "--train", 40, "--val", 8, "--test", 0)
    assert made.exit_code == 0, made.output
    config["vision_cfg"]["image_size"] = 32
    _, report = train_toyclip(world1 / "toyworld.json", tmp_path / "clip1", steps=1, batch_size=8,
                              config=config, progress=False)  # fmt: skip
    assert report.claim_accuracy is None


def test_logit_scale_warms_up_to_100(tmp_path, tiny_clip, monkeypatch):
    """With a warm-up, the scale the loss uses rises geometrically from 1/0.07 to 100, then stays there."""
    import tipcap.toy.clip as toyclip
    from tipcap.toy.world2_grammar import perturb

    karpathy = make_world(tmp_path / "w", train=40, val=4, test=0)
    config = json.loads(tiny_clip.read_text())
    config["vision_cfg"]["image_size"] = 48
    scales = []
    real = toyclip._loss_with_negatives

    def recording(images, texts, scale):
        scales.append(scale)
        return real(images, texts, scale)

    monkeypatch.setattr(toyclip, "_loss_with_negatives", recording)
    toyclip.train_toyclip(karpathy, tmp_path / "clip", steps=5, batch_size=8, config=config,
                          negatives=perturb, scale_warmup=2, progress=False)  # fmt: skip
    assert scales == pytest.approx([1 / 0.07, (100 / 0.07) ** 0.5, 100.0, 100.0, 100.0])


def test_cell_labels_name_what_each_cell_holds():
    from tipcap.toy.world2 import cell_labels

    scene = [
        ShapeObject("red", "circle", "small", 0.15, 0.18),
        ShapeObject("blue", "ring", "large", 0.52, 0.83),
    ]
    cells = cell_labels(scene)
    assert cells[0] == (1, 1, 1)  # top left: red (1st colour), circle (1st shape), small (1st size)
    assert cells[7] == (3, 7, 2)  # bottom middle: blue, ring, large
    assert [c for i, c in enumerate(cells) if i not in (0, 7)] == [(0, 0, 0)] * 7


def test_seeing_stage_trains_the_image_tower_alone(tmp_path, tiny_clip, monkeypatch):
    """Before contrastive training, the image tower learns to read the scene: its weights move (the built
    last LayerNorm stays fixed); a tower without one patch per cell, or a world without scenes, gets one
    line."""
    import tipcap.toy.clip as toyclip
    from tipcap.errors import TipcapError

    karpathy = make_world(tmp_path / "w", train=40, val=4, test=0)
    config = json.loads(tiny_clip.read_text())
    config["vision_cfg"].update(image_size=48, patch_size=16, pool_type="avg", final_ln_after_pool=True)
    seen = {}
    real = toyclip._teach_to_see

    def recording(visual, head, *args):
        before = {k: v.clone() for k, v in visual.state_dict().items()}
        real(visual, head, *args)
        seen["moved"] = [k for k, v in visual.state_dict().items() if not torch.equal(v, before[k])]

    monkeypatch.setattr(toyclip, "_teach_to_see", recording)
    untrained, _ = toyclip.train_toyclip(karpathy, tmp_path / "a", steps=1, batch_size=8, config=config,
                                         gap=GapShape(1.0), progress=False)  # fmt: skip
    assert "moved" not in seen
    taught, _ = toyclip.train_toyclip(karpathy, tmp_path / "b", steps=1, batch_size=8, config=config,
                                      gap=GapShape(1.0), seeing_steps=3, progress=False)  # fmt: skip
    assert "conv1.weight" in seen["moved"] and "ln_post.bias" not in seen["moved"]
    first, second = load_file(untrained.pretrained), load_file(taught.pretrained)
    assert not torch.equal(first["visual.conv1.weight"], second["visual.conv1.weight"])

    config["vision_cfg"]["patch_size"] = 8
    with pytest.raises(TipcapError, match="one patch per cell"):
        toyclip.train_toyclip(karpathy, tmp_path / "c", steps=1, config=config, seeing_steps=1,
                              progress=False)  # fmt: skip
    world1 = tmp_path / "w1"
    made = run("toyworld", "--out", world1, "--version", 1, "--train", 20, "--val", 4, "--test", 0)
    assert made.exit_code == 0
    config["vision_cfg"].update(image_size=32, patch_size=8)
    with pytest.raises(TipcapError, match="toy world 2"):
        toyclip.train_toyclip(world1 / "toyworld.json", tmp_path / "d", steps=1, config=config,
                              seeing_steps=1, progress=False)  # fmt: skip
