"""Engine lookup by name without importing heavy engines until one is asked for.

An engine is any module `medmllm.engines.<name>` that defines `ENGINE`; adding a model means
adding one such file, nothing here changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import List, Type

import medmllm.engines as _pkg
from medmllm.engines.base import Engine, EngineError, EngineOptions

_NOT_ENGINES = {"base", "registry"}


def engine_names() -> List[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules(_pkg.__path__)
        if m.name not in _NOT_ENGINES and not m.name.startswith("_")
    )


def engine_class(name: str) -> Type[Engine]:
    if name not in engine_names():
        raise EngineError(f"unknown engine {name!r}; available: {', '.join(engine_names())}")
    module = importlib.import_module(f"medmllm.engines.{name}")
    return module.ENGINE


def create_engine(name: str, options: EngineOptions) -> Engine:
    return engine_class(name)(options)
