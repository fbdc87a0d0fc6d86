"""Strict checkpoint checks shared by the engines that load official weights.

The official loaders use `strict=False` and silently ignore missing tensors; we name them instead,
so a partial download or another model's file is a sentence, not a model that answers nonsense.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from medmllm.engines.base import EngineError

Shapes = Mapping[str, Sequence[int]]


def read_json_object(path: str, what: str) -> Dict[str, Any]:
    """A JSON file that must hold an object (config.json and friends), or an EngineError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise EngineError(f"{what} {path} is not a JSON object")
    return data


def tensor_names(names: List[str], most: int = 5) -> str:
    """A short list for an error message: the first few names and how many more."""
    more = f" (+{len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def check_tensors(what: str, expected: Shapes, found: Shapes, optional: Optional[Shapes] = None) -> None:
    """Every expected tensor present with its shape; `optional` ones may be absent but must fit."""
    optional = optional or {}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - set(optional))
    shapes: Dict[str, Tuple[int, ...]] = {k: tuple(v) for k, v in {**optional, **expected}.items()}
    wrong = sorted(k for k in set(shapes) & set(found) if shapes[k] != tuple(found[k]))
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {tensor_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {tensor_names(unexpected)}")
    if wrong:
        problems.append(
            "wrong shape: "
            + "; ".join(f"{k} is {list(found[k])}, expected {list(shapes[k])}" for k in wrong[:3])
        )
    if problems:
        raise EngineError(f"{what} does not match: " + " | ".join(problems))


def require_memory(
    model: str, params: int, dtype: Any, device: str, free: int, overhead: int, detail: str
) -> int:
    """Weights plus ~10% working memory and `overhead` bytes must fit in `free`, else a sentence
    saying how much is needed; checked before a single weight is read. Returns the bytes needed."""
    import torch

    needed = int(params * torch.empty((), dtype=dtype).element_size() * 1.1) + overhead
    if needed > free:
        raise EngineError(
            f"not enough memory on {device}: {model} needs about {needed / 2**30:.1f} GiB "
            f"({detail} as {str(dtype).replace('torch.', '')}), {free / 2**30:.1f} GiB free; "
            "use a GPU, --dtype bfloat16, or a machine with more memory"
        )
    return needed


def load_tokenizer_folder(folder: str, what: str) -> Any:
    """The tokenizer of a Hugging Face folder: `tokenizer.json` as is, else built by transformers
    from `tokenizer.model` (SentencePiece; needs the `engines` extra). A folder with neither is
    refused: transformers would build an empty tokenizer from the configuration alone, which
    reads every prompt as (almost) nothing. `what` names the folder in errors."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    has = {n: os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model")}
    if not any(has.values()):
        raise EngineError(
            f"{folder} has neither tokenizer.json nor tokenizer.model: an incomplete copy of {what}? "
            "Download its tokenizer files too"
        )
    try:
        if has["tokenizer.json"]:
            return PreTrainedTokenizerFast.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError/ValueError/ImportError for missing pieces
        hint = " (pip install 'medmllm[engines]')" if isinstance(exc, ImportError) else ""
        raise EngineError(f"cannot load the tokenizer of {what} from {folder}: {exc}{hint}") from exc
