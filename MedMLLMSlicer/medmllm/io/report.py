"""Markdown report of a conversation about a volume: facts, measured findings, located regions.

Inputs are plain dicts and lists so the server, the CLI and the Slicer module can all build them
without sharing classes. The report always ends with a line saying it is not for diagnosis.

Report dict keys (all optional):

- `title` (str), `created` (str, shown as given), `model` (str: engine / model name)
- `volume`: `name` (str), `shape` (the voxel array's shape `[k, j, i]`), `spacing` (mm, ordered
  `(i, j, k)`), `orientation` (str, e.g. "RAS", "LPS", "oblique"), `intensity_range` ([min, max]),
  `modality` (str)
- `findings`: list of {`label`, `volume_ml`, `extent_mm` ([x, y, z]), `hu_mean`, `hu_std`, `note`}
- `grounded`: list of {`label`, `center_ras` ([x, y, z] mm), `size_mm` ([x, y, z]), `source`}
- `conversation`: list of {`question`, `answer`} (answers are Markdown, shown as given: strip
  model grammar before, e.g. with the dialect's `strip`)
- `summary` (str, Markdown)

Missing numbers print as an em dash.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Mapping, Sequence, Union

DISCLAIMER = (
    "**Not for diagnostic use.** Generated with AI models in a research tool; every finding, "
    "measurement and location must be checked by a qualified clinician."
)
DEFAULT_TITLE = "MedMLLMSlicer report"
_KEYS = {"title", "created", "model", "volume", "findings", "grounded", "conversation", "summary"}
_MISSING = "—"

QuestionAnswers = Sequence[Union[Mapping[str, str], Sequence[str]]]


def render_report(report: Union[Mapping[str, object], QuestionAnswers]) -> str:
    """Render a report dict (keys in the module docstring), or just a list of question/answer
    pairs (dicts with `question` and `answer`, or 2-tuples), as Markdown."""
    if isinstance(report, Mapping):
        unknown = set(report) - _KEYS
        if unknown:
            raise ValueError(f"unknown report keys {sorted(unknown)}; expected some of {sorted(_KEYS)}")
        data = report
    elif isinstance(report, (list, tuple)):
        data = {"conversation": report}
    else:
        raise ValueError(
            f"report must be a dict or a list of question/answer pairs, got {type(report).__name__}"
        )
    parts = [f"# {_inline(data.get('title') or DEFAULT_TITLE)}"]
    byline = _byline(data)
    if byline:
        parts.append(byline)
    if data.get("volume"):
        parts.append(_volume_section(_mapping(data["volume"], "volume")))
    if data.get("findings"):
        parts.append(_findings_section(_items(data["findings"], "findings")))
    if data.get("grounded"):
        parts.append(_grounded_section(_items(data["grounded"], "grounded")))
    if data.get("conversation"):
        parts.append(_conversation_section(data["conversation"]))
    if data.get("summary"):
        parts.append("## Summary\n\n" + _text(data["summary"], "summary").strip())
    parts.append("---\n\n> " + DISCLAIMER)
    return "\n\n".join(parts) + "\n"


def _byline(data: Mapping[str, object]) -> str:
    bits = []
    if data.get("created"):
        bits.append(f"Created: {_inline(data['created'])}")
    if data.get("model"):
        bits.append(f"Model: {_inline(data['model'])}")
    return " · ".join(bits)


def _volume_section(volume: Mapping[str, object]) -> str:
    rows = []
    if volume.get("name"):
        rows.append(("Name", _inline(volume["name"])))
    if volume.get("modality"):
        rows.append(("Modality", _inline(volume["modality"])))
    if volume.get("shape") is not None:
        k, j, i = _numbers(volume["shape"], "volume shape", 3)
        rows.append(("Size (i × j × k)", f"{int(i)} × {int(j)} × {int(k)} voxels"))
    if volume.get("spacing") is not None:
        rows.append(("Spacing (i, j, k)", _triple(volume["spacing"], "volume spacing", 3) + " mm"))
    if volume.get("orientation"):
        rows.append(("Orientation", _inline(volume["orientation"])))
    if volume.get("intensity_range") is not None:
        low, high = _numbers(volume["intensity_range"], "volume intensity_range", 2)
        rows.append(("Intensity range", f"{_number(low, 1)} to {_number(high, 1)}"))
    lines = ["## Volume", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _findings_section(findings: List[Mapping[str, object]]) -> str:
    lines = [
        "## Findings",
        "",
        "| Finding | Volume (mL) | Extent (mm) | HU mean ± SD | Note |",
        "|---|---:|---|---:|---|",
    ]
    for n, item in enumerate(findings):
        what = f"findings[{n}]"
        extent = (
            _triple(item["extent_mm"], f"{what}.extent_mm", 1)
            if item.get("extent_mm") is not None
            else _MISSING
        )
        mean, std = _optional(item, "hu_mean", what), _optional(item, "hu_std", what)
        stats = (
            _MISSING if mean is None else _number(mean, 1) + ("" if std is None else f" ± {_number(std, 1)}")
        )
        volume = _optional(item, "volume_ml", what)
        lines.append(
            f"| {_label(item, what)} | {_MISSING if volume is None else _number(volume, 2)} | {extent} "
            f"| {stats} | {_inline(item.get('note', ''))} |"
        )
    return "\n".join(lines)


def _grounded_section(grounded: List[Mapping[str, object]]) -> str:
    lines = [
        "## Located regions",
        "",
        "| Region | Centre RAS (mm) | Size (mm) | Source |",
        "|---|---|---|---|",
    ]
    for n, item in enumerate(grounded):
        what = f"grounded[{n}]"
        center = _point(item["center_ras"], f"{what}.center_ras") if "center_ras" in item else _MISSING
        size = _triple(item["size_mm"], f"{what}.size_mm", 1) if "size_mm" in item else _MISSING
        lines.append(f"| {_label(item, what)} | {center} | {size} | {_inline(item.get('source', ''))} |")
    return "\n".join(lines)


def _conversation_section(conversation: object) -> str:
    if not isinstance(conversation, (list, tuple)):
        raise ValueError("conversation must be a list of question/answer pairs")
    blocks = ["## Conversation"]
    for n, pair in enumerate(conversation, start=1):
        question, answer = _pair(pair, n)
        quoted = "\n".join("> " + line if line else ">" for line in question.strip().splitlines())
        blocks.append(f"**Q{n}.**\n\n{quoted}\n\n{answer.strip() or '_(no answer)_'}")
    return "\n\n".join(blocks)


def _pair(pair: object, n: int) -> Sequence[str]:
    if isinstance(pair, Mapping):
        if "question" not in pair:
            raise ValueError(f"conversation item {n} has no 'question'")
        values = (pair["question"], pair.get("answer", ""))
    elif isinstance(pair, (list, tuple)) and len(pair) == 2:
        values = tuple(pair)
    else:
        raise ValueError(
            f"conversation item {n} must be a dict with 'question'/'answer' or a 2-tuple, got {pair!r}"
        )
    return _text(values[0], f"question {n}"), _text(values[1], f"answer {n}")


# ---------------------------------------------------------------- values


def _mapping(value: object, what: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}")
    return value


def _items(value: object, what: str) -> List[Mapping[str, object]]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a list of dicts, got {type(value).__name__}")
    return [_mapping(item, f"{what}[{n}]") for n, item in enumerate(value)]


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _label(item: Mapping[str, object], what: str) -> str:
    return _inline(_text(item.get("label", ""), f"{what}.label")) or _MISSING


def _inline(value: object) -> str:
    """Text safe inside one table cell or heading: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _real(value: object, what: str) -> float:
    """A real number (numpy scalars included); booleans and strings are refused, not coerced."""
    if not isinstance(value, (bool, str, bytes)):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{what} must be a number, got {value!r}")


def _numbers(values: object, what: str, count: int) -> List[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{what} must be {count} numbers, got {values!r}")
    numbers = [_real(v, what) for v in values]
    if len(numbers) != count:
        raise ValueError(f"{what} must be {count} numbers, got {len(numbers)}")
    return numbers


def _optional(item: Mapping[str, object], key: str, what: str) -> Union[float, None]:
    value = item.get(key)
    return None if value is None else _real(value, f"{what}.{key}")


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _point(values: object, what: str) -> str:
    return "(" + ", ".join(_number(v, 1) for v in _numbers(values, what, 3)) + ")"


def _triple(values: object, what: str, digits: int) -> str:
    return " × ".join(_number(v, digits) for v in _numbers(values, what, 3))
