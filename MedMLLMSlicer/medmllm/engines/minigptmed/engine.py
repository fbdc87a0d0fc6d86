"""The `minigptmed` engine: MiniGPT-Med answers about the slice the user looks at, with boxes.

Options: `--model` the MiniGPT-Med `.pth` or a folder holding all inputs (`loader.resolve_inputs`);
extra `llama` (Llama-2-7b-chat-hf folder), `eva` (`eva_vit_g.pth`), optional `config` (dict or
JSON path of sizes, see `config.py`),
`max_new_tokens`, `temperature`, `top_p` (0.9 as the official demo), `seed`, `max_slices`
(per-slice caches kept, default 8), `segmenter` (box -> 3D mask for "segment ..." questions, default
`region-growing`; `none` turns masks off).

One question: export the current slice (8-bit, windowed), preprocess it as the official eval
transform, and build the official single-turn prompt
`<s>[INST] <Img><ImageHere></Img> {tag} {text} [/INST]` with the 256 image embeddings in place of
`<ImageHere>`. Everything up to and including the image is the same for every question on that
slice, so its KV cache is computed once per slice and copied per question. Boxes are parsed by the
`minigptmed` dialect while the text streams and mapped through the exported slice to IJK boxes
one slice thick. MiniGPT-Med cannot segment: a segmentation question is asked as detection and
each box is handed to a `medmllm.segmenters` box segmenter.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

from medmllm.engines.base import (
    BoxOut,
    Capabilities,
    ChatContext,
    Engine,
    EngineError,
    EngineEvent,
    EngineOptions,
    MaskOut,
    ModelInfo,
    TokenOut,
    WarningOut,
)
from medmllm.engines.minigptmed.config import MiniGPTMedConfig
from medmllm.engines.toolkit import int_option, sampling_options, segmenter_option
from medmllm.geometry.boxes import IJKBox
from medmllm.geometry.slices import SliceImage, export_slice
from medmllm.geometry.volume import Volume, VolumeError
from medmllm.segmenters import BoxSegmenter, SegmenterError

IMAGE_SLOT = "<ImageHere>"
# conversation.py CONV_VISION_minigptv2: roles ("<s>[INST] ", " [/INST]"), sep "", system "";
# Chat.upload_img adds "<Img><ImageHere></Img>" and Chat.ask appends the text after a space.
PROMPT = "<s>[INST] <Img>" + IMAGE_SLOT + "</Img> {} [/INST]"
TASK_TAG = re.compile(r"^\s*\[(grounding|refer|detection|identify|vqa)\]", re.IGNORECASE)
DEMO_MAX_LENGTH = 2000  # conversation.py Chat.answer_prepare: max_length=2000


@dataclass
class _SliceState:
    view: SliceImage
    prefix: Any  # KV cache of "<s>[INST] <Img>" + image embeddings (read-only)
    prefix_len: int


def _clamp(fractions: Tuple[float, ...]) -> Tuple[Optional[Tuple[float, float, float, float]], Optional[str]]:
    """Fractions clipped to the slice; (None, reason) when nothing of the box is left on it."""
    x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in fractions)
    shown = [round(v * 100) for v in fractions]
    if x1 <= x0 or y1 <= y0:
        return None, f"box {shown} (0-100) has no area inside the slice; dropped"
    if (x0, y0, x1, y1) != tuple(fractions):
        return (x0, y0, x1, y1), f"box {shown} (0-100) reaches outside the slice; clamped"
    return (x0, y0, x1, y1), None


class MiniGPTMedEngine(Engine):
    """MiniGPT-Med (MiniGPT-v2, LLaMA-2-7B-chat + LoRA, EVA-ViT-g) loaded from the official files."""

    name = "minigptmed"

    def __init__(self, options: EngineOptions) -> None:
        super().__init__(options)
        from medmllm.engines.m3d.generation import Decoder
        from medmllm.engines.minigptmed.loader import load, resolve_inputs
        from medmllm.grounding.registry import get_dialect

        extra = options.extra or {}
        checkpoint, llama, eva, sizes = resolve_inputs(options.model, extra)
        self.config = MiniGPTMedConfig.from_value(sizes)
        self.max_slices = int_option(extra, "max_slices", 8)
        self.segmenter: Optional[BoxSegmenter] = segmenter_option(extra)
        self.loaded = load(checkpoint, llama, eva, self.config, options.device, options.dtype)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.dialect = get_dialect("minigptmed")
        self.max_len = min(
            int(getattr(self.model.lm.config, "max_position_embeddings", 4096)), DEMO_MAX_LENGTH
        )
        self.decoder = Decoder(self.model, False, None, self.max_len)  # dynamic cache, eager
        self._slices: OrderedDict[Tuple[Any, ...], _SliceState] = OrderedDict()
        self._lock = threading.RLock()  # one forward at a time: steps of concurrent chats interleave

    def models(self) -> List[ModelInfo]:
        return [
            ModelInfo(
                engine=self.name,
                model=os.path.basename(self.options.model or "minigpt-med"),
                description="MiniGPT-Med (MiniGPT-v2, LLaMA-2-7B-chat): 2D grounding, region questions, "
                "VQA and reports on the current slice (448x448)",
                capabilities=Capabilities(
                    input="slice2d", boxes=True, masks=self.segmenter is not None, region_input=True
                ),
                licence="MiniGPT-Med code BSD-3-Clause; Llama 2 Community Licence; EVA-CLIP MIT",
                intended_use="research and teaching; not a medical device, not for diagnosis",
            )
        ]

    # ---- per slice --------------------------------------------------------------------------

    def _slice_state(self, ctx: ChatContext) -> _SliceState:
        import torch

        from medmllm.engines.minigptmed.model import image_tensor

        view = ctx.view
        key = (ctx.volume_id, view.orientation, view.index, tuple(view.window) if view.window else None)
        with self._lock:
            state = self._slices.get(key)
            if state is not None:
                self._slices.move_to_end(key)
                return state
            image = export_view(ctx.volume, view.orientation, view.index, view.window)
            head, _ = self.prompt_ids("")
            with torch.no_grad():
                pixels = image_tensor(image.pixels, self.config.image_size)
                embeds = torch.cat((self.model.embed(self._ids(head)), self.model.encode_img(pixels)), dim=1)
                state = _SliceState(image, self.decoder.prefix_cache(embeds), embeds.shape[1])
            self._slices[key] = state
            while len(self._slices) > self.max_slices:
                self._slices.popitem(last=False)
            return state

    # ---- one question -----------------------------------------------------------------------

    def prompt_ids(self, text: str) -> Tuple[List[int], List[int]]:
        """Token ids before and after the image, split and tokenised as `get_context_emb` does:
        the first piece with special tokens (the tokenizer's BOS, then the literal `<s>`)."""
        before, after = PROMPT.format(text).split(IMAGE_SLOT)
        head = list(self.tokenizer(before, add_special_tokens=True)["input_ids"])
        tail = list(self.tokenizer(after, add_special_tokens=False)["input_ids"])
        return head, tail

    def question_text(self, ctx: ChatContext, view: SliceImage) -> Tuple[str, str, List[EngineEvent]]:
        """(text after the image, task, notes): a user ROI as `[identify] ... {<..>}`, a typed task tag
        kept as written, otherwise the dialect's prompt for the kind of question (`classify_question`)."""
        from medmllm.engines.openai import classify_question, target_phrase

        question = " ".join(ctx.question.split())
        if not question and ctx.roi is None:
            raise EngineError("the question is empty")
        notes: List[EngineEvent] = []
        if ctx.roi is not None:
            hit = view.ijk_box_to_fractions(ctx.roi)
            if hit is not None:
                text = TASK_TAG.sub("", question).strip()
                return self.dialect.build_prompt("region", text, region=hit), "region", notes
            notes.append(
                WarningOut(
                    f"the ROI does not cross the {view.orientation} slice {view.index}; asking without it"
                )
            )
            if not question:
                raise EngineError("the question is empty")
        tag = TASK_TAG.match(question)
        if tag:
            grounding = tag.group(1).lower() in ("detection", "refer", "grounding")
            return question, "ground" if grounding else "chat", notes
        task = classify_question(question)
        if task in ("ground", "segment"):
            return self.dialect.build_prompt("ground", target_phrase(question)), task, notes
        if task == "report":
            return self.dialect.build_prompt("report", ""), task, notes
        return self.dialect.build_prompt("chat", question), task, notes

    def _settings(self, ctx: ChatContext) -> Tuple[int, float, float, Any]:
        import torch

        s = sampling_options(self.options.extra or {}, ctx)
        generator = None if s.seed is None else torch.Generator(device=self.model.device).manual_seed(s.seed)
        return s.max_new_tokens, s.temperature, s.top_p, generator

    def _ids(self, ids: List[int]) -> Any:
        import torch

        return torch.tensor([ids], device=self.model.device)

    def chat(self, ctx: ChatContext, cancel: threading.Event) -> Iterator[EngineEvent]:
        import torch

        from medmllm.engines.m3d.generation import IncrementalDetokenizer, pick_token

        if not ctx.question.strip() and ctx.roi is None:
            raise EngineError("the question is empty")
        state = self._slice_state(ctx)
        text, task, notes = self.question_text(ctx, state.view)
        yield from notes
        _, tail = self.prompt_ids(text)
        max_new, temperature, top_p, generator = self._settings(ctx)
        total = state.prefix_len + len(tail)
        if total >= self.max_len:
            raise EngineError(
                f"the prompt is {total} positions (including {self.config.image_tokens} for the image), "
                f"over the {self.max_len} this engine allows; shorten the question"
            )
        max_new = min(max_new, self.max_len - total)
        detok = IncrementalDetokenizer(self.tokenizer)
        parser = self.dialect.parser()
        found = 0
        with self._lock, torch.no_grad():
            cache, position, step = self.decoder.start(
                state.prefix, state.prefix_len, self.model.embed(self._ids(tail))
            )
        for _ in range(max_new):
            if cancel.is_set():
                return
            token = pick_token(step.logits, temperature, top_p, generator)
            if token in self.loaded.eos_ids:
                break
            piece = detok.push(token)
            if piece:
                yield TokenOut(piece)
                for event in self._events(parser.feed(piece), state.view, ctx.volume, task):
                    found += isinstance(event, BoxOut)
                    yield event
            with self._lock:
                step = self.decoder.step(cache, position, token)
            position += 1
        tail_text = detok.flush()
        if tail_text:
            yield TokenOut(tail_text)
        events = (parser.feed(tail_text) if tail_text else []) + parser.finish()
        for event in self._events(events, state.view, ctx.volume, task):
            found += isinstance(event, BoxOut)
            yield event
        if found == 0 and task in ("ground", "segment"):
            yield WarningOut("the model answered without a box; no ROI was made")

    def _events(
        self, events: List[Any], view: SliceImage, volume: Volume, task: str
    ) -> Iterator[EngineEvent]:
        from medmllm.grounding.base import BoxFound

        for event in events:
            if not isinstance(event, BoxFound):
                yield WarningOut(event.message)
                continue
            fractions, problem = _clamp(tuple(event.fractions))
            if problem:
                yield WarningOut(problem)
            if fractions is None:
                continue
            source = {
                "engine": self.name,
                "dialect": "minigptmed",
                "values": list(event.values),
                "fractions": list(fractions),
                "orientation": view.orientation,
                "slice_axis": view.slice_axis,
                "slice_index": view.index,
                "image_size": [self.config.image_size, self.config.image_size],
            }
            label = event.label or "finding"
            box = view.box_to_ijk(fractions)
            yield BoxOut(label, box, source)
            if task == "segment" and self.segmenter is not None:
                yield from _mask(self.segmenter, volume, label, box, view.slice_axis)

    def close(self) -> None:
        with self._lock:
            self._slices.clear()


def _mask(
    segmenter: BoxSegmenter, volume: Volume, label: str, box: IJKBox, slice_axis: int
) -> Iterator[EngineEvent]:
    """The box handed to a 3D box segmenter (MiniGPT-Med itself only draws boxes)."""
    try:
        mask = np.asarray(segmenter.segment(volume, box, slice_axis))
    except SegmenterError as exc:
        yield WarningOut(f"no mask for {label!r}: {exc}")
        return
    if mask.shape != volume.voxels.shape:
        yield WarningOut(f"the segmenter returned a mask shaped {mask.shape}, not {volume.voxels.shape}")
        return
    mask = mask.astype(bool)
    yield MaskOut(label, mask, stats={"voxels": float(mask.sum())})


def export_view(
    volume: Volume, orientation: str, index: Optional[int], window: Optional[Tuple[float, float]]
) -> SliceImage:
    """The slice the user looks at; a slice one pixel thin (a 2D image stored as a volume, seen
    edge-on) cannot be resized to 448x448 meaningfully and is refused."""
    try:
        view = export_slice(volume, orientation, index=index, window=window)
    except VolumeError as exc:
        raise EngineError(str(exc)) from exc
    if min(view.width, view.height) < 2:
        raise EngineError(
            f"the {view.orientation} slice of this volume is {view.width}x{view.height} pixels: the volume "
            "is a single 2D image seen edge-on; ask about it in the view where it is a full image"
        )
    return view
