"""Write the dialect table of docs/openai-compatible.md from the registry (the docs never list
dialects by hand): `python scripts/docs_tables.py` rewrites it, `--check` exits 1 when it is stale.
Testing/test_docs_tables.py runs the check."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medmllm.grounding.registry import FALLBACK, dialect_names, get_dialect

DOC = Path(__file__).resolve().parents[1] / "docs" / "openai-compatible.md"
BEGIN = "<!-- dialect table: written by scripts/docs_tables.py from the dialect registry -->"
END = "<!-- end of dialect table -->"


def dialect_table() -> str:
    """One row per registered dialect: served names it is guessed from, picture sent, boxes."""
    rows = [
        "| dialect | guessed for served models named | picture sent | boxes as written |",
        "|---|---|---|---|",
    ]
    for name in dialect_names():
        dialect = get_dialect(name)
        models = ", ".join(f"`{m}`" for m in dialect.models)
        if name == FALLBACK:
            models = "anything else"
        picture = dialect.image.description if dialect.image else "— (3D: its own engine reads the volume)"
        rows.append(f"| `{name}` | {models or '—'} | {picture} | {dialect.coordinate_range} |")
    return "\n".join(rows)


def rewritten(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block")
    head, _, rest = text.partition(BEGIN)
    tail = rest.partition(END)[2]
    return f"{head}{BEGIN}\n{dialect_table()}\n{END}{tail}"


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether the doc is up to date")
    args = parser.parse_args(argv)
    text = DOC.read_text("utf-8")
    new = rewritten(text)
    if args.check:
        if new != text:
            print(f"{DOC} is stale: run python scripts/docs_tables.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new, "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
