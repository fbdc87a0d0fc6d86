"""Dialect lookup by name: a dialect is any module `medmllm.grounding.<name>` that defines `DIALECT`,
so adding a model family means adding one file and nothing here changes."""

from __future__ import annotations

import importlib
import pkgutil
from typing import List

import medmllm.grounding as _pkg
from medmllm.grounding.base import Dialect

_NOT_DIALECTS = {"base", "registry"}


def dialect_names() -> List[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules(_pkg.__path__)
        if m.name not in _NOT_DIALECTS and not m.name.startswith("_")
    )


def get_dialect(name: str) -> Dialect:
    if name not in dialect_names():
        raise ValueError(f"unknown dialect {name!r}; available: {', '.join(dialect_names())}")
    return importlib.import_module(f"medmllm.grounding.{name}").DIALECT
