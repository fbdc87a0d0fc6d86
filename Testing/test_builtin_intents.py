"""Keyword routing of the built-in engine: English and Chinese questions land on the same intent."""

from __future__ import annotations

import pytest
from medmllm.engines.builtin.intents import parse


@pytest.mark.parametrize(
    ("english", "chinese", "intent", "structures"),
    [
        ("Where are the lungs?", "肺在哪里？", "where", ("lung",)),
        ("show me the bones", "显示骨骼", "show", ("bone",)),
        ("How big is the trachea?", "气管有多大？", "size", ("airway",)),
        ("segment the body outline", "分割体表", "segment", ("body",)),
        ("where is the brain", "脑在哪儿", "where", ("brain",)),
        ("give me a report", "生成报告", "report", ()),
        ("help", "帮助", "help", ()),
    ],
)
def test_english_and_chinese_route_the_same(english, chinese, intent, structures):
    for question in (english, chinese):
        request = parse(question)
        assert (request.intent, request.structures) == (intent, structures), question
        assert request.unknown is None


@pytest.mark.parametrize(
    ("question", "structures"),
    [
        ("pulmonary volume?", ("lung",)),
        ("measure the skeleton", ("bone",)),
        ("where is the windpipe", ("airway",)),
        ("show the skin", ("body",)),
        ("how big are the lungs and the airway", ("lung", "airway")),
    ],
)
def test_synonyms(question, structures):
    assert parse(question).structures == structures


def test_side_is_read_in_both_languages():
    assert parse("where is the left lung").side == "left"
    assert parse("右肺在哪里").side == "right"
    assert parse("where are the lungs").side is None


def test_structure_without_verb_is_a_show_request():
    assert parse("lungs").intent == "show"


def test_airway_is_not_found_inside_other_words():
    assert parse("show me the hair").structures == ()
    assert parse("show me the airways").structures == ("airway",)


@pytest.mark.parametrize(
    ("question", "unknown"),
    [("where is the liver?", "liver"), ("show me the spleen please", "spleen"), ("肝在哪里", "肝")],
)
def test_unknown_structure_is_named_back(question, unknown):
    request = parse(question)
    assert request.structures == ()
    assert request.unknown == unknown


@pytest.mark.parametrize("question", ["", "   ", "What's up?", "¿qué tal?", "12345"])
def test_odd_text_never_raises_and_names_nothing(question):
    request = parse(question)
    assert request.structures == ()
    assert request.intent in ("help", "unknown")
