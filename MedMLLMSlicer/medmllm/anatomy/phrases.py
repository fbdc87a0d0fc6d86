"""Which TotalSegmentator structures a question names, with the patient side it asks for.

Longest phrase first ("left adrenal gland" before "kidney", 左肾上腺 before 左肾), each stretch of
text used once; English matches whole words, Chinese substrings. A side written beside the
structure ("left kidney", "kidney, left", 左肾) binds to it; a side elsewhere in the question
("the kidney on the left") applies to every sided structure left without one; no side means both.
"""

from __future__ import annotations

import functools
import re
from typing import List, Optional, Tuple

from medmllm.anatomy import catalogue, names
from medmllm.anatomy.catalogue import Entry, Part

_Phrase = Tuple[str, Entry, Optional[str]]  # (text, entry, side bound by the phrase)


def _has_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


@functools.cache
def _phrases(task: str) -> Tuple[_Phrase, ...]:
    found: List[_Phrase] = []
    for text, entry in catalogue.all_phrases(task):
        text = text.lower()
        found.append((text, entry, None))
        if not entry.sided:
            continue
        for side in ("left", "right"):
            if _has_cjk(text):
                found += [(word + text, entry, side) for word in names.SIDES_ZH[side]]
            else:
                found += [(f"{side} {text}", entry, side), (f"{text} {side}", entry, side)]
                found.append((f"{text}, {side}", entry, side))
                if entry.key.startswith("lung_"):  # "upper lobe of the left lung"
                    found += [(f"{text} of{the} {side} lung", entry, side) for the in (" the", "")]
    return tuple(sorted(found, key=lambda p: len(p[0]), reverse=True))


def _spans(text: str, phrase: str) -> List[Tuple[int, int]]:
    if phrase not in text:  # the cheap test first: most of the ~2000 phrases are not there
        return []
    if _has_cjk(phrase):
        return [(m.start(), m.end()) for m in re.finditer(re.escape(phrase), text)]
    pattern = rf"(?<![a-z0-9]){re.escape(phrase)}(?![a-z0-9])"
    return [(m.start(), m.end()) for m in re.finditer(pattern, text)]


def mentions(text: str, phrase: str) -> bool:
    """Whether lower-cased `text` holds `phrase` (a whole word or words; Chinese as a substring)."""
    return bool(_spans(text, phrase))


def _sides_left_in(text: str) -> Tuple[str, ...]:
    sides = []
    for side in ("right", "left"):
        words = names.SIDES_EN[side] + names.SIDES_ZH[side]
        if any(_spans(text, w) for w in words):
            sides.append(side)
    return tuple(sides)


def find_parts(question: str, task: str) -> List[Part]:
    """The segments a question asks for, in the order it names them (empty if it names none)."""
    text = " ".join(str(question).lower().split())
    hits: List[Tuple[int, Entry, Optional[str]]] = []
    for phrase, entry, side in _phrases(task):
        for start, end in _spans(text, phrase):
            hits.append((start, entry, side))
            text = text[:start] + "\x00" * (end - start) + text[end:]
    loose_sides = _sides_left_in(text) or ("right", "left")
    parts: List[Part] = []
    for _, entry, side in sorted(hits, key=lambda h: h[0]):
        if not entry.sided:
            chosen = [entry.parts[None]]
        else:
            chosen = [entry.parts[s] for s in ((side,) if side else loose_sides) if s in entry.parts]
        parts += [p for p in chosen if p not in parts]
    return parts
