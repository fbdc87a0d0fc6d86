"""MiniGPT-Med (2D): `<p>label</p> {<x1><y1><x2><y2>}`, `<delim>` between boxes, ints 0-100.

Facts (reference/models/minigptmed-medrega.md §1.2-1.3, Vision-CAIR/MiniGPT-Med@adb55c3): values
are `int(x / size * 100)` of the original (plainly resized, unpadded) image
(`minigpt4/datasets/datasets/nlst_dataset.py`); the demo decodes them as x/100*W
(`demo_v2.py:visualize_all_bbox_together`). Task tags `[grounding] [refer] [detection] [identify]
[vqa]`; region input for `[identify]` is the same `{<..>}` string (`demo_v2.py`).
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

from medmllm.grounding.base import Dialect, ImageSize, ParseEvent, ParseWarning
from medmllm.grounding.images import ImagePolicy, fixed_size
from medmllm.grounding.toolkit import (
    LabelledParser,
    SpanRule,
    box_events,
    check_region,
    clean_label,
    parse_numbers,
    snippet,
)

SCALE = 100
_PHRASE = SpanRule("<p>", "</p>", max_len=300)
_BOX = SpanRule("{<", ">}", max_len=200)
_DELIM = SpanRule("<delim>", "")


class MiniGPTMedParser(LabelledParser):
    rules = (_PHRASE, _BOX, _DELIM)

    def on_span(self, rule: SpanRule, body: str, start: int, end: int) -> Tuple[List[ParseEvent], str]:
        if rule is _DELIM:
            return [], " "
        if rule is _PHRASE:
            self.label = clean_label(body)
            return [], self.label or ""
        source = "{<" + body + ">}"
        values = parse_numbers(",".join(re.split(r">\s*<", body))) if "," not in body else None
        if values is None:
            return [ParseWarning(f"malformed MiniGPT-Med box: {snippet(source)}")], ""
        if len(values) != 4:
            return [
                ParseWarning(f"MiniGPT-Med box needs 4 numbers, got {len(values)}: {snippet(source)}")
            ], ""
        shown = "" if self.label else "[box]"
        return box_events(self.label, values, (SCALE,) * 4, range(4), (start, end), source), shown


class MiniGPTMedDialect(Dialect):
    """Images: 448x448 plainly resized, no padding (MiniGPT-v2's `Blip2ImageEvalProcessor`)."""

    coordinate_range = "integers 0-100 of the slice width and height, order x1, y1, x2, y2"
    tasks = ("chat", "ground", "region", "report")
    models = ("minigpt",)
    image = ImagePolicy(fixed_size(448, 448), description="448×448, plain resize")

    def example_answer(
        self, fractions: Sequence[float], label: str, image_size: Optional[ImageSize] = None
    ) -> str:
        """`<p>tumor</p> {<29><43><42><56>}` (MiniGPT-Med nlst_dataset.py generate_caption)."""
        return f"<p>{label}</p> {self.format_region(fractions)}"

    def parser(self, image_size: Optional[ImageSize] = None, keep_special: bool = False) -> MiniGPTMedParser:
        return MiniGPTMedParser()

    def _display_parser(self) -> MiniGPTMedParser:
        return MiniGPTMedParser(keep_display=True)

    def format_region(self, fractions: Sequence[float], image_size: Optional[ImageSize] = None) -> str:
        values = check_region(fractions, dims=2)
        return "{" + "".join(f"<{round(v * SCALE)}>" for v in values) + "}"

    def _prompt(
        self, task: str, text: str, region: Optional[Sequence[float]], image_size: Optional[ImageSize]
    ) -> str:
        if task == "ground":
            if not text:
                raise ValueError("this task needs the name of a finding, e.g. 'tumor'")
            return f"[detection] {text}"
        if task == "region":
            return f"[identify] {text or 'what is this'} {self.format_region(region)}"  # type: ignore[arg-type]
        if task == "report":
            return " ".join(filter(None, ["Describe this image in detail", text]))
        return text


DIALECT = MiniGPTMedDialect()
