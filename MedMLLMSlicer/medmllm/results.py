"""Engine events -> the JSON events of the API and the files a user opens in Slicer.

Shared by the server (one result folder per answer, files served over HTTP) and `medmllm ask`
(files written into --out), so a box or mask means exactly the same thing in both: boxes become
RAS ROIs and `.mrk.json` files, masks become segments of one `segmentation.seg.nrrd` in the
original volume's geometry. Engines only speak IJK; this module is where RAS appears.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import quote

import numpy as np

from medmllm.atomic import write_atomic
from medmllm.engines.base import (
    BoxOut,
    ChatContext,
    ChatTurn,
    Engine,
    EngineError,
    EngineEvent,
    MaskOut,
    ReportOut,
    TokenOut,
    WarningOut,
)
from medmllm.geometry.transforms import voxel_volume_mm3
from medmllm.preview import write_preview

if TYPE_CHECKING:
    from medmllm.geometry.boxes import IJKBox, RoiRAS
    from medmllm.geometry.volume import Volume

log = logging.getLogger("medmllm.results")

SEGMENTATION_FILE = "segmentation.seg.nrrd"
PALETTE = (
    (0.90, 0.30, 0.25),
    (0.25, 0.60, 0.90),
    (0.30, 0.80, 0.35),
    (0.95, 0.75, 0.20),
    (0.70, 0.40, 0.85),
    (0.20, 0.80, 0.80),
)


def roi_json(roi: RoiRAS) -> Dict[str, Any]:
    return {
        "center": [float(v) for v in roi.center],
        "size": [float(v) for v in roi.size],
        "axes": np.asarray(roi.axes, dtype=float).tolist(),
    }


def box_json(box: IJKBox, ijk_to_ras: np.ndarray) -> Dict[str, Any]:
    """An IJK box with its inclusive voxel range and its RAS ROI."""
    lo, hi = box.voxel_range()
    return {
        "ijk": {"lo": [float(v) for v in box.lo], "hi": [float(v) for v in box.hi]},
        "voxels": {"min": [int(v) for v in lo], "max": [int(v) for v in hi]},
        "roi": roi_json(box.to_roi(ijk_to_ras)),
    }


def roi_to_ijk(roi: Any, volume: Volume) -> IJKBox:
    """A user's RAS ROI (6 numbers = two corners, or {center, size, axes}) -> IJK box in `volume`.

    Done once, where the request arrives, because engines speak IJK only; raises ValueError
    with a sentence when the ROI is malformed or misses the volume.
    """
    from medmllm.geometry.boxes import RoiRAS
    from medmllm.protocol import roi_from_bounds

    if isinstance(roi, dict):
        axes = np.eye(3) if roi.get("axes") is None else np.array(roi["axes"], dtype=float)
        size = np.array(roi["size"], dtype=float)
        if size.shape != (3,) or np.any(size <= 0):
            raise ValueError("ROI size must be 3 positive numbers (mm)")
        region = RoiRAS(np.array(roi["center"], dtype=float), size, axes)
    else:
        values = np.array(roi_from_bounds(roi))
        region = RoiRAS.from_bounds(np.minimum(values[:3], values[3:]), np.maximum(values[:3], values[3:]))
    return region.to_ijk_box(volume.ijk_to_ras).clamp(volume.shape)[0]


def mask_bbox(mask: np.ndarray) -> Optional[Tuple[int, int, int, int, int, int]]:
    """Inclusive voxel bounds (i0, j0, k0, i1, j1, k1) of a [k, j, i] mask; None when empty."""
    ranges = []
    for axis in (2, 1, 0):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        ranges.append((int(hits[0]), int(hits[-1])))
    (i0, i1), (j0, j1), (k0, k1) = ranges
    return i0, j0, k0, i1, j1, k1


class ResultWriter:
    """Collects one answer: converts each engine event to API events and writes the result files.

    Thread-safe: the server's engine thread adds events while a download may ask for the files;
    files are replaced atomically, and `finished` is set once `write_files` is through.
    """

    def __init__(
        self,
        out_dir: Path,
        volume: Volume,
        volume_id: str,
        messages: Sequence[ChatTurn],
        result_id: Optional[str] = None,
        session_id: Optional[str] = None,
        url_prefix: Optional[str] = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.volume = volume
        self.volume_id = volume_id
        self.messages = list(messages)
        self.result_id = result_id
        self.session_id = session_id
        self.url_prefix = url_prefix
        self.text: List[str] = []
        self.events: List[Dict[str, Any]] = []
        self.boxes: List[Dict[str, Any]] = []
        self.masks: List[MaskOut] = []
        self.mask_events: List[Dict[str, Any]] = []
        self.answered = False  # `done` recorded: later events (a timed-out engine still talking) are dropped
        self.on_done: Optional[Callable[[], None]] = None
        self.finished = threading.Event()
        self._written_masks = -1
        self._lock = threading.RLock()
        self._write_lock = threading.RLock()

    @property
    def answer(self) -> str:
        return "".join(self.text)

    def add(self, event: EngineEvent) -> List[Dict[str, Any]]:
        """One engine event -> the API events it stands for (a clamped box adds a warning)."""
        with self._lock:
            if self.answered:
                return []
            if isinstance(event, TokenOut):
                self.text.append(event.text)
                out = [{"type": "token", "text": event.text}]
            elif isinstance(event, BoxOut):
                out = self._box(event)
            elif isinstance(event, MaskOut):
                out = self._mask(event)
            elif isinstance(event, ReportOut):
                out = [{"type": "report", "markdown": event.markdown}]
            elif isinstance(event, WarningOut):
                out = [_warning(event.message)]
            else:
                out = [_warning(f"the engine produced an unknown event {type(event).__name__}; ignored")]
            self.events.extend(out)
            return out

    def warning(self, message: str) -> Dict[str, Any]:
        """A warning of the caller's own (not from the engine), recorded like the others."""
        with self._lock:
            self.events.append(_warning(message))
            return self.events[-1]

    def error(self, message: str) -> List[Dict[str, Any]]:
        """The answer failed: one `error` event, or none when the answer already ended."""
        with self._lock:
            if self.answered:
                return []
            self.events.append({"type": "error", "message": message})
            return [self.events[-1]]

    def done(self, timings: Dict[str, Any], cancelled: bool) -> List[Dict[str, Any]]:
        """The closing `done` event, recorded once (then `on_done` runs); none if already done."""
        with self._lock:
            if self.answered:
                return []
            event = {
                "type": "done",
                "result_id": self.result_id,
                "session_id": self.session_id,
                "cancelled": cancelled,
                "timings": timings,
            }
            self.events.append(event)
            self.answered = True
        if self.on_done is not None:
            self.on_done()
        return [event]

    def _file_url(self, name: str) -> str:
        return f"{self.url_prefix}/{quote(name, safe='')}" if self.url_prefix else name

    def _box(self, event: BoxOut) -> List[Dict[str, Any]]:
        from medmllm.io.markups import roi_document, safe_filename, unique_names, write_roi_json

        out: List[Dict[str, Any]] = []
        try:
            box, problem = event.box.clamp(self.volume.shape)
        except ValueError as exc:
            return [_warning(f"{event.label}: {exc}; not shown")]
        if problem:
            out.append(_warning(f"{event.label}: {problem}"))
        index = len(self.boxes)
        color = PALETTE[index % len(PALETTE)]
        info = box_json(box, self.volume.ijk_to_ras)
        stems = unique_names([safe_filename(b["label"]) for b in self.boxes] + [safe_filename(event.label)])
        name = f"{stems[-1]}.mrk.json"
        roi = (info["roi"]["center"], info["roi"]["size"], np.array(info["roi"]["axes"]))
        write_roi_json(self.out_dir / name, event.label, *roi, color=color)
        payload = {
            "type": "box",
            "index": index,
            "label": event.label,
            "color": list(color),
            **info,
            "markups": roi_document(event.label, *roi, color=color),
            "file": name,
            "url": self._file_url(name),
            "source": _jsonable(event.source),
        }
        self.boxes.append(payload)
        out.append(payload)
        return out

    def _mask(self, event: MaskOut) -> List[Dict[str, Any]]:
        mask = np.asarray(event.mask)
        if mask.shape != self.volume.shape:
            shapes = f"mask shape {mask.shape} does not match the volume {self.volume.shape}"
            return [_warning(f"{event.label}: {shapes}; ignored")]
        mask = mask if mask.dtype == bool else mask != 0
        index = len(self.masks)
        color = tuple(event.color) if event.color else PALETTE[index % len(PALETTE)]
        count = int(np.count_nonzero(mask))
        voxel_ml = voxel_volume_mm3(self.volume.ijk_to_ras) / 1000.0
        bounds = mask_bbox(mask)
        self.masks.append(MaskOut(event.label, mask, color, dict(event.stats), event.terminology))
        payload = {
            "type": "mask",
            "index": index,
            "label": event.label,
            "color": [float(c) for c in color],
            "voxel_count": count,
            "volume_ml": count * voxel_ml,
            "bbox": box_json(_box_from_voxels(bounds), self.volume.ijk_to_ras) if bounds else None,
            "stats": _jsonable(event.stats),
            "terminology": event.terminology,
            "segment": index,
            "url": self._file_url(SEGMENTATION_FILE),
        }
        self.mask_events.append(payload)
        out = [payload]
        if count == 0:
            out.append(_warning(f"{event.label}: the mask is empty"))
        return out

    def write_segmentation(self) -> Optional[Path]:
        """(Re)write segmentation.seg.nrrd with every mask so far; nothing when there are none."""
        from medmllm.io.markups import unique_names
        from medmllm.io.segnrrd import Segment, write_seg_nrrd

        with self._write_lock:
            with self._lock:
                masks = list(self.masks)
            path = self.out_dir / SEGMENTATION_FILE
            if not masks or self._written_masks == len(masks):
                return path if masks else None
            names = unique_names([m.label for m in masks])
            segments = [
                Segment(name, m.mask, m.color, terminology=m.terminology) for name, m in zip(names, masks)
            ]
            partial = self.out_dir / f".partial-{SEGMENTATION_FILE}"
            write_seg_nrrd(partial, segments, self.volume.ijk_to_ras)
            os.replace(partial, path)
            self._written_masks = len(masks)
            return path

    def write_files(self, preview: bool = True) -> List[Path]:
        """Write answer.md, chat.json, the segmentation and preview.png once the answer is over."""
        with self._write_lock:
            try:
                paths = [self._write_answer(), self._write_chat()]
                seg = self.write_segmentation()
                if seg:
                    paths.append(seg)
                if preview:
                    paths.append(
                        write_preview(self.out_dir / "preview.png", self.volume, self.boxes, self.masks)
                    )
                return paths + [self.out_dir / b["file"] for b in self.boxes]
            finally:
                self.finished.set()

    def _write_chat(self) -> Path:
        doc = {
            "volume_id": self.volume_id,
            "result_id": self.result_id,
            "session_id": self.session_id,
            "messages": [{"role": t.role, "content": t.content} for t in self.messages]
            + [{"role": "assistant", "content": self.answer}],
            "events": self.events,
        }
        return write_atomic(self.out_dir / "chat.json", json.dumps(doc, indent=1, ensure_ascii=False))

    def _write_answer(self) -> Path:
        lines = [f"# {self.messages[-1].content}", "", self.answer.strip() or "_(no text)_", ""]
        lines += [e["markdown"] for e in self.events if e["type"] == "report"]
        if self.boxes or self.mask_events:
            lines += [
                "## Findings (RAS, mm)",
                "",
                "| item | centre | size | volume (mL) | file |",
                "|---|---|---|---|---|",
            ]
        for b in self.boxes:
            roi = b["roi"]
            lines.append(
                f"| box: {b['label']} | {_fmt(roi['center'])} | {_fmt(roi['size'])} | | {b['file']} |"
            )
        for m in self.mask_events:
            roi = m["bbox"]["roi"] if m["bbox"] else None
            centre, size = (_fmt(roi["center"]), _fmt(roi["size"])) if roi else ("-", "-")
            lines.append(
                f"| mask: {m['label']} | {centre} | {size} | {m['volume_ml']:.1f} | {SEGMENTATION_FILE} |"
            )
        lines += [f"> warning: {e['message']}" for e in self.events if e["type"] in ("warning", "error")]
        lines += ["", "_Research use only; not for diagnosis._", ""]
        return write_atomic(self.out_dir / "answer.md", "\n".join(lines))


def answer_events(
    engine: Engine,
    ctx: ChatContext,
    writer: ResultWriter,
    cancel: threading.Event,
    prepare: bool = True,
    started: Optional[float] = None,
) -> Iterator[Dict[str, Any]]:
    """Run one question through an engine, yielding API events, always ending with `done`.

    `prepare` (the first question about a volume) also warns when the volume is constant. Engine
    failures become an `error` event (EngineError text as is), never an exception, so the stream
    always closes cleanly; `done` carries time to first event, total time and token count.
    """
    started = time.perf_counter() if started is None else started
    first: Optional[float] = None
    tokens = 0
    try:
        if prepare:
            voxels = ctx.volume.voxels
            if voxels.min() == voxels.max():
                first = time.perf_counter() - started
                yield writer.warning("the volume has a single intensity value everywhere: it looks empty")
            engine.prepare(ctx.volume, ctx.volume_id)
        for event in engine.chat(ctx, cancel):
            for out in writer.add(event):
                first = time.perf_counter() - started if first is None else first
                tokens += out["type"] == "token"
                yield out
            if cancel.is_set():
                break
    except EngineError as exc:
        yield from writer.error(str(exc))
    except Exception as exc:
        log.exception("engine %s failed", engine.name)
        yield from writer.error(f"the engine failed: {type(exc).__name__}: {exc}")
    total = time.perf_counter() - started
    timings = {"first_event_s": first if first is not None else total, "total_s": total, "tokens": tokens}
    yield from writer.done(timings, cancelled=cancel.is_set())


def _box_from_voxels(bounds: Tuple[int, int, int, int, int, int]) -> IJKBox:
    from medmllm.geometry.boxes import IJKBox

    return IJKBox.from_voxels(*bounds)


def _warning(message: str) -> Dict[str, Any]:
    return {"type": "warning", "message": message}


def _fmt(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _jsonable(value: Any) -> Any:
    """Engine-supplied dicts may hold numpy scalars/arrays and NaN; strict JSON needs plain numbers
    (NaN/Inf become null so any client can parse the event)."""
    text = json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    return json.loads(text, parse_constant=lambda _: None)
