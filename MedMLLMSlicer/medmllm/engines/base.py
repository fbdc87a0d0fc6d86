"""The one interface every model engine implements, and the events it yields.

Engines speak in the volume's own voxel grid (IJK boxes, masks shaped like the volume); the
server turns that into RAS, ROI markups and `.seg.nrrd` files, so no engine repeats that work.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, Iterator, List, Optional, Tuple, Union

if TYPE_CHECKING:
    import numpy as np

    from medmllm.geometry.boxes import IJKBox
    from medmllm.geometry.volume import Volume


@dataclass(frozen=True)
class Capabilities:
    input: str  # "volume3d" or "slice2d"
    boxes: bool
    masks: bool
    region_input: bool
    streaming: bool = True
    languages: Tuple[str, ...] = ("en",)


@dataclass(frozen=True)
class ModelInfo:
    engine: str
    model: str
    description: str
    capabilities: Capabilities
    licence: str
    intended_use: str


@dataclass(frozen=True)
class EngineOptions:
    """What `medmllm serve` / `medmllm ask` pass to an engine; unknown keys go to `extra`."""

    model: Optional[str] = None
    base_url: Optional[str] = None
    api_key: Optional[str] = None
    dialect: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ViewState:
    """The slice the user looks at: orientation in {axial, coronal, sagittal}, IJK index along the
    array axis nearest that slice's normal (None = middle), optional window (centre, width)."""

    orientation: str = "axial"
    index: Optional[int] = None
    window: Optional[Tuple[float, float]] = None


@dataclass(frozen=True)
class ChatTurn:
    role: str  # "user" | "assistant"
    content: str


@dataclass
class ChatContext:
    """One question: the conversation so far (the new question is the last user turn)."""

    volume: Volume
    volume_id: str
    messages: List[ChatTurn]
    view: ViewState = field(default_factory=ViewState)
    roi: Optional[IJKBox] = None
    max_new_tokens: int = 256
    temperature: float = 0.0

    @property
    def question(self) -> str:
        return self.messages[-1].content


@dataclass(frozen=True)
class TokenOut:
    text: str


@dataclass(frozen=True)
class BoxOut:
    """A grounded box in the volume's IJK grid; `source` says how it was derived (dialect values, slice)."""

    label: str
    box: IJKBox
    source: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MaskOut:
    """A mask with the volume's shape ([k, j, i], bool) plus optional measurements for the report;
    `terminology` is a Slicer TerminologyEntry string when the engine knows the structure's codes."""

    label: str
    mask: np.ndarray
    color: Optional[Tuple[float, float, float]] = None
    stats: Dict[str, float] = field(default_factory=dict)
    terminology: Optional[str] = None


@dataclass(frozen=True)
class ReportOut:
    markdown: str


@dataclass(frozen=True)
class WarningOut:
    message: str


EngineEvent = Union[TokenOut, BoxOut, MaskOut, ReportOut, WarningOut]


class EngineError(Exception):
    """A problem the user can fix (bad checkpoint, unreachable model server); message is shown as is."""


class Engine(ABC):
    """A model backend. Subclasses live in `medmllm/engines/<name>.py` as `ENGINE = Subclass`."""

    name: ClassVar[str]  # given by the registry (`medmllm.engines.registry`) unless the class states it
    # A reader of the model's own demo file format (path -> (Volume, grid for `prepare`)), if any.
    read_demo_input: ClassVar[Optional[Callable[[str], Tuple[Volume, Any]]]] = None

    def __init__(self, options: EngineOptions) -> None:
        self.options = options

    @abstractmethod
    def models(self) -> List[ModelInfo]:
        """What this engine serves, for `GET /v1/models`."""

    def use_store(self, folder: Path) -> None:  # noqa: B027 - optional hook
        """A folder in the server's store for per-volume results that outlive a restart (keyed by
        volume id); the server calls this once. Default: nothing kept."""

    def forget(self, volume_id: str) -> None:  # noqa: B027 - optional hook
        """The server removed this volume (disk bound, or damaged): drop what `use_store` kept for
        it, or that folder grows without bound. Default: nothing."""

    def sweep(self, held: Callable[[str], bool]) -> None:  # noqa: B027 - optional hook
        """At start, after `use_store`: drop what was kept for volumes `held` says the server no
        longer has (removed while it was down). Default: nothing."""

    def prepare(self, volume: Volume, volume_id: str) -> None:  # noqa: B027 - optional hook
        """Per-volume work done once (preprocessing, vision features); default: nothing."""

    @abstractmethod
    def chat(self, ctx: ChatContext, cancel: threading.Event) -> Iterator[EngineEvent]:
        """Answer the last question, yielding events as they happen; stop soon after `cancel` is set."""

    def max_concurrent_chats(self) -> int:
        """How many `chat` calls the server may run at once: more than 1 only for engines that
        batch concurrent questions themselves."""
        return 1

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release models / connections."""
