#!/usr/bin/env python3
"""Benchmark the m3d engine against transformers' `generate` on the same weights.

On a GPU: a full-size M3D-LaMed-Phi-3-4B with random bf16 weights (built in memory; no download),
decoded through the engine's static slot cache with the batched step compiled into CUDA graphs.
With `--tiny` (any machine, CPU included): the tiny official-format checkpoint of the tests.
Prints one table: time to first token (new volume, vision included; and a follow-up question on a
prepared volume), decode tokens/s at batch 1, aggregate tokens/s of N threads calling the engine's
`chat()` at once (continuous batching) next to `generate` on one padded batch, mask decoder time
and peak memory. `--out FILE` also writes the table as markdown (for docs/benchmarks.md).

    python scripts/bench_m3d.py [--tiny] [--tokens 128] [--concurrent 8] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Can you segment the liver in this image? Please output the mask."


def _maker() -> Any:
    spec = importlib.util.spec_from_file_location("make_tiny_m3d", ROOT / "scripts" / "make_tiny_m3d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def full_size_loaded(tokenizer_folder: str, device: str) -> Any:
    """Phi-3-mini-4k sized M3D-LaMed (about 4.05B parameters) with random bf16 weights on `device`."""
    import torch
    from medmllm.engines.m3d.config import LamedConfig
    from medmllm.engines.m3d.loader import Loaded, load_tokenizer
    from medmllm.engines.m3d.model import LamedModel
    from transformers.initialization import no_init_weights

    tiny = LamedConfig.from_folder(tokenizer_folder)
    data = {
        **tiny.raw,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32015,
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "sliding_window": 2047,
    }
    for key in (
        "vision_hidden_size",
        "vision_mlp_dim",
        "vision_num_layers",
        "vision_num_heads",
        "mm_hidden_size",
    ):
        data.pop(key, None)
    for key in (
        "seg_embed_dim",
        "seg_vit_mlp_dim",
        "seg_vit_num_layers",
        "seg_vit_num_heads",
        "seg_decoder_mlp_dim",
    ):
        data.pop(key, None)
    config = LamedConfig.from_dict(data)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device), no_init_weights():
            model = LamedModel(config)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.eval().requires_grad_(False)
    tok, im_patch, bos, eos = load_tokenizer(tokenizer_folder, config)
    return Loaded(model, tok, config, im_patch, bos, eos)


def phantom() -> Any:
    from medmllm.geometry.volume import Volume

    rng = np.random.default_rng(0)
    v = rng.normal(40, 20, (120, 256, 256)).astype(np.float32)
    v[:, :20] = -1000
    return Volume.from_array(v, np.diag([0.8, 0.8, 2.5, 1.0]))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _chat(engine: Any, volume: Any, volume_id: str, tokens: int) -> int:
    from medmllm.engines.base import ChatContext, ChatTurn

    ctx = ChatContext(volume, volume_id, [ChatTurn("user", QUESTION)], max_new_tokens=tokens)
    return sum(1 for _ in engine.chat(ctx, threading.Event()))


def bench_ours(engine: Any, volume: Any, tokens: int, concurrent: int, repeats: int) -> Dict[str, float]:
    counter = iter(range(10**6))
    ttft = [_timed(lambda: _chat(engine, volume, f"v{next(counter)}", 1)) for _ in range(repeats)]
    engine.prepare(volume, "warm")
    total = statistics.median(_timed(lambda: _chat(engine, volume, "warm", tokens)) for _ in range(repeats))
    first = statistics.median(_timed(lambda: _chat(engine, volume, "warm", 1)) for _ in range(repeats))
    steps = engine.scheduler.steps
    steps.clear()
    threads = [
        threading.Thread(target=_chat, args=(engine, volume, "warm", tokens)) for _ in range(concurrent)
    ]
    wall = _timed(lambda: [t.start() for t in threads] and [t.join() for t in threads])
    return {
        "ttft_s": statistics.median(ttft),
        "followup_ttft_s": first,
        "decode_tok_s": (tokens - 1) / max(total - first, 1e-9),
        "aggregate_tok_s": concurrent * tokens / wall,
        "mean_batch": statistics.mean(steps) if steps else 1.0,
    }


def bench_generate(engine: Any, volume: Any, tokens: int, concurrent: int, repeats: int) -> Dict[str, float]:
    """transformers' own loop on the same weights, fed the same inputs_embeds (the official path)."""
    import torch
    from medmllm.geometry.m3d_grid import M3DGrid

    model, loaded = engine.model, engine.loaded
    ids = engine.prompt_ids(QUESTION)

    def embeds() -> Any:
        image, _ = M3DGrid.prepare(volume)
        prefix = model.prefix_embeds(loaded.prefix_id, model.image_features(model.image_tensor(image)))
        return torch.cat([prefix, model.embed(torch.tensor([ids[257:]], device=model.device))], 1)

    def generate(batch: int, n: int) -> None:
        with torch.no_grad():
            x = embeds().expand(batch, -1, -1)
            model.lm.generate(
                inputs_embeds=x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )

    ttft = statistics.median(_timed(lambda: generate(1, 1)) for _ in range(repeats))
    total = statistics.median(_timed(lambda: generate(1, tokens)) for _ in range(repeats))
    wall = _timed(lambda: generate(concurrent, tokens))
    return {
        "ttft_s": ttft,
        "followup_ttft_s": float("nan"),  # generate has no prepared volume: every call starts over
        "decode_tok_s": (tokens - 1) / max(total - ttft, 1e-9),
        "aggregate_tok_s": concurrent * tokens / wall,
        "mean_batch": float(concurrent),
    }


def bench_mask(engine: Any, volume: Any, repeats: int) -> Dict[str, float]:
    import torch
    from medmllm.geometry.m3d_grid import M3DGrid

    model = engine.model
    image, grid = M3DGrid.prepare(volume)
    tensor = model.image_tensor(image)
    hidden = torch.randn(1, model.config.hidden_size, device=model.device, dtype=model.dtype)
    with torch.no_grad():
        encode = statistics.median(_timed(lambda: model.seg_embedding(tensor)) for _ in range(repeats))
        embedding = model.seg_embedding(tensor)
        decode = statistics.median(
            _timed(lambda: model.seg_logits(embedding, hidden)) for _ in range(repeats)
        )
        logits = model.seg_logits(embedding, hidden).cpu().numpy()
    to_volume = statistics.median(
        _timed(lambda: grid.mask_to_volume(logits, logits=True)) for _ in range(repeats)
    )
    return {"seg_encoder_s": encode, "mask_decoder_s": decode, "mask_to_volume_s": to_volume}


def peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def table(rows: Dict[str, Dict[str, float]], mask: Dict[str, float], concurrent: int) -> str:
    """Markdown table (readable on a terminal too) plus one line for the mask and memory."""
    lines = [
        f"| path | TTFT new volume ms | TTFT follow-up ms | decode tok/s | x{concurrent} aggregate tok/s "
        "| mean batch |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        follow = "n/a" if math.isnan(r["followup_ttft_s"]) else f"{r['followup_ttft_s'] * 1e3:.1f}"
        lines.append(
            f"| {name} | {r['ttft_s'] * 1e3:.1f} | {follow} | {r['decode_tok_s']:.1f} "
            f"| {r['aggregate_tok_s']:.1f} | {r['mean_batch']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"Mask: SegVol encoder {mask['seg_encoder_s'] * 1e3:.1f} ms (once per volume), "
        f"decoder {mask['mask_decoder_s'] * 1e3:.1f} ms, to volume {mask['mask_to_volume_s'] * 1e3:.1f} ms; "
        f"peak memory {peak_memory_gib():.2f} GiB."
    )
    return "\n".join(lines)


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoint (runs on CPU)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the table as markdown to this file")
    args = parser.parse_args(argv)
    if min(args.tokens, args.concurrent, args.repeats) < 1:
        parser.error("--tokens, --concurrent and --repeats must be >= 1")
    import torch
    from medmllm.engines.base import EngineOptions
    from medmllm.engines.m3d import M3DEngine

    on_gpu = torch.cuda.is_available()
    if not args.tiny and not on_gpu:
        parser.error("no CUDA GPU here: the full-size benchmark needs one; use --tiny on CPU")
    if not on_gpu:
        # Tiny ops do not parallelise: OpenMP spinning made the same decode 10x slower with 2 threads.
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _maker().make_tiny(os.path.join(tmp, "tiny"))
        options = EngineOptions(model=folder)
        loaded = None if args.tiny else full_size_loaded(folder, "cuda")
        engine = M3DEngine(options, loaded=loaded)  # on CUDA this compiles every batch bucket
        engine.scheduler.eos_ids = frozenset()  # random weights: never stop early; all decode --tokens
        volume = phantom()
        _chat(engine, volume, "compile-warmup", 8)
        rows = {
            "ours": bench_ours(engine, volume, args.tokens, args.concurrent, args.repeats),
            "transformers generate": bench_generate(
                engine, volume, args.tokens, args.concurrent, args.repeats
            ),
        }
        mask = bench_mask(engine, volume, args.repeats)
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)"
    size = "tiny checkpoint" if args.tiny else "Phi-3-4B size, random bf16"
    text = table(rows, mask, args.concurrent)
    title = (
        f"M3D-LaMed bench: {size} on {device}; {args.tokens} new tokens, {args.concurrent} concurrent; "
        f"torch {torch.__version__}"
    )
    print(title)
    print(text)
    if args.out:
        Path(args.out).write_text(f"{title}\n\n{text}\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
