"""Shared types of every dialect: what a parser emits while model text streams in.

A dialect turns model text into `BoxFound` / `SegFound` events the moment a box or `[SEG]`
is complete; anything unusable becomes a `ParseWarning` instead of an exception, because model
text is untrusted and often truncated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:
    from medmllm.grounding._stream import StreamParser

TASKS = ("chat", "ground", "region", "report", "segment")
ImageSize = Tuple[int, int]


@dataclass(frozen=True)
class BoxFound:
    """One box as the model wrote it, plus its normalised form.

    `values`: the numbers exactly as written, in the order written (what `medmllm parse` prints).
    `fractions`: the box normalised to the image the model saw, as voxel/pixel *edge* fractions
    in [0, 1]: 2D dialects give (x0, y0, x1, y1) with x along image columns and y along rows
    (top row = 0); the m3d dialect gives (d0, h0, w0, d1, h1, w1) exactly as M3D writes them
    (index / size, max inclusive; `medmllm.geometry.m3d_grid` knows how to invert that). Empty
    when a pixel grammar was parsed without the image size.
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


class Dialect(ABC):
    """One model family's grammar: parse its answers, and write prompts and user regions its way.

    `tasks` lists the `build_prompt` tasks the model family supports (a subset of `TASKS`).
    `special_markup`: the box markup are tokenizer special tokens, which servers drop unless asked
    to keep them (`skip_special_tokens: false`).
    """

    name: str = ""
    coordinate_range: str = ""
    tasks: Tuple[str, ...] = ("chat", "report")
    special_markup: bool = False

    @abstractmethod
    def parser(self, image_size: Optional[ImageSize] = None, keep_special: bool = False) -> StreamParser:
        """A fresh streaming parser for one answer; `image_size` (width, height) for pixel grammars.

        Grammars whose markup are tokenizer special tokens (internvl, m3d) also read the bare form a
        `skip_special_tokens=True` decode leaves, unless `keep_special` says the text kept them."""

    @abstractmethod
    def format_region(self, fractions: Sequence[float], image_size: Optional[ImageSize] = None) -> str:
        """A user region (edge fractions, see `BoxFound.fractions`) written in the model's grammar."""

    def build_prompt(
        self,
        task: str,
        text: str = "",
        region: Optional[Sequence[float]] = None,
        image_size: Optional[ImageSize] = None,
    ) -> str:
        """The question to send for `task`: `text` is the target phrase (ground, segment), the question
        (chat, region) or extra instructions (report); `region` the user region for task "region"."""
        if task not in self.tasks:
            raise ValueError(
                f"dialect {self.name!r} has no task {task!r}; it supports: {', '.join(self.tasks)}"
            )
        return self._prompt(task, text.strip(), region, image_size)

    @abstractmethod
    def _prompt(
        self, task: str, text: str, region: Optional[Sequence[float]], image_size: Optional[ImageSize]
    ) -> str:
        """`build_prompt` for one of `tasks`, with `text` already stripped."""

    def strip(self, text: str) -> str:
        """Answer text for display: grammar markup removed, boxes replaced by their labels."""
        parser = self._display_parser()
        parser.feed(text)
        parser.finish()
        lines = (" ".join(line.split()) for line in self._finish_display(parser.display()).splitlines())
        return "\n".join(lines).strip()

    def _finish_display(self, text: str) -> str:
        """Dialect-specific tidying of the assembled display text (before whitespace is collapsed)."""
        return text

    def parse(
        self, text: str, image_size: Optional[ImageSize] = None, keep_special: bool = False
    ) -> ParseResult:
        """Parse a whole answer at once (the streaming parser fed one chunk)."""
        parser = self.parser(image_size, keep_special)
        result = ParseResult()
        result.add(parser.feed(text))
        result.add(parser.finish())
        return result

    @abstractmethod
    def _display_parser(self) -> StreamParser:
        """A parser that assembles display text (sizes irrelevant: only markup matters)."""
