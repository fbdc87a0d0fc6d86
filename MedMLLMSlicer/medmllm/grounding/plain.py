"""Models without grounding (LLaVA-Med and any chat model): everything they write is text."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from medmllm.grounding.base import Dialect, ImageSize, ParseEvent
from medmllm.grounding.toolkit import SpanRule, StreamParser


class PlainParser(StreamParser):
    rules = ()

    def on_span(self, rule: SpanRule, body: str, start: int, end: int) -> Tuple[List[ParseEvent], str]:
        raise AssertionError("a parser without rules never finds a span")


class PlainDialect(Dialect):
    """Any chat model: the picture at its native size (long side at most 1024 px)."""

    coordinate_range = "none (no boxes)"
    tasks = ("chat", "report")

    def parser(self, image_size: Optional[ImageSize] = None, keep_special: bool = False) -> PlainParser:
        return PlainParser()

    def _display_parser(self) -> PlainParser:
        return PlainParser(keep_display=True)

    def format_region(self, fractions: Sequence[float], image_size: Optional[ImageSize] = None) -> str:
        raise ValueError(f"dialect {self.name!r} has no grammar for regions; choose a grounding model")

    def _prompt(
        self, task: str, text: str, region: Optional[Sequence[float]], image_size: Optional[ImageSize]
    ) -> str:
        if task == "report":
            return " ".join(
                filter(None, ["Describe the findings in this image as a radiology report.", text])
            )
        return text


DIALECT = PlainDialect()
