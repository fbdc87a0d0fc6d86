"""Extension points stay open: no file in MedMLLMSlicer/ names a registered dialect except the
dialect's own module, the model engine of the same name (the `m3d` engine may say `m3d`) and the
registry's entry list. Everything else reads the registry, so a new dialect is one module plus
one registry line, and a dialect never silently gets another's image policy or aliases."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from medmllm.engines.registry import ENGINES
from medmllm.grounding.registry import DIALECTS, dialect_names

PACKAGE = Path(__file__).resolve().parents[1] / "MedMLLMSlicer"
REGISTRY = PACKAGE / "medmllm" / "grounding" / "registry.py"
ENGINE_REGISTRY = PACKAGE / "medmllm" / "engines" / "registry.py"
# Dialect names that are also ordinary English words: only a quoted name counts, not the word.
ORDINARY_WORDS = {"plain"}


def _source_file(target: str) -> Path:
    """The file (module) or folder (package) an entry's `module:attribute` target lives in."""
    path = PACKAGE / Path(*target.split(":")[0].split("."))
    return path if path.is_dir() else path.with_suffix(".py")


def _allowed(name: str) -> list:
    allowed = [REGISTRY, _source_file(DIALECTS.entries[name])]
    if name in ENGINES.entries:  # the model engine of the same name, and the engines' entry list
        allowed += [_source_file(ENGINES.entries[name]), ENGINE_REGISTRY]
    return allowed


def _mentions(name: str, text: str) -> list:
    if name in ORDINARY_WORDS:
        pattern = rf"""["'`]{re.escape(name)}["'`]"""
    else:
        pattern = rf"(?<![\w./-]){re.escape(name)}(?![\w-])"
    return [m.start() for m in re.finditer(pattern, text)]


@pytest.mark.parametrize("name", dialect_names())
def test_no_file_names_a_dialect_outside_its_module_and_its_engine(name: str) -> None:
    allowed = _allowed(name)
    offenders = []
    for path in sorted(PACKAGE.rglob("*")):
        if not path.is_file() or path.suffix not in (".py", ".ui", ".json", ".md", ".txt"):
            continue
        if any(path == a or a in path.parents for a in allowed):
            continue
        text = path.read_text("utf-8", errors="replace")
        for pos in _mentions(name, text):
            line = text.count("\n", 0, pos) + 1
            offenders.append(f"{path.relative_to(PACKAGE)}:{line}")
    assert not offenders, f"{name!r} written outside its own module: {offenders}"


def test_the_rule_catches_a_name_written_elsewhere() -> None:
    """The check itself works: a quoted or bare dialect name is found, a longer word is not."""
    assert _mentions("internvl", 'if dialect == "internvl":') == [15]
    assert _mentions("internvl", "InternVL internvl_chat medmllm.grounding.internvl") == []
    assert _mentions("plain", "a plain resize") == [] and _mentions("plain", "x = 'plain'") == [4]
