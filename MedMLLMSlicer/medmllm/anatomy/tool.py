"""TotalSegmentator as a tool of the built-in engine: which structures a question names, whether
they can be segmented here, and their masks and the report's organ volumes.

Engine options (`--option KEY=VALUE`): `anatomy` = auto (default) | off; `anatomy_device` = auto |
cpu | gpu; `anatomy_fast` = auto | yes | no; `anatomy_download` = no (default) | yes, which lets
TotalSegmentator download its weights once (the user's decision, never taken silently).
"""

from __future__ import annotations

import importlib.util
import re
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from medmllm.anatomy import catalogue, names, phrases
from medmllm.anatomy.catalogue import Part
from medmllm.anatomy.runner import DEFAULT_ENTRY, NOT_INSTALLED, Runner, Settings

TASK_OF_MODALITY = {"CT": "total", "MR": "total_mr"}
# What the report lists when TotalSegmentator ran (catalogue keys; sided ones give both sides).
REPORT_KEYS = ("liver", "spleen", "kidney", "pancreas", "gallbladder", "stomach", "heart", "lung")
REPORT_KEYS += ("urinary_bladder", "aorta", "brain")
_YES = ("1", "yes", "true", "on")
_NO = ("0", "no", "false", "off")


def _flag(value: object, name: str) -> Optional[bool]:
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text in _YES or text in _NO:
        return text in _YES
    raise ValueError(f"{name} must be auto, yes or no; got {value!r}")


def settings_from(extra: Dict[str, object]) -> Settings:
    """Runner settings from engine options (see the module docstring); ValueError on bad values."""
    device = str(extra.get("anatomy_device", "auto")).lower()
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"anatomy_device must be auto, cpu or gpu; got {device!r}")
    download = _flag(extra.get("anatomy_download", "no"), "anatomy_download")
    entry = str(extra.get("anatomy_entry", DEFAULT_ENTRY))
    return Settings(device, _flag(extra.get("anatomy_fast", "auto"), "anatomy_fast"), bool(download), entry)


_NUMBERED = re.compile(
    r"\b(?:[ctl]\d{1,2}|s1)(?: vertebra)?\b|\b\d{1,2}(?:st|nd|rd|th) rib\b|第.{1,2}(?:颈椎|胸椎|腰椎|肋)"
)


def names_a_structure(question: str) -> bool:
    """Whether the question names anything TotalSegmentator knows, judged from the name tables
    alone (so it works without TotalSegmentator installed)."""
    text = " ".join(str(question).lower().split())
    tables = [*names.BASE_NAMES.values(), *(g[:2] for g in names.GROUPS.values())]
    words = [w for english, chinese in tables for w in (*english, *chinese)]
    return bool(_NUMBERED.search(text)) or any(phrases.mentions(text, w) for w in words)


class AnatomyTool:
    """Per engine: the runner (settings + label cache) and the answers' segments."""

    def __init__(self, extra: Dict[str, object], cache_root: Path) -> None:
        mode = str(extra.get("anatomy", "auto")).lower()
        if mode not in ("auto", "off"):
            raise ValueError(f"anatomy must be auto or off; got {mode!r}")
        self.enabled = mode == "auto"
        self.runner = Runner(cache_root, settings_from(extra))

    def use_store(self, folder: Path) -> None:
        self.runner = Runner(folder, self.runner.settings)

    def installed(self) -> bool:
        return importlib.util.find_spec("totalsegmentator") is not None

    def parts(self, question: str, modality: str) -> List[Part]:
        """Segments the question asks for; empty when it names none or TotalSegmentator is absent."""
        if not (self.enabled and self.installed()):
            return []
        return phrases.find_parts(question, TASK_OF_MODALITY[modality])

    def missing(self, modality: str) -> str:
        """One sentence: what naming any organ would need here, or "" when it is only switched off."""
        if not self.enabled:
            return ""
        return "" if self.installed() else NOT_INSTALLED

    def masks(
        self, volume, volume_id: str, modality: str, parts: List[Part], cancel: threading.Event
    ) -> Iterator[str]:
        """Progress notes while TotalSegmentator runs; returns [(part, mask)] on the volume's grid."""
        task = TASK_OF_MODALITY[modality]
        wanted = [c for p in parts for c in p.classes]
        labels = yield from self.runner.labels(volume, volume_id, task, wanted, cancel)
        return [(p, _mask(labels, task, p)) for p in parts]

    def structure_in_box(
        self, volume, volume_id: str, modality: str, box, cancel: threading.Event
    ) -> Iterator[str]:
        """Progress notes; returns (part, mask, IoU) of the structure whose extent fits a user's ROI
        best (the ROI's thinnest axis is its slab), or None when none fits (`boxes.MIN_IOU`)."""
        from medmllm.anatomy.boxes import MIN_IOU, best_label
        from medmllm.segmenters import clipped_ranges

        task = TASK_OF_MODALITY[modality]
        labels = yield from self.runner.labels(volume, volume_id, task, [], cancel)
        ranges = clipped_ranges(box, volume.voxels.shape)
        normal = int(np.argmin([b - a for a, b in ranges]))
        found = best_label(labels, ranges, normal)
        if found is None or found[1] < MIN_IOU:
            return None
        part = catalogue.class_part(task, catalogue.class_map(task)[found[0]])
        return part, labels == found[0], found[1]

    def report_parts(self, volume_id: str, modality: str) -> List[Tuple[Part, np.ndarray]]:
        """The major organs' masks when TotalSegmentator already ran on this volume, else []."""
        if not (self.enabled and self.installed()):
            return []
        task = TASK_OF_MODALITY[modality]
        labels = self.runner.cache.find(volume_id, task, [])
        if labels is None:
            return []
        found = []
        for key in REPORT_KEYS:
            try:
                entry = catalogue.entry(task, key)
            except catalogue.CatalogueError:
                continue  # not a class of this task (the brain in total_mr is; the aorta is not)
            found += [(p, _mask(labels, task, p)) for p in entry.parts.values()]
        return [(p, m) for p, m in found if m.any()]


def _mask(labels: np.ndarray, task: str, part: Part) -> np.ndarray:
    numbers = [n for n, name in catalogue.class_map(task).items() if name in part.classes]
    return np.isin(labels, numbers)
