"""The engines this package ships, by name, imported only when one is asked for; packages add
theirs under the entry-point group `medmllm.engines` (see `medmllm.plugins`)."""

from __future__ import annotations

from typing import List, Type

from medmllm.engines.base import Engine, EngineError, EngineOptions
from medmllm.plugins import PluginError, Registry

ENGINES = Registry(
    "engine",
    "medmllm.engines",
    {
        "builtin": "medmllm.engines.builtin:ENGINE",
        "m3d": "medmllm.engines.m3d:ENGINE",
        "minigptmed": "medmllm.engines.minigptmed:ENGINE",
        "openai": "medmllm.engines.openai:ENGINE",
    },
    check=lambda obj: isinstance(obj, type) and issubclass(obj, Engine),
)


def engine_names() -> List[str]:
    return ENGINES.names()


def engine_class(name: str) -> Type[Engine]:
    try:
        return ENGINES.load(name)
    except PluginError as exc:
        raise EngineError(str(exc)) from exc


def create_engine(name: str, options: EngineOptions) -> Engine:
    return engine_class(name)(options)
