"""The picture a 2D model family wants: a dialect's `ImagePolicy` (size rule, padding, CT windows).

The engine that talks to the model (`medmllm.engines.openai`) only carries a policy out; which
size, padding and windows a family needs is the dialect's knowledge, next to its grammar, because
the two go together: box numbers refer to the picture the model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

Size = Tuple[int, int]  # (width, height) in pixels
Window = Tuple[float, float]  # (centre, width) in the volume's units (HU for CT)

# Qwen-family processors refuse an aspect ratio of 200 or more (smart_resize); a slice seen edge-on
# is stretched to at most this ratio (boxes map back through fractions, which a stretch keeps).
MAX_ASPECT = 50.0
MIN_SIDE = 28


def guard_aspect(width: float, height: float) -> Tuple[float, float]:
    """Stretch the short side so the ratio stays below `MAX_ASPECT`."""
    if width > height * MAX_ASPECT:
        return width, width / MAX_ASPECT
    if height > width * MAX_ASPECT:
        return height / MAX_ASPECT, height
    return width, height


def plain_image_size(width: int, height: int, longest: int = 1024) -> Size:
    """Native size capped at `longest`, every side at least `MIN_SIDE` and the aspect ratio below
    `MAX_ASPECT`: servers of Qwen-family models refuse thinner images."""
    w, h = guard_aspect(float(width), float(height))
    scale = min(1.0, longest / max(w, h))
    return max(MIN_SIDE, round(w * scale)), max(MIN_SIDE, round(h * scale))


def fixed_size(width: int, height: int) -> Callable[[int, int], Size]:
    """A size rule that resizes every picture to `width` x `height` (edge fractions survive that)."""
    return lambda _w, _h: (width, height)


@dataclass(frozen=True)
class ImagePolicy:
    """How to turn the slice into the picture the model was trained on.

    `size(width, height)`: the sent picture's size, given the slice's (or, with `pad_square`, the
    padded square's) size. `pad_square`: centre the slice on a black square first; box fractions
    then refer to the square and the engine takes the padding off. `ct_windows`: (centre, width)
    windows sent as the R, G, B channels of a CT when the user set no window (empty: one gray
    channel in the viewer's window). `description`: the same in words, for the docs' table.
    """

    size: Callable[[int, int], Size] = plain_image_size
    pad_square: bool = False
    ct_windows: Tuple[Window, ...] = ()
    description: str = (
        "native size (≤ 1024 long side), every side ≥ 28 px and aspect ≤ 50:1 (a slice seen edge-on is "
        "stretched: Qwen-family servers refuse a ratio ≥ 200)"
    )
