"""M3D-LaMed (3D): `<bx_start>[d1, h1, w1, d2, h2, w2]<bx_end>` boxes and `[SEG]` mask requests.

Facts (reference/models/m3d-lamed.md §2-3, BAAI-DCAI/M3D@63e7200): box values are voxel index /
size over the (D, H, W) axes of the 32x256x256 model grid, max inclusive, rounded to 3 decimals
(`LaMed/src/utils/utils.py:mask2box`). `<bx_start>`/`<bx_end>` are special tokens, so a decode
with `skip_special_tokens=True` leaves the bare six-number list, which is parsed too. `[SEG]` is
an ordinary added token and stays in decoded text. The prompt is `"<im_patch>" * 256 + question`
with no chat template; the question templates are from `LaMed/src/dataset/prompt_templates.py`.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

from medmllm.grounding.base import Dialect, ImageSize, ParseEvent, ParseWarning, SegFound
from medmllm.grounding.toolkit import (
    ProseLabel,
    SpanRule,
    StreamParser,
    box_events,
    check_region,
    parse_numbers,
    snippet,
)

IMAGE_TOKENS = 256
_BOX = SpanRule("<bx_start>", "<bx_end>", max_len=512)
_BARE = SpanRule("[", "]", max_len=120, weak=True, abort_chars="[\n<")
_RECENT_CHARS = 200
# "The target is {} and the coordinates is {}." / "... and the segmentation mask is [SEG]."
_TARGET = re.compile(
    r"(?:target is|identified as|categorized as|category is)\s+(?:the\s+)?([^.,;:\[\]]{1,80}?)\s*"
    r"(?:,|\s+and)\s+(?:the|its|with)\s+(?:a\s+)?(?:segmentation mask|mask|coordinates|bounding box|box)"
    r"(?:\s+(?:is|are|of))?:?\s*$",
    re.IGNORECASE,
)


class M3DParser(StreamParser):
    """`<bx_start>` boxes, `[SEG]`, and (unless `keep_special`) the bare list a stripped decode leaves."""

    rules = (_BOX, _BARE)

    def __init__(self, keep_display: bool = False, keep_special: bool = False) -> None:
        super().__init__(keep_display)
        self._bare_boxes = not keep_special
        self._prose = ProseLabel(_target_in_prose, chars=_RECENT_CHARS)

    def on_text(self, text: str, start: int) -> List[ParseEvent]:
        self._prose.see(text)
        return []

    def on_span(self, rule: SpanRule, body: str, start: int, end: int) -> Tuple[List[ParseEvent], str]:
        source = rule.opener + body + (rule.closer or "")
        label = self._prose.label()
        if rule is _BARE:
            if body.strip() == "SEG":
                return [SegFound(label, start, end)], "[mask]"
            numbers = parse_numbers(body) if self._bare_boxes else None
            if numbers is None or len(numbers) != 6:
                self.on_text(source, start)
                return [], source
            return box_events(label, numbers, (1,) * 6, range(6), (start, end), source), "[box]"
        inner = body.strip()
        numbers = parse_numbers(inner[1:-1]) if inner.startswith("[") and inner.endswith("]") else None
        if numbers is None:
            return [ParseWarning(f"malformed M3D box: {snippet(source)}")], ""
        if len(numbers) != 6:
            return [ParseWarning(f"M3D box needs 6 numbers, got {len(numbers)}: {snippet(source)}")], ""
        return box_events(label, numbers, (1,) * 6, range(6), (start, end), source), "[box]"

    def on_unclosed(self, rule: SpanRule, text: str) -> List[ParseEvent]:
        bare_box = rule is _BARE and self._bare_boxes and "\n" not in text
        if bare_box and parse_numbers(text[1:].rstrip(", ")) is not None:
            return [ParseWarning(f"truncated M3D box dropped: {snippet(text)}")]
        return super().on_unclosed(rule, text)


def _target_in_prose(prose: str) -> Optional[str]:
    """The structure M3D's answer templates name just before a box or [SEG]."""
    match = _TARGET.search(prose)
    return match.group(1) if match else None


class M3DDialect(Dialect):
    """A 3D model: it reads the whole volume through its own engine, so no 2D picture policy."""

    coordinate_range = (
        "fractions 0-1 of the 32x256x256 model grid, order d0, h0, w0, d1, h1, w1 (max inclusive)"
    )
    tasks = ("chat", "ground", "region", "report", "segment")
    image = None
    box_dims = 3

    def example_answer(
        self, fractions: Sequence[float], label: str, image_size: Optional[ImageSize] = None
    ) -> str:
        """The PosREC answer template "The target is {} and the coordinates is {}."."""
        return f"The target is {label} and the coordinates is {self.format_region(fractions)}."

    def parser(self, image_size: Optional[ImageSize] = None, keep_special: bool = False) -> M3DParser:
        return M3DParser(keep_special=keep_special)

    def _display_parser(self) -> M3DParser:
        return M3DParser(keep_display=True)

    def format_region(self, fractions: Sequence[float], image_size: Optional[ImageSize] = None) -> str:
        values = check_region(fractions, dims=3)
        return "<bx_start>[" + ", ".join(repr(round(v, 3)) for v in values) + "]<bx_end>"

    def _prompt(
        self, task: str, text: str, region: Optional[Sequence[float]], image_size: Optional[ImageSize]
    ) -> str:
        if task == "ground":
            return f"Where is {_target(text)} in this image? Please output the box."
        if task == "segment":
            return f"Can you segment the {_target(text)} in this image? Please output the mask."
        if task == "region":
            box = self.format_region(region)  # type: ignore[arg-type]
            return f"{text} {box}" if text else f"What target is present within the coordinates {box} ?"
        if task == "report":
            return " ".join(filter(None, ["Please generate a medical report based on this image.", text]))
        return text

    def image_prompt(self, question: str) -> str:
        """The full model input text: M3D overwrites embedding positions 1..256 with the image, so the
        patch placeholders must come first, right after BOS, with no template around them."""
        return "<im_patch>" * IMAGE_TOKENS + question


def _target(text: str) -> str:
    if not text:
        raise ValueError("this task needs the name of a structure, e.g. 'liver'")
    return text


DIALECT = M3DDialect()
