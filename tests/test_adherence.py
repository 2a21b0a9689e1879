"""Prompt adherence: which prompt words a caption mentions, per image and over an evaluation."""

import pytest

from tipcap.evaluation.adherence import adherence, image_adherence, mentioned_words, vocabulary_mentions
from tipcap.evaluation.chair import CocoObjectWords
from tipcap.prompts import EntityVocabulary
from tipcap.toy.plugin import mentioned_objects


def scene_mentions(caption: str) -> set[str]:
    return set(mentioned_objects(caption))


def test_a_toy_prompt_counts_only_the_exact_colour_and_shape_pair():
    caption = "an image showing a brown circle, an orange diamond and two orange crosses"
    found = image_adherence(["brown diamond", "orange cross"], caption, scene_mentions)
    # "brown" and "diamond" are both in the caption, but not as one object.
    assert (found.mentioned, found.share, found.complete) == (["orange cross"], 0.5, False)
    assert image_adherence(["orange cross", "orange cross"], caption, scene_mentions).share == 1.0
    assert image_adherence([], caption, scene_mentions) is None


def test_a_page_finds_prompt_words_of_any_installed_world():
    # The toy worlds plug their (colour, shape) objects in through the registry; COCO's words are built in.
    caption = "a man beside two orange crosses and a brown circle"
    assert mentioned_words(["orange cross", "brown diamond", "person", "red"], caption) == [
        "orange cross",
        "person",
    ]


def test_a_coco_prompt_is_followed_by_a_form_or_a_chair_synonym():
    mentions = vocabulary_mentions(EntityVocabulary.load(), CocoObjectWords.load())
    caption = "a biker throws a frisbee to two puppies beside a stallion"
    found = image_adherence(["person", "dog", "frisbee", "horse", "surfboard"], caption, mentions)
    assert found.mentioned == ["person", "dog", "frisbee", "horse"] and found.share == pytest.approx(4 / 5)
    # "biker" and "stallion" are no forms in the entity vocabulary: only CHAIR's synonyms make them mentions.
    alone = image_adherence(["person", "horse", "dog"], caption, vocabulary_mentions(EntityVocabulary.load()))
    assert alone.mentioned == ["dog"] and alone.share == pytest.approx(1 / 3)


def test_an_evaluation_averages_over_its_prompted_images_only():
    captions = {1: "a red circle and a blue square", 2: "a red circle", 3: "a green star"}
    prompts = {1: ["red circle", "blue square"], 2: ["blue square"], 3: []}
    means, per_image = adherence(prompts, captions, scene_mentions)
    assert sorted(per_image) == [1, 2]  # image 3 had no words to follow
    assert means == {"Adherence": pytest.approx((1.0 + 0.0) / 2), "Adherence-all": pytest.approx(1 / 2)}
    nothing, none_prompted = adherence({}, captions, scene_mentions)
    assert nothing == {"Adherence": None, "Adherence-all": None} and none_prompted == {}
