#!/usr/bin/env python3
"""Write tiny random M3D-LaMed checkpoints in the official on-disk format, for tests and --tiny benches.

Same config keys (model_type lamed_phi3 / lamed_llama), same tensor names, same file layout
(single safetensors, sharded safetensors + model.safetensors.index.json, or pytorch_model.bin)
and the official tokenizer file set: a SentencePiece `tokenizer.model` trained here plus
tokenizer_config.json, special_tokens_map.json and added_tokens.json, no tokenizer.json (Phi-3's
added tokens, then <im_patch>, <bx_start>, <bx_end> special and [SEG] normal, in that order like
LaMed's train.py). Only the vocabulary, widths and depths are small; the image geometry stays the
real 32x256x256 with 4x16x16 patches. The remote-code files of the release
(configuration_m3d_lamed.py, modeling_m3d_lamed.py) are not written: the engine never runs them.

    python scripts/make_tiny_m3d.py OUT_DIR [--family phi3|llama] [--layout single|sharded|bin] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Sequence

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


# Phi-3-mini's added tokens (ids 32000..32010 after its 32000 SentencePiece pieces), then LaMed's.
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>"]
PHI3_ADDED += [
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]
LAMED_SPECIAL = ["<im_patch>", "<bx_start>", "<bx_end>"]
# The files a slow LlamaTokenizer.save_pretrained writes, as in the official release (no tokenizer.json).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def train_sentencepiece(sentences: Sequence[str]) -> bytes:
    """A Llama-style SentencePiece BPE model (byte fallback, split digits, <unk> <s> </s> = 0 1 2)
    trained on `sentences`; make_tiny_minigptmed uses it too."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences) * 4),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        num_threads=1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def _added(content: str, special: bool, rstrip: bool = False) -> Dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": not special,
        "rstrip": rstrip,
        "single_word": False,
        "special": special,
    }


def build_tokenizer(folder: str, family: str) -> Dict[str, int]:
    """Write the official tokenizer file set; returns token -> id of the added tokens.

    Layout of the released checkpoints (issue 10: `tokenizer.model` + small JSON files, no
    `tokenizer.json`), i.e. what LaMed's train.py saves with a slow LlamaTokenizer
    (`use_fast=False`) after `add_special_tokens` of <im_patch> <bx_start> <bx_end> and
    `add_tokens("[SEG]")`. Phi-3's tokenizer_config keeps `add_bos_token: false`, `legacy: false`
    and eos `<|endoftext|>` (Phi-3-mini tokenizer_config.json); Llama-2's adds BOS.
    """
    import sentencepiece as spm

    proto = train_sentencepiece(SENTENCES)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(proto)
    size = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    base = PHI3_ADDED if family == "phi3" else []
    names = [*base, *LAMED_SPECIAL, "[SEG]"]
    ids = {name: size + i for i, name in enumerate(names)}
    decoder = {"0": _added("<unk>", True), "1": _added("<s>", True), "2": _added("</s>", family != "phi3")}
    decoder.update({str(ids[t]): _added(t, True, rstrip=t != "<|endoftext|>") for t in base})
    decoder.update({str(ids[t]): _added(t, True) for t in LAMED_SPECIAL})
    decoder[str(ids["[SEG]"])] = _added("[SEG]", False)
    eos = "<|endoftext|>" if family == "phi3" else "</s>"
    pad = "<|endoftext|>" if family == "phi3" else "<unk>"
    config = {
        "add_bos_token": family != "phi3",
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": LAMED_SPECIAL,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "legacy": False,
        "model_max_length": 512,
        "pad_token": pad,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special_map = {"additional_special_tokens": LAMED_SPECIAL, "bos_token": "<s>", "eos_token": eos}
    special_map.update({"pad_token": pad, "unk_token": "<unk>"})
    for name, data in (
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", special_map),
        ("added_tokens.json", ids),
    ):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
    return ids


def official_config(family: str, vocab_size: int, seg_token_id: int, eos: int = 2) -> Dict[str, Any]:
    """config.json keys of the release; `eos` is Phi-3's <|endoftext|> id (32000 there), else </s>."""
    common = {
        "vocab_size": vocab_size,
        "bos_token_id": 1,
        "eos_token_id": eos,
        "pad_token_id": eos,
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
    added = build_tokenizer(folder, family)
    eos = added.get("<|endoftext|>", 2)
    data = official_config(family, added["[SEG]"] + 1, added["[SEG]"], eos)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    if family == "phi3":  # Phi-3 ends a turn with <|end|>, named only here
        generation = {"bos_token_id": 1, "eos_token_id": [data["eos_token_id"], added["<|end|>"]]}
        with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({**generation, "transformers_version": "4.45.0"}, f, indent=2)
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
