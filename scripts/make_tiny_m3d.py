#!/usr/bin/env python3
"""Write tiny random M3D-LaMed checkpoints in the official on-disk format, for tests and --tiny benches.

Same config keys (model_type lamed_phi3 / lamed_llama), same tensor names, same file layout
(single safetensors, sharded safetensors + model.safetensors.index.json, or pytorch_model.bin)
and a tokenizer with the official extra tokens (<im_patch>, <bx_start>, <bx_end> special, [SEG]
normal, added in that order like LaMed's train.py); only the widths and depths are small. The image
geometry stays the real 32x256x256 with 4x16x16 patches.

    python scripts/make_tiny_m3d.py OUT_DIR [--family phi3|llama] [--layout single|sharded|bin] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict

SENTENCES = [
    "Can you segment the liver in this image? Please output the mask.",
    "Where is the spleen in this image? Please output the box.",
    "Please generate a medical report based on this image.",
    "Sure, the bounding box is [0.1, 0.2, 0.3, 0.5, 0.6, 0.7].",
    "It is [SEG]. The mask is [SEG]. Coordinates are [0.094, 0.277, 0.5, 0.656, 0.75, 0.812].",
    "The liver shows a hypodense lesion of 2.5 cm in segment 7; no ascites.",
    "What is the abnormality type in this image? Choices: A. Axial B. Coronal C. Sagittal D. Oblique",
]

# Widths small enough for CPU tests; names follow the optional config keys of the engine.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vision_hidden_size": 32,
    "vision_mlp_dim": 64,
    "vision_num_layers": 2,
    "vision_num_heads": 2,
    "mm_hidden_size": 32,
    "seg_embed_dim": 32,
    "seg_vit_mlp_dim": 64,
    "seg_vit_num_layers": 1,
    "seg_vit_num_heads": 2,
    "seg_decoder_mlp_dim": 64,
}


def build_tokenizer(folder: str) -> Any:
    """Byte-level BPE (multi-byte characters split across tokens, like Llama's byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    fast.add_special_tokens({"additional_special_tokens": ["<im_patch>", "<bx_start>", "<bx_end>"]})
    fast.add_tokens("[SEG]")
    fast.save_pretrained(folder)
    write_tokenizer_json(folder, fast)
    return fast


def write_tokenizer_json(folder: str, fast: Any) -> None:
    """tokenizer_config.json / special_tokens_map.json as transformers 4.4x wrote them for LaMed."""
    specials = ["<im_patch>", "<bx_start>", "<bx_end>"]
    decoder = {
        str(fast.convert_tokens_to_ids(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t != "[SEG]",
        }
        for t in ["<unk>", "<s>", "</s>", *specials, "[SEG]"]
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": specials,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 512,
        "pad_token": "</s>",
        "padding_side": "right",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }
    special_map = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "additional_special_tokens": specials,
    }
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)


def official_config(family: str, vocab_size: int, seg_token_id: int) -> Dict[str, Any]:
    common = {
        "vocab_size": vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "transformers_version": "4.45.0",
        "image_channel": 1,
        "image_size": [32, 256, 256],
        "patch_size": [4, 16, 16],
        "vision_tower": "vit3d",
        "vision_select_layer": -1,
        "vision_select_feature": "patch",
        "mm_projector_type": "spp",
        "proj_layer_type": "mlp",
        "proj_layer_num": 2,
        "proj_pooling_type": "spatial",
        "proj_pooling_size": 2,
        "segmentation_module": "segvol",
        "seg_token_id": seg_token_id,
        **TINY,
    }
    if family == "phi3":
        return {
            "architectures": ["LamedPhi3ForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_m3d_lamed.LamedPhi3Config",
                "AutoModelForCausalLM": "modeling_m3d_lamed.LamedPhi3ForCausalLM",
            },
            "model_type": "lamed_phi3",
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "original_max_position_embeddings": 1024,
            "sliding_window": 1023,
            **common,
        }
    return {
        "architectures": ["LamedLlamaForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_m3d_lamed.LamedConfig",
            "AutoModelForCausalLM": "modeling_m3d_lamed.LamedLlamaForCausalLM",
        },
        "model_type": "lamed_llama",
        "attention_bias": False,
        "pretraining_tp": 1,
        **common,
    }


def write_weights(folder: str, state: Dict[str, Any], layout: str) -> None:
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if layout == "bin":
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        return
    if layout == "single":
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, os.path.join(folder, shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def liven(lm: Any) -> None:
    """Unit-scale the language-model matrices: with 0.02-std weights a tiny LM repeats one token,
    which would let a broken KV cache pass a greedy-equality test."""
    import torch

    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.ndim == 2 and not name.startswith(
                ("model.vision_tower", "model.mm_projector", "model.seg_")
            ):
                p.normal_(0.0, 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5)


def make_tiny(folder: str, family: str = "phi3", layout: str = "single", seed: int = 0) -> str:
    """Write the checkpoint folder and return it."""
    import torch
    from medmllm.engines.m3d.config import LamedConfig
    from medmllm.engines.m3d.model import LamedModel

    os.makedirs(folder, exist_ok=True)
    tok = build_tokenizer(folder)
    data = official_config(family, len(tok), tok.convert_tokens_to_ids("[SEG]"))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    torch.manual_seed(seed)
    model = LamedModel(LamedConfig.from_dict(data))
    torch.manual_seed(seed)  # the LM's draws must not depend on how many the vision blocks' init took
    liven(model.lm)
    write_weights(folder, model.lm.state_dict(), layout)
    return folder


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--family", choices=("phi3", "llama"), default="phi3")
    parser.add_argument("--layout", choices=("single", "sharded", "bin"), default="single")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny(args.out_dir, args.family, args.layout, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
