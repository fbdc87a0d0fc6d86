"""Segment terminology: phrases models use -> Slicer's names, colours and TerminologyEntry strings."""

from __future__ import annotations

import pytest
from slicer_fakes import MODULE_DIR  # noqa: F401 - puts MedMLLMSlicerLib on sys.path


@pytest.fixture
def terminology():
    from MedMLLMSlicerLib import terminology

    return terminology


@pytest.mark.parametrize(
    ("phrase", "name", "type_code", "modifier"),
    [
        ("Right lung", "Right lung", "SCT^39607008^Lung", "SCT^24028007^Right"),
        ("lung, left", "Left lung", "SCT^39607008^Lung", "SCT^7771000^Left"),
        ("both lungs", "Lungs", "SCT^39607008^Lung", "^^"),
        ("right and left lung", "Lungs", "SCT^39607008^Lung", "^^"),
        ("the left kidney", "Left kidney", "SCT^64033007^Kidney", "SCT^7771000^Left"),
        ("BONES", "Bone", "SCT^272673000^Bone", "^^"),
        ("skeleton", "Bone", "SCT^272673000^Bone", "^^"),
        ("Body", "Body", "SCT^39937001^Skin", "^^"),
        ("windpipe", "Trachea", "SCT^44567001^Trachea", "^^"),
        ("brain mask", "Brain", "SCT^12738006^Brain", "^^"),
        ("Liver", "Liver", "SCT^10200004^Liver", "^^"),
        ("tumour", "Tumor", "SCT^108369006^Neoplasm", "^^"),
    ],
)
def test_known_phrases_get_slicer_terminology(terminology, phrase, name, type_code, modifier):
    term = terminology.lookup(phrase)
    parts = term.entry.split("~")
    assert term.name == name and len(parts) == 7
    assert parts[2] == type_code and parts[3] == modifier
    assert parts[4] == "Anatomic codes - DICOM master list" and parts[5:] == ["^^", "^^"]
    assert all(0.0 <= c <= 1.0 for c in term.color)


def test_contexts_match_the_list_each_code_comes_from(terminology):
    assert terminology.lookup("liver").entry.startswith(
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~"
    )
    assert terminology.lookup("airway").entry.startswith(
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^89187006^"
    )
    assert terminology.lookup("bone").color == pytest.approx((241 / 255, 214 / 255, 145 / 255))


@pytest.mark.parametrize("phrase", ["left liver", "lung lobe", "sella turcica", "", "lung nodule 3"])
def test_unknown_or_contradictory_phrases_have_no_terminology(terminology, phrase):
    assert terminology.lookup(phrase) is None


def test_fallback_colours_differ_from_each_other(terminology):
    colours = [tuple(round(c, 2) for c in terminology.fallback_color(n)) for n in range(8)]
    assert len(set(colours)) == 8 and all(0.0 <= c <= 1.0 for rgb in colours for c in rgb)
