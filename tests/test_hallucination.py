"""CHAIR-i and CHAIR-s: COCO object words, counting, instance files, `evaluate --instances`, the toy world."""

import json
import shutil

import pytest
from conftest import COCO_SLICE, karpathy_references, run

from tipcap.config import EvalConfig
from tipcap.evaluation.chair import CocoObjectWords, chair
from tipcap.evaluation.evaluate import evaluate_split
from tipcap.toy.plugin import mentioned_objects
from tipcap.toy.prompt_sources import wrong_prompts

FAST_METRICS = ("--metrics", "bleu,rouge,cider")


@pytest.fixture(scope="module")
def words():
    return CocoObjectWords.load()


PLURALS = {"person": "people", "bus": "buses", "bench": "benches", "sheep": "sheep", "skis": "skis",
           "wine glass": "wine glasses", "knife": "knives", "sandwich": "sandwiches", "couch": "couches",
           "broccoli": "broccoli", "mouse": "mice", "scissors": "scissors",
           "toothbrush": "toothbrushes"}  # fmt: skip


def test_the_list_holds_coco_s_80_categories_each_found_by_its_name_and_plural(words):
    assert len(words.categories) == 80 and len(set(words.categories)) == 80
    assert words.categories[:3] == ["person", "bicycle", "car"] and words.categories[-1] == "toothbrush"
    for name in words.categories:
        assert words.objects(f"there is a {name} here.") == [name], name
        assert words.objects(f"two {PLURALS.get(name, name + 's')}.") == [name], name


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A man eats a hot dog beside two teddy bears.", ["person", "hot dog", "teddy bear"]),
        ("Two puppies chase a dog and a frisbee.", ["dog", "dog", "frisbee"]),
        ("People riding motor bikes past a fire hydrant.", ["person", "motorcycle", "fire hydrant"]),
        ("Knives, forks and mice on a desk.", ["knife", "fork", "mouse", "dining table"]),
        ("A baby elephant and adult giraffes.", ["elephant", "giraffe"]),  # no person
        ("A baby with an adult.", ["person", "person"]),
        ("Passenger jets at the gate.", ["airplane"]),
        ("The toilet seat is up next to a sink.", ["toilet", "sink"]),  # the seat is no chair
        ("A seat by the window.", ["chair"]),
        ("A player slides into home plate near the train tracks.", ["person"]),
        ("Wine glasses and a cell-phone on the dining table.", ["wine glass", "cell phone", "dining table"]),
        ("A stove top oven and a TV.", ["oven", "tv"]),
    ],
)
def test_object_mentions(words, caption, expected):
    assert words.objects(caption) == expected


def test_chair_counts_mentions_and_captions():
    captions = {1: "a dog and a cat on a couch.", 2: "two dogs and a dog.", 3: "a table.", 4: "a view."}
    truth = {1: {"dog", "couch"}, 2: {"cat"}, 3: {"dining table"}, 4: {"person"}}
    result = chair(captions, truth, CocoObjectWords.load().objects)
    # mentions: dog, cat*, couch | dogs*, dog* | table | (none): 3 of 6 hallucinated, in 2 of 4 captions
    assert (result.mentions, result.hallucinated_mentions) == (6, 3)
    assert (result.captions, result.hallucinated_captions) == (4, 2)
    assert result.chair_i == pytest.approx(0.5) and result.chair_s == pytest.approx(0.5)
    assert result.per_image[2] == {"mentioned": ["dog", "dog"], "hallucinated": ["dog", "dog"]}
    assert chair({1: "a view."}, {1: set()}, CocoObjectWords.load().objects).chair_i is None


def test_the_toy_world_scores_against_its_scenes():
    captions = {
        "a": "a red circle and two blue squares.",
        "b": "a green cross above a green cross.",
        "c": "a shape.",
    }
    scenes = {"a": ["red circle", "blue square"], "b": ["pink cross"], "c": ["red circle"]}
    result = chair(captions, scenes, mentioned_objects)
    assert (result.mentions, result.hallucinated_mentions, result.hallucinated_captions) == (4, 2, 1)
    assert result.chair_i == pytest.approx(0.5) and result.chair_s == pytest.approx(1 / 3)


def test_wrong_prompts_are_absent_entities_drawn_per_image():
    vocabulary = [f"{c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")]
    objects = {1: ["red circle", "red circle"], 2: ["blue square"], 3: vocabulary[:5]}
    prompts = wrong_prompts(objects, [1, 2, 3], vocabulary, seed=0)
    assert [len(p) for p in prompts] == [2, 1, 1] and prompts[2] == [vocabulary[5]]
    assert all(
        not set(p) & set(objects[i]) and len(set(p)) == len(p)
        for i, p in zip([1, 2, 3], prompts, strict=True)
    )
    assert wrong_prompts(objects, [2, 1], vocabulary, seed=0) == [prompts[1], prompts[0]]
    draws = {tuple(wrong_prompts(objects, [1], vocabulary, seed=s)[0]) for s in range(20)}
    assert len(draws) > 1


def instances_file(path, annotations, categories=None, images=None):
    """A COCO instance annotation file in the official schema (the fields CHAIR reads, and a few more)."""
    words = CocoObjectWords.load()
    categories = categories or [
        {"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(words.categories)
    ]
    document = {
        "info": {}, "licenses": [], "images": images or [], "categories": categories,
        "annotations": [
            {"id": k, "image_id": image_id, "category_id": category, "bbox": [0, 0, 1, 1], "area": 1.0,
             "iscrowd": 0}
            for k, (image_id, category) in enumerate(annotations)
        ],
    }  # fmt: skip
    path.write_text(json.dumps(document))
    return path


def test_evaluate_reports_chair_against_instances_and_references(coco_texts, coco_images, tmp_path, words):
    """The template baseline names two entities of a vocabulary of COCO objects per image; their mentions
    are checked against the test's own truth (the instance file's categories plus the references')."""
    references = karpathy_references(COCO_SLICE, "val")
    val_ids = list(references)
    # The first val image is annotated with every category: nothing said of it can be hallucinated.
    annotations = [(val_ids[0], c) for c in range(1, 81)] + [(val_ids[1], 1)]
    instances = instances_file(tmp_path / "instances_val2014.json", annotations,
                               images=[{"id": i, "file_name": f"{i}.jpg"} for i in val_ids])  # fmt: skip
    names = ["dog", "cat", "pizza", "couch", "person", "bus", "teddy bear", "kite"]
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(json.dumps({"entities": [{"name": n, "forms": [n]} for n in names]}))
    out = tmp_path / "eval"
    evaluate_split(
        COCO_SLICE, "val", out, EvalConfig(metrics=["bleu", "cider"]), method="template", texts=coco_texts,
        images=coco_images, instances=instances, vocabulary=vocabulary, device="cpu",
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    per_image = {row["image_id"]: row for row in json.loads((out / "per_image.json").read_text())}
    mentions = hallucinated = captions_with = 0
    for image_id, row in per_image.items():
        truth = {"person"} if image_id == val_ids[1] else set()
        truth |= set(words.categories) if image_id == val_ids[0] else set()
        for reference in references[image_id]:
            truth |= set(words.objects(reference))
        named = words.objects(row["prediction"])
        wrong = [name for name in named if name not in truth]
        assert row["objects_mentioned"] == named and row["objects_hallucinated"] == wrong
        mentions, hallucinated, captions_with = (
            mentions + len(named),
            hallucinated + len(wrong),
            captions_with + bool(wrong),
        )
    assert not per_image[val_ids[0]]["objects_hallucinated"] and 0 < hallucinated < mentions
    assert metrics["metrics"]["CHAIR-i"] == pytest.approx(hallucinated / mentions)
    assert metrics["metrics"]["CHAIR-s"] == pytest.approx(captions_with / len(per_image))
    assert metrics["hallucination"]["mentions"] == mentions
    assert metrics["hallucination"]["instances"] == str(instances.resolve())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        ({"annotations": []}, "no 'categories' list"),
        ({"annotations": [{"image_id": 1, "category_id": 99}], "categories": [{"id": 1, "name": "person"}]},
         "category_id 99"),
        ({"annotations": [], "categories": [{"id": 1, "name": "hamster"}]},
         "'hamster' (id 1) is not one of COCO"),
        ({"annotations": [{"image_id": 5, "category_id": 1}], "categories": [{"id": 1, "name": "person"}]},
         "none of the 12 images of split 'val'"),
    ],
)  # fmt: skip
def test_a_bad_instances_file_is_one_line_before_any_work(
    coco_texts, coco_images, tmp_path, content, message
):
    path = tmp_path / "instances.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "eval"
    result = run("evaluate", "--method", "template", "--texts", coco_texts, "--data", COCO_SLICE,
                 "--images", coco_images, "--split", "val", "--out", out, "--instances", path)  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], result.stderr
    assert "Traceback" not in result.output and not (out / "predictions.json").exists()


@pytest.mark.parametrize("annotated_image_readable", [True, False])
def test_chair_scores_only_the_images_the_instance_file_annotates(
    coco_texts, coco_images, tmp_path, annotated_image_readable
):
    """An instance file listing 1 of the 12 val images: the other 11 would take their truth from their
    references alone, so CHAIR leaves them out, says so on stderr once and counts them in metrics.json;
    when the one annotated image cannot be read, nothing is left to score and CHAIR is skipped."""
    val_ids = list(karpathy_references(COCO_SLICE, "val"))
    instances = instances_file(tmp_path / "instances.json", [(val_ids[0], 1)],
                               images=[{"id": val_ids[0], "file_name": "x.jpg"}])  # fmt: skip
    root = coco_images
    if not annotated_image_readable:
        root = shutil.copytree(coco_images, tmp_path / "images")
        entry = next(e for e in json.loads(COCO_SLICE.read_text())["images"] if e["cocoid"] == val_ids[0])
        (root / entry["filepath"] / entry["filename"]).write_bytes(b"not an image")
    out = tmp_path / "eval"
    result = run("evaluate", "--method", "template", "--texts", coco_texts, "--data", COCO_SLICE,
                 "--images", root, "--split", "val", "--out", out, "--instances", instances,
                 *FAST_METRICS)  # fmt: skip
    assert result.exit_code == 0, result.output
    evaluated = 12 if annotated_image_readable else 11
    warnings = [line for line in result.stderr.splitlines() if "annotates" in line]
    expected = f"--instances {instances} annotates {evaluated - 11} of the {evaluated} evaluated images"
    assert len(warnings) == 1 and expected in warnings[0], result.stderr
    document = json.loads((out / "metrics.json").read_text())
    record = document["hallucination"]
    assert (record["evaluated_images"], record["annotated_images"]) == (evaluated, evaluated - 11)
    assert record["left_out_images"] == 11 and "reference captions alone" in record["left_out"]
    per_image = json.loads((out / "per_image.json").read_text())
    scored = [row["image_id"] for row in per_image if "objects_mentioned" in row]
    if annotated_image_readable:
        assert scored == [val_ids[0]] and record["captions"] == 1 and "CHAIR-s" in document["metrics"]
    else:
        assert scored == [] and "captions" not in record
        assert "CHAIR-i" not in document["metrics"] and "annotates 0" in document["skipped"]["CHAIR-i"]
