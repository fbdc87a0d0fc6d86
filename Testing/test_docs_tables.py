"""The dialect table in docs/openai-compatible.md is the registry's, not a hand-kept copy."""

from __future__ import annotations

from conftest import load_script
from medmllm.grounding.registry import dialect_names


def test_the_docs_dialect_table_is_written_from_the_registry(capsys) -> None:
    tables = load_script("docs_tables")
    assert tables.main(["--check"]) == 0, capsys.readouterr().err
    table = tables.dialect_table()
    assert [line.split("`")[1] for line in table.splitlines()[2:]] == dialect_names()


def test_a_stale_table_is_reported(monkeypatch, tmp_path, capsys) -> None:
    tables = load_script("docs_tables")
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{tables.BEGIN}\n| old | table |\n{tables.END}\nrest\n", "utf-8")
    monkeypatch.setattr(tables, "DOC", doc)
    assert tables.main(["--check"]) == 1 and "stale" in capsys.readouterr().err
    assert tables.main([]) == 0 and tables.main(["--check"]) == 0
    assert doc.read_text("utf-8").endswith(f"{tables.END}\nrest\n")
