"""Every dialect against real and messy model answers (Testing/data/model_outputs/corpus.json, each
entry citing where its text comes from): the expected boxes, and identical events however the text
is chunked, with each box emitted exactly when its closing token arrives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from medmllm.grounding.base import BoxFound, ParseWarning, SegFound
from medmllm.grounding.registry import dialect_names, get_dialect

CORPUS = json.loads((Path(__file__).parent / "data" / "model_outputs" / "corpus.json").read_text("utf-8"))
IDS = [case["id"] for case in CORPUS]


def _size(case):
    return tuple(case["image_size"]) if "image_size" in case else None


def _events(case, pieces):
    parser = get_dialect(case["dialect"]).parser(_size(case))
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish()


@pytest.mark.parametrize("case", CORPUS, ids=IDS)
def test_expected_boxes_seg_tokens_and_warnings(case):
    events = _events(case, [case["text"]])
    boxes = [{"label": e.label, "values": list(e.values)} for e in events if isinstance(e, BoxFound)]
    assert boxes == case["boxes"]
    assert sum(isinstance(e, SegFound) for e in events) == case["seg_tokens"]
    warnings = [e.message for e in events if isinstance(e, ParseWarning)]
    assert len(warnings) == case["warnings"], warnings
    assert all(len(w) < 200 for w in warnings)


@pytest.mark.parametrize("case", CORPUS, ids=IDS)
def test_box_offsets_point_at_the_written_box(case):
    for event in _events(case, [case["text"]]):
        if isinstance(event, (BoxFound, SegFound)):
            span = case["text"][event.start : event.end]
            assert span[0] in "<[{" and span[-1] in ">]}"
        if isinstance(event, BoxFound):
            assert all(str(v) in span for v in event.values)


@pytest.mark.parametrize("case", CORPUS, ids=IDS)
def test_char_by_char_emits_each_event_when_its_closing_token_arrives(case):
    text = case["text"]
    parser = get_dialect(case["dialect"]).parser(_size(case))
    arrived = []
    for i, ch in enumerate(text):
        arrived += [(i + 1, e) for e in parser.feed(ch)]
    whole = _events(case, [text])
    assert [e for _, e in arrived] + parser.finish() == whole
    for position, event in arrived:
        if isinstance(event, (BoxFound, SegFound)):
            assert position == event.end


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_random_chunking_gives_identical_events(data):
    case = data.draw(st.sampled_from(CORPUS))
    text = case["text"]
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert _events(case, pieces) == _events(case, [text])


FRAGMENTS = [
    "<box>", "</box>", "<ref>", "</ref>", "[[", "]]", "[", "]", "1", "0.5", "-3", "1000", ", ", "<p>", "</p>",
    "{<", ">}", "<", ">", "<delim>", "[SEG]", "<bx_start>", "<bx_end>", "{", "}", '"bbox_2d": ', '"box_2d": ',
    '"label": "x"', "\n", "a", "```json", "<unused94>", "<unused95>", '"', "\\", "胰",
]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(dialect_names()),
    parts=st.lists(st.sampled_from(FRAGMENTS), max_size=40),
    data=st.data(),
)
def test_any_mix_of_markup_never_raises_and_chunking_never_matters(name, parts, data):
    text = "".join(parts)
    case = {"dialect": name, "image_size": [64, 32]}
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=10)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    whole = _events(case, [text])
    assert _events(case, pieces) == whole
    for event in whole:
        if isinstance(event, BoxFound):
            assert all(0.0 <= f <= 1.0 for f in event.fractions)
            lo, hi = (
                event.fractions[: len(event.fractions) // 2],
                event.fractions[len(event.fractions) // 2 :],
            )
            assert all(a <= b for a, b in zip(lo, hi))
    assert isinstance(get_dialect(name).strip(text), str)
