"""Argument counts of C++ declarations as Slicer's API manifest writes them (standalone: no
package imports, so `scripts/slicer_api_manifest.py` can load it by path)."""

from __future__ import annotations

from typing import List, Optional, Tuple


def _split_params(params: str) -> List[str]:
    """Top-level comma split of a C++ parameter list (templates and arrays keep their commas)."""
    parts, depth, current = [], 0, ""
    for ch in params:
        depth += (ch in "<([" and 1) or 0
        depth -= (ch in ">)]" and 1) or 0
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip() and p.strip() != "void"]


def signature_arity(signature: str, name: str) -> Optional[Tuple[int, int]]:
    """(fewest, most) arguments of one C++ declaration; None for macros (their overloads vary)."""
    if "Macro(" in signature or f"{name}(" not in signature:
        return None
    inner = signature.split(f"{name}(", 1)[1]
    depth = 1
    for end, ch in enumerate(inner):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            inner = inner[:end]
            break
    params = _split_params(inner)
    return sum("=" not in p for p in params), len(params)
