"""Per-grammar facts: coordinate scaling and order, labels, repairs with warnings, display text,
and the parser's resilience (bounded memory, capped warnings, no exceptions from model text)."""

from __future__ import annotations

import tracemalloc

import pytest
from medmllm.grounding.base import BoxFound, ParseWarning, SegFound
from medmllm.grounding.registry import dialect_names, get_dialect
from medmllm.grounding.toolkit import MAX_WARNINGS


def _parse(name, text, size=None):
    return get_dialect(name).parse(text, size)


def test_m3d_fractions_are_the_written_dhw_values():
    result = _parse("m3d", "Sure, <bx_start>[0.125, 0.5, 0.25, 0.875, 0.75, 0.5]<bx_end>.")
    assert result.boxes[0].fractions == (0.125, 0.5, 0.25, 0.875, 0.75, 0.5)


def test_m3d_one_slice_thick_box_is_not_a_zero_area_warning():
    # max is an inclusive voxel index / size: d0 == d1 means one slice, a normal M3D answer
    result = _parse("m3d", "[0.5, 0.1, 0.1, 0.5, 0.2, 0.2]")
    assert len(result.boxes) == 1 and result.warnings == []


def test_m3d_seg_label_from_the_answer_template_and_none_otherwise():
    result = _parse("m3d", "The target is right kidney and the segmentation mask is [SEG]. It is [SEG].")
    assert [s.label for s in result.seg_tokens] == ["right kidney", None]


def test_m3d_strip_and_image_prompt():
    m3d = get_dialect("m3d")
    answers = [
        "It is [SEG].",
        "Coordinates are <bx_start>[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]<bx_end>.",
        "A. [x] B. [1, 2]",
    ]
    shown = ["It is [mask].", "Coordinates are [box].", "A. [x] B. [1, 2]"]
    assert [m3d.strip(text) for text in answers] == shown
    prompt = m3d.image_prompt("Where is liver in this image? Please output the box.")
    assert prompt == "<im_patch>" * 256 + "Where is liver in this image? Please output the box."


def test_minigptmed_scale_is_100_and_label_is_forgotten_after_prose():
    result = _parse("minigptmed", "<p>tumor</p> {<29><43><42><56>} The rest is normal. {<1><2><3><4>}")
    assert result.boxes[0].fractions == (0.29, 0.43, 0.42, 0.56)
    assert [b.label for b in result.boxes] == ["tumor", None]


def test_minigptmed_strip():
    answers = [
        "<p>pneumonia</p> {<13><25><42><71>}<delim>{<58><22><88><69>} in both lungs",
        "{<1><2><3><4>} is it",
    ]
    shown = ["pneumonia in both lungs", "[box] is it"]
    assert [get_dialect("minigptmed").strip(text) for text in answers] == shown


def test_internvl_scale_is_999_like_medregas_evaluator():
    result = _parse("internvl", "<ref>x</ref><box>[[0, 999, 999, 999]]</box>")
    assert result.boxes[0].fractions == (0.0, 1.0, 1.0, 1.0)


def test_internvl_zero_area_box_is_kept_with_a_warning():
    result = _parse("internvl", "<ref>x</ref><box>[[10, 20, 10, 40]]</box>")
    assert len(result.boxes) == 1
    assert any("zero area" in w for w in result.warnings)


def test_internvl_strip_keeps_labels_and_chinese():
    answers = [
        "<ref>胰腺癌</ref><box>[[661, 528, 743, 599]]</box>：胰尾部见一稍低密度肿块",
        "See <box>[[1, 2, 3, 4]]</box>.",
    ]
    shown = ["胰腺癌：胰尾部见一稍低密度肿块", "See [box]."]
    assert [get_dialect("internvl").strip(text) for text in answers] == shown


def test_out_of_range_values_are_clamped_and_reversed_corners_swapped():
    result = _parse("internvl", "<ref>a</ref><box>[[-5, 700, 1200, 100]]</box>")
    box = result.boxes[0]
    assert box.values == (-5, 700, 1200, 100)
    assert box.fractions == (0.0, 100 / 999, 1.0, 700 / 999)
    assert len(result.warnings) == 2
    assert "clamped" in result.warnings[0] and "swapped" in result.warnings[1]


def test_qwen_pixels_are_divided_by_the_image_size():
    text = '{"bbox_2d": [112, 56, 336, 448], "label": "liver"}'
    box = _parse("qwen25vl", text, (448, 560)).boxes[0]
    assert box.fractions == (0.25, 0.1, 0.75, 0.8)
    assert box.label == "liver"


def test_qwen_nested_objects_and_float_values():
    text = '{"objects": [{"bbox_2d": [1.5, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8]}]}'
    result = _parse("qwen25vl", text, (10, 10))
    assert [(b.label, b.values) for b in result.boxes] == [("a", (1.5, 2, 3, 4)), (None, (5, 6, 7, 8))]


def test_qwen_parser_without_the_image_size_keeps_values_and_gives_no_fractions():
    (box,) = get_dialect("qwen25vl").parse('{"bbox_2d": [10, 20, 900, 40], "label": "a"}').boxes
    assert box.values == (10, 20, 900, 40) and box.fractions == ()
    with pytest.raises(ValueError, match="positive"):
        get_dialect("qwen25vl").parser((0, 10))


def test_qwen_and_medgemma_strip_fences_and_json():
    text = (
        'Found:\n```json\n[\n\t{"bbox_2d": [1, 2, 3, 4], "label": "liver"},\n'
        '\t{"bbox_2d": [5, 6, 7, 8], "label": "spleen"}\n]\n```\nDone.'
    )
    assert get_dialect("qwen25vl").strip(text) == "Found: liver, spleen Done."
    text = (
        "<unused94>thinking...<unused95>Final Answer: "
        '```json[{"box_2d": [140, 110, 340, 470], "label": "right clavicle"}]```'
    )
    assert get_dialect("medgemma").strip(text) == "Final Answer: right clavicle"


def test_medgemma_is_y_first_on_a_0_1000_grid():
    box = _parse("medgemma", '[{"box_2d": [100, 200, 300, 400], "label": "heart"}]').boxes[0]
    assert box.values == (100, 200, 300, 400)
    assert box.fractions == (0.2, 0.1, 0.4, 0.3)


def test_medgemma_unterminated_thinking_is_dropped_with_a_warning():
    result = _parse("medgemma", '<unused94>let me think {"box_2d": [1, 2, 3, 4]}')
    assert result.boxes == [] and len(result.warnings) == 1 and "<unused94>" in result.warnings[0]


def test_plain_finds_nothing_and_keeps_text():
    assert _parse("plain", "<ref>a</ref><box>[[1, 2, 3, 4]]</box> [SEG]").boxes == []
    text = "  Hello  there\n"
    assert get_dialect("plain").strip(text) == "Hello there"


@pytest.mark.parametrize(
    ("name", "opener"),
    [("internvl", "<box>"), ("m3d", "<bx_start>"), ("qwen25vl", '{"bbox_2d": ['), ("m3d", "[")],
)
def test_a_megabyte_inside_an_open_span_keeps_memory_bounded(name, opener):
    parser = get_dialect(name).parser((100, 100))
    chunk = "1, " * 350
    tracemalloc.start()
    events = parser.feed(opener)
    for _ in range(1000):
        events += parser.feed(chunk)
    events += parser.finish()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000
    assert not any(isinstance(e, BoxFound) for e in events)


def test_warnings_are_capped():
    result = _parse("internvl", "<box>[[1, 2]]</box>" * 200)
    assert len(result.warnings) == MAX_WARNINGS + 1
    assert "suppressed" in result.warnings[-1]


def test_snippets_in_warnings_are_truncated():
    result = _parse("internvl", "<box>[[" + "7" * 500 + "]]</box>")
    assert len(result.warnings) == 1 and len(result.warnings[0]) < 100 and "..." in result.warnings[0]


def test_misuse_by_code_raises_but_model_text_never_does():
    parser = get_dialect("internvl").parser()
    with pytest.raises(TypeError, match="str"):
        parser.feed(b"<box>")  # type: ignore[arg-type]
    parser.finish()
    assert parser.finish() == []
    with pytest.raises(RuntimeError, match="new parser"):
        parser.feed("more")
    nasty = (
        '<ref></ref><box></box><box>]]]][[[[</box>{<><><><>}<p></p>[SEG][][,,,]{}{"bbox_2d": null}\x00\ufffd'
    )
    for name in dialect_names():
        result = _parse(name, nasty, (10, 10))
        assert all(isinstance(w, str) for w in result.warnings)
        assert all(0 <= f <= 1 for b in result.boxes for f in b.fractions)


def test_empty_labels_become_none_and_markup_is_removed_from_labels():
    result = _parse(
        "internvl",
        "<ref> </ref><box>[[1, 2, 3, 4]]</box> <ref>left <b>lung</b></ref><box>[[1, 2, 3, 4]]</box>",
    )
    assert [b.label for b in result.boxes] == [None, "left lung"]


def test_seg_found_is_a_dataclass_event():
    result = _parse("m3d", "[SEG]")
    assert result.seg_tokens == [SegFound(None, 0, 5)]
    assert not any(isinstance(w, ParseWarning) for w in result.warnings)
