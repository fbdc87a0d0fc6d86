"""Load MiniGPT-Med from the three files a user gathers, checking every tensor by name and shape.

- `eva_vit_g.pth`: a flat state dict of EVA-ViT-g (LAVIS/BLIP-2 release). The official loader
  uses `strict=False` because the file holds more than the 39 blocks it keeps (BLIP-2 drops the
  last block); we allow exactly that surplus (blocks past the depth, `norm`, `fc_norm`, `head`) and
  refuse anything else.
- the MiniGPT-Med `.pth` (`{"model": {...}}`): only what was trained, saved by
  `runner_base.py:_save_checkpoint` — `llama_proj` and the peft-0.2.0 LoRA matrices
  `llama_model.base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}.weight`, plus
  buffers (`rotary_emb.inv_freq`, recomputed, ignored). The official loader ignores missing keys
  silently; here a missing, unexpected or mis-shaped tensor is an error naming it.
- the Llama-2-7b-chat-hf folder: transformers' LlamaForCausalLM with its own config.json.
LoRA is merged at load: W += (B @ A) * alpha / r, computed in float32.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from medmllm.engines._checkpoint import (
    check_tensors,
    load_tokenizer_folder,
    read_json_object,
    require_memory,
    tensor_names,
)
from medmllm.engines.base import EngineError
from medmllm.engines.minigptmed.config import MiniGPTMedConfig

EVA_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
WHERE = {
    "model": "the MiniGPT-Med checkpoint (checkpoint_stage3.pth, Google Drive link in the README of "
    "github.com/Vision-CAIR/MiniGPT-Med); pass it (or a folder holding all three inputs) as --model",
    "eva": f"eva_vit_g.pth from {EVA_URL}; put it in the --model folder or pass extra option eva",
    "llama": "the Llama-2-7b-chat-hf folder (huggingface.co/meta-llama/Llama-2-7b-chat-hf, gated: accept "
    "Meta's licence first); put it in the --model folder as llama/ or pass extra option llama",
}
EVA_NAME = "eva_vit_g.pth"
LLAMA_NAMES = ("llama", "Llama-2-7b-chat-hf")
CHECKPOINT_NAME = "checkpoint_stage3.pth"  # eval_configs/minigptv2_eval.yaml
SIZES_NAME = "minigptmed_config.json"
LORA_PREFIX = "llama_model.base_model.model.model.layers."
LORA_TARGETS = ("q_proj", "v_proj")
PAD_TOKEN = "$$"  # base_model.py:init_llm sets llama_tokenizer.pad_token = "$$"
_EVA_SURPLUS = re.compile(r"^(norm|fc_norm|head)\.|^blocks\.(\d+)\.")
_ROTARY = re.compile(r"^llama_model\.base_model\.model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

Shapes = Dict[str, Tuple[int, ...]]


@dataclass
class Loaded:
    model: Any  # MiniGPTMed
    tokenizer: Any
    config: MiniGPTMedConfig
    bos_id: int
    eos_ids: Tuple[int, ...]


def resolve_inputs(model: Optional[str], extra: Mapping[str, Any]) -> Tuple[str, str, str, Any]:
    """(checkpoint, LLaMA folder, EVA file, sizes) from `--model` and the extra options.

    `--model` may be the checkpoint itself or a folder holding all three inputs: `eva_vit_g.pth`,
    `llama/` (or `Llama-2-7b-chat-hf/`), and `checkpoint_stage3.pth` or the one other `.pth`
    (plus optional `minigptmed_config.json` sizes); extra options win over what the folder holds.
    """
    llama, eva, sizes = extra.get("llama"), extra.get("eva"), extra.get("config")
    if not model or not os.path.isdir(model):
        return model or "", llama or "", eva or "", sizes
    llama = llama or next(
        (os.path.join(model, n) for n in LLAMA_NAMES if os.path.isdir(os.path.join(model, n))), ""
    )
    eva = eva or os.path.join(model, EVA_NAME)
    if sizes is None and os.path.isfile(os.path.join(model, SIZES_NAME)):
        sizes = os.path.join(model, SIZES_NAME)
    found = sorted(n for n in os.listdir(model) if n.endswith(".pth") and n != EVA_NAME)
    if CHECKPOINT_NAME in found:
        found = [CHECKPOINT_NAME]
    if len(found) != 1:
        listing = ", ".join(found) or "none"
        raise EngineError(
            f"{model}: expected one MiniGPT-Med checkpoint .pth besides {EVA_NAME}, found {listing}"
        )
    return os.path.join(model, found[0]), llama, eva, sizes


def _require_file(path: Optional[str], what: str) -> str:
    if not path:
        raise EngineError(f"the minigptmed engine needs {WHERE[what]}")
    if not os.path.isfile(path):
        raise EngineError(f"{path!r} does not exist or is not a file; it should be {WHERE[what]}")
    return path


def read_pth(path: str, what: str) -> Dict[str, Any]:
    """`torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary code."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, disallowed globals: all unreadable here
        raise EngineError(
            f"cannot read {path} as a PyTorch checkpoint (a partial download, or not a .pth file?): {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise EngineError(f"{path} does not hold a state dict; it should be {WHERE[what]}")
    return data


def _tensors(state: Mapping[str, Any], path: str, what: str) -> Dict[str, Any]:
    import torch

    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise EngineError(
            f"{path} holds non-tensor entries ({tensor_names(sorted(map(str, bad)))}); "
            f"it should be {WHERE[what]}"
        )
    return dict(state)


def eva_shapes(config: MiniGPTMedConfig) -> Shapes:
    """Names and shapes of our EVA-ViT, from a meta-device build (no memory)."""
    import torch

    from medmllm.engines.minigptmed.eva_vit import VisionTransformer

    with torch.device("meta"):
        vit = VisionTransformer(config)
    return {k: tuple(v.shape) for k, v in vit.state_dict().items()}


def load_eva_state(path: str, config: MiniGPTMedConfig) -> Dict[str, Any]:
    """The EVA state dict, checked, surplus removed, position grid resized to the model's."""
    from medmllm.engines.minigptmed.eva_vit import interpolate_pos_embed

    state = read_pth(_require_file(path, "eva"), "eva")
    if "model" in state and "cls_token" not in state:
        raise EngineError(f"{path} looks like a MiniGPT-Med/LAVIS training checkpoint, not {WHERE['eva']}")
    state = _tensors(state, path, "eva")
    state = {k: v for k, v in state.items() if not _is_eva_surplus(k, config.vision_depth)}
    expected = eva_shapes(config)
    found = {k: tuple(v.shape) for k, v in state.items()}
    pos = found.get("pos_embed")
    eva_grid = config.eva_image_size // config.patch_size
    if pos is not None and pos == (1, eva_grid * eva_grid + 1, config.vision_width):
        found["pos_embed"] = expected["pos_embed"]
    check_tensors(f"EVA-ViT-g checkpoint {path}", expected, found, {})
    state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], config.num_patches)
    return state


def _is_eva_surplus(name: str, depth: int) -> bool:
    match = _EVA_SURPLUS.match(name)
    return bool(match) and (match.group(2) is None or int(match.group(2)) >= depth)


def minigptmed_shapes(config: MiniGPTMedConfig, llama_config: Any) -> Tuple[Shapes, Shapes]:
    """(required, optional) names and shapes of the MiniGPT-Med checkpoint for this LLaMA."""
    hidden = llama_config.hidden_size
    heads = llama_config.num_attention_heads
    head_dim = getattr(llama_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(llama_config, "num_key_value_heads", None) or heads
    outputs = {"q_proj": heads * head_dim, "v_proj": kv_heads * head_dim}
    r = config.lora_r
    required: Shapes = {
        "llama_proj.weight": (hidden, config.vision_width * 4),
        "llama_proj.bias": (hidden,),
    }
    optional: Shapes = {"ln_vision.weight": (config.vision_width,), "ln_vision.bias": (config.vision_width,)}
    for layer in range(llama_config.num_hidden_layers):
        base = f"{LORA_PREFIX}{layer}.self_attn."
        for target in LORA_TARGETS:
            required[f"{base}{target}.lora_A.weight"] = (r, hidden)
            required[f"{base}{target}.lora_B.weight"] = (outputs[target], r)
        optional[f"{base}rotary_emb.inv_freq"] = (head_dim // 2,)
    return required, optional


def load_minigptmed_state(path: str, config: MiniGPTMedConfig, llama_config: Any) -> Dict[str, Any]:
    data = read_pth(_require_file(path, "model"), "model")
    if "model" not in data:
        hint = " (this looks like eva_vit_g.pth)" if "cls_token" in data else ""
        raise EngineError(f"{path} has no 'model' entry, so it is not a MiniGPT-Med checkpoint{hint}")
    if not isinstance(data["model"], dict):
        raise EngineError(f"{path}: 'model' is not a state dict")
    state = _tensors(data["model"], path, "model")
    required, optional = minigptmed_shapes(config, llama_config)
    found = {k: tuple(v.shape) for k, v in state.items()}
    check_tensors(f"MiniGPT-Med checkpoint {path}", required, found, optional)
    return {k: v for k, v in state.items() if not _ROTARY.match(k)}


def merge_lora(llama: Any, state: Mapping[str, Any], config: MiniGPTMedConfig) -> None:
    """Fold every LoRA pair into its base weight (float32 product, then the model's dtype)."""
    import torch

    layers = llama.model.layers
    with torch.no_grad():
        for layer, block in enumerate(layers):
            for target in LORA_TARGETS:
                key = f"{LORA_PREFIX}{layer}.self_attn.{target}"
                a = state[f"{key}.lora_A.weight"].float()
                b = state[f"{key}.lora_B.weight"].float()
                weight = getattr(block.self_attn, target).weight
                delta = (b @ a) * config.lora_scaling
                weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


def llama_parameters(llama_config: Any) -> int:
    """LlamaForCausalLM's parameter count from its config (6.74B for Llama-2-7B)."""
    h, inter, vocab = llama_config.hidden_size, llama_config.intermediate_size, llama_config.vocab_size
    heads = llama_config.num_attention_heads
    head_dim = getattr(llama_config, "head_dim", None) or h // heads
    kv = getattr(llama_config, "num_key_value_heads", None) or heads
    layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter + 2 * h
    heads_out = 1 if getattr(llama_config, "tie_word_embeddings", False) else 2
    return llama_config.num_hidden_layers * layer + heads_out * vocab * h + h


def check_memory(
    config: MiniGPTMedConfig, llama_config: Any, dtype: Any, device: str, available: Optional[int] = None
) -> int:
    """Refuse before loading when the weights plus ~10% working memory cannot fit; returns bytes needed."""
    import math

    from medmllm.engines.m3d.loader import available_bytes

    llama = llama_parameters(llama_config)
    eva = sum(math.prod(shape) for shape in eva_shapes(config).values())
    free = available_bytes(device) if available is None else available
    detail = f"LLaMA {llama / 1e9:.2f}B + EVA {eva / 1e9:.2f}B parameters"
    return require_memory("MiniGPT-Med", llama + eva, dtype, device, free, 512 << 20, detail)


def llama_config_of(folder: str) -> Any:
    """The LLaMA folder's config, refusing other architectures before any weight is read."""
    from transformers import LlamaConfig

    if not folder:
        raise EngineError(f"the minigptmed engine needs {WHERE['llama']}")
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder) or not os.path.isfile(path):
        raise EngineError(f"{folder!r} is not a LLaMA folder with config.json; it should be {WHERE['llama']}")
    data = read_json_object(path, "the LLaMA config")
    if data.get("model_type") != "llama":
        raise EngineError(
            f"{folder} holds a {data.get('model_type')!r} model, not LLaMA; it should be {WHERE['llama']}"
        )
    return LlamaConfig.from_dict(data)


def load_llama(folder: str, torch_dtype: Any, device: str) -> Any:
    from transformers import LlamaForCausalLM

    try:
        llama, info = LlamaForCausalLM.from_pretrained(folder, dtype=torch_dtype, output_loading_info=True)
    except Exception as exc:  # transformers raises OSError/RuntimeError/ValueError for bad folders
        raise EngineError(f"cannot load LLaMA from {folder} (incomplete download?): {exc}") from exc
    problems = []
    for key, label in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "wrong shape"),
    ):
        names = sorted(str(n) for n in info.get(key) or [])
        if names:
            problems.append(f"{label} tensor(s): {tensor_names(names)}")
    if problems:
        raise EngineError(f"LLaMA weights in {folder} do not match its config.json: " + " | ".join(problems))
    return llama.to(device).eval().requires_grad_(False)


def load_tokenizer(folder: str, llama_config: Any) -> Tuple[Any, int, Tuple[int, ...]]:
    """LLaMA-2 tokenizer (fast from tokenizer.json when present), "$$" pad as the official code."""
    tok = load_tokenizer_folder(folder, "Llama-2-7b-chat-hf")
    bos = tok.bos_token_id if tok.bos_token_id is not None else llama_config.bos_token_id
    if bos is None or tok("<s>", add_special_tokens=False)["input_ids"] != [bos]:
        raise EngineError(
            f"the tokenizer in {folder} does not read '<s>' as its BOS token; not a LLaMA-2 tokenizer"
        )
    if PAD_TOKEN in tok.get_vocab():
        tok.pad_token = PAD_TOKEN
    eos_config = llama_config.eos_token_id
    eos = {tok.eos_token_id, *(eos_config if isinstance(eos_config, list) else [eos_config])} - {None}
    if not eos:
        raise EngineError(f"neither the tokenizer nor config.json in {folder} names an EOS token")
    if len(tok) > llama_config.vocab_size:
        raise EngineError(
            f"the tokenizer has {len(tok)} tokens but the LLaMA model only {llama_config.vocab_size}"
        )
    return tok, int(bos), tuple(sorted(int(e) for e in eos))


def load(
    model_path: Optional[str],
    llama_dir: Optional[str],
    eva_path: Optional[str],
    config: MiniGPTMedConfig,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
) -> Loaded:
    """Check all three inputs (cheapest first), then build the network and fill it."""
    import torch

    from medmllm.engines.m3d.loader import resolve_device
    from medmllm.engines.minigptmed.model import MiniGPTMed

    _require_file(model_path, "model")
    _require_file(eva_path, "eva")
    llama_config = llama_config_of(llama_dir or "")
    tok, bos, eos = load_tokenizer(llama_dir or "", llama_config)
    extra = load_minigptmed_state(model_path or "", config, llama_config)
    eva = load_eva_state(eva_path or "", config)
    device, torch_dtype = resolve_device(device, dtype)
    check_memory(config, llama_config, torch_dtype, device)
    llama = load_llama(llama_dir or "", torch_dtype, device)
    merge_lora(llama, extra, config)
    with torch.device("meta"):
        model = MiniGPTMed(config, llama)
    model.visual_encoder.load_state_dict(_on(eva, device, torch_dtype), assign=True)
    model.llama_proj.load_state_dict(
        _on(
            {k.split(".", 1)[1]: v for k, v in extra.items() if k.startswith("llama_proj.")},
            device,
            torch_dtype,
        ),
        assign=True,
    )
    width = config.vision_width
    norm = {
        "weight": extra.get("ln_vision.weight", torch.ones(width)),
        "bias": extra.get("ln_vision.bias", torch.zeros(width)),
    }
    model.ln_vision.load_state_dict(_on(norm, device, torch.float32), assign=True)
    model.eval().requires_grad_(False)
    return Loaded(model, tok, config, bos, eos)


def _on(state: Mapping[str, Any], device: str, dtype: Any) -> Dict[str, Any]:
    return {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
