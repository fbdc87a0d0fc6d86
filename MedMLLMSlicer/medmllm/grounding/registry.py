"""The dialects this package ships, by name; packages add theirs under the entry-point group
`medmllm.dialects` (see `medmllm.plugins`). Adding a built-in dialect is one line here."""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

from medmllm.grounding.base import Dialect
from medmllm.plugins import PluginError, Registry

# Order matters only for `dialect_for_model`: the first dialect that answers to a model name wins.
DIALECTS = Registry(
    "dialect",
    "medmllm.dialects",
    {
        "internvl": "medmllm.grounding.internvl:DIALECT",
        "qwen25vl": "medmllm.grounding.qwen25vl:DIALECT",
        "medgemma": "medmllm.grounding.medgemma:DIALECT",
        "minigptmed": "medmllm.grounding.minigptmed:DIALECT",
        "m3d": "medmllm.grounding.m3d:DIALECT",
        "plain": "medmllm.grounding.plain:DIALECT",
    },
    check=lambda obj: isinstance(obj, Dialect),
)
FALLBACK = "plain"  # what a model nobody recognises gets: text only, no boxes


def dialect_names() -> List[str]:
    return DIALECTS.names()


def get_dialect(name: str) -> Dialect:
    """The dialect called `name`; unknown names raise ValueError listing the known ones."""
    try:
        return DIALECTS.load(name)
    except PluginError as exc:
        raise ValueError(str(exc)) from exc


def _each_dialect() -> Iterator[Tuple[str, Dialect]]:
    """Every dialect in `dialect_names()` order, loaded lazily (errors as in `get_dialect`)."""
    try:
        yield from DIALECTS.each()
    except PluginError as exc:
        raise ValueError(str(exc)) from exc


def slice_dialect_names() -> List[str]:
    """Dialects of models that look at one 2D picture (what an OpenAI-compatible server is sent)."""
    return [name for name, dialect in _each_dialect() if dialect.image is not None]


def dialect_for_model(model: Optional[str]) -> str:
    """The dialect a served model most likely speaks, from its name; `FALLBACK` when unknown."""
    lowered = (model or "").lower()
    for name, dialect in _each_dialect():
        if any(key in lowered for key in dialect.models):
            return name
    return FALLBACK
