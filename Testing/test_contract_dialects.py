"""Contract of every registered dialect (and of the example dialect in docs/internals.md): at least
one cited real output in the corpus, a user region survives its formatter and parser, its example
answer parses back to the box it was made from, and through the fake OpenAI server that answer
becomes a box on the phantom's lesion (`check_lesion_box`). Registering a dialect is enough to be
checked here; nothing lists the dialects by name."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from medmllm.grounding.registry import DIALECTS, dialect_for_model, dialect_names, get_dialect
from test_openai_engine import check_lesion_box

ROOT = Path(__file__).resolve().parents[1]
CORPUS = json.loads((ROOT / "Testing" / "data" / "model_outputs" / "corpus.json").read_text("utf-8"))
REGION = {2: (0.1, 0.2, 0.6, 0.9), 3: (0.0, 0.25, 0.5, 0.5, 0.75, 1.0)}
PICTURE = (560, 448)  # (width, height) for pixel grammars


def check_round_trip(name: str) -> None:
    """A region written by `format_region` is read back by the parser (grammars with regions)."""
    dialect = get_dialect(name)
    if "region" not in dialect.tasks:
        with pytest.raises(ValueError):
            dialect.format_region(REGION[dialect.box_dims], PICTURE)
        return
    region = REGION[dialect.box_dims]
    (box,) = dialect.parse(dialect.format_region(region, PICTURE), PICTURE).boxes
    assert box.fractions == pytest.approx(region, abs=1e-3)


def check_example_answer(name: str) -> None:
    """A grounding dialect's example answer parses to one labelled box at the fractions it was
    made from, without warnings; a dialect that cannot ground has none."""
    dialect = get_dialect(name)
    region = REGION[dialect.box_dims]
    answer = dialect.example_answer(region, "left kidney", PICTURE)
    if "ground" not in dialect.tasks:
        assert answer is None
        return
    result = dialect.parse(answer, PICTURE)
    assert not result.warnings, result.warnings
    (box,) = result.boxes
    assert box.label == "left kidney" and box.fractions == pytest.approx(region, abs=1e-3)
    assert dialect.strip(answer).count("left kidney") == 1


@pytest.mark.parametrize("name", dialect_names())
def test_every_dialect_has_a_cited_real_output_case(name: str) -> None:
    """Made-up stress cases say "messy:" in their source; at least one case must be a cited real output."""
    cases = [case for case in CORPUS if case["dialect"] == name]
    real = [case for case in cases if not case["source"].startswith("messy:")]
    assert real, f"dialect {name!r} has no real output in Testing/data/model_outputs/corpus.json"
    assert all(len(case["source"]) > 40 for case in real), "a real case cites where its text comes from"


@pytest.mark.parametrize("name", dialect_names())
def test_region_round_trips_through_formatter_and_parser(name: str) -> None:
    check_round_trip(name)


@pytest.mark.parametrize("name", dialect_names())
def test_example_answer_parses_back(name: str) -> None:
    check_example_answer(name)


@pytest.mark.parametrize("name", dialect_names())
def test_model_names_and_picture_policy_are_the_dialects_own(name: str) -> None:
    dialect = get_dialect(name)
    for alias in dialect.models:
        assert dialect_for_model(f"org/{alias.upper()}-7B") == name
    if dialect.image is not None:
        width, height = dialect.image.size(60, 50)
        assert width >= 28 and height >= 28


def doc_block(marker: str) -> str:
    """The ```python block of docs/internals.md that contains `marker`."""
    text = (ROOT / "docs" / "internals.md").read_text("utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    (block,) = [b for b in blocks if marker in b]
    return block


def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, code: str) -> str:
    (tmp_path / f"{module}.py").write_text(code, "utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return module


def test_the_documented_example_dialect_keeps_the_contract(tmp_path, monkeypatch) -> None:
    code = doc_block("class FractionBoxDialect")
    assert len(code.strip().splitlines()) <= 55
    module = install(tmp_path, monkeypatch, "doc_fraction_dialect", code)
    monkeypatch.setitem(DIALECTS.entries, "fractionvl", f"{module}:DIALECT")
    assert get_dialect("fractionvl").name == "fractionvl"
    assert dialect_for_model("acme/FractionVL-2B") == "fractionvl"
    check_round_trip("fractionvl")
    check_example_answer("fractionvl")
    check_lesion_box("fractionvl")
