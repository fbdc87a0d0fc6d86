"""Continuous batching in the m3d engine: concurrent chats decode together and answer exactly as alone."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest
import torch
import transformers  # noqa: F401
from conftest import load_script
from medmllm.engines.base import ChatContext, ChatTurn, EngineError, EngineOptions, TokenOut
from medmllm.engines.m3d import engine as engine_module
from medmllm.engines.m3d.batching import Request, Scheduler, SlotCache
from medmllm.engines.registry import create_engine
from medmllm.geometry.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Please generate a medical report based on this image.",
    "Where is the spleen in this image? Please output the box.",
    "Can you segment the liver in this image? Please output the mask.",
    "Describe the findings.",
    "What is the abnormality type in this image?",
    "The liver shows a hypodense lesion; where?",
]


@pytest.fixture(scope="module")
def engine(tiny_m3d):
    engine = create_engine("m3d", EngineOptions(model=tiny_m3d, device="cpu"))
    for n in range(3):
        engine.prepare(volume(n), f"vol{n}")
    yield engine
    engine.close()


def volume(n: int) -> Volume:
    """Three different phantoms (size, foreground and orientation differ), so prefixes differ."""
    v = np.full((30 + 5 * n, 50, 40 + 3 * n), -1000, np.int16)
    v[3 + n : 25, 8:45, 5 : 30 + n] = 40 + 30 * n
    v[10:18, 15 + 2 * n : 30, 12:20] = 300
    return Volume.from_array(v, np.diag([0.8, 0.9 + 0.1 * n, 2.5, 1.0]))


def ctx_for(n: int, max_new: int) -> ChatContext:
    question = QUESTIONS[n % len(QUESTIONS)]
    vol = n % 3
    return ChatContext(volume(vol), f"vol{vol}", [ChatTurn("user", question)], max_new_tokens=max_new)


def text_of(events: List[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenOut))


def answer(engine, ctx: ChatContext, cancel: Optional[threading.Event] = None) -> str:
    return text_of(list(engine.chat(ctx, cancel or threading.Event())))


@contextmanager
def held(scheduler: Scheduler) -> Iterator[None]:
    """Keep the decode thread busy with a job, so that what is submitted meanwhile joins at once."""
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=scheduler.call, args=(lambda: entered.set() or release.wait(),))
    holder.start()
    entered.wait()
    try:
        yield
    finally:
        release.set()
        holder.join()


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def in_threads(jobs: Dict[Any, Any]) -> Dict[Any, Any]:
    """Run each callable in its own thread (like the server's chat workers); results by key."""
    results: Dict[Any, Any] = {}
    threads = [threading.Thread(target=lambda k=k, f=f: results.update({k: f()})) for k, f in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def together(scheduler: Scheduler, jobs: Dict[Any, Any]) -> Dict[Any, Any]:
    """Run the jobs in threads, all submitted before the decode thread takes any: one batch."""
    results: Dict[Any, Any] = {}
    with held(scheduler):
        runner = threading.Thread(target=lambda: results.update(in_threads(jobs)))
        runner.start()
        wait_for(lambda: len(scheduler._incoming) == len(jobs), "the submissions")
    runner.join()
    return results


def test_concurrent_chats_answer_exactly_as_sequential_runs(engine):
    """Six conversations (3 volumes, 6 questions, different lengths) decoded together: same text
    as each alone; three start together, three more join while those decode, some leave early."""
    lengths = [40, 16, 28, 40, 9, 33]
    contexts = [ctx_for(n, lengths[n]) for n in range(6)]
    alone = [answer(engine, ctx) for ctx in contexts]
    assert len(set(alone)) == 6 and all(alone)
    scheduler = engine.scheduler
    scheduler.steps.clear()
    results: Dict[int, str] = {}
    workers = [
        threading.Thread(target=lambda n=n: results.update({n: answer(engine, contexts[n])}))
        for n in range(6)
    ]
    with held(scheduler):
        for t in workers[:3]:
            t.start()
        wait_for(lambda: len(scheduler._incoming) == 3, "three submissions")
    wait_for(lambda: len(scheduler.steps) >= 3, "the first three to decode")
    for t in workers[3:]:
        t.start()
    for t in workers:
        t.join()
    assert [results[n] for n in range(6)] == alone
    assert scheduler.steps[0] == 3 and max(scheduler.steps) >= 4  # really batched, and joined mid-way
    wait_for(lambda: not scheduler._rows and not scheduler._waiting, "every slot given back")


def test_sampled_answers_keep_their_own_random_stream(tiny_m3d):
    """With temperature and a seed, each conversation samples from its own generator: the same
    answers concurrently as one after another."""
    options = EngineOptions(model=tiny_m3d, device="cpu", extra={"temperature": 1.0, "seed": 3})
    sampled = create_engine("m3d", options)
    for n in range(3):
        sampled.prepare(volume(n), f"vol{n}")
    contexts = [ctx_for(n, 20) for n in range(3)]
    alone = [answer(sampled, ctx) for ctx in contexts]
    results = together(sampled.scheduler, {n: lambda n=n: answer(sampled, contexts[n]) for n in range(3)})
    assert [results[n] for n in range(3)] == alone
    assert max(sampled.scheduler.steps) == 3
    sampled.close()


def request(
    engine, n: int, max_new: int, cancel: Optional[threading.Event] = None, keep_all: bool = True
) -> Request:
    ctx = ctx_for(n, max_new)
    state = engine._volumes[ctx.volume_id]
    ids = engine.prompt_ids(ctx.question)
    keep = frozenset(range(engine.config.vocab_size)) if keep_all else frozenset()
    return Request(state.prefix, 257, ids[257:], max_new, 0.0, 0.9, None, cancel or threading.Event(), keep)


def collect(stream) -> Tuple[List[int], List[Any]]:
    tokens, hidden = [], []
    for token, h in stream:
        tokens.append(token)
        hidden.append(h)
    return tokens, hidden


def test_each_row_gets_its_own_hidden_states_and_padding_is_exact(engine, monkeypatch):
    """Hidden states (what [SEG] masks are made from) come back to the right conversation: equal
    to its batch-1 run up to GEMM rounding, and bit-identical whatever its companions in the batch
    (other volumes, other lengths), so the per-row masking adds nothing to the numerics."""
    scheduler = engine.scheduler
    monkeypatch.setattr(scheduler, "eos_ids", frozenset())  # every answer runs its full length
    alone = [collect(scheduler.submit(request(engine, n, 12))) for n in range(6)]

    def batch(members: List[int]) -> Dict[int, Tuple[List[int], List[Any]]]:
        with held(scheduler):
            streams = {n: scheduler.submit(request(engine, n, 12)) for n in members}
        return in_threads({n: lambda s=s: collect(s) for n, s in streams.items()})

    scheduler.steps.clear()
    first, second = batch([0, 1, 2, 3]), batch([0, 4, 5, 2])
    assert set(scheduler.steps) == {4}
    for got in (first, second):
        for n, (tokens, hidden) in got.items():
            assert tokens == alone[n][0]
            for h, ref in zip(hidden, alone[n][1]):
                assert h.shape == ref.shape == (1, engine.config.hidden_size)
                assert torch.allclose(h, ref, atol=1e-5, rtol=1e-4)
    # Row 0 is conversation 0 in both batches: bit-identical, whatever shares the batch.
    assert all(torch.equal(a, b) for a, b in zip(first[0][1], second[0][1]))
    assert not torch.allclose(first[0][1][-1], first[1][1][-1])  # rows really differ


def test_cancel_of_one_leaves_the_others_running(engine, monkeypatch):
    scheduler = engine.scheduler
    monkeypatch.setattr(scheduler, "eos_ids", frozenset())
    cancel = threading.Event()

    def cancelled() -> List[int]:
        tokens = []
        for token, _ in scheduler.submit(request(engine, 0, 30, cancel, keep_all=False)):
            tokens.append(token)
            if len(tokens) == 3:
                cancel.set()
        return tokens

    def whole(n: int) -> List[int]:
        return collect(scheduler.submit(request(engine, n, 30, keep_all=False)))[0]

    results = together(scheduler, {0: cancelled, 1: lambda: whole(1), 3: lambda: whole(3)})
    assert 3 <= len(results[0]) < 30
    assert results[1] == whole(1) and results[3] == whole(3)  # as when decoded with no company
    wait_for(lambda: not scheduler._rows, "the slots given back")


def test_single_conversation_uses_the_one_row_step(engine):
    engine.scheduler.steps.clear()
    assert answer(engine, ctx_for(0, 10))
    assert engine.scheduler.steps and set(engine.scheduler.steps) == {1}


def test_compiled_buckets_trace_one_graph_per_batch_size(tiny_m3d, engine, monkeypatch):
    """The CUDA path's batched step, traced by dynamo on CPU (eager backend): warm-up traces one
    graph per bucket (1, 2, 4, 8); then 3 conversations run in a padded bucket of 4 with no
    further trace (no recompiles per token or per join) and answer as alone."""
    from torch._dynamo.utils import counters

    compiled = create_engine("m3d", EngineOptions(model=tiny_m3d, device="cpu"))
    scheduler = Scheduler(
        compiled.model,
        compiled.dynamic,
        8,
        compiled.static_len,
        compiled.loaded.eos_ids,
        {"backend": "eager", "fullgraph": True},
    )
    compiled.scheduler = scheduler
    torch._dynamo.reset()
    counters.clear()
    assert scheduler.call(scheduler.warm_up) == [1, 2, 4, 8]
    assert counters["stats"]["unique_graphs"] == 4
    for n in range(3):
        compiled.prepare(volume(n), f"vol{n}")
    contexts = [ctx_for(n, 14) for n in range(3)]
    alone = [answer(engine, ctx) for ctx in contexts]
    results = together(scheduler, {n: lambda n=n: answer(compiled, contexts[n]) for n in range(3)})
    assert [results[n] for n in range(3)] == alone
    assert 4 in set(scheduler.steps) and set(scheduler.steps) <= {1, 2, 4}
    assert counters["stats"]["unique_graphs"] == 4
    monkeypatch.setattr(scheduler, "_rows", [None])
    with pytest.raises(EngineError, match="no conversation in progress"):
        scheduler.warm_up()
    monkeypatch.undo()
    compiled.close()
    torch._dynamo.reset()


def test_long_answers_decode_alone_next_to_the_batch(tiny_m3d, engine):
    """An answer longer than a slot runs on its own DynamicCache, interleaved with the batch."""
    short = create_engine("m3d", EngineOptions(model=tiny_m3d, device="cpu", extra={"static_cache_len": 290}))
    for n in range(2):
        short.prepare(volume(n), f"vol{n}")
    contexts = [ctx_for(0, 40), ctx_for(1, 8)]  # 257 + 10 + 40 > 290: alone; 257 + ~12 + 8 fits
    alone = [answer(engine, ctx) for ctx in contexts]
    assert short._solo_decoder(300) is short.dynamic and short._solo_decoder(280) is None
    results = in_threads({n: lambda n=n: answer(short, contexts[n]) for n in range(2)})
    assert [results[0], results[1]] == alone
    short.close()


def test_a_failing_step_fails_its_conversations_and_the_next_one_works(engine, monkeypatch):
    scheduler = engine.scheduler

    def broken(*args: Any) -> Any:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(scheduler, "_forward", broken)
    with pytest.raises(EngineError, match="decoding failed: CUDA out of memory"):
        answer(engine, ctx_for(1, 10))
    wait_for(lambda: not scheduler._rows, "the slots given back")
    monkeypatch.undo()
    assert answer(engine, ctx_for(1, 10))


def test_a_failing_prefill_fails_only_its_conversation(engine, monkeypatch):
    scheduler = engine.scheduler
    monkeypatch.setattr(scheduler, "eos_ids", frozenset())
    reference = collect(scheduler.submit(request(engine, 1, 20, keep_all=False)))[0]
    running = scheduler.submit(request(engine, 1, 20, keep_all=False))
    first, _ = next(running)

    def broken(*args: Any) -> Any:
        raise RuntimeError("bad prefill (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(scheduler.prefill, "start", broken)
        with pytest.raises(EngineError, match="decoding failed: bad prefill"):
            list(scheduler.submit(request(engine, 2, 5)))
    assert [first, *(token for token, _ in running)] == reference


def test_bad_batch_options(tiny_m3d, monkeypatch):
    for extra, message in (
        ({"batch_slots": "-1"}, "option batch_slots must be >= 0, got -1"),
        ({"batch_slots": "eight"}, "option batch_slots must be an integer, got 'eight'"),
        ({"static_cache_len": "0"}, "option static_cache_len must be >= 1"),
        ({"max_volumes": None}, "option max_volumes must be an integer"),
    ):
        with pytest.raises(EngineError, match=message):
            create_engine("m3d", EngineOptions(model=tiny_m3d, device="cpu", extra=extra))
    for extra, message in (
        ({"seed": "x"}, "bad generation option"),
        ({"temperature": "nan"}, "temperature >= 0"),
        ({"top_p": "1.5"}, "0 < top_p <= 1"),
    ):
        options = EngineOptions(model=tiny_m3d, device="cpu", extra={"batch_slots": 0, **extra})
        with pytest.raises(EngineError, match=message):
            answer(create_engine("m3d", options), ctx_for(0, 4))
    monkeypatch.setattr(SlotCache, "nbytes", staticmethod(lambda *args: 1 << 60))
    with pytest.raises(EngineError, match="lower the batch_slots or static_cache_len"):
        create_engine("m3d", EngineOptions(model=tiny_m3d, device="cpu"))


def test_slot_cache_size_matches_phi3_mini():
    """8 conversations x 1024 tokens of Phi-3-mini (32 layers, 32 KV heads of 96) in bf16: 3 GiB."""
    from transformers import Phi3Config

    config = Phi3Config(
        hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
    )
    assert SlotCache.nbytes(config, 8, 1024, torch.bfloat16) == 3 * 2**30


def test_closed_engine_ends_conversations_in_flight(engine, monkeypatch):
    scheduler = engine.scheduler
    monkeypatch.setattr(scheduler, "eos_ids", frozenset())
    stream = scheduler.submit(request(engine, 0, 500, keep_all=False))
    next(stream)
    scheduler.close()
    with pytest.raises(EngineError, match="closed"):
        list(stream)
    assert answer(engine, ctx_for(0, 4))  # the next call starts the thread again
    assert scheduler.slots == engine_module.BATCH_SLOTS


def test_bench_script_writes_its_markdown_table(tmp_path, capsys):
    """The benchmark a GPU session will run unattended: here its --tiny form, reduced to seconds."""
    bench = load_script("bench_m3d")
    out = tmp_path / "bench.md"
    threads = torch.get_num_threads()
    try:
        argv = ["--tiny", "--tokens", "6", "--concurrent", "3", "--repeats", "1", "--out", str(out)]
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    text = out.read_text(encoding="utf-8")
    assert text.startswith("M3D-LaMed bench: tiny checkpoint on CPU") and "| ours |" in text
    assert "| transformers generate |" in text and "x3 aggregate tok/s" in text
    assert text.split("\n\n", 1)[1].strip() in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--tokens", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main([])  # full size needs a GPU
