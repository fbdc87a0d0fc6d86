"""What the engine contract suite (test_contract_engines.py) needs from each registered engine.

Every engine `NAME` in the registry must have a test module `Testing/test_NAME_engine.py` that
defines `contract_case(request)`: a generator yielding one `EngineCase` (set-up before the yield,
clean-up after, like a pytest fixture; `request` is pytest's, for session fixtures such as
`tiny_m3d`). An engine without it fails the suite, so none arrives untested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from medmllm.engines.base import Engine, ViewState
from medmllm.geometry.volume import Volume


@dataclass
class EngineCase:
    """`engine` ready to answer about `volume`; `box_question` is a question it answers with at least
    one box on `volume` (None where its weights are random test weights and can promise nothing);
    `long_question` one whose answer streams for a while (cancel is checked on it)."""

    engine: Engine
    volume: Volume
    box_question: Optional[str] = None
    long_question: str = "Describe this image in detail."
    view: ViewState = field(default_factory=ViewState)
