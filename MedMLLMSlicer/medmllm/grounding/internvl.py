"""MedRegA / InternVL (2D): `<ref>label</ref><box>[[x1, y1, x2, y2], ...]</box>`, ints 0-999.

Facts (reference/models/minigptmed-medrega.md §2.2-2.3, xmed-lab/MedRegA@dfdb0db): the task
preambles say "integers ranging from 0 to 999", and MedRegA's evaluator maps back with
`BBOX_SCALE = 999` (`src/eval/regt2r/evaluator_reg.py:process_box`), so fractions are v/999 of
the unpadded image. Upstream InternVL divides by 1000 (0.1 % apart). A paper figure shows
`[[[...]]]`, so bracket depth is tolerated. Prompt preambles are the `base_prompt` strings of
`src/shell/meta_file.json` and `demo_data/data_file.jsonl` (English and Chinese). The `<image>`
placeholder is left out: OpenAI-compatible servers put the image first, as in training.

`<ref>`, `</ref>`, `<box>`, `</box>` are special tokens of the InternVL tokenizer, so MedRegA's own
`chat()` (`batch_decode(..., skip_special_tokens=True)` in `modeling_internvl_chat.py`) and servers
that decode the same way (vLLM's default) print `label[[x1, y1, x2, y2], ...]`. MedRegA's
evaluator reads exactly that (`evaluator_reg.py:PATTERN_REGCAP`: the phrase before a `[[...]]` list
of 4-integer groups), and so does this parser unless told the special tokens were kept.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

from medmllm.grounding.base import BoxFound, Dialect, ImageSize, ParseEvent, ParseWarning
from medmllm.grounding.images import ImagePolicy, fixed_size
from medmllm.grounding.toolkit import (
    LabelledParser,
    ProseLabel,
    SpanRule,
    box_events,
    check_region,
    clean_label,
    parse_numbers,
    snippet,
)

SCALE = 999
# MedRegA was trained with the Hermes-2 system message (xmed-lab/MedRegA src/internvl/conversation.py).
MEDREGA_SYSTEM = "Answer the questions."
_REF = SpanRule("<ref>", "</ref>", max_len=300)
_BOX = SpanRule("<box>", "</box>", max_len=2048)
_LIST = SpanRule("[[", None, max_len=1024, weak=True, abort_chars='<>{}"\n')
_BOX_CHARS = re.compile(r"[\s\[\],.\d+-]*")
# The phrase that names a bare list: after the last clause break, without bridging words.
_CLAUSE = re.compile(r".*[,，;；:：.。!！?？、()（）\n]", re.DOTALL)
_BRIDGE_HEAD = re.compile(r"^(?:sure\s+)?(?:the\s+region\s+of|the\s+location\s+of|the|a|an)\s+", re.I)
_BRIDGE_TAIL = re.compile(
    r"(?:\s+(?:is|are|was|were|lies|lie|located|seen|found|at|in|on|within|of|shown|as|here))+\s*$", re.I
)
UNTAGGED_NOTE = (
    "read boxes written without <ref>/<box> tags (label[[x1, y1, x2, y2]]), as servers print them "
    "when they drop special tokens: labels are the phrase before each list"
)
_CJK = re.compile(r"[\u3400-\u9fff]")

_COORDS = (
    "The region is represented in the form of bounding box, [x1, y1, x2, y2], with integers "
    "ranging from 0 to 999. These values correspond to the top left x, top left y, bottom right x, "
    "and bottom right y."
)
_FORMAT = (
    "For each object, please utilize this format to represent the region with its bounding box: "
    '"<ref>object</ref><box>[[x1, y1, x2, y2]]</box>". There might be multiple boxes for one object, in '
    'which case the format is like "<ref>object</ref><box>[[x1, y1, x2, y2], [x3, y3, x4, y4]]</box>".'
)
_EN = {
    "chat": "You are a helpful medical assistant. You are required to answer the question based on the "
    "medical image.",
    "ground": "You are a helpful medical assistant. Your task is object detection. You are required to find "
    f"all the regions of the given objects. {_COORDS} {_FORMAT}",
    "region": "You are a helpful medical assistant. Your task is object recognition. You are required to "
    f"recognize the object in the given region. {_COORDS}",
    "report": "You are a helpful medical assistant. Your task is report generation. You are given a chest "
    "x-ray image, and you are required to generate a medical report consisting of findings and impressions "
    "based on the image.",
}
_ZH = {
    "chat": "你是一个医疗助手，你需要根据医学图像回答问题。",
    "ground": "你是一个医疗助手，你的任务是定位并描述病种。病种区域用边界框的形式表示，[x1, y1, x2, y2]，"
    "整数范围从0到999。这些值分别对应左上角的x，左上角的y，右下角的x和右下角的y。对于每个病种，请使用这种格式"
    '用边界框表示区域："<ref>病种</ref><box>[[x1, y1, x2, y2]]</box>：诊断"。',
    "report": "你是一个医疗助手，你的任务是生成诊断报告。"
    "请为这张医学影像撰写诊断报告，需包括影像诊断和影像结论两部分。"
    "影像诊断描述可见信息，影响结论列举最终的诊断结果。",
}


class InternVLParser(LabelledParser):
    """Both forms: tagged `<ref>X</ref><box>[[..]]</box>` and, unless `keep_special`, bare `X[[..]]`."""

    def __init__(self, keep_display: bool = False, keep_special: bool = False) -> None:
        self.rules = (_REF, _BOX) if keep_special else (_REF, _BOX, _LIST)
        super().__init__(keep_display)
        self._prose = ProseLabel(_phrase)
        self._noted = False

    def on_text(self, text: str, start: int) -> List[ParseEvent]:
        self._prose.see(text)
        return super().on_text(text, start)

    def on_span(self, rule: SpanRule, body: str, start: int, end: int) -> Tuple[List[ParseEvent], str]:
        if rule is _LIST:
            return self._bare_list(body, start, end)
        self._prose.clear()
        if rule is _REF:
            self.label = clean_label(body)
            return [], self.label or ""
        source = "<box>" + body + "</box>"
        if not _BOX_CHARS.fullmatch(body) or not re.search(r"\[[^\[\]]*\]", body):
            return [ParseWarning(f"malformed box: {snippet(source)}")], ""
        return self._boxes(self.label, start, end, source)

    def _bare_list(self, body: str, start: int, end: int) -> Tuple[List[ParseEvent], str]:
        """`phrase[[x1, y1, x2, y2], ...]`; a list with anything but numbers (a prompt template's
        `[[x1, y1, x2, y2]]`) is prose."""
        source = "[[" + body + "]"
        if not _BOX_CHARS.fullmatch(body) or not re.search(r"\d", body):
            self.on_text(source, start)
            return [], source
        label = self.label or self._prose.label()
        self._prose.clear()
        events, shown = self._boxes(label, start, end, source)
        if not self._noted and any(isinstance(e, BoxFound) for e in events):
            self._noted = True
            events.insert(0, ParseWarning(UNTAGGED_NOTE))
        return events, shown

    def _boxes(self, label: Optional[str], start: int, end: int, source: str) -> Tuple[List[ParseEvent], str]:
        groups = re.findall(r"\[([^\[\]]*)\]", source)
        events: List[ParseEvent] = []
        for group in groups:
            numbers = parse_numbers(group)
            if numbers is None or len(numbers) != 4:
                events.append(ParseWarning(f"box needs 4 numbers: {snippet('[' + group + ']')}"))
                continue
            events += box_events(label, numbers, (SCALE,) * 4, range(4), (start, end), source)
        found = any(isinstance(e, BoxFound) for e in events)
        return events, "[box]" if found and not label else ""


def _phrase(text: str) -> str:
    """The name a bare list carries: the clause right before it, bridging words removed
    ("The region of left kidney is" -> "left kidney")."""
    phrase = _CLAUSE.sub("", text).strip()
    return _BRIDGE_TAIL.sub("", _BRIDGE_HEAD.sub("", phrase))


class InternVLDialect(Dialect):
    """Images: 448x448 plainly resized, no padding (InternVL's dynamic tiling at one tile; edge
    fractions survive a plain resize; reference/models/minigptmed-medrega.md §2.1)."""

    coordinate_range = (
        "integers 0-999 of the image width and height (MedRegA divides by 999), order x1, y1, x2, y2"
    )
    tasks = ("chat", "ground", "region", "report")
    special_markup = True
    models = ("medrega", "internvl")
    image = ImagePolicy(
        fixed_size(448, 448), description="448×448, plain bicubic resize (edge fractions survive it)"
    )
    languages = ("en", "zh")

    def system_prompt(self, model: str) -> Optional[str]:
        return MEDREGA_SYSTEM if "medrega" in model.lower() else None

    def example_answer(
        self, fractions: Sequence[float], label: str, image_size: Optional[ImageSize] = None
    ) -> str:
        """`<ref>carotid vessel wall</ref><box>[[365, 293, 416, 598]]</box>` (MedRegA
        demo_data/data_file.jsonl)."""
        return f"<ref>{label}</ref>{self.format_region(fractions)}"

    def parser(self, image_size: Optional[ImageSize] = None, keep_special: bool = False) -> InternVLParser:
        return InternVLParser(keep_special=keep_special)

    def _display_parser(self) -> InternVLParser:
        return InternVLParser(keep_display=True)

    def format_region(self, fractions: Sequence[float], image_size: Optional[ImageSize] = None) -> str:
        values = check_region(fractions, dims=2)
        return "<box>[[" + ", ".join(str(round(v * SCALE)) for v in values) + "]]</box>"

    def _prompt(
        self, task: str, text: str, region: Optional[Sequence[float]], image_size: Optional[ImageSize]
    ) -> str:
        """MedRegA's task preamble, then the question; Chinese text gets the Chinese preamble where
        MedRegA has one (chat, ground, report)."""
        chinese = bool(_CJK.search(text)) and task in _ZH
        preamble = (_ZH if chinese else _EN)[task]
        if task == "ground":
            if not text:
                raise ValueError("this task needs the name of a finding, e.g. 'liver'")
            question = (
                f"请定位并描述这张医学影像中的<ref>{text}</ref>"
                if chinese
                else f"Please locate <ref>{text}</ref> in this image."
            )
        elif task == "region":
            box = "<ref>this</ref>" + self.format_region(region)  # type: ignore[arg-type]
            question = f"{text} {box}" if text else f"What is {box} in this image?"
        else:
            question = text
        return preamble + ("" if chinese else " ") + question if question else preamble


DIALECT = InternVLDialect()
