"""Write a tiny MiniGPT-Med in the real file formats, for tests and demos without the real weights.

Three inputs, exactly as a user gathers them for the real model:
- `eva_vit_g.pth`: flat EVA-ViT state dict with the official names, a 16x16 (224-pixel) position
  grid, one block more than the model keeps, and `norm`/`head` tensors (the surplus the official
  `strict=False` load skips);
- `llama/`: a LLaMA HF folder with the tokenizer files of Llama-2-7b-chat-hf: `tokenizer.model`
  (a SentencePiece BPE trained offline, byte fallback, `<unk>` `<s>` `</s>` = 0 1 2, holding the
  "$$" piece the official code uses as pad token), `tokenizer_config.json` (LlamaTokenizer, BOS
  added), `special_tokens_map.json` and the `tokenizer.json` transformers converts from them; plus
  config.json, generation_config.json and model.safetensors;
- `checkpoint_stage3.pth`: `{"model": {...}, "config": {...}, "epoch": ...}` as `runner_base.py` saves it:
  `llama_proj`, the peft-0.2.0 LoRA matrices and the `rotary_emb.inv_freq` buffers.
- `minigptmed_config.json`: the tiny sizes (read from the folder, or pass as extra option `config`).
The folder itself is a valid `--model` for the engine (`loader.resolve_inputs`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict

TINY_SIZES = {
    "image_size": 448,
    "patch_size": 14,
    "vision_width": 32,
    "vision_depth": 2,
    "vision_heads": 2,
    "vision_mlp_ratio": 2.0,
    "eva_image_size": 224,
    "lora_r": 4,
    "lora_alpha": 16.0,
}
LLAMA_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}
SENTENCES = [
    "[INST] <Img></Img> [detection] tumor [/INST]",
    "[INST] <Img></Img> [refer] where is the nodule in the left lung ? [/INST]",
    "[INST] <Img></Img> [identify] what is this {<56><16><84><58>} [/INST]",
    "[INST] <Img></Img> [grounding] please describe this image in details [/INST]",
    "[INST] <Img></Img> [vqa] Which region of the brain is impacted? [/INST]",
    "Describe this image in detail. The chest CT shows a small nodule.",
    "<p>tumor</p> {<20><30><40><55>} <p>nodule</p> {<29><43><42><56>}<delim>{<10><12><25><33>}",
    "pneumonia kidney liver lung brain heart bone effusion mass lesion $$ 0123456789",
]


# tokenizer_config.json and special_tokens_map.json as in meta-llama/Llama-2-7b-chat-hf.
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "legacy": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 1000000000000000019884624838656,
}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_tokenizer(folder: str) -> Any:
    """The three tokenizer files of the official folder, consistent with each other: a trained
    SentencePiece model, the configuration, and the tokenizer.json converted from both."""
    here = os.path.dirname(os.path.abspath(__file__))  # scripts/ is no package: its siblings by path
    if here not in sys.path:
        sys.path.insert(0, here)
    from make_tiny_m3d import train_sentencepiece
    from transformers import AutoTokenizer

    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(train_sentencepiece([*SENTENCES, "$$ $$ $$"]))
    for name, content in (
        ("tokenizer_config.json", TOKENIZER_CONFIG),
        ("special_tokens_map.json", SPECIAL_TOKENS),
    ):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
    tok = AutoTokenizer.from_pretrained(folder)  # converted from tokenizer.model
    if "$$" not in tok.get_vocab():
        raise RuntimeError("the tiny tokenizer must hold the '$$' piece (the official pad token)")
    tok.backend_tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return tok


def liven(module: Any) -> None:
    """Unit-scale the matrices: with 0.02-std weights a tiny LM repeats one token, which would let a
    broken KV cache pass a greedy-equality test."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5)


def write_llama(folder: str, vocab_size: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        **LLAMA_SIZES,
    )
    llama = LlamaForCausalLM(config).to(torch.float32)
    liven(llama)
    llama.save_pretrained(folder, safe_serialization=True)
    return llama


def eva_state(sizes: Dict[str, Any]) -> Dict[str, Any]:
    """Official names; pos_embed on the 224-pixel grid; one surplus block plus norm/head."""
    import torch
    from medmllm.engines.minigptmed.config import MiniGPTMedConfig
    from medmllm.engines.minigptmed.eva_vit import Block, VisionTransformer

    config = MiniGPTMedConfig.from_value(sizes)
    vit = VisionTransformer(config)
    state = {k: torch.randn_like(v) * (0.02 if v.ndim > 1 else 0.1) for k, v in vit.state_dict().items()}
    for name, value in state.items():
        if name.endswith(("norm1.weight", "norm2.weight")):
            value.add_(1.0)
    grid = config.eva_image_size // config.patch_size
    state["pos_embed"] = torch.randn(1, grid * grid + 1, config.vision_width) * 0.02
    extra = Block(config.vision_width, config.vision_heads, config.mlp_hidden).state_dict()
    state.update({f"blocks.{config.vision_depth}.{k}": v.clone() for k, v in extra.items()})
    state["norm.weight"] = torch.ones(config.vision_width)
    state["norm.bias"] = torch.zeros(config.vision_width)
    state["head.weight"] = torch.randn(16, config.vision_width) * 0.02
    state["head.bias"] = torch.zeros(16)
    return state


def minigptmed_state(sizes: Dict[str, Any], llama_config: Any) -> Dict[str, Any]:
    import torch
    from medmllm.engines.minigptmed.config import MiniGPTMedConfig
    from medmllm.engines.minigptmed.loader import minigptmed_shapes

    config = MiniGPTMedConfig.from_value(sizes)
    required, optional = minigptmed_shapes(config, llama_config)
    state = {}
    for name, shape in required.items():
        scale = shape[-1] ** -0.5 if len(shape) == 2 else 0.1
        state[name] = torch.randn(shape) * scale
    head_dim = llama_config.hidden_size // llama_config.num_attention_heads
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    state.update({k: inv_freq.clone() for k in optional if k.endswith("rotary_emb.inv_freq")})
    return state


def make_tiny(folder: str, seed: int = 0) -> Dict[str, str]:
    """Write the four files under `folder`; returns their paths (model, eva, llama, config)."""
    import torch

    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    paths = {
        "model": os.path.join(folder, "checkpoint_stage3.pth"),
        "eva": os.path.join(folder, "eva_vit_g.pth"),
        "llama": os.path.join(folder, "llama"),
        "config": os.path.join(folder, "minigptmed_config.json"),
    }
    os.makedirs(paths["llama"], exist_ok=True)
    tok = build_tokenizer(paths["llama"])
    llama = write_llama(paths["llama"], len(tok))
    torch.save(eva_state(TINY_SIZES), paths["eva"])
    checkpoint = {
        "model": minigptmed_state(TINY_SIZES, llama.config),
        "config": {"arch": "minigpt_v2"},
        "epoch": 3,
    }
    torch.save(checkpoint, paths["model"])
    with open(paths["config"], "w", encoding="utf-8") as f:
        json.dump(TINY_SIZES, f, indent=2)
    return paths


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key, path in make_tiny(args.out_dir, args.seed).items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
