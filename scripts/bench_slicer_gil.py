"""The chat panel's worker hand-off under PythonQt's idle GIL, next to PySide6: prints numbers.

Slicer never enables PythonQt's thread support, so its main thread keeps the GIL while idle in the
Qt event loop: worker threads (upload, streaming) run only while the main thread runs Python, i.e.
in timer slots. This script drives the real `ChatPanel` (fake `slicer` over PySide6, offscreen)
against a real server in another process, with one main loop for both regimes:

    sleep until the next panel timer is due, then app.processEvents()   (the timers' Python slots)

`pyside6`: the sleep is `time.sleep` (GIL released while idle, as PySide6's event loop does);
`pythonqt`: the sleep is libc `usleep` called through `ctypes.PyDLL`, which keeps the GIL (as PythonQt's
idle event loop does). Reported per regime: Send -> done for a volume (copy, hash, upload, answer),
tokens per second reaching the panel while a long answer streams, and the longest main-thread busy
stretch (one `processEvents` call: the slots' own work plus any wait for the GIL), i.e. the UI stall,
and its 99th percentile (the maximum grows with the number of ticks on a busy machine);
each with the hand-off as shipped ("now") and as it was before (20 ms ticks, no GIL-free wait),
runs interleaved so that a busy machine slows all variants alike.

    .venv/bin/python scripts/bench_slicer_gil.py [--repeat 3] [--tokens 3000]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "MedMLLMSlicer"), str(ROOT / "Testing")]
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def serve(port: int, store: str) -> None:
    """The server side (run in its own process): an engine that answers 'tokens N' with N tokens
    as fast as it can, so the numbers measure the hand-off, not a model."""
    import uvicorn
    from medmllm.engines.base import Capabilities, ChatContext, Engine, EngineOptions, ModelInfo, TokenOut
    from medmllm.server.app import create_app

    class FastTokens(Engine):
        name = "fast-tokens"

        def models(self) -> List[ModelInfo]:
            caps = Capabilities("volume3d", False, False, False)
            return [ModelInfo("fast-tokens", "fast-tokens", "benchmark", caps, "-", "-")]

        def prepare(self, volume: Any, volume_id: str) -> None:
            pass

        def chat(self, ctx: ChatContext, cancel: threading.Event) -> Iterator[Any]:
            words = ctx.question.split()
            for _ in range(int(words[1]) if len(words) > 1 and words[0] == "tokens" else 1):
                yield TokenOut("x")

    app = create_app(FastTokens(EngineOptions()), store)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


from slicer_fakes.qt import restore_none_references  # noqa: E402


class MainLoop:
    """Sleep until the next of `timers` is due, then run the due slots (processEvents)."""

    def __init__(self, app: Any, timers: List[Any], hold_gil: bool) -> None:
        self.app, self.timers = app, timers
        self._sleep = self._usleep_holding_gil if hold_gil else time.sleep
        self._libc = ctypes.PyDLL(None)
        self.busy: List[float] = []
        self._none_references = sys.getrefcount(None)

    def _usleep_holding_gil(self, seconds: float) -> None:
        self._libc.usleep(ctypes.c_uint(int(seconds * 1e6)))

    def run_until(self, done: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = time.perf_counter() + timeout
        while not done():
            if time.perf_counter() > deadline:
                raise TimeoutError("the answer did not finish")
            due = [t.remainingTime() for t in self.timers if t.isActive()]
            self._sleep(max(0, min(due, default=5)) / 1000.0)
            started = time.perf_counter()
            self.app.processEvents()
            self.busy.append(time.perf_counter() - started)
            restore_none_references(self._none_references)  # see slicer_fakes.qt


def _ask(panel: Any, loop: MainLoop, question: str) -> float:
    panel.input.setPlainText(question)
    started = time.perf_counter()
    panel.send()
    loop.run_until(lambda: panel.job is None)
    answer = panel.conversation.turns[-1]
    if answer.status != "done":
        notices = [t.text for t in panel.conversation.turns if t.role == "notice"]
        raise RuntimeError(f"the answer failed: {notices}")
    return time.perf_counter() - started


def measure(slicer: Any, url: str, hold_gil: bool, tokens: int, shapes: List[tuple]) -> Dict[str, Any]:
    from conftest import phantom_ct
    from MedMLLMSlicerLib.chat_panel import ChatPanel

    slicer.mrmlScene.Clear()
    panel = ChatPanel()
    panel.accept_intended_use()
    panel.mode_combo.setCurrentIndex(1)
    panel.url_combo.setEditText(url)
    loop = MainLoop(slicer.app, [panel.dispatcher._timer, panel._render_timer], hold_gil)
    result: Dict[str, Any] = {}
    try:
        for shape in shapes:
            voxels, ijk_to_ras = phantom_ct(shape=shape)
            voxels[0, 0, :8] = np.frombuffer(os.urandom(16), dtype=np.int16)  # new to the server: uploaded
            volume = slicer.util.addVolumeFromArray(voxels, ijk_to_ras, f"v{shape}")
            panel.select_volume(volume)
            loop.busy = []
            result[f"send {shape}"] = _ask(panel, loop, "tokens 1")
            result[f"stall {shape}"] = max(loop.busy)
            result[f"stall p99 {shape}"] = float(np.percentile(loop.busy, 99))
        _ask(panel, loop, "tokens 1")  # the volume is on the server: the next Send only streams
        loop.busy = []
        elapsed = _ask(panel, loop, f"tokens {tokens}")
        if len(panel.conversation.turns[-1].text) != tokens:
            raise RuntimeError("tokens were lost")
        result["tokens/s"] = tokens / elapsed
        result["stall streaming"] = max(loop.busy)
        result["stall p99 streaming"] = float(np.percentile(loop.busy, 99))
    finally:
        panel.cleanup()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return 0
    import requests
    import slicer_fakes

    slicer = slicer_fakes.install()
    from MedMLLMSlicerLib import worker

    shipped = (worker.FAST_TICK_MS, worker.WAIT_S)
    before = (worker.TICK_MS, 0.0)  # 20 ms ticks, no GIL-free wait
    port = _free_port()
    store = tempfile.mkdtemp(prefix="bench-gil-")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[:2])}
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), store],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if requests.get(url + "/healthz", timeout=0.5).status_code == 200:
                    break
            except requests.exceptions.RequestException:
                time.sleep(0.1)
        shapes = [(200, 256, 256), (300, 512, 512)]
        print(f"load average {os.getloadavg()[0]:.1f}; {args.tokens} tokens; {args.repeat} interleaved runs")
        variants = [(r, h, f) for r, h in (("pyside6", False), ("pythonqt", True)) for f in (False, True)]
        runs: Dict[tuple, List[Dict[str, Any]]] = {v: [] for v in variants}
        for _ in range(args.repeat):
            for regime, hold, fast in variants:
                worker.FAST_TICK_MS, worker.WAIT_S = shipped if fast else before
                runs[(regime, hold, fast)].append(measure(slicer, url, hold, args.tokens, shapes))
        for (regime, _hold, fast), results in runs.items():
            for key in results[0]:
                values = sorted(r[key] for r in results)
                unit = "" if key == "tokens/s" else " s"
                handoff = "now" if fast else "before"
                print(
                    f"{regime:9s} {handoff:6s} {key:26s} median {values[len(values) // 2]:9.3f}{unit}  "
                    f"range {values[0]:.3f}-{values[-1]:.3f}"
                )
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
