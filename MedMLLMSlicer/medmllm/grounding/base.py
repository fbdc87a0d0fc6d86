"""Shared types of every dialect: what a parser emits while model text streams in.

A dialect turns model text into `BoxFound` / `SegFound` events the moment a box or `[SEG]`
is complete; anything unusable becomes a `ParseWarning` instead of an exception, because model
text is untrusted and often truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union


@dataclass(frozen=True)
class BoxFound:
    """One box as the model wrote it, plus its normalised form.

    `values`: the numbers exactly as written, in the order written (what `medmllm parse` prints).
    `fractions`: the box normalised to the image the model saw, as voxel/pixel *edge* fractions
    in [0, 1]: 2D dialects give (x0, y0, x1, y1) with x along image columns and y along rows
    (top row = 0); the m3d dialect gives (d0, h0, w0, d1, h1, w1) exactly as M3D writes them
    (index / size, max inclusive; `medmllm.geometry.m3d_grid` knows how to invert that).
    """

    label: Optional[str]
    values: Tuple[float, ...]
    fractions: Tuple[float, ...]
    start: int = 0
    end: int = 0


@dataclass(frozen=True)
class SegFound:
    """An M3D `[SEG]` token: the engine should decode a mask for `label` (phrase before it, if any)."""

    label: Optional[str]
    start: int = 0
    end: int = 0


@dataclass(frozen=True)
class ParseWarning:
    message: str


ParseEvent = Union[BoxFound, SegFound, ParseWarning]


@dataclass
class ParseResult:
    """Everything a parser emitted for one whole answer."""

    boxes: List[BoxFound] = field(default_factory=list)
    seg_tokens: List[SegFound] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    def add(self, events: List[ParseEvent]) -> None:
        for event in events:
            if isinstance(event, BoxFound):
                self.boxes.append(event)
            elif isinstance(event, SegFound):
                self.seg_tokens.append(event)
            else:
                self.warnings.append(event.message)
