"""The `m3d` engine: M3D-LaMed answers about a whole volume, with boxes and [SEG] masks in its voxels."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

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
from medmllm.engines.toolkit import flag, int_option, sampling_options
from medmllm.geometry.m3d_grid import MODEL_SHAPE, M3DGrid
from medmllm.geometry.volume import Volume, VolumeError
from medmllm.grounding.base import BoxFound, SegFound

if TYPE_CHECKING:
    from medmllm.engines.m3d.loader import Loaded

# A volume this big (4 GiB as float32) is refused rather than risking the server's memory.
MAX_VOXELS = 1 << 30
TRAINED_CONTEXT = 512  # the official model_max_length
STATIC_CACHE_LEN = 1024
BATCH_SLOTS = 8  # conversations decoded together (one KV row each)


def load_demo_npy(path: str) -> Tuple[Volume, M3DGrid]:
    """The official demo input: a (1, 32, 256, 256) .npy in [0, 1], used as is with identity geometry."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot read {path} as a numpy array: {exc}") from exc
    if array.shape not in ((1, *MODEL_SHAPE), MODEL_SHAPE):
        raise EngineError(f"{path}: the M3D demo input is shaped (1, 32, 256, 256); got {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise EngineError(f"{path}: expected real numbers, got dtype {array.dtype}")
    voxels = np.asarray(array.reshape(MODEL_SHAPE), dtype=np.float32)
    if not np.isfinite(voxels).all() or voxels.min() < 0 or voxels.max() > 1:
        raise EngineError(f"{path}: values must lie in [0, 1] (min-max normalised, as M3D expects)")
    return Volume.from_array(voxels, np.eye(4)), M3DGrid.from_identity()


@dataclass
class _VolumeState:
    image: Any  # (1, 1, 32, 256, 256) tensor on the model device
    grid: M3DGrid
    prefix: Any  # KV cache of BOS + image features (read-only)
    seg_embedding: Any = None  # SegVol image embedding, computed at the first [SEG]


def prompt_ids(loaded: Loaded, text: str, n: int) -> List[int]:
    """Token ids exactly as the official pipeline makes them: `tokenizer("<im_patch>" * 256 +
    question)`, nothing added (`text` is that string). The model overwrites positions 1..n with the
    image and keeps whatever the tokenizer put at 0: BOS where it adds one (Llama-2), else an
    <im_patch> (Phi-3), and then the question's first token, at n, is overwritten too, as in
    training (LaMed lamed_arch.py `prepare_inputs_for_multimodal`). Checked: that layout, and no
    <im_patch> in the question."""
    patch = loaded.im_patch_id
    ids = list(loaded.tokenizer(text)["input_ids"])
    if ids[:1] != [loaded.prefix_id] or ids[1:n] != [patch] * (n - 1) or patch in ids[n + 1 :]:
        raise EngineError(
            "the tokenizer did not turn the prompt into its first token + 256 <im_patch> tokens "
            "+ the question; wrong tokenizer, or <im_patch> in the question?"
        )
    if len(ids) <= n + 1:
        raise EngineError("the question is empty")
    return ids


class M3DEngine(Engine):
    """M3D-LaMed (Phi-3-4B or Llama-2-7B) from the official checkpoint folder, loaded by our own code."""

    name = "m3d"
    read_demo_input = staticmethod(load_demo_npy)
    # chat() may be called from several threads at once: they are decoded together (batching.py).

    def __init__(self, options: EngineOptions, loaded: Optional[Loaded] = None) -> None:
        """`loaded` lets the benchmark hand in a model built in memory; normally the folder is read."""
        super().__init__(options)
        from medmllm.engines.m3d.batching import Scheduler
        from medmllm.engines.m3d.generation import Decoder
        from medmllm.engines.m3d.loader import load
        from medmllm.grounding.registry import get_dialect

        if loaded is None and not options.model:
            raise EngineError("the m3d engine needs --model PATH (an M3D-LaMed checkpoint folder)")
        self.loaded = loaded or load(options.model, options.device, options.dtype)
        self.model = self.loaded.model
        self.config = self.loaded.config
        self.dialect = get_dialect("m3d")
        extra = options.extra or {}
        self.max_len = self.config.context_length
        on_cuda = self.model.device.type == "cuda"
        static = flag(extra.get("static_cache", on_cuda))
        self.static_len = min(self.max_len, int_option(extra, "static_cache_len", STATIC_CACHE_LEN, 1))
        compiled = {"mode": "reduce-overhead"} if on_cuda and flag(extra.get("compile", True)) else None
        self.decoder = Decoder(self.model, static, compiled, self.static_len)
        self.dynamic = Decoder(self.model, False, None, self.max_len)
        slots = int_option(extra, "batch_slots", BATCH_SLOTS, 0)  # 0: no batched decoding
        if slots:
            self._check_slot_memory(slots)
        # The scheduler thread runs every forward; batched steps compile like the batch-1 step.
        self.scheduler = Scheduler(
            self.model, self.dynamic, slots, self.static_len, self.loaded.eos_ids, compiled
        )
        if compiled and slots:
            self.scheduler.call(self.scheduler.warm_up)  # compile at start-up, not at a user's question
        self.window = extra.get("window")
        self.max_volumes = int_option(extra, "max_volumes", 4, 1)
        self._volumes: OrderedDict[str, _VolumeState] = OrderedDict()
        self._lock = threading.Lock()  # guards the per-volume states, never held during a forward

    def max_concurrent_chats(self) -> int:
        return max(1, self.scheduler.slots)

    def _check_slot_memory(self, slots: int) -> None:
        """The batched KV cache is allocated up front; refuse clearly if it cannot fit."""
        from medmllm.engines.m3d.batching import SlotCache
        from medmllm.engines.m3d.loader import available_bytes

        needed = SlotCache.nbytes(self.model.lm.config, slots, self.static_len, self.model.dtype)
        free = available_bytes(str(self.model.device))
        if needed > free:
            raise EngineError(
                f"the batched KV cache ({slots} conversations x {self.static_len} tokens) needs "
                f"{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free; "
                "lower the batch_slots or static_cache_len option"
            )

    def models(self) -> List[ModelInfo]:
        family = {"phi3": "Phi-3-4B", "llama": "Llama-2-7B"}[self.config.family]
        return [
            ModelInfo(
                engine=self.name,
                model=os.path.basename(os.path.normpath(self.options.model or "")),
                description=f"M3D-LaMed-{family}: 3D CT report, VQA, boxes and [SEG] masks",
                capabilities=Capabilities(
                    input="volume3d", boxes=True, masks=self.config.seg_enabled, region_input=True
                ),
                licence="M3D: Apache-2.0 (model card); the base LLM licence (Phi-3 MIT / Llama 2) applies",
                intended_use="research and teaching on CT; not a medical device, not for diagnosis",
            )
        ]

    def close(self) -> None:
        """Drop per-volume caches and free GPU memory held by the allocator."""
        import torch

        self.scheduler.close()
        with self._lock:
            self._volumes.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- per volume -------------------------------------------------------------------------

    def prepare(self, volume: Volume, volume_id: str, grid: Optional[M3DGrid] = None) -> None:
        """Preprocess, run the vision tower and the prefix prefill once; `grid` only for demo .npy input."""
        self._volume_state(volume, volume_id, grid)

    def _volume_state(self, volume: Volume, volume_id: str, grid: Optional[M3DGrid] = None) -> _VolumeState:
        with self._lock:
            state = self._volumes.get(volume_id)
            if state is not None:
                self._volumes.move_to_end(volume_id)
                return state
        image, grid = self._model_input(volume, grid)
        state = self.scheduler.call(self._encode, image, grid)
        with self._lock:
            state = self._volumes.setdefault(volume_id, state)
            self._volumes.move_to_end(volume_id)
            while len(self._volumes) > self.max_volumes:
                self._volumes.popitem(last=False)
            return state

    def _encode(self, image: np.ndarray, grid: M3DGrid) -> _VolumeState:
        """Vision tower, projector and prefix prefill (on the decode thread)."""
        import torch

        with torch.no_grad():
            tensor = self.model.image_tensor(image)
            prefix = self.model.prefix_embeds(self.loaded.prefix_id, self.model.image_features(tensor))
            return _VolumeState(tensor, grid, self.dynamic.prefix_cache(prefix))

    def _model_input(self, volume: Volume, grid: Optional[M3DGrid]) -> Tuple[np.ndarray, M3DGrid]:
        if volume.voxels.size > MAX_VOXELS:
            raise EngineError(
                f"volume of {volume.voxels.size:,} voxels is too large for the m3d engine "
                f"(limit {MAX_VOXELS:,}); "
                "crop or downsample it first"
            )
        if grid is not None:
            if tuple(volume.shape) != tuple(grid.model_shape) or grid.crop_size != grid.model_shape:
                raise EngineError("an identity grid needs a volume already shaped (32, 256, 256)")
            return np.asarray(volume.voxels, dtype=np.float32), grid
        try:
            return M3DGrid.prepare(volume, self.window)
        except VolumeError as exc:
            raise EngineError(f"cannot prepare the volume for M3D-LaMed: {exc}") from exc

    # ---- one question -----------------------------------------------------------------------

    def prompt_ids(self, question: str) -> List[int]:
        return prompt_ids(self.loaded, self.dialect.image_prompt(question), self.config.num_image_tokens)

    def question_text(self, ctx: ChatContext, state: _VolumeState) -> str:
        """The last user turn (M3D is single-turn), with a user ROI written as the official box text."""
        question = ctx.question.strip()
        if not question:
            raise EngineError("the question is empty")
        if ctx.roi is None:
            return question
        try:
            box = self.dialect.format_region(state.grid.ijk_box_to_fractions(ctx.roi))
        except VolumeError as exc:
            raise EngineError(f"the region cannot be given to M3D-LaMed: {exc}") from exc
        if "<region>" in question:
            return question.replace("<region>", box)
        return f"{question} (the box {box})"

    def _settings(self, ctx: ChatContext) -> Tuple[int, float, float, Any]:
        import torch

        s = sampling_options(self.options.extra or {}, ctx)
        generator = None
        if s.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(s.seed)
        return s.max_new_tokens, s.temperature, s.top_p, generator

    def chat(self, ctx: ChatContext, cancel: threading.Event) -> Iterator[EngineEvent]:
        from medmllm.engines.m3d.batching import Request
        from medmllm.engines.m3d.generation import IncrementalDetokenizer

        state = self._volume_state(ctx.volume, ctx.volume_id)
        ids = self.prompt_ids(self.question_text(ctx, state))
        max_new, temperature, top_p, generator = self._settings(ctx)
        prefix_len = self.config.num_image_tokens + 1
        if len(ids) >= self.max_len:
            raise EngineError(
                f"the question is {len(ids) - prefix_len} tokens; with the {prefix_len} BOS/image tokens "
                f"it exceeds the model's context of {self.max_len} tokens; shorten it"
            )
        if len(ids) > TRAINED_CONTEXT:
            yield WarningOut(
                f"the prompt is {len(ids)} tokens, longer than the {TRAINED_CONTEXT} M3D was trained on"
            )
        max_new = min(max_new, self.max_len - len(ids))
        request = Request(
            state.prefix,
            prefix_len,
            ids[prefix_len:],
            max_new,
            temperature,
            top_p,
            generator,
            cancel,
            frozenset({self.config.seg_token_id}),
            self._solo_decoder(len(ids) + max_new),
        )
        detok = IncrementalDetokenizer(self.loaded.tokenizer)
        parser = self.dialect.parser()
        seg_hidden: List[Any] = []
        for token, hidden in self.scheduler.submit(request):
            if cancel.is_set():
                return
            if hidden is not None:
                seg_hidden.append(hidden)
            text = detok.push(token)
            if text:
                yield TokenOut(text)
                yield from self._events(parser.feed(text), state, ctx, seg_hidden)
        if cancel.is_set():
            return
        tail = detok.flush()
        if tail:
            yield TokenOut(tail)
        events = (parser.feed(tail) if tail else []) + parser.finish()
        yield from self._events(events, state, ctx, seg_hidden)

    def _solo_decoder(self, length: int) -> Any:
        """None (batched) when the answer fits a slot; else the decoder it runs alone on."""
        if length > self.static_len:
            return self.dynamic
        return None if self.scheduler.slots else self.decoder

    def _seg_logits(self, state: _VolumeState, hidden: Any) -> np.ndarray:
        """SegVol mask logits on the model grid (on the decode thread; the encoder once per volume)."""
        import torch

        with torch.no_grad():
            if state.seg_embedding is None:
                state.seg_embedding = self.model.seg_embedding(state.image)
            return self.model.seg_logits(state.seg_embedding, hidden).cpu().numpy()

    def _events(
        self, events: List[Any], state: _VolumeState, ctx: ChatContext, seg_hidden: List[Any]
    ) -> Iterator[EngineEvent]:
        for event in events:
            if isinstance(event, BoxFound):
                try:
                    box = state.grid.box_to_ijk(event.fractions)
                except VolumeError as exc:
                    yield WarningOut(f"box {list(event.values)} ignored: {exc}")
                    continue
                source = {"values": list(event.values), "fractions": list(event.fractions), "grid": "m3d"}
                yield BoxOut(event.label or "box", box, source)
            elif isinstance(event, SegFound):
                yield from self._mask(event.label, state, ctx, seg_hidden)
            else:
                yield WarningOut(event.message)

    def _mask(
        self, label: Optional[str], state: _VolumeState, ctx: ChatContext, seg_hidden: List[Any]
    ) -> Iterator[EngineEvent]:
        if not self.config.seg_enabled:
            yield WarningOut("this checkpoint has no segmentation module; [SEG] ignored")
            return
        if not seg_hidden:
            yield WarningOut("the model wrote [SEG] as plain text, not as its [SEG] token; no mask")
            return
        logits = self.scheduler.call(self._seg_logits, state, seg_hidden.pop(0))
        mask = state.grid.mask_to_volume(logits, logits=True)
        if mask.shape != ctx.volume.shape:
            raise EngineError("internal: mask shape differs from the volume")
        stats: Dict[str, float] = {"voxels": float(mask.sum())}
        yield MaskOut(label or "segmentation", mask, stats=stats)
