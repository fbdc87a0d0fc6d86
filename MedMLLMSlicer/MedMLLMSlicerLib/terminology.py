"""Segment names, colours and DICOM/SNOMED CT terminology for what models name in plain words.

Slicer stores a segment's meaning in its `TerminologyEntry` tag as
`context~category~type~typeModifier~anatomicContext~region~regionModifier`, each code written
`scheme^value^meaning` (Slicer's `vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry`).
The codes, names and colours below are those of Slicer's own terminology files
(`SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json`, or `-DICOM-Master.json` for the
structures the general anatomy list lacks), so Segment Editor shows our segments like its own.
Pure Python: tested without Slicer.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"

Code = Tuple[str, str]  # (SNOMED CT code value, code meaning)
TISSUE: Code = ("85756007", "Tissue")
STRUCTURE: Code = ("123037004", "Anatomical Structure")
ALTERED: Code = ("49755003", "Morphologically Altered Structure")
RIGHT: Code = ("24028007", "Right")
LEFT: Code = ("7771000", "Left")
GOLDEN = 0.618033988749895  # hue step that keeps successive fallback colours far apart


@dataclass(frozen=True)
class _Type:
    context: str
    category: Code
    code: Code
    rgb: Tuple[int, int, int]  # Slicer's recommendedDisplayRGBValue
    name: str  # display name (Slicer's 3dSlicerLabel where it has one)
    sided: bool = False  # has Right/Left modifiers in Slicer's list


# key: the phrase's words after normalising (see `_words`)
_TYPES: Dict[str, _Type] = {
    "lung": _Type(ANATOMY, STRUCTURE, ("39607008", "Lung"), (197, 165, 145), "lungs", sided=True),
    "kidney": _Type(ANATOMY, STRUCTURE, ("64033007", "Kidney"), (185, 102, 83), "kidneys", sided=True),
    "bone": _Type(ANATOMY, TISSUE, ("272673000", "Bone"), (241, 214, 145), "bone"),
    "skin": _Type(ANATOMY, TISSUE, ("39937001", "Skin"), (177, 122, 101), "skin"),
    "body": _Type(ANATOMY, TISSUE, ("39937001", "Skin"), (177, 122, 101), "body"),
    "trachea": _Type(ANATOMY, STRUCTURE, ("44567001", "Trachea"), (182, 228, 255), "trachea"),
    "airway": _Type(DICOM, STRUCTURE, ("89187006", "Airway structure"), (182, 228, 255), "airway"),
    "brain": _Type(ANATOMY, STRUCTURE, ("12738006", "Brain"), (250, 250, 225), "brain"),
    "liver": _Type(ANATOMY, STRUCTURE, ("10200004", "Liver"), (221, 130, 101), "liver"),
    "spleen": _Type(ANATOMY, STRUCTURE, ("78961009", "Spleen"), (157, 108, 162), "spleen"),
    "heart": _Type(ANATOMY, STRUCTURE, ("80891009", "Heart"), (206, 110, 84), "heart"),
    "aorta": _Type(ANATOMY, STRUCTURE, ("15825003", "Aorta"), (224, 97, 76), "aorta"),
    "pancreas": _Type(ANATOMY, STRUCTURE, ("15776009", "Pancreas"), (249, 180, 111), "pancreas"),
    "stomach": _Type(ANATOMY, STRUCTURE, ("69695003", "Stomach"), (216, 132, 105), "stomach"),
    "bladder": _Type(ANATOMY, STRUCTURE, ("89837001", "Bladder"), (222, 154, 132), "urinary bladder"),
    "gallbladder": _Type(ANATOMY, STRUCTURE, ("28231008", "Gallbladder"), (139, 150, 98), "gallbladder"),
    "mass": _Type(ANATOMY, ALTERED, ("4147007", "Mass"), (144, 238, 144), "mass"),
    "cyst": _Type(ANATOMY, ALTERED, ("367643001", "Cyst"), (205, 205, 100), "cyst"),
    # Slicer's DICOM list gives Neoplasm and Nodule no colour: they take the Mass colour.
    "tumor": _Type(DICOM, ALTERED, ("108369006", "Neoplasm"), (144, 238, 144), "tumor"),
    "nodule": _Type(DICOM, ALTERED, ("27925004", "Nodule"), (144, 238, 144), "nodule"),
}
_SYNONYMS = {
    "lungs": "lung",
    "kidneys": "kidney",
    "bones": "bone",
    "skeleton": "bone",
    "body outline": "body",
    "windpipe": "trachea",
    "airways": "airway",
    "tumour": "tumor",
    "tumors": "tumor",
    "tumours": "tumor",
    "neoplasm": "tumor",
    "nodules": "nodule",
    "urinary bladder": "bladder",
}
_FILLER = {"the", "a", "an", "and", "both", "mask", "segment", "segmentation", "region", "structure", "of"}


@dataclass(frozen=True)
class Term:
    """What Slicer should show for a segment: name, colour (0..1) and TerminologyEntry string."""

    name: str
    color: Tuple[float, float, float]
    entry: str


def _code(code: Optional[Code]) -> str:
    return f"SCT^{code[0]}^{code[1]}" if code else "^^"


def _words(label: str) -> Tuple[Optional[Code], str]:
    """(side modifier, remaining words) of a phrase such as "Left lung" or "lung, right"; a phrase
    naming both sides ("right and left lung") gets no modifier."""
    words = [w for w in re.split(r"[^a-z]+", label.lower()) if w and w not in _FILLER]
    sides = {"right": RIGHT, "left": LEFT}
    side = [sides[w] for w in words if w in sides]
    rest = " ".join(w for w in words if w not in sides)
    return (side[0] if len(side) == 1 else None), _SYNONYMS.get(rest, rest)


def lookup(label: str) -> Optional[Term]:
    """The terminology of a phrase a model used, or None when Slicer's lists have no match."""
    side, key = _words(label)
    kind = _TYPES.get(key)
    if kind is None or (side is not None and not kind.sided):
        return None
    name = kind.name
    if side is not None:
        name = f"{side[1]} {kind.code[1].lower()}"
    entry = "~".join(
        (kind.context, _code(kind.category), _code(kind.code), _code(side), REGION_CONTEXT, "^^", "^^")
    )
    return Term(name[:1].upper() + name[1:], tuple(c / 255.0 for c in kind.rgb), entry)


def sent(name: str, entry: object, color: object) -> Optional[Term]:
    """A terminology the server sent with a mask (TotalSegmentator's structures carry their SNOMED
    CT codes), for phrases Slicer's own list lacks; None unless entry and colour are well formed."""
    if not isinstance(entry, str) or entry.count("~") != 6:
        return None
    if not (isinstance(color, (list, tuple)) and len(color) == 3):
        return None
    return Term(name, tuple(float(c) for c in color), entry)  # type: ignore[arg-type]


def fallback_color(index: int) -> Tuple[float, float, float]:
    """A saturated colour for the `index`-th segment of unknown meaning, unlike its neighbours."""
    return colorsys.hsv_to_rgb((0.11 + index * GOLDEN) % 1.0, 0.75, 0.95)
