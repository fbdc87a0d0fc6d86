"""Engine `openai`: 2D grounding through any OpenAI-compatible server (vLLM, SGLang, Ollama, ...).

The server holds the model (MedRegA, Lingshu, Qwen2.5-VL, MedGemma, a MiniGPT-Med shim); this
engine only decides what the model sees and what its answer means. It exports the slice the user
looks at as a windowed PNG sized the way the model family expects, asks in that family's prompt
conventions (the dialect's `build_prompt`), streams the answer, parses boxes with the dialect
while text arrives, and maps each box back through the exported slice to an IJK box one slice
thick. Questions that ask for a mask also run a box -> 3D segmenter (`medmllm.segmenters`).

Options (EngineOptions): `base_url` (required; `/v1` is appended when the URL has no path),
`model` (default: the only model the server lists), `api_key`, `dialect` (default: guessed from
the served model's name once it is known), and in `extra`: `max_images` (slices sent for report
questions, default 1), `segmenter` (default `region-growing`; `none` turns masks off), `timeout`
(s, default 120), `max_retries` (default 1), `system_prompt`.

Dialects whose box markup are tokenizer special tokens (`Dialect.special_markup`, MedRegA's
`<ref>`/`<box>`) are asked for with `skip_special_tokens: false` (a vLLM/SGLang sampling field,
sent as an extra body field); a server that rejects the field is asked again without it, and the
parser reads the bare `label[[...]]` form such servers print.
"""

from __future__ import annotations

import base64
import importlib
import io
import queue
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from medmllm.client import error_detail
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
from medmllm.engines.toolkit import int_option, seconds_option, segmenter_option
from medmllm.geometry.slices import CT_SOFT_TISSUE, SliceImage, default_window_limits, export_slice
from medmllm.geometry.volume import VolumeError, window_limits
from medmllm.grounding.base import BoxFound, ParseWarning
from medmllm.grounding.images import ImagePolicy
from medmllm.grounding.registry import dialect_for_model, get_dialect, slice_dialect_names
from medmllm.segmenters import BoxSegmenter, SegmenterError

if TYPE_CHECKING:
    from medmllm.geometry.boxes import IJKBox
    from medmllm.geometry.volume import Volume

Fractions = Tuple[float, float, float, float]

# Question -> task, checked in this order (English and Chinese keywords).
_TASK_PATTERNS = (
    ("segment", re.compile(r"\b(segment\w*|mask|outline|contour\w*|delineat\w*)\b|分割|勾画", re.IGNORECASE)),
    (
        "ground",
        re.compile(
            r"\b(where|locate|locali[sz]e|find|detect|box(es)?|bounding|show\s+me)\b|定位|在哪|找到|检测",
            re.I,
        ),
    ),
    (
        "report",
        re.compile(r"\b(report|describe|description|findings|impression|summari[sz]e)\b|报告|描述", re.I),
    ),
)

# Question wording around the thing to ground (English and Chinese), removed by `target_phrase`.
_LEAD = re.compile(
    r"^(please\s+|can you\s+|could you\s+|would you\s+|请)*"
    r"(where\s+(is|are)|locate|locali[sz]e|find|detect|segment|outline|delineate|mask|contour|"
    r"draw\s+a\s+box\s+around|box|show\s+me|show|give\s+me\s+the\s+location\s+of|定位|分割|找到|检测)\s*",
    re.IGNORECASE,
)
_TAIL = re.compile(r"(\s+(in|on)\s+(this|the)\s+(image|slice|scan|ct|mri|picture|view)\b.*|在哪里?.*)$", re.I)


def classify_question(question: str) -> str:
    """`segment`, `ground`, `report` or `chat`: decides the prompt form and whether masks are made."""
    return next((task for task, pattern in _TASK_PATTERNS if pattern.search(question)), "chat")


def target_phrase(question: str) -> str:
    """What to ground in a question ("Where is the left kidney?" -> "left kidney"); the whole
    question when no pattern fits, because the grounding prompts want a phrase, not a sentence."""
    text = _LEAD.sub("", question.strip())
    text = _TAIL.sub("", text)
    text = re.sub(r"^(the|a|an|all)\s+", "", text.strip(), flags=re.I).strip(" ?.!？。")
    return text or question.strip()


def _clamp_box(fractions: Fractions) -> Tuple[Optional[Fractions], Optional[str]]:
    """Clamp to the slice; (None, reason) when nothing of the box is left on it."""
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in fractions)
    if x1 <= x0 or y1 <= y0:
        return None, f"box {tuple(round(v, 3) for v in fractions)} lies outside the slice; dropped"
    clamped = (x0, y0, x1, y1)
    if clamped != tuple(fractions):
        return clamped, f"box {tuple(round(v, 3) for v in fractions)} reaches outside the slice; clamped"
    return clamped, None


@dataclass(frozen=True)
class SentImage:
    """The PNG one model saw and where the slice sits in it (padding makes them differ)."""

    png: bytes
    size: Tuple[int, int]  # (width, height) of the PNG: what pixel-based dialects measure in
    content: Tuple[float, float, float, float]  # slice extent in the PNG as fractions (x0, y0, x1, y1)

    @property
    def data_url(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    def to_slice(self, fractions: Fractions) -> Fractions:
        """Fractions of the sent image -> fractions of the exported slice."""
        cx0, cy0, cx1, cy1 = self.content
        x0, y0, x1, y1 = fractions
        w, h = cx1 - cx0, cy1 - cy0
        return ((x0 - cx0) / w, (y0 - cy0) / h, (x1 - cx0) / w, (y1 - cy0) / h)

    def from_slice(self, fractions: Fractions) -> Fractions:
        """Fractions of the exported slice -> fractions of the sent image (region-to-text)."""
        cx0, cy0, cx1, cy1 = self.content
        x0, y0, x1, y1 = fractions
        w, h = cx1 - cx0, cy1 - cy0
        return (cx0 + x0 * w, cy0 + y0 * h, cx0 + x1 * w, cy0 + y1 * h)


def prepare_image(pixels: np.ndarray, policy: ImagePolicy) -> SentImage:
    """The slice (gray [rows, cols] or RGB [rows, cols, 3] uint8) as the PNG the dialect's
    `ImagePolicy` asks for: centred on a black square first if it pads, then resized (bicubic) to
    its size rule; `content` remembers where the slice went."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    cols, rows = picture.size
    content = (0.0, 0.0, 1.0, 1.0)
    if policy.pad_square:
        square = max(rows, cols)
        left, top = (square - cols) // 2, (square - rows) // 2
        canvas = Image.new(picture.mode, (square, square), 0)
        canvas.paste(picture, (left, top))
        picture = canvas
        content = (left / square, top / square, (left + cols) / square, (top + rows) / square)
    size = policy.size(*picture.size)
    if size != picture.size:
        picture = picture.resize(size, Image.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return SentImage(buffer.getvalue(), size, content)


def windowed_ct_image(volume: Volume, view: SliceImage, policy: ImagePolicy) -> SentImage:
    """A CT slice as RGB of the policy's HU windows (one per channel), then the policy's picture."""
    channels = [_export(volume, view.orientation, view.index, window).pixels for window in policy.ct_windows]
    return prepare_image(np.stack(channels, axis=-1), policy)


def _is_ct(volume: Volume) -> bool:
    """The same rule the slice export uses to pick a CT window (Hounsfield units below -500)."""
    return default_window_limits(volume) == window_limits(CT_SOFT_TISSUE)


def _sdk() -> Any:
    try:
        import openai
    except ImportError as exc:
        raise EngineError("engine 'openai' needs the openai package: pip install 'openai>=1.55.3'") from exc
    return openai


def _transport_errors() -> Tuple[type, ...]:
    """Errors of the SDK's HTTP library (httpx, or httpx2 in newer SDKs) raised while a stream is read."""
    errors: List[type] = []
    for name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        errors += [module.HTTPError, module.StreamError]
    return tuple(errors)


def _pump(stream: Any, chunks: queue.Queue) -> None:
    """Read the stream in its own thread, so a cancel never waits for a silent server: a blocked
    socket read cannot be interrupted, but the generator can stop waiting for it."""
    try:
        for chunk in stream:
            chunks.put(("chunk", chunk))
        chunks.put(("end", None))
    except Exception as exc:
        chunks.put(("error", exc))


def _with_api_path(base_url: str) -> str:
    """OpenAI-compatible servers live under /v1; accept `http://host:8000` as well."""
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EngineError(
            f"--base-url must be an http(s) URL such as http://localhost:8000/v1, got {base_url!r}"
        )
    if parts.path in ("", "/"):
        parts = parts._replace(path="/v1")
    return urlunsplit(parts)


def _error_text(exc: Any) -> str:
    """The server's own words: the SDK keeps the decoded error body (OpenAI, FastAPI or plain text)."""
    body = getattr(exc, "body", None)
    if body not in (None, "", {}):
        return error_detail(body)
    return str(getattr(exc, "message", exc))


def _is_timeout(exc: Exception) -> bool:
    """The SDK's timeout, or its HTTP library's (ReadTimeout, ...) raised while a stream is read."""
    return isinstance(exc, _sdk().APITimeoutError) or type(exc).__name__.endswith("Timeout")


def _explain(exc: Exception, url: str, model: str, timeout: float) -> EngineError:
    """Turn an SDK exception into one sentence the user can act on."""
    openai = _sdk()

    if _is_timeout(exc):
        return EngineError(
            f"the model server at {url} did not answer within {timeout:g} s (busy, or still loading the "
            "model); try again or raise the timeout (extra option 'timeout')"
        )
    if isinstance(exc, openai.APIConnectionError):
        return EngineError(
            f"no model server at {url}: is it running and is the URL right? ({exc.__cause__ or exc})"
        )
    if isinstance(exc, openai.AuthenticationError):
        return EngineError(f"the model server at {url} rejected the API key (401): check --api-key")
    if isinstance(exc, openai.PermissionDeniedError):
        return EngineError(f"the model server at {url} refused access (403): {_error_text(exc)}")
    if isinstance(exc, openai.NotFoundError):
        return EngineError(f"the model server at {url} has no model {model!r} (404): {_error_text(exc)}")
    text = _error_text(exc)
    if isinstance(exc, openai.APIStatusError):
        hint = ""
        if re.search(r"multimodal|image|vision", text, re.IGNORECASE):
            hint = (
                "; this model does not take images: serve a vision-language one (docs/openai-compatible.md)"
            )
        return EngineError(f"the model server refused the request ({exc.status_code}): {text}{hint}")
    if isinstance(exc, openai.OpenAIError):
        return EngineError(f"the model server failed: {text}")
    return EngineError(f"the model server at {url} broke off the answer: {type(exc).__name__}: {exc}")


class OpenAIEngine(Engine):
    """A vision-language model behind an OpenAI-compatible `/v1/chat/completions`."""

    name = "openai"

    def __init__(self, options: EngineOptions) -> None:
        super().__init__(options)
        if not options.base_url:
            raise EngineError(
                "engine 'openai' needs --base-url, e.g. http://localhost:8000/v1 (a vLLM server)"
            )
        self.base_url = _with_api_path(options.base_url)
        self._use_dialect(options.dialect or dialect_for_model(options.model))
        extra = options.extra
        self.max_images = int_option(extra, "max_images", 1)
        self.timeout = seconds_option(extra, "timeout", 120.0)
        self.max_retries = int_option(extra, "max_retries", 1, minimum=0)
        self._system_prompt: Optional[str] = extra.get("system_prompt")
        self.segmenter: Optional[BoxSegmenter] = segmenter_option(extra)
        self._model = options.model
        self._served: Optional[str] = None  # the model name, once the server confirmed it
        self._keep_special: Optional[bool] = None  # whether the server takes skip_special_tokens
        self._client: Any = None

    def _use_dialect(self, name: str) -> None:
        try:
            dialect = get_dialect(name)
        except ValueError as exc:
            raise EngineError(str(exc)) from exc
        if dialect.image is None:
            raise EngineError(
                f"dialect {name!r} is for a model that reads whole volumes, not pictures; choose one of "
                f"{', '.join(slice_dialect_names())}"
            )
        self.dialect, self.dialect_name, self.image = dialect, name, dialect.image

    @property
    def system_prompt(self) -> Optional[str]:
        """The user's, else the one the dialect says the served model was trained with."""
        if self._system_prompt is None:
            return self.dialect.system_prompt(self._served or self._model or "")
        return self._system_prompt

    def models(self) -> List[ModelInfo]:
        grounding = "ground" in self.dialect.tasks
        return [
            ModelInfo(
                engine=self.name,
                model=self._served or self._model or f"(the model served at {self.base_url})",
                description=f"OpenAI-compatible server at {self.base_url}, {self.dialect_name} box grammar",
                capabilities=Capabilities(
                    input="slice2d",
                    boxes=grounding,
                    masks=grounding and self.segmenter is not None,
                    region_input=grounding,
                    languages=self.dialect.languages,
                ),
                licence="that of the served model (see its model card); this engine adds no weights",
                intended_use="research and teaching; not for diagnosis",
            )
        ]

    def _connect(self) -> Any:
        if self._client is None:
            self._client = _sdk().OpenAI(
                base_url=self.base_url,
                api_key=self.options.api_key or "EMPTY",
                timeout=self.timeout,
                max_retries=self.max_retries,
            )
        return self._client

    def prepare(self, volume: Volume, volume_id: str) -> None:
        """Reach the server before the first question: a wrong URL, key or model name fails here."""
        self._resolve()

    def _resolve(self) -> str:
        """The served model (asked once), and the dialect and system prompt its name implies when
        the user chose none: a model learned from the server is as good as one given."""
        if self._served is None:
            self._served = self._served_model()
            if self.options.dialect is None:
                self._use_dialect(dialect_for_model(self._served))
        return self._served

    def _served_model(self) -> str:
        openai = _sdk()
        try:
            served = [m.id for m in self._connect().models.list()]
        except openai.NotFoundError:
            if self._model is None:
                raise EngineError(
                    f"the server at {self.base_url} does not list its models: give --model"
                ) from None
            return self._model  # some servers have no /models: trust the name given
        except openai.OpenAIError as exc:
            raise _explain(exc, self.base_url, self._model or "?", self.timeout) from exc
        listing = ", ".join(served) or "none"
        if self._model is None:
            if len(served) != 1:
                raise EngineError(f"the server at {self.base_url} serves {listing}: choose one with --model")
            return served[0]
        if self._model not in served:
            raise EngineError(
                f"the server at {self.base_url} serves {listing}, not {self._model!r}: "
                "fix --model or leave it out"
            )
        return self._model

    def chat(self, ctx: ChatContext, cancel: threading.Event) -> Iterator[EngineEvent]:
        self._resolve()
        task = classify_question(ctx.question)
        view = _export(ctx.volume, ctx.view.orientation, ctx.view.index, ctx.view.window)
        first = self._picture(ctx.volume, view, ctx.view.window)
        region = None
        if ctx.roi is not None:
            hit = view.ijk_box_to_fractions(ctx.roi)
            if "region" not in self.dialect.tasks:
                yield WarningOut(
                    f"the {self.dialect_name} dialect cannot take a region; asking without the ROI"
                )
            elif hit is None:
                yield WarningOut(
                    f"the ROI does not cross the {view.orientation} slice {view.index}; asking without it"
                )
            else:
                region = first.from_slice(tuple(hit))
        slices, sent = [view], [first]
        if task == "report" and region is None and self.max_images > 1:
            slices = self._spread(ctx.volume, view, ctx.view.window)
            sent = [self._picture(ctx.volume, s, ctx.view.window) for s in slices]
        prompt = self._prompt(task, ctx.question, region, sent[0].size)
        messages = self._messages(ctx, slices, sent, prompt)
        yield from self._answer(ctx, cancel, task, messages, view if len(slices) == 1 else None, sent[0])

    def _picture(self, volume: Volume, view: SliceImage, window: Optional[Tuple[float, float]]) -> SentImage:
        """The PNG for one slice: a CT as RGB of the dialect's windows, if it has any and the user set
        no window of their own; otherwise the viewer's gray picture."""
        if self.image.ct_windows and window is None and _is_ct(volume):
            return windowed_ct_image(volume, view, self.image)
        return prepare_image(view.pixels, self.image)

    def _spread(
        self, volume: Volume, view: SliceImage, window: Optional[Tuple[float, float]]
    ) -> List[SliceImage]:
        """Evenly spaced slices through the volume (bin centres) for whole-volume questions."""
        count = volume.voxels.shape[2 - view.slice_axis]
        n = min(self.max_images, count)
        indices = sorted({int((b + 0.5) * count / n) for b in range(n)})
        return [_export(volume, view.orientation, index, window) for index in indices]

    def _prompt(
        self, task: str, question: str, region: Optional[Fractions], image_size: Tuple[int, int]
    ) -> str:
        """The dialect's own prompt: a region question when there is a region, the target phrase for
        grounding (a 2D model cannot segment: it grounds, and the segmenter makes the mask)."""
        if region is not None:
            prompt_task, text = "region", question
        elif task in ("ground", "segment") and "ground" in self.dialect.tasks:
            prompt_task, text = "ground", target_phrase(question)
        else:
            prompt_task, text = ("report" if task == "report" else "chat"), question
        try:
            return self.dialect.build_prompt(prompt_task, text, region=region, image_size=image_size)
        except ValueError as exc:
            raise EngineError(f"cannot phrase this question for {self.dialect_name}: {exc}") from exc

    def _messages(
        self, ctx: ChatContext, slices: List[SliceImage], sent: List[SentImage], prompt: str
    ) -> List[Dict[str, Any]]:
        messages: List[Dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.extend({"role": turn.role, "content": turn.content} for turn in ctx.messages[:-1])
        content: List[Dict[str, Any]] = []
        for image, picture in zip(slices, sent):
            if len(slices) > 1:
                content.append({"type": "text", "text": f"{image.orientation} slice {image.index}:"})
            content.append({"type": "image_url", "image_url": {"url": picture.data_url}})
        content.append({"type": "text", "text": prompt})
        messages.append({"role": "user", "content": content})
        return messages

    def _answer(
        self,
        ctx: ChatContext,
        cancel: threading.Event,
        task: str,
        messages: List[Dict[str, Any]],
        view: Optional[SliceImage],
        sent: SentImage,
    ) -> Iterator[EngineEvent]:
        parser = self.dialect.parser(image_size=sent.size)
        found = 0
        for delta in self._stream(ctx, cancel, messages):
            yield TokenOut(delta)
            for event in parser.feed(delta):
                found += isinstance(event, BoxFound)
                yield from self._handle(ctx, event, view, sent, task)
        if cancel.is_set():
            return
        for event in parser.finish():
            found += isinstance(event, BoxFound)
            yield from self._handle(ctx, event, view, sent, task)
        if found == 0 and task in ("ground", "segment") and "ground" in self.dialect.tasks:
            yield WarningOut(f"the model answered without a {self.dialect_name} box; no ROI was made")

    def _stream(
        self, ctx: ChatContext, cancel: threading.Event, messages: List[Dict[str, Any]]
    ) -> Iterator[str]:
        model = self._resolve()
        stream = self._open_stream(model, messages, ctx)
        chunks: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(stream, chunks), daemon=True).start()
        received, finished = 0, False
        try:
            while not cancel.is_set():
                try:
                    kind, item = chunks.get(timeout=0.05)
                except queue.Empty:
                    continue
                if cancel.is_set():
                    return
                if kind == "end":
                    if not finished:  # every chat stream ends with a finish_reason; a cut one does not
                        raise self._broke_off(received, "the stream ended without a finish reason")
                    return
                if kind == "error":
                    raise self._stream_error(item, received, model)
                for choice in item.choices:
                    finished = finished or choice.finish_reason is not None
                    if choice.delta is not None and choice.delta.content:
                        received += len(choice.delta.content)
                        yield choice.delta.content
        finally:
            stream.close()

    def _open_stream(self, model: str, messages: List[Dict[str, Any]], ctx: ChatContext) -> Any:
        """Start the answer; ask to keep special-token markup where the dialect needs it, and ask
        again without that field if the server refuses it (OpenAI itself answers 400
        "Unrecognized request argument supplied")."""
        openai = _sdk()
        keep = self.dialect.special_markup and self._keep_special is not False
        request = {
            "model": model,
            "messages": messages,
            "stream": True,
            "max_tokens": ctx.max_new_tokens,
            "temperature": ctx.temperature,
        }
        try:
            try:
                stream = self._connect().chat.completions.create(
                    **request, extra_body={"skip_special_tokens": False} if keep else None
                )
            except (openai.BadRequestError, openai.UnprocessableEntityError):
                if not keep:
                    raise
                self._keep_special = False
                return self._connect().chat.completions.create(**request)
        except openai.OpenAIError as exc:
            raise _explain(exc, self.base_url, model, self.timeout) from exc
        if keep:
            self._keep_special = True
        return stream

    def _stream_error(self, exc: Exception, received: int, model: str) -> EngineError:
        """What went wrong while the answer streamed; after the first words it is a broken-off
        answer (the text so far stays in the conversation), not a missing server."""
        openai = _sdk()
        if not isinstance(exc, (openai.OpenAIError, *_transport_errors())):
            return EngineError(
                f"the server at {self.base_url} sent something that is not an OpenAI chat "
                f"stream: {type(exc).__name__}: {exc}"
            )
        if received and not _is_timeout(exc):
            return self._broke_off(received, f"{type(exc).__name__}: {exc}")
        return _explain(exc, self.base_url, model, self.timeout)

    def _broke_off(self, received: int, why: str) -> EngineError:
        return EngineError(
            f"the model server at {self.base_url} broke off the answer after {received} characters "
            f"({why}); the partial answer is kept"
        )

    def _handle(
        self, ctx: ChatContext, event: Any, view: Optional[SliceImage], sent: SentImage, task: str
    ) -> Iterator[EngineEvent]:
        if isinstance(event, ParseWarning):
            yield WarningOut(event.message)
            return
        if not isinstance(event, BoxFound):
            return
        if view is None:
            yield WarningOut("a box in an answer about several slices cannot be placed; ask about one slice")
            return
        fractions, problem = _clamp_box(sent.to_slice(tuple(event.fractions)))
        if problem:
            yield WarningOut(problem)
        if fractions is None:
            return
        label = event.label or "finding"
        box = view.box_to_ijk(fractions)
        source = {
            "engine": self.name,
            "dialect": self.dialect_name,
            "values": list(event.values),
            "fractions": list(fractions),
            "orientation": view.orientation,
            "slice_axis": view.slice_axis,
            "slice_index": view.index,
            "image_size": list(sent.size),
        }
        yield BoxOut(label, box, source)
        if task == "segment" and self.segmenter is not None:
            yield from self._mask(ctx.volume, label, box, view.slice_axis)

    def _mask(self, volume: Volume, label: str, box: IJKBox, slice_axis: int) -> Iterator[EngineEvent]:
        try:
            mask = np.asarray(self.segmenter.segment(volume, box, slice_axis))
        except SegmenterError as exc:
            yield WarningOut(f"no mask for {label!r}: {exc}")
            return
        if mask.shape != volume.voxels.shape:
            name = getattr(self.segmenter, "name", type(self.segmenter).__name__)
            yield WarningOut(
                f"segmenter {name!r} returned a mask shaped {mask.shape}, not {volume.voxels.shape}"
            )
            return
        mask = mask.astype(bool)
        yield MaskOut(label, mask, stats={"voxels": float(mask.sum())})

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _export(
    volume: Volume, orientation: str, index: Optional[int], window: Optional[Tuple[float, float]]
) -> SliceImage:
    try:
        return export_slice(volume, orientation, index=index, window=window)
    except VolumeError as exc:
        raise EngineError(str(exc)) from exc


ENGINE = OpenAIEngine
