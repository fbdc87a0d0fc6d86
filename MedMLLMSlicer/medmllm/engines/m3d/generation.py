"""Our own decode loop: prefix KV cache per volume, streaming, and the hidden state behind each token.

`model.generate` cannot stream text and hand back the hidden state that predicted `[SEG]` at the
moment it happens, so the loop is written here: one prefill of BOS + image features per volume
(cached), a prefill of the question on a copy of that cache, then one token at a time. On CUDA the
per-token step can use a StaticCache and a `torch.compile(mode="reduce-overhead")` step (CUDA
graphs); elsewhere a DynamicCache and eager execution.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch


class IncrementalDetokenizer:
    """Turns token ids into text deltas that are always complete characters.

    Decoding a sliding window (prefix..end) and emitting only what grew past the previous window
    keeps SentencePiece's leading-space rules and multi-byte characters (split across byte tokens)
    right; a delta ending in U+FFFD waits for the next token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end becomes U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def pick_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]
) -> int:
    """Greedy at temperature 0, else nucleus sampling (the official demo samples with top_p 0.9)."""
    if temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(-1, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator).item())


@dataclass
class Step:
    """The hidden state (final norm) at the last position and the next-token logits it gives."""

    hidden: torch.Tensor
    logits: torch.Tensor


class Decoder:
    """Runs the language model for one conversation on top of a shared, read-only prefix cache."""

    def __init__(
        self, model: Any, static: bool, compile_options: Optional[Dict[str, Any]], max_len: int
    ) -> None:
        """`compile_options`: `torch.compile` arguments for the per-token step (None = eager)."""
        self.model = model
        self.static = static
        self.max_len = max_len
        self._pool: List[Any] = []  # finished static caches, reused so CUDA graphs keep their addresses
        self._pool_lock = threading.Lock()
        self._step_fn: Callable[..., torch.Tensor] = model.run
        if compile_options is not None:
            self._step_fn = torch.compile(model.run, dynamic=False, **compile_options)

    @torch.no_grad()
    def prefix_cache(self, embeds: torch.Tensor) -> Any:
        """KV cache of BOS + image features: computed once per volume, never mutated afterwards."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.lm.config)
        self.model.run(embeds, cache)
        return cache

    def _session_cache(self, prefix: Any) -> Any:
        if not self.static:
            return copy.deepcopy(prefix)
        from transformers import StaticCache

        with self._pool_lock:
            cache = self._pool.pop() if self._pool else None
        if cache is None:
            cache = StaticCache(config=self.model.lm.config, max_cache_len=self.max_len)
        else:
            cache.reset()
        for i, layer in enumerate(prefix.layers):
            cache.update(layer.keys, layer.values, i)
        return cache

    def release(self, cache: Any) -> None:
        """Hand a finished conversation's static cache back for the next one."""
        if self.static:
            with self._pool_lock:
                self._pool.append(cache)

    @torch.no_grad()
    def start(self, prefix: Any, prefix_len: int, embeds: torch.Tensor) -> Tuple[Any, int, Step]:
        """Copy the prefix cache and prefill the question; returns (cache, position, Step)."""
        cache = self._session_cache(prefix)
        n = embeds.shape[1]
        positions = torch.arange(prefix_len, prefix_len + n, device=embeds.device).unsqueeze(0)
        last = self.model.run(embeds, cache, positions)[:, -1]
        return cache, prefix_len + n, Step(last, self.model.logits(last)[0])

    @torch.no_grad()
    def step(self, cache: Any, position: int, token_id: int) -> Step:
        """Feed one token at `position`; the compiled variant sees only fixed-shape tensors.

        The hidden state is cloned: a CUDA-graph replay overwrites its output buffer, and a `[SEG]`
        hidden state is used after later steps.
        """
        embeds = self.model.embed(torch.tensor([[token_id]], device=self.model.device))
        positions = torch.tensor([[position]], device=embeds.device)
        hidden = self._step_fn(embeds, cache, positions)[:, -1].clone()
        return Step(hidden, self.model.logits(hidden)[0])
