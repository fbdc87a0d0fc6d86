"""Shared types of every dialect: what a parser emits while model text streams in, and `Dialect`.

A dialect turns model text into `BoxFound` / `SegFound` events the moment a box or `[SEG]`
is complete; anything unusable becomes a `ParseWarning` instead of an exception, because model
text is untrusted and often truncated.

Coordinates (the one place they are defined): between a dialect and everything else, a box is a
tuple of **edge fractions** of the picture the model saw, never centres and never pixels. 2D:
(x0, y0, x1, y1), x along image columns from the left edge, y along rows from the top edge, so a
box over the whole picture is (0, 0, 1, 1) and pixel column c spans [c/width, (c+1)/width). 3D
(M3D's grid): (d0, h0, w0, d1, h1, w1) as the model writes them (voxel index / size, max
inclusive; `medmllm.geometry.m3d_grid` inverts that). Parsers produce them (`BoxFound.fractions`),
`format_region` and `example_answer` take them; each dialect converts to its own numbers
(0-999, 0-1000 y-first, pixels, ...) and back with `medmllm.grounding.toolkit.box_events`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

from medmllm.grounding.images import ImagePolicy

if TYPE_CHECKING:
    from medmllm.grounding.toolkit import StreamParser

TASKS = ("chat", "ground", "region", "report", "segment")
ImageSize = Tuple[int, int]


@dataclass(frozen=True)
class BoxFound:
    """One box as the model wrote it, plus its normalised form.

    `values`: the numbers exactly as written, in the order written (what `medmllm parse` prints).
    `fractions`: the box normalised to the image the model saw, as edge fractions in [0, 1] (see
    the module docstring: 2D (x0, y0, x1, y1), 3D (d0, h0, w0, d1, h1, w1)). Empty when a pixel
    grammar was parsed without the image size.
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
    """Everything about one model family's text and picture: its grammar (parse answers, write
    prompts and user regions its way), the picture it wants and the model names it answers to.

    `name` is given by the registry (`medmllm.grounding.registry`); a dialect need not state it.
    `tasks` lists the `build_prompt` tasks the model family supports (a subset of `TASKS`).
    `special_markup`: the box markup are tokenizer special tokens, which servers drop unless asked
    to keep them (`skip_special_tokens: false`).
    `models`: lower-case pieces of served model names that speak this dialect ("lingshu").
    `image`: the picture a 2D model wants (`ImagePolicy`); None for models that read a volume.
    `languages`: the languages its prompts are written in.
    `box_dims`: 2 for boxes on a picture, 3 for boxes in a volume (the length of a region is twice that).
    """

    name: str = ""
    coordinate_range: str = ""
    tasks: Tuple[str, ...] = ("chat", "report")
    special_markup: bool = False
    models: Tuple[str, ...] = ()
    image: Optional[ImagePolicy] = ImagePolicy()
    languages: Tuple[str, ...] = ("en",)
    box_dims: int = 2

    def system_prompt(self, model: str) -> Optional[str]:
        """The system message the served `model` was trained with, if it needs one."""
        return None

    def example_answer(
        self, fractions: Sequence[float], label: str, image_size: Optional[ImageSize] = None
    ) -> Optional[str]:
        """What a model of this family answers when it grounds `label` at `fractions` (edges, see
        the module docstring) in a picture of `image_size`, in the form its real answers take;
        None for a family that writes no boxes. Test servers answer with it, and the contract
        tests check that the dialect's own parser reads it back."""
        return None

    @abstractmethod
    def parser(self, image_size: Optional[ImageSize] = None, keep_special: bool = False) -> StreamParser:
        """A fresh streaming parser for one answer; `image_size` (width, height) for pixel grammars.

        Grammars whose markup are tokenizer special tokens (`special_markup`) also read the bare form a
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
