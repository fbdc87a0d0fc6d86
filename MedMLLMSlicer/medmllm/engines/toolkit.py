"""Helpers every engine needs the same way (public: new engines import them too).

Engine options arrive from the command line as strings (`--option seed=3`), from the server and
from Python as numbers, so every engine reads them through these typed readers, which name the
option in their error. `stream_words` is how an engine that has its answer whole still streams
it and stops at a cancel. docs/internals.md shows a complete engine built with them.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional

from medmllm.engines.base import ChatContext, EngineError, TokenOut
from medmllm.segmenters import DEFAULT_SEGMENTER, BoxSegmenter, SegmenterError, get_segmenter


def flag(value: Any) -> bool:
    """A yes/no option: the strings "false" / "0" / "no" / "off" / "" mean False."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def int_option(extra: Dict[str, Any], key: str, default: int, minimum: int = 1) -> int:
    """An integer option of at least `minimum`."""
    value = extra.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise EngineError(f"option {key} must be an integer, got {value!r}") from None
    if number < minimum:
        raise EngineError(f"option {key} must be >= {minimum}, got {number}")
    return number


def seconds_option(extra: Dict[str, Any], key: str, default: float) -> float:
    """A positive, finite number of seconds."""
    value = extra.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number > 0 or math.isinf(number):
        raise EngineError(f"option {key} must be a positive number of seconds, got {value!r}")
    return number


def segmenter_option(extra: Dict[str, Any]) -> Optional[BoxSegmenter]:
    """The box -> mask segmenter named by option `segmenter` (default region growing; `none`: no masks)."""
    name = str(extra.get("segmenter", DEFAULT_SEGMENTER))
    try:
        return None if name == "none" else get_segmenter(name)
    except SegmenterError as exc:
        raise EngineError(str(exc)) from exc


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]


def sampling_options(extra: Dict[str, Any], ctx: ChatContext) -> Sampling:
    """Generation settings: options `max_new_tokens`, `temperature` (default: the question's own),
    `top_p` (0.9) and `seed` (none)."""
    try:
        sampling = Sampling(
            int(extra.get("max_new_tokens", ctx.max_new_tokens)),
            float(extra.get("temperature", ctx.temperature)),
            float(extra.get("top_p", 0.9)),
            int(extra["seed"]) if "seed" in extra else None,
        )
    except (TypeError, ValueError) as exc:
        raise EngineError(f"bad generation option: {exc}") from None
    if sampling.max_new_tokens < 1 or not sampling.temperature >= 0 or not 0 < sampling.top_p <= 1:
        raise EngineError("need max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1")
    return sampling


def stream_words(text: str, cancel: threading.Event) -> Iterator[TokenOut]:
    """Stream text word by word (with the following space), stopping as soon as `cancel` is set."""
    for word in text.split(" "):
        if cancel.is_set():
            return
        yield TokenOut(word + " ")
