"""`medmllm parse`: run a dialect's parser over model text on stdin and print what it found as JSON.

Useful to check a model's raw output, or a new dialect, without a server or a GPU. Box values are
printed as written; with `--image-size` each box also gets its edge fractions and pixels of that
image. Grammars made of special tokens (InternVL's, M3D's) are read in both forms, tagged and as a
`skip_special_tokens` decode leaves them; a note in `warnings` says when the bare form was used.
`--keep-special` reads the tagged form only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Dict, Optional, Tuple

from medmllm.cli import UsageError
from medmllm.grounding.base import BoxFound, ParseResult
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
        "--image-size",
        metavar="WxH",
        help="size of the image the model saw: adds fractions and pixels to each box",
    )
    parser.add_argument(
        "--keep-special",
        action="store_true",
        help="the text kept its special tokens: read tagged boxes only, not bare label[[...]] lists",
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
        parser = get_dialect(args.dialect).parser(size, keep_special=args.keep_special)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    result = ParseResult()
    for chunk in iter(lambda: sys.stdin.read(_CHUNK), ""):
        result.add(parser.feed(chunk))
    result.add(parser.finish())
    out = {
        "boxes": [_box(box, size) for box in result.boxes],
        "seg_tokens": len(result.seg_tokens),
        "warnings": result.warnings,
    }
    print(json.dumps(out, ensure_ascii=False))
    return 0


def _box(box: BoxFound, size: Optional[Tuple[int, int]]) -> Dict[str, Any]:
    """A box as written; mapped onto the image only when its size is known."""
    out: Dict[str, Any] = {"label": box.label, "values": list(box.values)}
    if size is not None and box.fractions:
        out["fractions"] = [round(f, 6) for f in box.fractions]
        if len(box.fractions) == 4:
            scale = (size[0], size[1], size[0], size[1])
            out["pixels"] = [round(f * s, 2) for f, s in zip(box.fractions, scale)]
    return out
