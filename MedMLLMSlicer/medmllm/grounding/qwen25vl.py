"""Qwen2.5-VL (and Lingshu, built on it): JSON `{"bbox_2d": [x1, y1, x2, y2], "label": ...}` in pixels.

Facts (reference/models/minigptmed-medrega.md §3): coordinates are absolute pixels of the image
*after* the processor's resize (`smart_resize`, sides multiples of 28), per the Qwen maintainers
(QwenLM/Qwen3-VL#676, #866), so the parser needs that size: send slices already sized to multiples
of 28 and pass their size. Answers usually come as a ```json fenced list; objects are read one by
one as their braces close. Prompts follow the Qwen2.5-VL spatial-understanding cookbook
("Outline the position of each ... and output all the coordinates in JSON format.").
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from medmllm.grounding._stream import (
    JsonBoxParser,
    check_image_size,
    check_region,
    unfence_json_display,
)
from medmllm.grounding.base import Dialect, ImageSize


class QwenParser(JsonBoxParser):
    key = "bbox_2d"


class Qwen25VLDialect(Dialect):
    name = "qwen25vl"
    coordinate_range = (
        "absolute pixels x1, y1, x2, y2 of the image the model saw (needs its width and height)"
    )
    tasks = ("chat", "ground", "region", "report")

    def parser(self, image_size: Optional[ImageSize] = None, keep_special: bool = False) -> QwenParser:
        """Without `image_size` boxes carry their written values only (no fractions): enough for
        `medmllm parse`; the engine always passes the size of the image it sent."""
        if image_size is None:
            return QwenParser(None, range(4))
        width, height = check_image_size(image_size, self.name)
        return QwenParser((width, height, width, height), range(4))

    def _display_parser(self) -> QwenParser:
        return QwenParser((1, 1, 1, 1), range(4), keep_display=True)

    def _finish_display(self, text: str) -> str:
        return unfence_json_display(text)

    def format_region(self, fractions: Sequence[float], image_size: Optional[ImageSize] = None) -> str:
        width, height = check_image_size(image_size, self.name)
        x0, y0, x1, y1 = check_region(fractions, dims=2)
        return json.dumps(
            {"bbox_2d": [round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)]}
        )

    def _prompt(
        self, task: str, text: str, region: Optional[Sequence[float]], image_size: Optional[ImageSize]
    ) -> str:
        if task == "ground":
            if not text:
                raise ValueError("this task needs the name of a finding, e.g. 'liver'")
            return f"Outline the position of each {text} and output all the coordinates in JSON format."
        if task == "region":
            box = self.format_region(region, image_size)  # type: ignore[arg-type]
            return f"{text} {box}" if text else f"What is in the region {box} of this image?"
        if task == "report":
            return " ".join(
                filter(None, ["Write a radiology report (findings and impression) for this image.", text])
            )
        return text


DIALECT = Qwen25VLDialect()
