"""`medmllm parse`: run a dialect's parser over model text on stdin and print what it found as JSON.

Useful to check a model's raw output, or a new dialect, without a server or a GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Optional, Tuple

from medmllm.cli import UsageError
from medmllm.grounding.base import ParseResult
from medmllm.grounding.registry import dialect_names, get_dialect

_CHUNK = 1 << 16


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "parse",
        help="parse model output text (stdin) with a grounding dialect and print boxes as JSON",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--dialect", required=True, help=f"one of: {', '.join(dialect_names())}")
    parser.add_argument(
        "--image-size", metavar="WxH", help="size of the image the model saw (needed by qwen25vl)"
    )
    parser.set_defaults(func=run)


def _image_size(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        raise UsageError(f"--image-size must be WIDTHxHEIGHT in pixels, e.g. 448x448, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def run(args: argparse.Namespace) -> int:
    size = _image_size(args.image_size)
    try:
        parser = get_dialect(args.dialect).parser(size)
    except ValueError as exc:
        hint = " (give --image-size WxH)" if size is None and "image_size" in str(exc) else ""
        raise UsageError(f"{exc}{hint}") from exc
    result = ParseResult()
    for chunk in iter(lambda: sys.stdin.read(_CHUNK), ""):
        result.add(parser.feed(chunk))
    result.add(parser.finish())
    out = {
        "boxes": [{"label": box.label, "values": list(box.values)} for box in result.boxes],
        "seg_tokens": len(result.seg_tokens),
        "warnings": result.warnings,
    }
    print(json.dumps(out, ensure_ascii=False))
    return 0
