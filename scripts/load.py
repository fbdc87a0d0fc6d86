"""Load test on loopback: N concurrent conversations with the builtin engine through the real client.

Starts `medmllm serve --engine builtin` as a subprocess, uploads a few synthetic CTs, then runs
`--conversations` threads, each a `MedMLLMClient` asking follow-up questions in its own session,
until `--duration` seconds or `--max-questions` answers. Prints throughput, p50/p99 latency (to the
`done` event) and time to first event, errors (target 0), and the server's resident memory when
idle, after warm-up (every conversation answered once) and at the end (target: no growth after
warm-up). Run with `scripts/load` (uses .venv/bin/python); `--duration 60` for a short run.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bench import rss_mb, synthetic_ct


def start_server(store: Path, *options: str) -> Tuple[Any, str]:
    """A real `medmllm serve --engine builtin [options]` subprocess on a free loopback port."""
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "medmllm.cli", "serve", "--engine", "builtin", "--port", str(port)]
    cmd += ["--store", str(store), "--log-level", "error", *options]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            requests.get(f"{url}/healthz", timeout=1)
            return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


QUESTIONS = (
    "where are the lungs?",
    "how big is the body?",
    "show me the bones",
    "give me a report",
    "where is the trachea?",
    "segment the body outline",
    "how big are the lungs and the airway",
    "where is the liver?",
)


@dataclass
class Tally:
    """What all conversations measured, under one lock."""

    latencies: List[float] = field(default_factory=list)
    first_events: List[float] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    warmed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answered(self, latency: float, first: float) -> None:
        with self.lock:
            self.latencies.append(latency)
            self.first_events.append(first)

    def failed(self, what: str) -> None:
        with self.lock:
            self.errors[what[:120]] += 1


def ask(client, volume_id: str, session_id: str, question: str, tally: Tally) -> None:
    """One question, timed to its `done` event; an `error` event or an exception counts as an error."""
    started = time.perf_counter()
    first: Optional[float] = None
    try:
        for event in client.chat(volume_id, question, session_id=session_id):
            first = first if first is not None else time.perf_counter() - started
            if event["type"] == "error":
                tally.failed(f"error event: {event.get('message')}")
                return
    except Exception as exc:
        tally.failed(f"{type(exc).__name__}: {exc}")
        return
    tally.answered(time.perf_counter() - started, first or 0.0)


def conversation(
    n: int, url: str, volume_ids: Sequence[str], stop: threading.Event, budget, tally: Tally
) -> None:
    """Ask questions in one session about one volume until told to stop or the budget is spent."""
    from medmllm.client import MedMLLMClient

    client = MedMLLMClient(url, timeout=(5.0, 300.0))
    volume_id = volume_ids[n % len(volume_ids)]
    for turn in itertools.count():
        if stop.is_set() or not budget.acquire(blocking=False):
            return
        ask(client, volume_id, f"load-{n}", QUESTIONS[(n + turn) % len(QUESTIONS)], tally)
        if turn == 0:
            with tally.lock:
                tally.warmed += 1


def upload_volumes(url: str, count: int, shape: Sequence[int]) -> List[str]:
    from medmllm.client import MedMLLMClient

    client = MedMLLMClient(url)
    ct, matrix = synthetic_ct(tuple(shape))
    return [client.ensure_volume(ct + (v * 7) % 13, matrix) for v in range(count)]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (nan when nothing was measured)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="medmllm-load-") as folder:
        proc, url = start_server(Path(folder) / "store")
        try:
            return measure(args, proc.pid, url)
        finally:
            proc.terminate()
            proc.wait(10)


def measure(args: argparse.Namespace, pid: int, url: str) -> int:
    idle = rss_mb(pid)
    volume_ids = upload_volumes(url, args.volumes, args.shape)
    tally, stop = Tally(), threading.Event()
    budget = threading.Semaphore(args.max_questions)
    threads = [
        threading.Thread(target=conversation, args=(n, url, volume_ids, stop, budget, tally), daemon=True)
        for n in range(args.conversations)
    ]
    started = time.perf_counter()
    deadline = started + args.duration
    for thread in threads:
        thread.start()
    warm_rss: Optional[float] = None
    warm_at: Optional[float] = None
    peak = idle
    while any(t.is_alive() for t in threads) and time.perf_counter() < deadline:
        time.sleep(0.5)
        peak = max(peak, rss_mb(pid))
        if warm_rss is None and tally.warmed >= args.conversations:
            warm_rss, warm_at = rss_mb(pid), time.perf_counter() - started
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    elapsed = time.perf_counter() - started
    end_rss = rss_mb(pid)
    report(args, tally, elapsed, idle, warm_rss, warm_at, end_rss, peak)
    return 1 if tally.errors else 0


def report(args, tally: Tally, elapsed: float, idle, warm, warm_at, end, peak) -> None:
    answered = len(tally.latencies)
    errors = sum(tally.errors.values())
    print(f"machine: {os.cpu_count()} cores, load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    shape = tuple(args.shape)
    print(f"{args.conversations} conversations, {args.volumes} volumes {shape} int16, {elapsed:.0f} s")
    print(f"answers {answered}, errors {errors}, throughput {answered / elapsed:.2f} answers/s")
    for name, values in (("latency to done", tally.latencies), ("first event", tally.first_events)):
        print(f"{name:<16} p50 {percentile(values, 50):.3f} s  p99 {percentile(values, 99):.3f} s")
    for what, count in tally.errors.most_common(10):
        print(f"  error x{count}: {what}")
    warm_text = f"{warm:.0f} MB (at {warm_at:.0f} s)" if warm is not None else "not reached"
    print(f"server RSS: idle {idle:.0f} MB, after warm-up {warm_text}, end {end:.0f} MB, peak {peak:.0f} MB")
    if warm is not None:
        print(f"growth after warm-up: {end - warm:+.0f} MB")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=32, help="concurrent conversations (default 32)")
    parser.add_argument("--duration", type=float, default=300, help="seconds (default 300)")
    parser.add_argument("--max-questions", type=int, default=100_000, help="stop after this many answers")
    parser.add_argument("--volumes", type=int, default=4, help="distinct volumes shared by the conversations")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 160, 160], metavar=("K", "J", "I"))
    args = parser.parse_args(argv)
    limits: Dict[str, float] = {
        "--conversations": args.conversations,
        "--duration": args.duration,
        "--max-questions": args.max_questions,
        "--volumes": args.volumes,
    }
    for flag, value in limits.items():
        if not value > 0:
            parser.error(f"{flag} must be positive")
    if args.duration > 3600 or min(args.shape) < 8:
        parser.error("--duration is at most 3600 s and every --shape size at least 8")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
