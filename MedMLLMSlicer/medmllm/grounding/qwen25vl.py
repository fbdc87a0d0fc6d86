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
import math
from typing import Optional, Sequence, Tuple

from medmllm.grounding.base import Dialect, ImageSize
from medmllm.grounding.images import ImagePolicy, guard_aspect
from medmllm.grounding.toolkit import (
    JsonBoxParser,
    check_image_size,
    check_region,
    unfence_json_display,
)

# Qwen2.5-VL's processor keeps an image unchanged when its sides are multiples of 28 and its area
# lies within [min_pixels, max_pixels]. The documented configurations (QwenLM/Qwen2.5-VL@f0af299):
# README.md 256*28*28 ... 1280*28*28; cookbooks/ocr.ipynb and document_parsing.ipynb (the API
# calls) 512*28*28 ... 2048*28*28; the checkpoint's own defaults 56*56 ... 12845056. Sending within
# their intersection means none of them resizes the image, so the model's pixels are ours.
QWEN_MIN_PIXELS = 512 * 28 * 28
QWEN_MAX_PIXELS = 1280 * 28 * 28


def qwen_image_size(
    width: int,
    height: int,
    factor: int = 28,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> Tuple[int, int]:
    """A size Qwen2.5-VL's processor keeps unchanged (sides multiples of 28, area within its pixel
    range), so the absolute pixel boxes it answers are pixels of exactly the image we sent. Small
    slices are enlarged to a long side of 448 first and to `min_pixels` at least: tiny images give
    the model almost nothing to look at, and a server set up like the cookbook would enlarge them."""
    w, h = guard_aspect(float(width), float(height))
    scale = max(1.0, 448.0 / max(w, h), math.sqrt(min_pixels / (w * h)))
    w, h = w * scale, h * scale
    rounded = max(factor, round(w / factor) * factor), max(factor, round(h / factor) * factor)
    if rounded[0] * rounded[1] < min_pixels:  # rounding down crossed the floor
        rounded = math.ceil(w / factor) * factor, math.ceil(h / factor) * factor
    if rounded[0] * rounded[1] <= max_pixels:
        return rounded
    shrink = min(1.0, math.sqrt(max_pixels / (w * h)))  # rounding up alone can cross the budget
    w, h = w * shrink, h * shrink
    return max(factor, math.floor(w / factor) * factor), max(factor, math.floor(h / factor) * factor)


class QwenParser(JsonBoxParser):
    key = "bbox_2d"


class Qwen25VLDialect(Dialect):
    """Images: aspect kept, sides multiples of 28 within Qwen's pixel range (`qwen_image_size`)."""

    coordinate_range = (
        "absolute pixels x1, y1, x2, y2 of the image the model saw (needs its width and height)"
    )
    tasks = ("chat", "ground", "region", "report")
    models = ("lingshu", "qwen2.5-vl", "qwen2_5_vl", "qwen2.5vl")
    image = ImagePolicy(
        qwen_image_size,
        description="aspect kept (up to 50:1), long side ≥ 448, sides multiples of 28, between 512·28² and "
        "1280·28² pixels: Qwen's processor keeps such a size unchanged under the README's, the cookbooks' "
        "and the checkpoint's pixel ranges, so the pixels it answers in are ours",
    )

    def example_answer(
        self, fractions: Sequence[float], label: str, image_size: Optional[ImageSize] = None
    ) -> str:
        """The cookbook's form: a ```json fenced list of `{"bbox_2d": [...], "label": ...}`."""
        box = json.loads(self.format_region(fractions, image_size))
        return f"```json\n[\n\t{json.dumps({**box, 'label': label})}\n]\n```"

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
