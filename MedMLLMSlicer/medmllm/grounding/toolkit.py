"""The parser toolkit every dialect is built from (public: new dialects import it too).

- `StreamParser`: the scanner. A dialect lists its spans (`SpanRule`: an opener and a closer, or
  an opener alone) and turns each finished span into events in `on_span`. The scanner guarantees
  what every dialect needs and none should re-implement: a span is handed over the moment its
  closer arrives, the result does not depend on how the text was chunked (every search is confined
  to the same window whatever the chunking), nothing raises, and memory stays bounded however long
  a span stays open.
- `LabelledParser`: grammars that name a box in a tag just before it (`<p>x</p> {..}`).
- `ProseLabel`: grammars that name a box in free text before it (`the target is liver and the box
  is [..]`, `left kidney[[..]]`).
- `JsonBoxParser`: JSON objects carrying a box under one key, anywhere in prose.
- `box_events`: written numbers -> edge fractions (see `medmllm.grounding.base` for the coordinate
  convention), with every repair (clamp, swap) reported as a warning; `parse_numbers`,
  `clean_label`, `snippet`, `check_region`, `check_image_size` for the pieces around it.

docs/internals.md shows a complete dialect in 30 lines.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

from medmllm.grounding.base import BoxFound, ParseEvent, ParseWarning

SNIPPET_CHARS = 60
_PIECE = 4096  # big chunks are scanned in pieces, so the buffer never exceeds a span's max_len + _PIECE
MAX_WARNINGS = 50  # a garbage answer must not flood the chat with warnings
_JSON_MAX_DEPTH = 16  # deeper nesting is not a box: give up early instead of rescanning a brace flood
LABEL_CHARS = 200
Number = Union[int, float]

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_TAG = re.compile(r"<[^<>]{0,40}>")
_CLOSING = {"{": "}", "[": "]"}
LABEL_GAP = 40  # a label still names a box after this much prose between them, if no sentence ends
_SENTENCE_END = re.compile(r"[.;:!?\n。；：！？]")
# Keys that name a JSON box, most specific first: Qwen cookbooks write `label`, `name_en`/`name_zh`,
# a nested `names: {en, zh}`, `text_content` (text spotting) or `sub_label`.
_LABEL_KEYS = (
    "label",
    "name_en",
    ("names", "en"),
    "name",
    "text_content",
    "sub_label",
    "name_zh",
    ("names", "zh"),
)
_LENIENT_LABEL = re.compile(
    r"""['"](?:label|name_en|name|text_content|sub_label|name_zh|en|zh)['"]\s*:\s*['"]([^'"]*)['"]"""
)


def snippet(text: str) -> str:
    """Short quoted excerpt of model text for a warning (model text can be arbitrarily long)."""
    text = text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 3] + "..."
    return repr(text)


def parse_numbers(text: str) -> Optional[List[Number]]:
    """Comma-separated numbers (ints stay ints, to print as written); None if any item is not a number."""
    items = [item.strip() for item in text.split(",")]
    if not items or not all(_NUMBER.fullmatch(item) for item in items):
        return None
    numbers: List[Number] = []
    for item in items:
        value = float(item)
        if not math.isfinite(value):
            return None
        numbers.append(int(item) if re.fullmatch(r"[-+]?\d+", item) else value)
    return numbers


def clean_label(text: Optional[str]) -> Optional[str]:
    """A label fit for display and node names: markup removed, whitespace collapsed, length capped."""
    if text is None:
        return None
    text = " ".join(_TAG.sub(" ", text).split())[:LABEL_CHARS]
    return text or None


def _fmt(value: float) -> str:
    return f"{value:g}"


def box_events(
    label: Optional[str],
    values: Sequence[Number],
    divisors: Optional[Sequence[float]],
    order: Sequence[int],
    span: Tuple[int, int],
    source: str,
) -> List[ParseEvent]:
    """Normalise one written box to edge fractions, repairing what can be repaired, with a warning each time.

    `divisors[i]` scales written value i to a fraction; `order` picks the written values that make
    the fractions (lo per axis, then hi per axis). Out-of-range values are clamped, reversed edges
    swapped; a zero extent is kept (with a warning) except for 3D boxes, whose max is an inclusive
    voxel index so equal min and max mean one voxel thick. `divisors` None (a pixel grammar whose
    image size is unknown) keeps the values as written and gives no fractions.
    """
    events: List[ParseEvent] = []
    raw = [values[i] / (divisors[i] if divisors else 1) for i in order]
    clamped = [min(max(f, 0.0), 1.0) for f in raw] if divisors else raw
    if clamped != raw:
        limits = sorted({_fmt(d) for d in divisors or ()})
        events.append(
            ParseWarning(f"box value out of range 0-{'/'.join(limits)}, clamped: {snippet(source)}")
        )
    dims = len(clamped) // 2
    lo, hi = clamped[:dims], clamped[dims:]
    if any(a > b for a, b in zip(lo, hi)):
        events.append(ParseWarning(f"box corners reversed, swapped: {snippet(source)}"))
        lo, hi = [min(a, b) for a, b in zip(lo, hi)], [max(a, b) for a, b in zip(lo, hi)]
    if dims == 2 and any(a == b for a, b in zip(lo, hi)):
        events.append(ParseWarning(f"box has zero area, kept: {snippet(source)}"))
    fractions = tuple(lo + hi) if divisors else ()
    events.append(BoxFound(label, tuple(values), fractions, span[0], span[1]))
    return events


@dataclass(frozen=True)
class SpanRule:
    """One kind of span. `closer` None means balanced brackets: a JSON object (`{`) or a list (`[[`)
    closed by the bracket that matches the opener's; "" a lone token.

    A weak span (a bare `[` or `{`) may well be ordinary prose: if it is not closed within
    `max_len` characters, or is cut by one of `abort_chars`, its opener is treated as text and
    scanning resumes right after it. A strong span (`<box>`) that stays open is dropped whole,
    and another strong opener inside it ends it, both with a warning.
    """

    opener: str
    closer: Optional[str]
    max_len: int = 4096
    weak: bool = False
    abort_chars: str = ""


class StreamParser:
    """Incremental parser: `feed(chunk)` returns the events completed by that chunk, `finish()` the rest.

    Subclasses set `rules` and implement `on_span`; they may override `on_text` (text between
    spans, for label tracking) and `on_unclosed`. With `keep_display=True` the parser also
    assembles the display text that `Dialect.strip` returns.
    """

    rules: Tuple[SpanRule, ...] = ()

    def __init__(self, keep_display: bool = False) -> None:
        self._buf = ""
        self._base = 0
        self._rule: Optional[SpanRule] = None
        self._scanned = 0
        self._json_state = (0, False, False)
        self._finished = False
        self._warnings = 0
        self._display: Optional[List[str]] = [] if keep_display else None
        openers = sorted((r.opener for r in self.rules), key=len, reverse=True)
        self._open_re = re.compile("|".join(re.escape(o) for o in openers)) if openers else None
        self._by_opener = {r.opener: r for r in self.rules}
        self._strong = [r.opener for r in self.rules if not r.weak]

    # ----- hooks for dialects -------------------------------------------------------------
    def on_span(self, rule: SpanRule, body: str, start: int, end: int) -> Tuple[List[ParseEvent], str]:
        """Events for one finished span (`body` without opener and closer) and its display text."""
        raise NotImplementedError

    def on_text(self, text: str, start: int) -> List[ParseEvent]:
        """Text outside spans; dialects track labels here. Must not depend on how text is split."""
        return []

    def on_unclosed(self, rule: SpanRule, text: str) -> List[ParseEvent]:
        """A span left open (too long, or the answer ended): warn for strong spans by default."""
        if rule.weak:
            return []
        return [ParseWarning(f"unterminated {rule.opener} dropped: {snippet(text)}")]

    # ----- public API ---------------------------------------------------------------------
    def feed(self, chunk: str) -> List[ParseEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish(): create a new parser for each answer")
        if not isinstance(chunk, str):
            raise TypeError(f"feed() takes model text as str, not {type(chunk).__name__}")
        events: List[ParseEvent] = []
        for i in range(0, len(chunk), _PIECE):
            self._buf += chunk[i : i + _PIECE]
            self._drain(events, final=False)
        return self._limit_warnings(events)

    def finish(self) -> List[ParseEvent]:
        if self._finished:
            return []
        events: List[ParseEvent] = []
        self._drain(events, final=True)
        self._finished = True
        return self._limit_warnings(events)

    def _limit_warnings(self, events: List[ParseEvent]) -> List[ParseEvent]:
        kept: List[ParseEvent] = []
        for event in events:
            if isinstance(event, ParseWarning):
                self._warnings += 1
                if self._warnings == MAX_WARNINGS + 1:
                    event = ParseWarning(f"more than {MAX_WARNINGS} problems; further warnings suppressed")
                elif self._warnings > MAX_WARNINGS:
                    continue
            kept.append(event)
        return kept

    def display(self) -> str:
        return "".join(self._display or [])

    # ----- scanner ------------------------------------------------------------------------
    def _drain(self, events: List[ParseEvent], final: bool) -> None:
        while self._open_span(events, final) if self._rule is None else self._close_span(events, final):
            pass

    def _emit_text(self, events: List[ParseEvent], n: int) -> None:
        if n <= 0:
            return
        text = self._buf[:n]
        events += self.on_text(text, self._base)
        if self._display is not None:
            self._display.append(text)
        self._buf = self._buf[n:]
        self._base += n

    def _open_span(self, events: List[ParseEvent], final: bool) -> bool:
        buf = self._buf
        match = self._open_re.search(buf) if self._open_re else None
        if match is None:
            keep = 0 if final else self._partial_opener_tail(buf)
            self._emit_text(events, len(buf) - keep)
            return False
        rest = buf[match.start() :]
        if not final and any(len(o) > len(match.group()) and o.startswith(rest) for o in self._by_opener):
            self._emit_text(events, match.start())
            return False
        self._emit_text(events, match.start())
        self._rule = self._by_opener[match.group()]
        self._scanned = len(match.group())
        self._json_state = (match.group().count(match.group()[0]), False, False)
        return True

    def _partial_opener_tail(self, buf: str) -> int:
        longest = max((len(o) for o in self._by_opener), default=1)
        for k in range(min(longest - 1, len(buf)), 0, -1):
            if any(o.startswith(buf[-k:]) for o in self._by_opener):
                return k
        return 0

    def _close_span(self, events: List[ParseEvent], final: bool) -> bool:
        rule = self._rule
        assert rule is not None
        window = self._buf[: rule.max_len]
        end, cut = self._find_end(rule, window)
        if end >= 0:
            closer_len = 1 if rule.closer is None else len(rule.closer)
            body = window[len(rule.opener) : end - closer_len]
            start = self._base
            new_events, shown = self.on_span(rule, body, start, start + end)
            events += new_events
            if self._display is not None:
                self._display.append(shown)
            self._consume(end)
            return True
        if cut >= 0 and not rule.weak:
            events.append(ParseWarning(f"unterminated {rule.opener} dropped: {snippet(self._buf[:cut])}"))
            self._consume(cut)
            return True
        if cut >= 0 or final or len(self._buf) >= rule.max_len:
            events += self.on_unclosed(rule, window)
            if rule.weak:
                self._rule = None
                self._emit_text(events, len(rule.opener))
            else:
                self._consume(len(window))
            return True
        self._scanned = len(window)
        return False

    def _consume(self, n: int) -> None:
        self._buf = self._buf[n:]
        self._base += n
        self._rule = None

    def _find_end(self, rule: SpanRule, window: str) -> Tuple[int, int]:
        """(end of span or -1, position where the span is cut short or -1), searching only new text."""
        if rule.closer == "":
            return len(rule.opener), -1
        if rule.closer is None:
            end = self._json_end(window, rule.opener[0])
            return (-1, len(window)) if end == -2 else (end, -1)
        start = max(len(rule.opener), self._scanned - len(rule.closer) + 1)
        pos = window.find(rule.closer, start)
        limit = pos if pos >= 0 else len(window)
        cut = -1
        if rule.weak:
            cut = next((i for i in range(start, limit) if window[i] in rule.abort_chars), -1)
        else:
            opener_start = max(len(rule.opener), self._scanned - max(map(len, self._strong)) + 1)
            hits = [window.find(o, opener_start, limit) for o in self._strong]
            cut = min((h for h in hits if h >= 0), default=-1)
        if cut >= 0:
            return -1, cut
        return (pos + len(rule.closer) if pos >= 0 else -1), -1

    def _json_end(self, window: str, opener: str) -> int:
        """Position after the bracket that balances the opening one, tracking JSON strings in objects;
        -1 if not yet, -2 if nesting is too deep to be a box."""
        close = _CLOSING[opener]
        depth, in_string, escaped = self._json_state
        for i in range(self._scanned, len(window)):
            ch = window[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"' and opener == "{":
                in_string = True
            elif ch == opener:
                depth += 1
                if depth > _JSON_MAX_DEPTH:
                    return -2
            elif ch == close:
                depth -= 1
                if depth == 0:
                    return i + 1
        self._json_state = (depth, in_string, escaped)
        return -1


class LabelledParser(StreamParser):
    """For grammars that name a box just before it (`<p>x</p> {..}`, `<ref>x</ref><box>..`).

    The label holds for the boxes after it across a short bridge of prose, as real answers write
    it (`<ref>X</ref> is located in <box>..`), and is forgotten where a sentence ends or after
    `LABEL_GAP` characters, so a phrase mentioned in passing never names a later, unrelated box.
    """

    def __init__(self, keep_display: bool = False) -> None:
        super().__init__(keep_display)
        self._label: Optional[str] = None
        self._gap = 0

    @property
    def label(self) -> Optional[str]:
        return self._label

    @label.setter
    def label(self, value: Optional[str]) -> None:
        self._label, self._gap = value, 0

    def on_text(self, text: str, start: int) -> List[ParseEvent]:
        self._gap += len(text)
        if self._gap > LABEL_GAP or _SENTENCE_END.search(text):
            self._label = None
        return []


class ProseLabel:
    """The label of a box named in the prose just before it, for grammars without a label tag.

    Keeps the last `chars` characters of text outside spans (bounded however long the answer) and
    hands them to `extract`, which finds the phrase (`None` if the prose names nothing).
    """

    def __init__(self, extract: Callable[[str], Optional[str]], chars: int = 2 * LABEL_CHARS) -> None:
        self._extract = extract
        self._chars = chars
        self._text = ""

    def see(self, text: str) -> None:
        self._text = (self._text + text)[-self._chars :]

    def clear(self) -> None:
        self._text = ""

    def label(self) -> Optional[str]:
        return clean_label(self._extract(self._text))


class JsonBoxParser(StreamParser):
    """JSON objects that carry a box under `key` (Qwen `bbox_2d`, MedGemma `box_2d`), anywhere in prose.

    Each top-level `{...}` is read when its brace closes; objects without `key` are plain text.
    Invalid JSON (single quotes, trailing commas) is read leniently, with one warning per answer
    (Qwen's own cookbook answers put a trailing comma in every object).
    """

    key = ""
    extra_rules: Tuple[SpanRule, ...] = ()

    def __init__(
        self, divisors: Optional[Sequence[float]], order: Sequence[int], keep_display: bool = False
    ) -> None:
        self.rules = (SpanRule("{", None, max_len=2048, weak=True), *self.extra_rules)
        super().__init__(keep_display)
        self._divisors = tuple(divisors) if divisors else None
        self._order = tuple(order)
        self._lenient_noted = False

    def on_span(self, rule: SpanRule, body: str, start: int, end: int) -> Tuple[List[ParseEvent], str]:
        source = "{" + body + "}"
        if self.key not in source:
            return [], source
        found, events = self._objects(source)
        shown = []
        for label, values in found:
            if len(values) != 4:
                events.append(
                    ParseWarning(f"{self.key} needs 4 numbers, got {len(values)}: {snippet(source)}")
                )
                continue
            events += box_events(label, values, self._divisors, self._order, (start, end), source)
            shown.append(f"\x00{label or '[box]'}\x01")
        return events, ", ".join(shown)

    def on_unclosed(self, rule: SpanRule, text: str) -> List[ParseEvent]:
        if rule.opener != "{":
            return super().on_unclosed(rule, text)
        if self.key in text and "{" not in text[1:]:
            return [ParseWarning(f"unterminated JSON box dropped: {snippet(text)}")]
        return []

    def _objects(self, source: str) -> Tuple[List[Tuple[Optional[str], List[Number]]], List[ParseEvent]]:
        try:
            return _collect(json.loads(source), self.key), []
        except ValueError:
            pass
        found = []
        for match in re.finditer(rf"""['"]?{self.key}['"]?\s*:\s*\[([^\[\]]*)\]""", source):
            label = _LENIENT_LABEL.search(source, match.end()) or _LENIENT_LABEL.search(source)
            numbers = parse_numbers(match.group(1))
            if numbers is None:
                return found, [ParseWarning(f"malformed {self.key}: {snippet(source)}")]
            found.append((clean_label(label.group(1)) if label else None, numbers))
        if not found:
            return [], [ParseWarning(f"malformed {self.key}: {snippet(source)}")]
        if self._lenient_noted:
            return found, []
        self._lenient_noted = True
        return found, [ParseWarning(f"invalid JSON, {self.key} read leniently: {snippet(source)}")]


def _collect(value: object, key: str) -> List[Tuple[Optional[str], List[Number]]]:
    """Every (label, numbers) under `key` in a parsed JSON value, depth first, in written order."""
    found: List[Tuple[Optional[str], List[Number]]] = []
    if isinstance(value, list):
        for item in value:
            found += _collect(item, key)
    elif isinstance(value, dict):
        if key in value:
            box = value[key]
            numbers = box if isinstance(box, list) else []
            if not all(_finite_number(v) for v in numbers):
                numbers = []
            found.append((_json_label(value), list(numbers)))
        for item in value.values():
            if isinstance(item, (list, dict)):
                found += _collect(item, key)
    return found


def _json_label(box: dict) -> Optional[str]:
    """The first of `_LABEL_KEYS` that holds a string in a JSON box object."""
    for key in _LABEL_KEYS:
        value: object = box
        for part in (key,) if isinstance(key, str) else key:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str) and clean_label(value):
            return clean_label(value)
    return None


def _finite_number(value: object) -> bool:
    """JSON allows 1e999, which Python reads as inf: such a box is malformed, not clamped."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def unfence_json_display(text: str) -> str:
    """Display text of a JSON dialect: code fences gone, a JSON list of boxes becomes "label, label"."""
    text = re.sub(r"\s*```(?:json)?\s*", " ", text)
    text = re.sub(r"\[\s*((?:\x00[^\x01]*\x01\s*,?\s*)+)\]", lambda m: m.group(1).strip(), text)
    text = re.sub(r"\x01\s*,\s*\x00", "\x01, \x00", text)
    return text.replace("\x00", "").replace("\x01", "")


def check_region(fractions: Optional[Sequence[float]], dims: int) -> List[float]:
    """Validate a user region: 2*dims edge fractions in [0, 1], all lows before highs."""
    if fractions is None:
        raise ValueError("task 'region' needs a region")
    try:
        values = [float(v) for v in fractions]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"a region is {2 * dims} numbers (edge fractions), got {fractions!r}") from exc
    if len(values) != 2 * dims:
        raise ValueError(f"a region is {2 * dims} edge fractions for this model, got {len(values)}")
    if not all(math.isfinite(v) and -1e-9 <= v <= 1 + 1e-9 for v in values):
        raise ValueError(f"region fractions must lie in [0, 1], got {values}")
    values = [min(max(v, 0.0), 1.0) for v in values]
    if any(a > b for a, b in zip(values[:dims], values[dims:])):
        raise ValueError(f"region lows must not exceed highs (lo..., hi...), got {values}")
    return values


def check_image_size(image_size: Optional[Tuple[int, int]], dialect_name: str) -> Tuple[int, int]:
    if image_size is None:
        raise ValueError(f"dialect {dialect_name!r} writes pixels: it needs image_size=(width, height)")
    try:
        width, height = (int(v) for v in image_size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"image_size must be (width, height), got {image_size!r}") from exc
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return width, height
