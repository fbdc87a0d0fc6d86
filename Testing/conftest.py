"""Shared fixtures: phantom volumes, a scripted test engine, and a real server on loopback.

`serve(engine=None, token=None, **create_app_options)` starts uvicorn in a thread on a free port
and returns a `LiveServer` (url, token, store path, the app's state); every server is stopped at
the end of the test. `ScriptedEngine` is a small deterministic Engine for protocol tests: its
answer depends on keywords in the question (see its docstring).
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import numpy as np
import pytest
from medmllm.engines.base import (
    BoxOut,
    Capabilities,
    ChatContext,
    Engine,
    EngineError,
    EngineOptions,
    MaskOut,
    ModelInfo,
    ReportOut,
    TokenOut,
    WarningOut,
)


def phantom_ct(shape=(20, 32, 28), spacing=(1.0, 1.5, 2.0), ijk_to_ras: Optional[np.ndarray] = None):
    """(voxels int16 [k, j, i], ijk_to_ras): air -1000, body ellipse 40 HU, a bright 'bone' block.

    The bone block occupies voxels i 10..17, j 12..19, k 5..14 (value 700).
    """
    _, j, i = np.indices(shape)
    voxels = np.full(shape, -1000, dtype=np.int16)
    body = ((i - shape[2] / 2) / (shape[2] * 0.45)) ** 2 + ((j - shape[1] / 2) / (shape[1] * 0.45)) ** 2 <= 1
    voxels[body] = 40
    voxels[5:15, 12:20, 10:18] = 700
    if ijk_to_ras is None:
        ijk_to_ras = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        ijk_to_ras[:3, 3] = (20.0, 30.0, -40.0)
    return voxels, ijk_to_ras


def oblique_matrix(spacing=(1.0, 1.5, 2.0), degrees: float = 30.0) -> np.ndarray:
    """IJK->RAS rotated about S by `degrees`, anisotropic spacing, non-zero origin."""
    t = np.radians(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rot * np.array(spacing)
    m[:3, 3] = (-12.0, 7.5, 3.0)
    return m


BONE_VOXELS = (10, 12, 5, 17, 19, 14)  # i0, j0, k0, i1, j1, k1 of the phantom's bone block


class ScriptedEngine(Engine):
    """Deterministic test engine. Question keywords:

    'box' -> a box over the phantom bone block; 'mask' -> mask of voxels > 300 (colour set);
    'report' -> a report; 'warn' -> a warning; 'fail' -> EngineError; 'crash' -> RuntimeError;
    'slow' -> tokens until cancelled (at most 30 s), recording `cancelled_at`; 'outside' -> a box
    beyond the volume; 'history' -> says how many turns it got. Every answer starts with "Echo: ".
    """

    name = "scripted"

    def __init__(self, options: Optional[EngineOptions] = None) -> None:
        super().__init__(options or EngineOptions())
        self.prepared: List[str] = []
        self.calls: List[ChatContext] = []
        self.cancelled = threading.Event()
        self.started = threading.Event()

    def models(self) -> List[ModelInfo]:
        caps = Capabilities(input="volume3d", boxes=True, masks=True, region_input=True)
        return [ModelInfo("scripted", "scripted-1", "test double", caps, "MIT", "tests only")]

    def prepare(self, volume: Any, volume_id: str) -> None:
        self.prepared.append(volume_id)

    def chat(self, ctx: ChatContext, cancel: threading.Event) -> Iterator[Any]:
        from medmllm.geometry.boxes import IJKBox

        self.calls.append(ctx)
        self.started.set()
        q = ctx.question.lower()
        yield TokenOut("Echo: ")
        yield TokenOut(ctx.question)
        if "fail" in q:
            raise EngineError("the scripted model failed on purpose")
        if "crash" in q:
            raise RuntimeError("boom")
        if "history" in q:
            yield TokenOut(f" [{len(ctx.messages)} turns]")
        if "box" in q:
            yield BoxOut("bone block", IJKBox.from_voxels(*BONE_VOXELS), {"why": "scripted"})
        if "outside" in q:
            yield BoxOut("nowhere", IJKBox((500.0, 500.0, 500.0), (600.0, 600.0, 600.0)))
        if "mask" in q:
            yield MaskOut("bone", ctx.volume.voxels > 300, (0.9, 0.9, 0.8), {"mean": np.float32(700.0)})
        if "report" in q:
            yield ReportOut("## Report\nscripted findings")
        if "warn" in q:
            yield WarningOut("scripted warning")
        if "slow" in q:
            deadline = time.monotonic() + 30
            while not cancel.is_set() and time.monotonic() < deadline:
                yield TokenOut(".")
                time.sleep(0.02)
            if cancel.is_set():
                self.cancelled.set()


@dataclass
class LiveServer:
    url: str
    token: Optional[str]
    store: Path
    engine: Engine
    app: Any

    def client(self, token: Optional[str] = "same", **kwargs: Any):
        from medmllm.client import MedMLLMClient

        return MedMLLMClient(self.url, token=self.token if token == "same" else token, **kwargs)


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Poll `condition` (e.g. a file the server writes in the background) until true or timeout."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Factory: `serve(engine=None, token=None, store=None, **create_app_options) -> LiveServer`."""
    import uvicorn
    from medmllm.server.app import create_app

    running = []

    def start(
        engine: Optional[Engine] = None, token: Optional[str] = None, store: Optional[Path] = None, **opts
    ):
        engine = engine or ScriptedEngine()
        store = store or tmp_path / f"store{len(running)}"
        app = create_app(engine, store, token=token, **opts)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        running.append((server, thread))
        return LiveServer(f"http://127.0.0.1:{port}", token, store, engine, app)

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def live_server(serve) -> LiveServer:
    """A server with the ScriptedEngine, no token."""
    return serve()


ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> Any:
    """The module in scripts/<name>.py (scripts are not a package), registered so dataclasses work."""
    spec = importlib.util.spec_from_file_location(f"medmllm_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_m3d() -> str:
    """A tiny random M3D-LaMed-Phi-3 checkpoint in the official format, written once per test run."""
    folder = ROOT / "Testing" / ".tiny" / "m3d-phi3-single"
    shutil.rmtree(folder, ignore_errors=True)
    # Seed 7: with the SentencePiece tokenizer its greedy report is lively (8 distinct tokens in 24)
    # and valid UTF-8, and six different conversations answer differently (seeds 0-6 fail one of
    # these); test_m3d_engine / test_m3d_batching rely on them, so that a broken KV cache or mixed-up
    # batch rows cannot pass by repetition.
    return load_script("make_tiny_m3d").make_tiny(str(folder), "phi3", "single", seed=7)
