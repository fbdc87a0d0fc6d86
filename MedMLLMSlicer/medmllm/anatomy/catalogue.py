"""TotalSegmentator's classes as segments a user can ask for: names, sides, colours, terminology.

The label numbers come from the installed TotalSegmentator (`map_to_binary.class_map`), and the
SNOMED CT codes and colours from the table it ships for its own DICOM-SEG output
(`resources/totalsegmentator_snomed_mapping.csv`), written as Slicer `TerminologyEntry` strings so
Slicer shows our segments like its own. Sides are the patient's: TotalSegmentator's `kidney_left`
is the patient's left kidney, whatever the screen shows.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from medmllm.anatomy import names

TASKS = ("total", "total_mr")
DICOM_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
STRUCTURE = ("123037004", "Anatomical Structure")
SIDE_ORDER = (None, "right", "left")
SIDE_CODES = {"left": ("7771000", "Left"), "right": ("24028007", "Right")}
_SIDE_SUFFIX = re.compile(r"_(left|right)(?=_\d+$|$)")
Color = Tuple[float, float, float]


class CatalogueError(RuntimeError):
    """TotalSegmentator is not installed, or has no such task."""


@dataclass(frozen=True)
class Part:
    """One answer segment: its name, the TotalSegmentator classes it unites, colour, terminology."""

    name: str
    classes: Tuple[str, ...]
    color: Color
    terminology: Optional[str]


@dataclass(frozen=True)
class Entry:
    """A structure as people name it; `parts` by patient side ("left"/"right"), or {None: part}."""

    key: str
    english: Tuple[str, ...]
    chinese: Tuple[str, ...]
    parts: Dict[Optional[str], Part]

    @property
    def sided(self) -> bool:
        return None not in self.parts


def split_side(class_name: str) -> Tuple[str, Optional[str]]:
    """`kidney_left` -> ("kidney", "left"); `rib_right_3` -> ("rib_3", "right"); `liver` -> (.., None)."""
    found = _SIDE_SUFFIX.search(class_name)
    if not found:
        return class_name, None
    return class_name[: found.start()] + class_name[found.end() :], found.group(1)


@functools.cache
def class_map(task: str) -> Dict[int, str]:
    """{label: class name} of the installed TotalSegmentator's task."""
    try:
        from totalsegmentator.map_to_binary import class_map as maps
    except ImportError as exc:
        raise CatalogueError(f"TotalSegmentator is not installed ({exc})") from None
    if task not in TASKS or task not in maps:
        raise CatalogueError(f"no TotalSegmentator task {task!r} here; supported: {', '.join(TASKS)}")
    return {int(k): str(v) for k, v in maps[task].items()}


@functools.cache
def snomed_rows() -> Dict[str, Dict[str, str]]:
    """TotalSegmentator's own class -> SNOMED CT / colour table, keyed by class name."""
    import importlib.resources

    resources = importlib.resources.files("totalsegmentator") / "resources"
    table = resources / "totalsegmentator_snomed_mapping.csv"
    with table.open("r", encoding="utf-8") as f:
        return {row["Structure"]: row for row in csv.DictReader(f)}


def _code(row: Dict[str, str], sequence: str) -> str:
    value = row.get(f"{sequence}.CodeValue", "")
    return f"SCT^{value}^{row.get(f'{sequence}.CodeMeaning', '')}" if value else "^^"


def _entry_string(category: str, type_code: str, modifier: str, region: str, region_mod: str) -> str:
    return "~".join((DICOM_CONTEXT, category, type_code, modifier, REGION_CONTEXT, region, region_mod))


def _class_part(class_name: str, index: int) -> Part:
    """A single class as a segment, named like Slicer names a terminology entry ("Left kidney")."""
    row = snomed_rows().get(class_name)
    base, side = split_side(class_name)
    if row is None:
        title = names.BASE_NAMES.get(base, ((base.replace("_", " "),), ()))[0][0]
        return Part(_named(title, side), (class_name,), _fallback_color(index), None)
    meaning = row["SegmentedPropertyTypeCodeSequence.CodeMeaning"]
    region = row.get("AnatomicRegionSequence.CodeMeaning", "")
    title = f"{region} {meaning.lower()}" if region else meaning
    rgb = tuple(int(v) / 255.0 for v in row["DicomRGBColor"].split(","))
    entry = _entry_string(
        _code(row, "SegmentedPropertyCategoryCodeSequence"),
        _code(row, "SegmentedPropertyTypeCodeSequence"),
        _code(row, "SegmentedPropertyTypeModifierCodeSequence"),
        _code(row, "AnatomicRegionSequence"),
        _code(row, "AnatomicRegionModifierSequence"),
    )
    return Part(_named(title, side), (class_name,), rgb, entry)  # type: ignore[arg-type]


def _named(title: str, side: Optional[str]) -> str:
    named_side = side and re.search(rf"\b{side}\b", title.lower())  # "Middle lobe of right lung"
    text = f"{side} {title.lower()}" if side and not named_side else title.lower()
    text = re.sub(r"\b([ctls])(\d+)\b", lambda m: m.group(1).upper() + m.group(2), text)
    return text[:1].upper() + text[1:]


def _fallback_color(index: int) -> Color:
    import colorsys

    return colorsys.hsv_to_rgb((0.11 + index * 0.618033988749895) % 1.0, 0.75, 0.95)  # type: ignore[return-value]


@functools.cache
def catalogue(task: str) -> Tuple[Entry, ...]:
    """Every structure of `task` that a question can name: single classes and groups."""
    labels = class_map(task)
    by_base: Dict[str, Dict[Optional[str], List[str]]] = {}
    for name in labels.values():
        base, side = split_side(name)
        by_base.setdefault(base, {}).setdefault(side, []).append(name)
    parts = {name: _class_part(name, n) for n, name in enumerate(labels.values())}
    entries = []
    for base, sides in by_base.items():
        english, chinese = names.BASE_NAMES.get(base) or names.GROUPS.get(base, ((), ()))[:2]
        if not english:
            english, chinese = names.numbered_names(base)
        english = tuple(dict.fromkeys((*english, base.replace("_", " "))))
        ordered = {s: parts[sides[s][0]] for s in SIDE_ORDER if s in sides}
        entries.append(Entry(base, english, chinese, ordered))
    entries += _groups(by_base, parts)
    return tuple(entries)


def _groups(by_base: Dict[str, Dict[Optional[str], List[str]]], parts: Dict[str, Part]) -> List[Entry]:
    groups = []
    for key, (english, chinese, pattern, whole) in names.GROUPS.items():
        inside = [sides for base, sides in by_base.items() if re.fullmatch(pattern, base)]
        members = {side: sorted(c for sides in inside for c in sides.get(side, [])) for side in SIDE_ORDER}
        members = {s: c for s, c in members.items() if c}
        if not members or (key in by_base and all(len(c) == 1 for c in members.values())):
            continue  # each side is one class already listed (MR "lung_left", "vertebrae")
        first = parts[next(iter(members.values()))[0]]
        group_parts = {}
        for side, classes in members.items():
            entry = None
            if whole is not None:
                modifier = f"SCT^{SIDE_CODES[side][0]}^{SIDE_CODES[side][1]}" if side else "^^"
                structure = f"SCT^{STRUCTURE[0]}^{STRUCTURE[1]}"
                entry = _entry_string(structure, f"SCT^{whole[0]}^{whole[1]}", modifier, "^^", "^^")
            group_parts[side] = Part(_named(english[0], side), tuple(classes), first.color, entry)
        groups.append(Entry(key, english, chinese, group_parts))
    return groups


def entry(task: str, key: str) -> Entry:
    found = [e for e in catalogue(task) if e.key == key]
    if not found:
        raise CatalogueError(f"TotalSegmentator's {task} task has no structure {key!r}")
    return found[0]


def class_part(task: str, class_name: str) -> Part:
    """The segment for one class (used when a box picks a class)."""
    names_ = list(class_map(task).values())
    if class_name not in names_:
        raise CatalogueError(f"TotalSegmentator's {task} task has no class {class_name!r}")
    return _class_part(class_name, names_.index(class_name))


def all_phrases(task: str) -> Iterable[Tuple[str, Entry]]:
    for e in catalogue(task):
        for phrase in (*e.english, *e.chinese):
            yield phrase, e
