"""Markdown report: sections, number formats, escaping, disclaimer, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from medmllm.io.report import DISCLAIMER, render_report

FULL = {
    "title": "Chest CT",
    "created": "2026-11-23 15:20",
    "model": "builtin",
    "volume": {
        "name": "CTChest",
        "modality": "CT",
        "shape": (34, 128, 256),
        "spacing": (0.7, 0.8, 2.5),
        "orientation": "LPS",
        "intensity_range": (-1024, 3071),
    },
    "findings": [
        {
            "label": "right lung",
            "volume_ml": 2345.678,
            "extent_mm": [120, 150.25, 200],
            "hu_mean": np.float32(-850.25),
            "hu_std": 60.04,
            "note": "air | lung",
        },
        {"label": "mass"},
    ],
    "grounded": [{"label": "nodule", "center_ras": [-1.25, 2, 3], "size_mm": [10, 12, 8], "source": "m3d"}],
    "conversation": [{"question": "Where is it?\nBe precise.", "answer": "In the **right** upper lobe."}],
    "summary": "One nodule.",
}


def _table_rows(markdown: str, heading: str) -> list:
    section = markdown.split(f"## {heading}\n\n", 1)[1].split("\n\n", 1)[0]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in section.splitlines()[2:]]


def test_full_report_sections_in_order():
    text = render_report(FULL)
    assert text.startswith("# Chest CT\n\nCreated: 2026-11-23 15:20 · Model: builtin\n")
    order = [
        text.index(f"## {name}")
        for name in ("Volume", "Findings", "Located regions", "Conversation", "Summary")
    ]
    assert order == sorted(order)
    assert text.rstrip().endswith("> " + DISCLAIMER)


def test_volume_facts_use_i_j_k_order():
    rows = dict(_table_rows(render_report(FULL), "Volume"))
    assert rows["Size (i × j × k)"] == "256 × 128 × 34 voxels"
    assert rows["Spacing (i, j, k)"] == "0.700 × 0.800 × 2.500 mm"
    assert rows["Orientation"] == "LPS"
    assert rows["Intensity range"] == "-1024.0 to 3071.0"


def test_findings_and_regions_tables():
    text = render_report(FULL)
    lung, mass = _table_rows(text, "Findings")
    assert lung == ["right lung", "2345.68", "120.0 × 150.2 × 200.0", "-850.2 ± 60.0", "air \\| lung"]
    assert mass == ["mass", "—", "—", "—", ""]
    (nodule,) = _table_rows(text, "Located regions")
    assert nodule == ["nodule", "(-1.2, 2.0, 3.0)", "10.0 × 12.0 × 8.0", "m3d"]


def test_question_is_quoted_and_answer_kept_as_markdown():
    text = render_report(FULL)
    assert "**Q1.**\n\n> Where is it?\n> Be precise.\n\nIn the **right** upper lobe." in text


def test_question_answer_list_alone():
    text = render_report([("What organ?", "Liver."), {"question": "Size?", "answer": ""}])
    assert text.startswith("# MedMLLMSlicer report\n")
    assert "**Q1.**\n\n> What organ?\n\nLiver." in text
    assert "**Q2.**\n\n> Size?\n\n_(no answer)_" in text
    assert "## Volume" not in text and "## Findings" not in text
    assert DISCLAIMER in text


def test_table_cells_cannot_break_the_table():
    text = render_report({"findings": [{"label": "a|b\nc", "volume_ml": float("nan")}]})
    (row,) = _table_rows(text, "Findings")
    assert row[0] == "a\\|b c" and row[1] == "n/a"


def test_empty_report_still_has_title_and_disclaimer():
    assert render_report({}) == f"# MedMLLMSlicer report\n\n---\n\n> {DISCLAIMER}\n"


@pytest.mark.parametrize(
    ("report", "message"),
    [
        ("text", "dict or a list"),
        ({"titel": "x"}, "unknown report keys"),
        ({"volume": [1, 2]}, "volume must be a dict"),
        ({"volume": {"shape": (1, 2)}}, "3 numbers"),
        ({"volume": {"spacing": "1 1 1"}}, "3 numbers"),
        ({"findings": {"label": "x"}}, "list of dicts"),
        ({"findings": ["x"]}, r"findings\[0\] must be a dict"),
        ({"findings": [{"label": "x", "volume_ml": "12"}]}, "must be a number"),
        ({"findings": [{"label": "x", "hu_mean": True}]}, "must be a number"),
        ({"findings": [{"label": 3}]}, "label must be a string"),
        ({"grounded": [{"label": "x", "center_ras": [1, 2]}]}, "center_ras must be 3 numbers"),
        ([("only question",)], "2-tuple"),
        ([{"answer": "no question"}], "no 'question'"),
        ([(1, "a")], "question 1 must be a string"),
    ],
)
def test_bad_input_raises_clear_value_error(report, message):
    with pytest.raises(ValueError, match=message):
        render_report(report)
