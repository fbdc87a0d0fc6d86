"""MedGemma 1.5: JSON `{"box_2d": [y0, x0, y1, x1], "label": ...}`, 0-1000, y first.

Facts (reference/models/minigptmed-medrega.md §3; Google's notebook
`cxr_anatomy_localization_with_hugging_face.ipynb`, copy at shahriar2203041/MedGemma@8bc9758):
the prompt asks for `[y0, x0, y1, x1]` normalised to [0, 1000] in a ```json list after
"Final Answer:", on an image padded to a square (the engine must undo the padding). The model may
think between `<unused94>` and `<unused95>`; that trace is neither parsed nor shown, since drafts
there are not answers.
"""

from __future__ import annotations

import json
from typing import List, Optional, Sequence, Tuple

from medmllm.grounding.base import Dialect, ImageSize, ParseEvent
from medmllm.grounding.images import ImagePolicy, fixed_size
from medmllm.grounding.toolkit import (
    JsonBoxParser,
    SpanRule,
    check_region,
    unfence_json_display,
)

SCALE = 1000
# (centre, width) of MedGemma's three CT windows, in R, G, B order (Google-Health/medgemma#27).
CT_WINDOWS = ((-100.0, 2250.0), (40.0, 350.0), (40.0, 80.0))
_THOUGHT = SpanRule("<unused94>", "<unused95>", max_len=65536)
_GROUND = (
    "Instructions:\nThe following user query will require outputting bounding boxes. The format of bounding "
    "boxes coordinates is [y0, x0, y1, x1] where (y0, x0) must be top-left corner and (y1, x1) the "
    "bottom-right corner. This implies that x0 < x1 and y0 < y1. Always normalize the x and y coordinates "
    "the range [0, 1000], meaning that a bounding box starting at 15% of the image width would be "
    "associated with an x coordinate of 150. You MUST output a single parseable json list of objects "
    "enclosed into "
    '```json...``` brackets, for instance ```json[{"box_2d": [800, 3, 840, 471], "label": "car"}, '
    '{"box_2d": [400, 22, 600, 73], "label": "dog"}]``` is a valid output. Now answer to the user query.\n\n'
    "Query:\nWhere is the {}? Don't give a final answer without reasoning. Output the final answer in the "
    'format "Final Answer: X" where X is a JSON list of objects. The object needs a "box_2d" and "label" '
    "key. Answer:"
)


class MedGemmaParser(JsonBoxParser):
    key = "box_2d"
    extra_rules = (_THOUGHT,)

    def on_span(self, rule: SpanRule, body: str, start: int, end: int) -> Tuple[List[ParseEvent], str]:
        if rule is _THOUGHT:
            return [], ""
        return super().on_span(rule, body, start, end)


class MedGemmaDialect(Dialect):
    """Images: centred on a black square, then 896x896 (the localisation notebook's padding; boxes
    refer to the square); a CT with no window set goes as RGB of its three HU windows
    (WW/WL 2250/-100, 350/40, 80/40)."""

    coordinate_range = "integers 0-1000 of the padded square image, order y0, x0, y1, x1"
    tasks = ("chat", "ground", "region", "report")
    models = ("medgemma",)
    image = ImagePolicy(
        fixed_size(896, 896),
        pad_square=True,
        ct_windows=CT_WINDOWS,
        description="padded to a centred black square, 896×896 (boxes are fractions of the square; the "
        "padding is taken off, a box in it dropped); a CT with no window set goes as RGB of three HU "
        "windows (W2250/L−100, W350/L40, W80/L40, Google-Health/medgemma#27)",
    )

    def example_answer(
        self, fractions: Sequence[float], label: str, image_size: Optional[ImageSize] = None
    ) -> str:
        """The notebook's form: a ```json list after "Final Answer:"."""
        x0, y0, x1, y1 = check_region(fractions, dims=2)
        box = {"box_2d": [round(v * SCALE) for v in (y0, x0, y1, x1)], "label": label}
        return f"Final Answer:\n```json\n[{json.dumps(box)}]\n```"

    def parser(self, image_size: Optional[ImageSize] = None, keep_special: bool = False) -> MedGemmaParser:
        return MedGemmaParser((SCALE,) * 4, (1, 0, 3, 2))

    def _display_parser(self) -> MedGemmaParser:
        return MedGemmaParser((SCALE,) * 4, (1, 0, 3, 2), keep_display=True)

    def _finish_display(self, text: str) -> str:
        return unfence_json_display(text)

    def format_region(self, fractions: Sequence[float], image_size: Optional[ImageSize] = None) -> str:
        x0, y0, x1, y1 = check_region(fractions, dims=2)
        return json.dumps({"box_2d": [round(v * SCALE) for v in (y0, x0, y1, x1)]})

    def _prompt(
        self, task: str, text: str, region: Optional[Sequence[float]], image_size: Optional[ImageSize]
    ) -> str:
        if task == "ground":
            if not text:
                raise ValueError("this task needs the name of a structure, e.g. 'right clavicle'")
            return _GROUND.replace("{}", text)
        if task == "region":
            box = self.format_region(region)  # type: ignore[arg-type]
            return (
                f"{text} {box}" if text else f"What is in the region {box} (format [y0, x0, y1, x1], 0-1000)?"
            )
        if task == "report":
            return " ".join(
                filter(None, ["Describe the findings in this image as a radiology report.", text])
            )
        return text


DIALECT = MedGemmaDialect()
