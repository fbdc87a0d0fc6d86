"""Question routing by keywords and synonyms, English and Chinese.

The built-in engine is not a language model, so a question becomes (intent, structures, side)
by matching word lists; anything left over that names no known structure is reported back
honestly as something the tools cannot find.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

INTENTS = ("help", "report", "size", "where", "segment", "show")
ASKS_ABOUT_A_STRUCTURE = ("size", "where", "segment", "show")

# Checked in this order: "how big is the lung in the report" is a size question, etc.
INTENT_WORDS: Dict[str, Tuple[str, ...]] = {
    "help": ("help", "what can you", "what do you do", "capabilities", "帮助", "你能", "能做什么", "功能"),
    "report": (
        "report",
        "summary",
        "summarize",
        "summarise",
        "describe",
        "overview",
        "报告",
        "总结",
        "描述",
        "概述",
    ),
    "size": (
        "how big",
        "how large",
        "how much",
        "size",
        "volume of",
        "measure",
        "measurement",
        "extent",
        "多大",
        "大小",
        "体积",
        "测量",
        "尺寸",
    ),
    "where": ("where", "locate", "location", "find", "position", "哪里", "哪儿", "在哪", "位置", "定位"),
    "segment": ("segment", "segmentation", "mask", "delineate", "contour", "分割", "勾画"),
    "show": ("show", "display", "highlight", "see", "view", "显示", "展示", "看"),
}


@dataclass(frozen=True)
class Structure:
    key: str
    title: str  # how answers name the whole structure
    modality: str  # "CT" or "MR": the tools that find it need this kind of image
    words: Tuple[str, ...]  # English words/phrases (whole-word match) and Chinese (substring)


STRUCTURES: Tuple[Structure, ...] = (
    Structure(
        "lung",
        "lungs",
        "CT",
        ("lung", "lungs", "pulmonary", "肺"),
    ),
    Structure(
        "airway",
        "airway",
        "CT",
        ("airway", "airways", "trachea", "windpipe", "bronchus", "bronchi", "air", "气道", "气管", "空气"),
    ),
    Structure(
        "bone",
        "bones",
        "CT",
        (
            "bone",
            "bones",
            "skeleton",
            "skeletal",
            "spine",
            "vertebra",
            "vertebrae",
            "rib",
            "ribs",
            "骨",
            "脊柱",
            "椎",
        ),
    ),
    Structure(
        "body",
        "body outline",
        "CT",
        ("body", "skin", "outline", "torso", "体表", "身体", "皮肤", "轮廓"),
    ),
    Structure("brain", "brain", "MR", ("brain", "cerebrum", "cerebral", "脑")),
)

SIDE_WORDS = {"right": ("right", "右"), "left": ("left", "左")}

# Words that carry no content once intent and structure are known ("where is the ... ?").
_FILLER_WORDS = """
a an the is are was be me my please can could would you your we us of in on at to for this that these
those it its there here what which show tell give do does did how big large much find where locate
segment display highlight see view and or with from whole all both
"""
FILLER = frozenset(_FILLER_WORDS.split())
ZH_FILLER = "的了吗呢吧在是有和与请帮我你给一下这个那个里哪儿出来？?，,。.！!"


@dataclass(frozen=True)
class Request:
    intent: str  # one of INTENTS, or "unknown" when nothing matched
    structures: Tuple[str, ...]
    side: Optional[str]
    unknown: Optional[str]  # leftover phrase that may name a structure the tools do not know


def _has_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def _matches(text: str, word: str) -> bool:
    if _has_cjk(word):
        return word in text
    return re.search(rf"(?<![a-z]){re.escape(word)}(?![a-z])", text) is not None


def _remove(text: str, word: str) -> str:
    if _has_cjk(word):
        return text.replace(word, " ")
    return re.sub(rf"(?<![a-z]){re.escape(word)}(?![a-z])", " ", text)


def parse(question: str) -> Request:
    """Route one question; never raises on odd text (empty text is a help request)."""
    text = " ".join(str(question).lower().split())
    if not text:
        return Request("help", (), None, None)
    intent = next((name for name in INTENTS if any(_matches(text, w) for w in INTENT_WORDS[name])), "unknown")
    structures = tuple(s.key for s in STRUCTURES if any(_matches(text, w) for w in s.words))
    side = next((name for name, words in SIDE_WORDS.items() if any(_matches(text, w) for w in words)), None)
    if intent == "unknown" and structures:
        intent = "show"
    unknown = None
    if not structures and intent in ASKS_ABOUT_A_STRUCTURE:
        unknown = _leftover(text) or None
    return Request(intent, structures, side, unknown)


def _leftover(text: str) -> str:
    """The question minus intent, structure, side and filler words: what the user asked about."""
    words: List[str] = [w for ws in INTENT_WORDS.values() for w in ws]
    words += [w for s in STRUCTURES for w in s.words] + [w for ws in SIDE_WORDS.values() for w in ws]
    for word in sorted(words, key=len, reverse=True):
        text = _remove(text, word)
    text = "".join(" " if ch in ZH_FILLER else ch for ch in text)
    words_left = re.split(r"[\s\-_/'\"()\[\]:;]+", text)
    kept = [w for w in words_left if (len(w) > 1 or _has_cjk(w)) and w not in FILLER]
    return " ".join(kept)


def structure(key: str) -> Structure:
    return next(s for s in STRUCTURES if s.key == key)


def capabilities_text() -> str:
    """One paragraph listing what can be asked, for help and for questions it cannot answer."""
    return (
        "On CT I can find the body outline, the lungs (right and left), the airway (trachea) and the bones; "
        "on brain MRI, the brain. Ask 'where is ...' (a box and where it lies), 'show me ...' (a mask), "
        "'how big is ...' (volume in mL, extents in mm, intensity statistics), or 'report' for a summary of "
        "the volume (modality guess, size, spacing, orientation, intensities and what the tools found). "
        "Chinese works too, e.g. 肺在哪里？ or 生成报告."
    )
