"""Network work on threads, results back on the main thread through a queue drained by a QTimer.

PythonQt has no custom signals and Qt objects must only be touched on the main thread, so worker
threads never call Qt: they put callbacks in a queue and `Dispatcher`'s timer runs them, a few
milliseconds' worth per tick, so a burst of tokens never freezes the UI. Anything slow (hashing,
upload, download, reading masks) runs on threads; the main thread only copies voxels in slices
and hands ready arrays to MRML.

Slicer never enables PythonQt's thread support: its main thread keeps the GIL while idle in the Qt
event loop, so worker threads advance only while the main thread runs Python. While a worker runs,
the timer therefore ticks every FAST_TICK_MS and each tick waits for the queue with the GIL
released for up to WAIT_S (`scripts/bench_slicer_gil.py` measures both regimes).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import qt
from medmllm.client import BackendError

log = logging.getLogger(__name__)

TICK_MS = 20  # idle cadence
FAST_TICK_MS = 5  # while worker threads run
WAIT_S = 0.003  # GIL-free wait for worker output per fast tick
BUDGET_S = 0.015
STEP_S = 0.005  # main-thread time per slice-copying step


class Dispatcher:
    """Runs callables on worker threads and delivers their results on the main thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self.running = 0  # worker threads started by `start` and not finished (main thread only)
        self._timer = qt.QTimer()
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self.drain)
        self._timer.start()

    def post(self, callback: Callable, *args: Any) -> None:
        """Thread-safe: run `callback(*args)` on the main thread soon."""
        self._queue.put((callback, args))

    def submit(self, fn: Callable[[], Any], on_done: Callable[[Any, Optional[BaseException]], None]) -> None:
        """Run `fn()` on a daemon thread; `on_done(result, error)` follows on the main thread."""

        def run() -> None:
            try:
                result, error = fn(), None
            except Exception as exc:
                result, error = None, exc
            self.post(on_done, result, error)

        self.start(run, "medmllm-worker")

    def start(self, target: Callable[[], None], name: str) -> threading.Thread:
        """Run `target` on a daemon thread (call on the main thread); until it ends the timer ticks
        fast and waits GIL-free for its output, so it advances even where idle Qt holds the GIL."""
        self.running += 1
        self._timer.setInterval(FAST_TICK_MS)

        def run() -> None:
            try:
                target()
            finally:
                self.post(self._ended)

        thread = threading.Thread(target=run, daemon=True, name=name)
        thread.start()
        return thread

    def _ended(self) -> None:
        self.running -= 1
        if not self.running:
            self._timer.setInterval(TICK_MS)

    def drain(self) -> None:
        """Run queued callbacks until this tick's time budget is spent; while workers run, wait
        up to WAIT_S for their output with the GIL released (it stays free for them meanwhile)."""
        start = time.perf_counter()
        deadline, wait_until = start + BUDGET_S, start + (WAIT_S if self.running else 0.0)
        while time.perf_counter() < deadline:
            try:
                remaining = wait_until - time.perf_counter()
                callback, args = (
                    self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                )
            except queue.Empty:
                return
            try:
                callback(*args)
            except Exception:
                log.exception("MedMLLMSlicer: a UI update failed")

    def stop(self) -> None:
        self._timer.stop()


def _buffer_key(voxels: Any) -> Tuple[Any, ...]:
    """Identity of an array's memory: Slicer reallocates it when a volume's image data changes."""
    if voxels is None or getattr(voxels, "ndim", 0) != 3:
        raise ValueError("the selected volume has no 3D scalar voxels")
    return voxels.__array_interface__["data"][0], voxels.shape, voxels.dtype.str, voxels.strides


class VolumeSnapshot:
    """A private copy of a volume's voxels, made on the main thread a few slices at a time.

    `slicer.util.arrayFromVolume` is a view into VTK memory that Slicer frees when the volume's
    image data is reallocated, so no worker thread may read it; copying it in one go would freeze
    the UI (157 MB: 13-23 ms measured here, more on a busy or slower machine). Each `step()` first
    checks that the view still points at the same memory, then copies k-slices for at most `budget_s`.
    """

    def __init__(self, read: Callable[[], np.ndarray]) -> None:
        self._read = read
        source = read()
        self._key = _buffer_key(source)
        self.voxels = np.empty_like(source)  # lazily mapped: costs nothing until written
        self.done_slices = 0

    @property
    def complete(self) -> bool:
        return self.done_slices == self.voxels.shape[0]

    def step(self, budget_s: float = STEP_S) -> bool:
        """Copy the next slices (at least one); True once the copy is complete."""
        source = self._read()
        if source is None or _buffer_key(source) != self._key:
            raise ValueError("the volume changed while it was being read: press Send again")
        deadline = time.perf_counter() + budget_s
        while not self.complete:
            self.voxels[self.done_slices] = source[self.done_slices]
            self.done_slices += 1
            if time.perf_counter() > deadline:
                break
        return self.complete


class ChatJob:
    """One question in flight: copy the voxels (main thread, in slices), then on a thread: check the
    server (handshake), upload if it lacks the volume, stream, and fetch the answer's masks.

    `on_event(job, event)` and `on_end(job, error_text)` run on the main thread. After `cancel()`
    nothing more is delivered, and the server is told to stop generating.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        client: Any,
        read_voxels: Callable[[], np.ndarray],
        ijk_to_ras: np.ndarray,
        request: Dict[str, Any],
        download_dir: str,
        on_event: Callable[[ChatJob, Dict[str, Any]], None],
        on_end: Callable[[ChatJob, Optional[str]], None],
        handshake: Optional[Callable[[], None]] = None,
    ) -> None:
        self.dispatcher, self.client = dispatcher, client
        self._read_voxels, self._ijk_to_ras = read_voxels, ijk_to_ras
        self.request = request
        self.download_dir = download_dir
        self._on_event, self._on_end = on_event, on_end
        self._handshake = handshake
        self.snapshot: Optional[VolumeSnapshot] = None
        self.copy_steps = 0  # main-thread steps the voxel copy took
        self.cancelled = threading.Event()
        self.volume_id = ""
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Begin copying the voxels; the network part starts on a thread once the copy is done."""
        try:
            self.snapshot = VolumeSnapshot(self._read_voxels)
        except ValueError as exc:
            self.dispatcher.post(self._finish, str(exc))
            return
        self.dispatcher.post(self._copy_step)

    def _copy_step(self) -> None:
        if self.cancelled.is_set():
            return
        self.copy_steps += 1
        try:
            complete = self.snapshot.step()
        except ValueError as exc:
            self._finish(str(exc))
            return
        if complete:
            self._thread = self.dispatcher.start(self._run, "medmllm-chat")
        else:
            self.dispatcher.post(self._copy_step)

    def cancel(self) -> None:
        """Stop delivering at once and ask the server to stop (on a thread: the server may be slow)."""
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        session_id = self.request.get("session_id")
        if session_id and self._thread is not None and self._thread.is_alive():
            threading.Thread(target=self._cancel_remote, args=(session_id,), daemon=True).start()

    def _cancel_remote(self, session_id: str) -> None:
        try:
            self.client.cancel(session_id)
        except Exception as exc:
            log.info("MedMLLMSlicer: cancel request failed: %s", exc)

    def _deliver(self, event: Dict[str, Any]) -> None:
        if not self.cancelled.is_set():
            self._on_event(self, event)

    def _finish(self, error: Optional[str]) -> None:
        self._on_end(self, error)

    def _run(self) -> None:
        error = None
        try:
            if self._handshake is not None:
                self._handshake()
            self.volume_id = self.client.ensure_volume(self.snapshot.voxels, self._ijk_to_ras)
            self.snapshot = None  # the server has the voxels: free the copy
            for event in stream_events(self.client, self.volume_id, self.request, self.download_dir):
                if self.cancelled.is_set():
                    break
                self.dispatcher.post(self._deliver, event)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
        self.dispatcher.post(self._finish, None if self.cancelled.is_set() else error)


def stream_events(
    client: Any, volume_id: str, request: Dict[str, Any], download_dir: str
) -> Iterator[Dict[str, Any]]:
    """The chat's events; blocking, so call it on a worker thread (or from scripts).

    The `.seg.nrrd` behind a mask event holds every mask of the answer so far, so mask events are
    held back until `done`; then the file is downloaded and read once, here, and each mask event
    comes out with its voxels (`mask`: uint8 [k, j, i]) and their grid (`mask_ijk_to_ras`), so
    the main thread only has to hand an array to the segmentation.
    """
    stream = client.chat(volume_id, **request)
    held: List[Dict[str, Any]] = []
    try:
        for event in stream:
            if event.get("type") == "mask":
                held.append(event)
                continue
            if event.get("type") == "done":
                yield from _masks_with_voxels(client, held, download_dir)
                held = []
            yield event
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _masks_with_voxels(
    client: Any, events: List[Dict[str, Any]], download_dir: str
) -> Iterator[Dict[str, Any]]:
    """Mask events with their voxels: one download per file, each (file, segment) once."""
    by_url: Dict[str, Dict[Any, Dict[str, Any]]] = {}
    for event in events:
        by_url.setdefault(str(event.get("url") or ""), {}).setdefault(event.get("segment"), event)
    for url, by_segment in by_url.items():
        try:
            segments, ijk_to_ras = _read_masks(client, url, download_dir)
        except (BackendError, OSError, ValueError) as exc:
            yield {"type": "warning", "message": f"the answer's masks could not be fetched: {exc}"}
            continue
        for index, event in by_segment.items():
            if not isinstance(index, int) or not 0 <= index < len(segments):
                label = event.get("label", "?")
                yield {"type": "warning", "message": f"mask '{label}' is missing from the server's file"}
                continue
            yield {**event, "mask": segments[index], "mask_ijk_to_ras": ijk_to_ras}


def _read_masks(client: Any, url: str, download_dir: str) -> Tuple[List[np.ndarray], np.ndarray]:
    if not url:
        raise ValueError("the server sent masks without a file address")
    os.makedirs(download_dir, exist_ok=True)
    path = os.path.join(download_dir, f"masks-{uuid.uuid4().hex[:8]}.seg.nrrd")
    client.download(url, path)
    try:
        return read_segment_masks(path)
    finally:
        os.remove(path)


def read_segment_masks(path: str) -> Tuple[List[np.ndarray], np.ndarray]:
    """Each segment's mask (uint8 [k, j, i], in file order) and the grid's IJK->RAS of a `.seg.nrrd`.

    Read with SimpleITK rather than `medmllm.io.segnrrd` on purpose: Slicer bundles SimpleITK (not
    pynrrd), and SimpleITK reads without holding the GIL, while pynrrd holds it ~80 ms per 78 MB
    of voxels, a freeze of the UI even from a worker thread. Only the layer/label fields are needed.
    """
    import SimpleITK as sitk
    from medmllm.geometry.volume import Volume, VolumeError

    try:
        image = sitk.ReadImage(path)
        components = image.GetNumberOfComponentsPerPixel()
        layers = (
            [sitk.VectorIndexSelectionCast(image, n) for n in range(components)]
            if components > 1
            else [image]
        )
        grids = [Volume.from_sitk(layer) for layer in layers]
    except (RuntimeError, VolumeError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise ValueError(f"the server's mask file is not a readable segmentation ({reason})") from None
    masks = []
    while image.HasMetaDataKey(f"Segment{len(masks)}_ID"):
        n = len(masks)
        layer = _int_field(image, f"Segment{n}_Layer", n)  # Slicer's default: one layer per segment
        if not 0 <= layer < len(grids):
            raise ValueError(f"the server's mask file puts segment {n} on layer {layer}, which it lacks")
        masks.append((grids[layer].voxels == _int_field(image, f"Segment{n}_LabelValue", 1)).view(np.uint8))
    return masks, grids[0].ijk_to_ras


def _int_field(image: Any, key: str, default: int) -> int:
    if not image.HasMetaDataKey(key):
        return default
    try:
        return int(image.GetMetaData(key).strip())
    except ValueError:
        raise ValueError(f"the server's mask file has a bad {key}") from None
