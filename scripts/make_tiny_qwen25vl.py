"""Write a tiny random Qwen2.5-VL checkpoint that `transformers serve` loads, and that answers one fixed text.

For the real-server test (`Testing/test_transformers_serve.py`): no weights can be downloaded, so
the checkpoint is built from a config, with a byte-level BPE tokenizer trained here on a few
sentences. The model is random except for a bigram shortcut: every attention and MLP output
projection is zero, so the last hidden state is the embedding of the last token, and `lm_head`
rows are set so that greedy decoding writes `--answer` (split on the added tokens `--special`
marks as special, the rest as ordinary added tokens) and then `<|im_end|>`. The vision tower,
processor and chat template are the real Qwen2.5-VL classes, so the server resizes and encodes the
image exactly as for the real model; `--min-pixels`/`--max-pixels` set the processor's range
(Qwen's README configuration is 256*28*28 .. 1280*28*28).

    python scripts/make_tiny_qwen25vl.py OUT --answer TEXT [--special TOKEN ...]
    python scripts/make_tiny_qwen25vl.py OUT --grid WxH   # prints the size the processor gives an image

Needs torch, transformers and torchvision (the Qwen processors); run it with the serving Python.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import List

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
SPECIAL += ["<|image_pad|>", "<|video_pad|>"]
# The Qwen2.5-VL chat template's layout (system default, image placeholders inside the user turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_TEXT = [
    "Where is the lesion? Outline the position of each lesion and output all the coordinates in JSON format.",
    "You are a helpful assistant. Describe the findings in this image as a radiology report.",
    "The liver, spleen and kidneys are normal. No focal lesion is seen in the right lobe.",
]


def train_tokenizer(answer_tokens: List[str], special: List[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL
    )
    core.train_from_iterator(TRAINING_TEXT * 20, trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:] + special,
    )
    tokenizer.add_tokens([t for t in answer_tokens if t not in special])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(out: Path, answer: str, special: List[str], min_pixels: int, max_pixels: int) -> None:
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    pieces = (
        [p for p in re.split("(" + "|".join(map(re.escape, special)) + ")", answer) if p]
        if special
        else [answer]
    )
    tokenizer = train_tokenizer(pieces, special)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "bos_token_id": None,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    chain = [tokenizer.encode("\n")[-1], *(ids(p) for p in pieces), ids("<|im_end|>")]
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.language_model.embed_tokens.weight
        head = model.lm_head.weight
        head.mul_(0.01)
        for before, after in zip(chain, chain[1:]):
            head[after] = embed[before] / embed[before].norm() * 100.0
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.do_sample = False
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "answer.json").write_text(json.dumps({"answer": answer, "tokens": pieces}, ensure_ascii=False))


def grid_size(folder: Path, width: int, height: int) -> str:
    """The size the checkpoint's processor turns an image into: image_grid_thw * 14."""
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder)
    grid = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"][0]
    patch = processor.patch_size
    return f"{int(grid[2]) * patch}x{int(grid[1]) * patch}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--answer")
    parser.add_argument("--special", nargs="*", default=[])
    parser.add_argument("--min-pixels", type=int, default=256 * 28 * 28)
    parser.add_argument("--max-pixels", type=int, default=1280 * 28 * 28)
    parser.add_argument("--grid", metavar="WxH", help="print the processed size of an image of this size")
    args = parser.parse_args()
    if args.grid:
        width, height = (int(v) for v in args.grid.lower().split("x"))
        print(grid_size(args.out, width, height))
    else:
        build(args.out, args.answer, args.special, args.min_pixels, args.max_pixels)


if __name__ == "__main__":
    main()
