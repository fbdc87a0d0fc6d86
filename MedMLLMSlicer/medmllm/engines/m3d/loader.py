"""Load an official M3D-LaMed checkpoint folder exactly as a user downloads it.

Weights come from `model.safetensors[.index.json]`, `pytorch_model.bin[.index.json]` or `model.bin`;
names and shapes are compared with our module tree before anything is allocated, so a checkpoint
of another model, a partial download or a shape mismatch fails with a sentence naming the tensor,
and a model too big for the machine fails before it fills memory.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from medmllm.engines._checkpoint import check_tensors, load_tokenizer_folder, require_memory
from medmllm.engines.base import EngineError
from medmllm.engines.m3d.config import LamedConfig

SPECIAL_TOKENS = ("<im_patch>", "<bx_start>", "<bx_end>")
SEG_TOKEN = "[SEG]"
# Buffers some transformers versions saved; they are recomputed from the config, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_BUILD_LOCK = threading.Lock()


@dataclass
class Loaded:
    model: Any  # LamedModel
    tokenizer: Any
    config: LamedConfig
    im_patch_id: int
    prefix_id: int  # the token every prompt starts with: BOS if the tokenizer adds one, else <im_patch>
    eos_ids: Tuple[int, ...]


def weight_files(folder: str) -> List[str]:
    """The weight files to read, every shard an index names; a missing shard is an incomplete download."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise EngineError(f"cannot read {index_path}: {exc}") from exc
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise EngineError(
                    f"incomplete download in {folder}: {index_name} lists {', '.join(missing)}, "
                    "which is missing"
                )
            return [os.path.join(folder, s) for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin", "model.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return [path]
    raise EngineError(
        f"no weights in {folder}: expected model.safetensors(.index.json), "
        "pytorch_model.bin(.index.json) or model.bin"
    )


def _open_bin(path: str) -> Dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated / foreign pickle
        raise EngineError(f"cannot read {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise EngineError(f"{path} does not hold a state dict")
    return state


def checkpoint_shapes(files: List[str]) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """name -> (shape, dtype) for every tensor, read from headers (safetensors) or a memory map (.bin)."""
    from safetensors import safe_open

    shapes: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    for path in files:
        if path.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        sl = f.get_slice(name)
                        shapes[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            except EngineError:
                raise
            except Exception as exc:  # safetensors raises its own error type for damaged files
                raise EngineError(f"cannot read {path}: {exc}") from exc
        else:
            for name, tensor in _open_bin(path).items():
                shapes[name] = (tuple(tensor.shape), str(tensor.dtype))
    return shapes


def expected_shapes(config: LamedConfig) -> Tuple[Dict[str, Tuple[int, ...]], int]:
    """Our state-dict names and shapes, and the parameter count, from a meta-device build (no memory)."""
    import torch

    from medmllm.engines.m3d.model import LamedModel

    with _BUILD_LOCK, torch.device("meta"):
        model = LamedModel(config)
    state = model.lm.state_dict()
    count = sum(p.numel() for p in model.lm.parameters())
    return {k: tuple(v.shape) for k, v in state.items()}, count


def available_bytes(device: str) -> int:
    """Free memory where the weights will live: GPU free memory or the OS's MemAvailable."""
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_memory(params: int, dtype: Any, device: str, available: Optional[int] = None) -> int:
    """Raise before loading when weights plus ~10% working memory cannot fit; returns the estimate."""
    free = available_bytes(device) if available is None else available
    detail = f"{params / 1e9:.2f}B parameters"
    return require_memory("M3D-LaMed", params, dtype, device, free, 256 << 20, detail)


def resolve_device(device: Optional[str], dtype: Optional[str]) -> Tuple[str, Any]:
    import torch

    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but no CUDA GPU is available")
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    names.update({"float16": torch.float16, "fp16": torch.float16})
    if dtype in (None, "", "auto"):
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise EngineError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(names))}")
    return device, names[dtype]


def _iter_tensors(files: List[str]) -> Iterator[Tuple[str, Any]]:
    from safetensors import safe_open

    for path in files:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, f.get_tensor(name)
        else:
            yield from _open_bin(path).items()


def load_tokenizer(folder: str, config: LamedConfig) -> Tuple[Any, int, int, Tuple[int, ...]]:
    """Tokenizer plus (im_patch id, prefix id, eos ids), checked against the config's [SEG] id and vocabulary.

    The official release ships a SentencePiece `tokenizer.model` with small JSON files and no
    `tokenizer.json`: transformers builds the tokenizer from `tokenizer_config.json`
    (`LlamaTokenizer`), reading the model with sentencepiece and protobuf (both in the `engines`
    extra). A folder with a `tokenizer.json` is read as is.
    """
    tok = load_tokenizer_folder(folder, "M3D-LaMed")
    vocab = tok.get_vocab()
    for token in (*SPECIAL_TOKENS, SEG_TOKEN):
        if token not in vocab:
            raise EngineError(
                f"the tokenizer in {folder} has no {token} token; this is not an M3D-LaMed tokenizer"
            )
    if config.seg_enabled and vocab[SEG_TOKEN] != config.seg_token_id:
        raise EngineError(
            f"tokenizer [SEG] id {vocab[SEG_TOKEN]} differs from config seg_token_id {config.seg_token_id}"
        )
    if len(tok) > config.vocab_size:
        raise EngineError(
            f"tokenizer has {len(tok)} tokens but the model only {config.vocab_size} embeddings"
        )
    eos = {tok.eos_token_id, *_as_list(config.text.get("eos_token_id")), *_generation_eos(folder)} - {None}
    if not eos:
        raise EngineError("neither the tokenizer nor config.json names an EOS token")
    prefix = tok(SPECIAL_TOKENS[0])["input_ids"][0]  # BOS only where the tokenizer adds it, as in training
    return tok, vocab["<im_patch>"], int(prefix), tuple(sorted(int(e) for e in eos))


def _generation_eos(folder: str) -> List[Any]:
    """Phi-3 ends turns with <|end|>, listed only in generation_config.json."""
    path = os.path.join(folder, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return _as_list(json.load(f).get("eos_token_id"))
    except (OSError, ValueError, AttributeError):
        return []


def _as_list(value: Any) -> List[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load(folder: str, device: Optional[str] = None, dtype: Optional[str] = None) -> Loaded:
    """Validate everything (config, tokenizer, names, shapes, memory), then build and fill the model."""
    import torch

    try:  # transformers 5; 4.x has it in modeling_utils
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights

    from medmllm.engines.m3d.model import LamedModel

    if not os.path.isdir(folder):
        raise EngineError(f"model folder {folder!r} does not exist")
    config = LamedConfig.from_folder(folder)
    tok, im_patch, prefix, eos = load_tokenizer(folder, config)
    files = weight_files(folder)
    found = checkpoint_shapes(files)
    expected, params = expected_shapes(config)
    tied = bool(config.text.get("tie_word_embeddings", False))
    shapes = {k: v[0] for k, v in found.items() if not k.endswith(_IGNORED_SUFFIXES)}
    optional = {"lm_head.weight": expected.pop("lm_head.weight")} if tied else {}
    check_tensors("checkpoint (M3D-LaMed)", expected, shapes, optional)
    device, torch_dtype = resolve_device(device, dtype)
    check_memory(params, torch_dtype, device)
    with _BUILD_LOCK:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        try:
            with torch.device(device), no_init_weights():
                model = LamedModel(config)
        finally:
            torch.set_default_dtype(previous)
    targets = model.lm.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in _iter_tensors(files):
            if name in targets:
                targets[name].data.copy_(tensor.to(dtype=targets[name].dtype))
    if tied:
        model.lm.tie_weights()
    model.eval().requires_grad_(False)
    return Loaded(model, tok, config, im_patch, prefix, eos)
