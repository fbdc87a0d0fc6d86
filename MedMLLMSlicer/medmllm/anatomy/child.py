"""`python -m medmllm.anatomy.child ENTRY KWARGS_JSON`: call TotalSegmentator's entry point in a
process of its own (so Stop can end it); stdout carries its progress lines, and the last line
says how it ended."""

from __future__ import annotations

import importlib
import json
import sys

DONE = "MEDMLLM-CHILD-DONE"
FAILED = "MEDMLLM-CHILD-FAILED: "


def main(argv) -> int:
    entry, kwargs = argv[1], json.loads(argv[2])
    try:
        module, _, name = entry.partition(":")
        getattr(importlib.import_module(module), name)(**kwargs)
    except BaseException as exc:  # SystemExit too: TotalSegmentator exits on some errors
        print(FAILED + f"{type(exc).__name__}: {exc}".strip().replace("\n", " "), flush=True)
        return 1
    print(DONE, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
