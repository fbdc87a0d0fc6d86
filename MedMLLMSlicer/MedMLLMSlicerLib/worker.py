"""Network work on threads, results back on the main thread through a queue drained by a QTimer.

PythonQt has no custom signals and Qt objects must only be touched on the main thread, so worker
threads never call Qt: they put callbacks in a queue and `Dispatcher`'s timer runs them, a few
milliseconds' worth per tick, so a burst of tokens never freezes the UI.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterator, Optional

import qt

log = logging.getLogger(__name__)

TICK_MS = 20
BUDGET_S = 0.015


class Dispatcher:
    """Runs callables on worker threads and delivers their results on the main thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
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

        threading.Thread(target=run, daemon=True, name="medmllm-worker").start()

    def drain(self) -> None:
        """Run queued callbacks until the queue is empty or this tick's time budget is spent."""
        deadline = time.perf_counter() + BUDGET_S
        while time.perf_counter() < deadline:
            try:
                callback, args = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                callback(*args)
            except Exception:
                log.exception("MedMLLMSlicer: a UI update failed")

    def stop(self) -> None:
        self._timer.stop()


class ChatJob:
    """One question in flight: upload (if the server lacks the volume), stream, download masks.

    `on_event(job, event)` and `on_end(job, error_text)` run on the main thread. After `cancel()`
    nothing more is delivered, and the server is told to stop generating.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        client: Any,
        voxels: Any,
        ijk_to_ras: Any,
        request: Dict[str, Any],
        download_dir: str,
        on_event: Callable[[ChatJob, Dict[str, Any]], None],
        on_end: Callable[[ChatJob, Optional[str]], None],
    ) -> None:
        self.dispatcher, self.client = dispatcher, client
        self._voxels, self._ijk_to_ras = voxels, ijk_to_ras
        self.request = request
        self.download_dir = download_dir
        self._on_event, self._on_end = on_event, on_end
        self.cancelled = threading.Event()
        self.volume_id = ""
        self._thread = threading.Thread(target=self._run, daemon=True, name="medmllm-chat")

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        """Stop delivering at once and ask the server to stop (on a thread: the server may be slow)."""
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        session_id = self.request.get("session_id")
        if session_id:
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
            self.volume_id = self.client.ensure_volume(self._voxels, self._ijk_to_ras)
            for event in self._events():
                if self.cancelled.is_set():
                    break
                self.dispatcher.post(self._deliver, event)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
        self.dispatcher.post(self._finish, None if self.cancelled.is_set() else error)

    def _events(self) -> Iterator[Dict[str, Any]]:
        return stream_events(self.client, self.volume_id, self.request, self.download_dir)


def stream_events(
    client: Any, volume_id: str, request: Dict[str, Any], download_dir: str
) -> Iterator[Dict[str, Any]]:
    """The chat's events, each mask event with its `.seg.nrrd` downloaded (`path` added): blocking,
    so call it on a worker thread (or from scripts)."""
    stream = client.chat(volume_id, **request)
    try:
        for index, event in enumerate(stream):
            if event.get("type") == "mask" and event.get("url"):
                path = os.path.join(download_dir, f"mask-{uuid.uuid4().hex[:8]}-{index}.seg.nrrd")
                client.download(event["url"], path)
                event = {**event, "path": path}
            yield event
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
