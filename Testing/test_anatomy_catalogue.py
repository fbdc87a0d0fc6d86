"""TotalSegmentator's classes by name: every class reachable in English and Chinese, sides, codes."""

from __future__ import annotations

import csv
import importlib.resources

import pytest
from medmllm import samples
from medmllm.anatomy import catalogue, phrases
from slicer_fakes import MODULE_DIR  # noqa: F401 - puts MedMLLMSlicerLib on sys.path

QUESTIONS = [
    ("show me the liver", "total", ["Liver"]),
    ("where is the left kidney?", "total", ["Left kidney"]),
    ("how big is the spleen?", "total", ["Spleen"]),
    ("显示肝脏", "total", ["Liver"]),
    ("左肾在哪里", "total", ["Left kidney"]),
    ("脾脏多大", "total", ["Spleen"]),
    ("显示主动脉", "total", ["Aorta"]),
    ("第一腰椎在哪里", "total", ["L1 vertebra"]),
    ("where is L1?", "total", ["L1 vertebra"]),
    ("show the kidneys", "total", ["Right kidney", "Left kidney"]),
    ("the kidney on the left", "total", ["Left kidney"]),
    ("left adrenal gland and right kidney", "total", ["Left adrenal gland", "Right kidney"]),
    ("左肾上腺", "total", ["Left adrenal gland"]),
    ("show me the lungs", "total", ["Right lung", "Left lung"]),
    ("右肺多大", "total", ["Right lung"]),
    ("show me the lungs", "total_mr", ["Right lung", "Left lung"]),
    ("left 5th rib", "total", ["Left fifth rib"]),
    ("the spine", "total", ["Vertebrae"]),
    ("the spine", "total_mr", ["Vertebrae"]),
    ("heart and aorta", "total", ["Heart", "Aorta"]),
    ("what is the weather", "total", []),
    ("左心耳", "total", ["Left auricular appendage"]),
    ("upper lobe of the left lung", "total", ["Left upper lobe of lung"]),
    ("左肺上叶", "total", ["Left upper lobe of lung"]),
]


@pytest.mark.parametrize(("question", "task", "expected"), QUESTIONS)
def test_questions_name_the_right_segments(question, task, expected):
    assert [p.name for p in phrases.find_parts(question, task)] == expected


@pytest.mark.parametrize("task", catalogue.TASKS)
def test_installed_class_map_is_the_pinned_release(task):
    assert catalogue.class_map(task) == samples.label_map(task)


@pytest.mark.parametrize("task", catalogue.TASKS)
def test_every_class_answers_to_an_english_and_a_chinese_name(task):
    for name in catalogue.class_map(task).values():
        entry = next(
            e for e in catalogue.catalogue(task) if any(p.classes == (name,) for p in e.parts.values())
        )
        side = catalogue.split_side(name)[1]
        assert entry.english and entry.chinese, name
        for phrase in (entry.english[0], entry.chinese[0]):
            sided = (
                phrase
                if side is None
                else (
                    f"{side} {phrase}" if phrase.isascii() else {"left": "左", "right": "右"}[side] + phrase
                )
            )
            assert name in [c for p in phrases.find_parts(sided, task) for c in p.classes], (sided, name)


def test_sides_are_the_patients_and_terminology_is_totalsegmentators_own():
    kidney = phrases.find_parts("left kidney", "total")[0]
    assert kidney.classes == ("kidney_left",)
    table = (
        importlib.resources.files("totalsegmentator") / "resources" / "totalsegmentator_snomed_mapping.csv"
    )
    with table.open(encoding="utf-8") as f:
        row = next(r for r in csv.DictReader(f) if r["Structure"] == "kidney_left")
    parts = kidney.terminology.split("~")
    assert len(parts) == 7 and parts[2] == f"SCT^{row['SegmentedPropertyTypeCodeSequence.CodeValue']}^Kidney"
    assert parts[3] == "SCT^7771000^Left"
    assert kidney.color == tuple(int(v) / 255 for v in row["DicomRGBColor"].split(","))


def test_codes_agree_with_slicers_own_terminology_where_both_know_the_structure():
    from MedMLLMSlicerLib import terminology

    for phrase in ("liver", "spleen", "left kidney", "heart", "aorta", "trachea", "right lung"):
        ours = phrases.find_parts(phrase, "total")[0].terminology.split("~")
        slicers = terminology.lookup(phrase).entry.split("~")
        assert ours[2:4] == slicers[2:4], phrase


def test_group_segments_unite_the_lobes_per_side():
    right, left = phrases.find_parts("lungs", "total")
    assert set(right.classes) == {"lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"}
    assert set(left.classes) == {"lung_upper_lobe_left", "lung_lower_lobe_left"}
    assert right.terminology.split("~")[2:4] == ["SCT^39607008^Lung", "SCT^24028007^Right"]
    assert len(phrases.find_parts("ribs", "total")[0].classes) == 12


def test_unknown_task_is_a_clear_error():
    with pytest.raises(catalogue.CatalogueError, match="supported: total, total_mr"):
        catalogue.class_map("total_v1")


def test_docs_list_exactly_the_structures_and_names_supported():
    from conftest import ROOT, load_script

    generated = load_script("anatomy_names").tables()
    assert generated in (ROOT / "docs" / "anatomy.md").read_text(encoding="utf-8")
