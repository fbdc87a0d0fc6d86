"""Continuous batching: one thread runs the model for every conversation and decodes them together.

Decoding is bound by reading the weights, so a forward over n conversations costs about as much as
over one: n tokens for the price of one. Each `chat()` thread submits a `Request` and reads its own
queue; the scheduler thread prefills a newcomer between two steps (batch 1, on a copy of the
volume's prefix cache), emits its first token at once, then copies its KV rows into a free slot of
a `SlotCache`, where every active conversation is stepped by one batched forward. A finished or
cancelled conversation leaves between steps and the last slot moves into its place, so the active
rows are always 0..n-1. With a single conversation the forward is a plain one-row step.

All model work (vision tower, prefix prefill, masks) runs on this thread through `call()`, so no
two forwards ever overlap and no lock has to be shared with the decode loop.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch

from medmllm.engines.base import EngineError
from medmllm.engines.m3d.generation import Decoder, pick_token

_END = object()


class SlotCache:
    """KV cache with one row ("slot") per conversation, each at its own length.

    Duck-types the `update(keys, values, layer_idx)` that transformers' attention layers call:
    row b's single new key/value is written at `write[b]`, and the whole row is returned; the
    attention mask (built by the scheduler) hides every position past each row's own length.
    Tensors are allocated once and marked static so CUDA graphs can mutate them in place.
    """

    def __init__(self, config: Any, slots: int, length: int, dtype: torch.dtype, device: Any) -> None:
        heads, head_dim = _kv_shape(config)
        shape = (slots, heads, length, head_dim)
        layers = config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.write = torch.zeros(slots, dtype=torch.long, device=device)
        self.span = torch.arange(length, device=device)
        self.row_ids = torch.arange(slots, device=device).unsqueeze(1)
        self.head_ids = torch.arange(heads, device=device).unsqueeze(0)
        for tensor in (*self.keys, *self.values, self.write, self.span, self.row_ids, self.head_ids):
            torch._dynamo.mark_static_address(tensor)

    @staticmethod
    def nbytes(config: Any, slots: int, length: int, dtype: torch.dtype) -> int:
        heads, head_dim = _kv_shape(config)
        size = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * slots * heads * length * head_dim * size

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write one token per row (decode steps only: key_states is (rows, heads, 1, head_dim)).

        `index_put_` on the whole tensor, not a write through a slice: inductor then updates the
        cache in place instead of copying all of it back (the pattern gpt-fast relies on)."""
        rows = key_states.shape[0]
        index = (self.row_ids[:rows], self.head_ids, self.write[:rows].unsqueeze(1))
        self.keys[layer_idx].index_put_(index, key_states[:, :, 0])
        self.values[layer_idx].index_put_(index, value_states[:, :, 0])
        return self.keys[layer_idx][:rows], self.values[layer_idx][:rows]

    def load(self, row: int, cache: Any, length: int) -> None:
        """Copy a batch-1 DynamicCache (a prefilled conversation) into `row`."""
        for i, layer in enumerate(cache.layers):
            self.keys[i][row, :, :length].copy_(layer.keys[0, :, :length])
            self.values[i][row, :, :length].copy_(layer.values[0, :, :length])

    def move(self, source: int, target: int, length: int) -> None:
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[target, :, :length].copy_(t[source, :, :length])


def _kv_shape(config: Any) -> Tuple[int, int]:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads, head_dim


@dataclass
class Request:
    """One answer to decode. `decoder` None = batched in a slot; else alone on that decoder."""

    prefix: Any  # the volume's read-only prefix cache (BOS + image features)
    prefix_len: int
    ids: List[int]  # question token ids after the prefix
    max_new: int
    temperature: float
    top_p: float
    generator: Optional[torch.Generator]
    cancel: threading.Event
    keep_hidden: FrozenSet[int] = frozenset()  # tokens whose predicting hidden state is sent ([SEG])
    decoder: Optional[Decoder] = None


@dataclass
class _Sequence:
    request: Request
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cache: Any = None  # batch-1 cache until admitted to a slot (or for good, when alone)
    position: int = 0  # where the next token goes
    last: int = 0  # the token to feed next
    produced: int = 0
    abandoned: bool = False  # the reader went away (generator closed)

    def stopped(self) -> bool:
        return self.abandoned or self.request.cancel.is_set()


class _Job:
    def __init__(self, fn: Callable[..., Any], args: Sequence[Any]) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # handed to the caller's thread, which re-raises it
            self.error = exc
        self.done.set()


class Scheduler:
    """The decode thread: batched steps over a SlotCache, plus conversations that decode alone."""

    def __init__(
        self,
        model: Any,
        prefill: Decoder,
        slots: int,
        slot_len: int,
        eos_ids: Sequence[int],
        compile_options: Optional[dict] = None,
    ) -> None:
        """`slots` 0 = no batching. `compile_options`: `torch.compile` arguments for the batched
        step; then batches are padded to a power of two (one graph per bucket size)."""
        self.model = model
        self.prefill = prefill
        self.slots = slots
        self.slot_len = slot_len
        self.eos_ids = frozenset(eos_ids)
        self.cache = SlotCache(model.lm.config, slots, slot_len, model.dtype, model.device) if slots else None
        self.compiled = compile_options is not None
        self._forward: Callable[..., Tuple[torch.Tensor, torch.Tensor]] = self._batch_forward
        if self.compiled:
            self._forward = torch.compile(self._batch_forward, dynamic=False, **compile_options)
        self._rows: List[_Sequence] = []  # in slots 0..n-1
        self._waiting: List[_Sequence] = []  # prefilled, waiting for a free slot
        self._solo: List[_Sequence] = []
        self._incoming: List[_Sequence] = []
        self._jobs: List[_Job] = []
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._closing = False
        # Batch size of recent batched steps (tests, benchmark); bounded for a long-running server.
        self.steps: deque = deque(maxlen=100_000)

    # ---- called from chat threads -----------------------------------------------------------

    def submit(self, request: Request) -> Iterator[Tuple[int, Optional[torch.Tensor]]]:
        """Queue a conversation now; iterate the result for (token, hidden or None) until it ends."""
        seq = _Sequence(request)
        with self._cond:
            self._start_thread()
            self._incoming.append(seq)
            self._cond.notify()
        return self._read(seq)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the decode thread between two steps and return its result."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        job = _Job(fn, args)
        with self._cond:
            self._start_thread()
            self._jobs.append(job)
            self._cond.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        """Stop the thread (conversations in flight end with an error); the next call restarts it."""
        with self._cond:
            thread, self._closing = self._thread, True
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cond:
            self._thread, self._closing = None, False

    def warm_up(self) -> List[int]:
        """Compile (on CUDA: capture) the batched step for every bucket size before any user waits
        for it; three calls each because cudagraph trees run eagerly, then record, then replay.
        Padding writes go to position 0 of each row, so this runs only while no slot is in use."""
        if self._rows:
            raise EngineError("warm_up needs an engine with no conversation in progress")
        sizes = sorted({self._bucket(n) for n in range(1, self.slots + 1)})
        device = self.model.device
        with torch.no_grad():
            for size in sizes:
                zeros = torch.zeros((size, 1), dtype=torch.long, device=device)
                for _ in range(3):
                    if self.compiled:
                        torch.compiler.cudagraph_mark_step_begin()
                    self._forward(self.model.embed(zeros), zeros)
        return sizes

    def _read(self, seq: _Sequence) -> Iterator[Tuple[int, Optional[torch.Tensor]]]:
        try:
            while True:
                item = seq.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    if isinstance(item, EngineError):
                        raise item
                    raise EngineError(f"decoding failed: {item}") from item
                yield item
        finally:
            seq.abandoned = True

    def _start_thread(self) -> None:
        """Called under the lock; a job queued during close() would never run, so it is refused."""
        if self._closing:
            raise EngineError("the engine is closing")
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="m3d-decode", daemon=True)
            self._thread.start()

    # ---- the decode thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while self._turn():
            pass

    def _turn(self) -> bool:
        """One loop turn: jobs, newcomers, departures, then one step of everything running."""
        with self._cond:
            while not (self._closing or self._jobs or self._incoming or self._busy()):
                self._cond.wait()
            jobs, self._jobs = self._jobs, []
            incoming, self._incoming = self._incoming, []
            closing = self._closing
        for job in jobs:
            job.run()
        if closing:
            self._fail_all(EngineError("the engine was closed"), incoming)
            return False
        try:
            with torch.no_grad():
                for seq in incoming:
                    self._begin(seq)
                self._drop_stopped()
                self._admit()
                self._step_rows()
                self._step_solo()
        except Exception as exc:  # e.g. out of memory: every running conversation gets the error
            self._fail_all(exc, [])
        return True

    def _busy(self) -> bool:
        return bool(self._rows or self._waiting or self._solo)

    def _fail_all(self, exc: BaseException, more: List[_Sequence]) -> None:
        for seq in (*self._rows, *self._waiting, *self._solo, *more):
            seq.out.put(exc)
        self._rows, self._waiting, self._solo = [], [], []

    def _begin(self, seq: _Sequence) -> None:
        """Prefill the question (batch 1) and emit the first token; then wait for a slot or go solo."""
        request = seq.request
        if seq.stopped():
            seq.out.put(_END)
            return
        decoder = request.decoder or self.prefill
        try:
            ids = torch.tensor([request.ids], device=self.model.device)
            seq.cache, seq.position, step = decoder.start(
                request.prefix, request.prefix_len, self.model.embed(ids)
            )
            token = pick_token(step.logits, request.temperature, request.top_p, request.generator)
        except Exception as exc:  # this conversation fails alone
            seq.out.put(exc)
            return
        if not self._emit(seq, token, step.hidden):
            decoder.release(seq.cache)
            return
        (self._solo if request.decoder is not None else self._waiting).append(seq)

    def _emit(self, seq: _Sequence, token: int, hidden: torch.Tensor) -> bool:
        """Send a token to its reader; False (and the end marker sent) when the answer is finished."""
        request = seq.request
        if token in self.eos_ids:
            seq.out.put(_END)
            return False
        seq.out.put((token, hidden.clone() if token in request.keep_hidden else None))
        seq.produced += 1
        seq.last = token
        if seq.produced >= request.max_new:
            seq.out.put(_END)
            return False
        return True

    def _drop_stopped(self) -> None:
        for seq in [s for s in self._solo if s.stopped()]:
            self._solo.remove(seq)
            seq.request.decoder.release(seq.cache)
            seq.out.put(_END)
        for seq in [s for s in self._waiting if s.stopped()]:
            self._waiting.remove(seq)
            seq.out.put(_END)
        gone = [row for row, seq in enumerate(self._rows) if seq.stopped()]
        for row in reversed(gone):
            self._rows[row].out.put(_END)
        self._release(gone)

    def _admit(self) -> None:
        while self._waiting and len(self._rows) < self.slots:
            seq = self._waiting.pop(0)
            self.cache.load(len(self._rows), seq.cache, seq.position)
            seq.cache = None
            self._rows.append(seq)

    def _release(self, rows: List[int]) -> None:
        """Remove finished rows, moving the last active row into each hole (rows stay 0..n-1)."""
        for row in sorted(rows, reverse=True):
            last = len(self._rows) - 1
            if row != last:
                self.cache.move(last, row, self._rows[last].position)
                self._rows[row] = self._rows[last]
            self._rows.pop()

    def _bucket(self, n: int) -> int:
        if not self.compiled:
            return n
        size = 1
        while size < n:
            size *= 2
        return min(size, self.slots)

    def _batch_forward(
        self, embeds: torch.Tensor, positions: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One token for each row: fixed shapes for a given batch size, so one graph per bucket."""
        rows = embeds.shape[0]
        self.cache.write[:rows].copy_(positions[:, 0])
        visible = self.cache.span.unsqueeze(0) <= positions
        mask = torch.zeros(visible.shape, dtype=embeds.dtype, device=embeds.device)
        mask = mask.masked_fill(~visible, torch.finfo(embeds.dtype).min)[:, None, None, :]
        hidden = self.model.run(embeds, self.cache, positions, mask)[:, -1]
        return hidden, self.model.logits(hidden)

    def _step_rows(self) -> None:
        n = len(self._rows)
        if not n:
            return
        size = self._bucket(n)
        pad = size - n
        device = self.model.device
        tokens = torch.tensor([[s.last] for s in self._rows] + [[0]] * pad, device=device)
        # Padding rows sit in free slots at position 0: harmless writes, never read by a real row.
        positions = torch.tensor([[s.position] for s in self._rows] + [[0]] * pad, device=device)
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        hidden, logits = self._forward(self.model.embed(tokens), positions)
        self.steps.append(size)
        picks = self._pick(logits[:n])
        done = []
        for row, (seq, token) in enumerate(zip(self._rows, picks)):
            seq.position += 1
            if not self._emit(seq, token, hidden[row : row + 1]):
                done.append(row)
        self._release(done)

    def _pick(self, logits: torch.Tensor) -> List[int]:
        """One device sync for all greedy rows; sampled rows use their own generator."""
        greedy = logits.argmax(dim=-1).tolist()
        return [
            greedy[i]
            if s.request.temperature <= 0
            else pick_token(logits[i], s.request.temperature, s.request.top_p, s.request.generator)
            for i, s in enumerate(self._rows)
        ]

    def _step_solo(self) -> None:
        for seq in list(self._solo):
            request = seq.request
            step = request.decoder.step(seq.cache, seq.position, seq.last)
            seq.position += 1
            token = pick_token(step.logits, request.temperature, request.top_p, request.generator)
            if not self._emit(seq, token, step.hidden):
                self._solo.remove(seq)
                request.decoder.release(seq.cache)
