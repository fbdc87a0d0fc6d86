"""Contract of every registered engine (and of the example engine in docs/internals.md): it streams,
stops within 1 s of a cancel, keeps boxes and masks inside the volume, and yields only what its
declared capabilities promise. Each engine supplies its set-up through `contract_case` in its own
test module (see engine_contract.py); registering an engine is enough to be checked here."""

from __future__ import annotations

import importlib
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, List

import numpy as np
import pytest
from engine_contract import EngineCase
from medmllm.engines.base import (
    BoxOut,
    Capabilities,
    ChatContext,
    ChatTurn,
    Engine,
    EngineOptions,
    MaskOut,
    ModelInfo,
    ReportOut,
    TokenOut,
    WarningOut,
)
from medmllm.engines.registry import ENGINES, create_engine, engine_names
from medmllm.geometry.boxes import IJKBox
from test_contract_dialects import doc_block, install
from test_openai_engine import phantom

CANCEL_LIMIT_S = 1.0


@contextmanager
def engine_case(name: str, request: Any) -> Iterator[EngineCase]:
    """The case the engine's own test module provides; a clear failure when there is none."""
    try:
        module = importlib.import_module(f"test_{name}_engine")
    except ModuleNotFoundError:
        pytest.fail(f"engine {name!r} has no test module Testing/test_{name}_engine.py")
    if not hasattr(module, "contract_case"):
        pytest.fail(
            f"Testing/test_{name}_engine.py defines no contract_case(request) (see engine_contract.py)"
        )
    cases = module.contract_case(request)
    case = next(cases)
    try:
        yield case
    finally:
        next(cases, None)


def _context(case: EngineCase, question: str) -> ChatContext:
    return ChatContext(
        case.volume, "contract", [ChatTurn("user", question)], view=case.view, max_new_tokens=24
    )


def _answer(case: EngineCase, question: str) -> List[Any]:
    return list(case.engine.chat(_context(case, question), threading.Event()))


def _inside(case: EngineCase, events: List[Any]) -> None:
    shape = case.volume.voxels.shape  # [k, j, i]
    extent = np.array(shape[::-1], dtype=float) - 0.5  # last voxel's far edge, (i, j, k)
    for event in events:
        if isinstance(event, BoxOut):
            lo, hi = np.asarray(event.box.lo), np.asarray(event.box.hi)
            assert np.all(lo >= -0.5 - 1e-6) and np.all(hi <= extent + 1e-6) and np.all(lo < hi), event
        if isinstance(event, MaskOut):
            assert event.mask.shape == shape and event.mask.dtype == bool, event.label


def check_contract(case: EngineCase) -> None:
    """Every clause of the contract for one engine, in the order a user meets them."""
    (info, *_) = case.engine.models()
    caps = info.capabilities
    assert info.engine == case.engine.name and caps.input in ("volume3d", "slice2d")
    questions = [case.long_question] + ([case.box_question] if case.box_question else [])
    for question in questions:
        events = _answer(case, question)
        assert any(isinstance(e, TokenOut) and e.text for e in events), f"no text for {question!r}"
        assert all(isinstance(e, (TokenOut, BoxOut, MaskOut, ReportOut, WarningOut)) for e in events)
        _inside(case, events)
        assert caps.boxes or not any(isinstance(e, BoxOut) for e in events), (
            "boxes from an engine without boxes"
        )
        assert caps.masks or not any(isinstance(e, MaskOut) for e in events), (
            "masks from an engine without masks"
        )
        if question == case.box_question:
            assert caps.boxes and any(isinstance(e, BoxOut) for e in events), "box question got no box"
    if caps.streaming:
        tokens = [e for e in _answer(case, case.long_question) if isinstance(e, TokenOut) and e.text]
        assert len(tokens) >= 2, "a streaming engine sent its answer in one piece"
    _check_cancel(case)


def _check_cancel(case: EngineCase) -> None:
    """Cancel right after the first words: the answer must end within CANCEL_LIMIT_S."""
    cancel = threading.Event()
    cancel_at: List[float] = []
    ended: List[float] = []

    def consume() -> None:
        for event in case.engine.chat(_context(case, case.long_question), cancel):
            if isinstance(event, TokenOut) and not cancel.is_set():
                cancel_at.append(time.monotonic())
                cancel.set()
        ended.append(time.monotonic())

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert ended and cancel_at, "the answer never started or never ended"
    assert ended[0] - cancel_at[0] <= CANCEL_LIMIT_S, f"{ended[0] - cancel_at[0]:.2f} s after cancel"


@pytest.mark.parametrize("name", engine_names())
def test_registered_engine_keeps_the_contract(name: str, request: Any) -> None:
    with engine_case(name, request) as case:
        assert case.engine.name == name
        check_contract(case)


def test_the_documented_example_engine_keeps_the_contract(tmp_path, monkeypatch) -> None:
    module = install(tmp_path, monkeypatch, "doc_brightest_engine", doc_block("class BrightestEngine"))
    monkeypatch.setitem(ENGINES.entries, "brightest", f"{module}:ENGINE")
    engine = create_engine("brightest", EngineOptions(extra={"margin": "1"}))
    assert engine.name == "brightest" and engine.margin == 1
    check_contract(EngineCase(engine, phantom(), box_question="Where is the brightest spot?"))


class _Stubborn(Engine):
    """Breaks the clause of the contract it is told to break (`none`: keeps them all)."""

    name = "stubborn"

    def __init__(self, fault: str) -> None:
        super().__init__(EngineOptions())
        self.fault = fault

    def models(self) -> List[ModelInfo]:
        caps = Capabilities(
            input="volume3d", boxes=self.fault != "undeclared box", masks=False, region_input=False
        )
        return [ModelInfo(self.name, "stub", "contract faults", caps, "MIT", "tests")]

    def chat(self, ctx: ChatContext, cancel: threading.Event) -> Iterator[Any]:
        yield TokenOut("one ")
        if self.fault == "ignores cancel":
            time.sleep(1.5)
        yield TokenOut("two ")
        shape = ctx.volume.voxels.shape
        far = (shape[2] + 5, shape[1], shape[0]) if self.fault == "box outside" else (1, 1, 1)
        yield BoxOut("thing", IJKBox.from_voxels(0, 0, 0, *far))


@pytest.mark.parametrize("fault", ["ignores cancel", "box outside", "undeclared box"])
def test_the_contract_catches_an_engine_that_breaks_it(fault: str) -> None:
    with pytest.raises(AssertionError):
        check_contract(EngineCase(_Stubborn(fault), phantom(), box_question="where?"))
    check_contract(EngineCase(_Stubborn("none"), phantom(), box_question="where?"))


def test_an_engine_without_a_test_module_fails_the_suite(request: Any) -> None:
    with pytest.raises(pytest.fail.Exception, match="no test module"), engine_case("nosuch", request):
        pass
