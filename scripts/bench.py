"""Backend benchmark on a synthetic 512x512x300 int16 CT (157 MB): prints numbers, asserts nothing.

Upload time over loopback to a real `medmllm serve` process (hash included), bytes sent by a second
question, time to first event, server memory per cached volume, gzip vs. link speed, and the
builtin engine's time per tool. Run with `scripts/bench` (uses .venv/bin/python).
"""

from __future__ import annotations

import argparse
import gzip
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median
from typing import Dict, Tuple

import numpy as np

SERVE = "import sys; from medmllm.cli import main; sys.exit(main())"


def synthetic_ct(
    shape: Tuple[int, int, int] = (300, 512, 512), seed: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
    """Air, a body ellipse with noise, two lungs, a trachea and a spine, in int16 HU ([k, j, i])."""
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    nk, nj, ni = shape
    ct = np.full(shape, -1000, dtype=np.int16)
    body = ((i - ni / 2) / (ni * 0.42)) ** 2 + ((j - nj / 2) / (nj * 0.32)) ** 2 <= 1
    ct[np.broadcast_to(body, shape)] = 40
    for side in (-1, 1):
        lung = ((i - ni / 2 - side * ni * 0.18) / (ni * 0.12)) ** 2 + ((j - nj * 0.47) / (nj * 0.2)) ** 2 + (
            (k - nk * 0.55) / (nk * 0.35)
        ) ** 2 <= 1
        ct[lung] = -850
    trachea = ((i - ni / 2) / 12.0) ** 2 + ((j - nj * 0.4) / 12.0) ** 2 <= 1
    ct[np.broadcast_to(trachea & (k > nk * 0.6), shape)] = -1000
    spine = ((i - ni / 2) / 25.0) ** 2 + ((j - nj * 0.72) / 25.0) ** 2 <= 1
    ct[np.broadcast_to(spine, shape)] = 1100  # cortical density (a 350-1000 HU solid is a vessel lumen)
    ct += np.random.default_rng(seed).integers(-20, 21, size=shape, dtype=np.int16)
    matrix = np.diag([-0.7, -0.7, 1.0, 1.0])
    matrix[:3, 3] = (180.0, 180.0, -150.0)
    return ct, matrix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(store: Path, engine: str) -> Tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        SERVE,
        "serve",
        "--engine",
        engine,
        "--port",
        str(port),
        "--store",
        str(store),
    ]
    proc = subprocess.Popen([*cmd, "--log-level", "warning"], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    from medmllm.client import BackendError, MedMLLMClient

    deadline = time.monotonic() + 60
    while True:
        try:
            MedMLLMClient(url).health()
            return proc, url
        except BackendError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench: the server did not start") from None
            time.sleep(0.2)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def row(name: str, value: str) -> None:
    print(f"{name:<50} {value}")


def bench_server(ct: np.ndarray, matrix: np.ndarray, engine: str, question: str, n_uploads: int = 3) -> None:
    from medmllm.client import MedMLLMClient
    from medmllm.geometry.wire import volume_sha256

    mb = ct.nbytes / 1e6
    with tempfile.TemporaryDirectory() as store:
        proc, url = start_server(Path(store), engine)
        try:
            client = MedMLLMClient(url, timeout=(5, 600))
            t = time.perf_counter()
            volume_sha256(ct, matrix)
            row(f"client sha256 of {mb:.0f} MB", f"{time.perf_counter() - t:.3f} s")
            idle = rss_mb(proc.pid)
            uploads = []
            for n in range(n_uploads):
                volume = ct if n == 0 else ct + np.int16(n)
                t = time.perf_counter()
                client.ensure_volume(volume, matrix)
                uploads.append(time.perf_counter() - t)
                sent = client.last_upload_bytes
                row(f"upload {n + 1} incl. hashing, loopback (<= 0.5 s)", f"{uploads[-1]:.3f} s, {sent} B")
                cached = (rss_mb(proc.pid) - idle) / (n + 1)
                row(
                    f"  server memory per cached volume ({n + 1} cached)",
                    f"{cached:.0f} MB = {cached / mb:.2f}x",
                )
            row(
                f"best / median upload (machine load {load()})",
                f"{min(uploads):.3f} / {median(uploads):.3f} s",
            )
            volume_id = volume_sha256(ct, matrix)
            for n in (1, 2):
                ask_once(client, volume_id, f"question {n} ({engine}: {question!r})", question)
                t = time.perf_counter()
                client.ensure_volume(ct, matrix)
                seconds = time.perf_counter() - t
                row(
                    "  same volume again: volume bytes sent",
                    f"{client.last_upload_bytes} ({seconds:.3f} s, hash + HEAD)",
                )
            row("server memory after the questions, above idle", f"{rss_mb(proc.pid) - idle:.0f} MB")
        finally:
            proc.terminate()
            proc.wait(10)


def ask_once(client, volume_id: str, name: str, question: str) -> None:
    t = time.perf_counter()
    first = None
    for event in client.chat(volume_id, question):
        first = first or time.perf_counter() - t
        if event["type"] == "done":
            server = event["timings"]
    total = time.perf_counter() - t
    row(name, f"first event {first:.3f} s, total {total:.2f} s")
    row(
        "  as the server measured it",
        f"first event {server['first_event_s']:.3f} s, total {server['total_s']:.2f} s",
    )


def bench_codec(ct: np.ndarray) -> None:
    data = memoryview(ct.reshape(-1).view(np.uint8))
    t = time.perf_counter()
    packed = gzip.compress(data, compresslevel=1)
    seconds = time.perf_counter() - t
    rate = len(data) / seconds / 1e6
    print(
        f"gzip level 1: {seconds:.2f} s ({rate:.0f} MB/s in, ratio {len(data) / len(packed):.1f}x): "
        f"worth it only on links slower than ~{rate * (1 - len(packed) / len(data)):.0f} MB/s"
    )


def bench_tools(ct: np.ndarray, matrix: np.ndarray) -> None:
    from medmllm.engines.base import ChatContext, ChatTurn, EngineOptions
    from medmllm.engines.registry import create_engine, engine_names
    from medmllm.geometry.volume import Volume

    if "builtin" not in engine_names():
        print("builtin engine: not available")
        return
    # the classical tools: TotalSegmentator (the anatomy extra) would otherwise take named organs
    engine = create_engine("builtin", EngineOptions(extra={"anatomy": "off"}))
    volume = Volume.from_array(ct, matrix)
    t = time.perf_counter()
    engine.prepare(volume, "bench")
    row("builtin prepare", f"{time.perf_counter() - t:.2f} s")
    times: Dict[str, float] = {}
    for structure in ("body", "bones", "lungs", "airway"):
        ctx = ChatContext(volume, "bench", [ChatTurn("user", f"show me the {structure}")])
        t = time.perf_counter()
        kinds = [type(e).__name__ for e in engine.chat(ctx, threading.Event())]
        times[structure] = time.perf_counter() - t
        row(
            f"builtin tool '{structure}' (target <= 3 s)",
            f"{times[structure]:.2f} s, {kinds.count('MaskOut')} masks",
        )
    for structure in ("lungs", "bones"):  # alone on a fresh volume: the body outline included
        engine.close()
        ctx = ChatContext(volume, "bench-alone", [ChatTurn("user", f"show me the {structure}")])
        t = time.perf_counter()
        list(engine.chat(ctx, threading.Event()))
        row(
            f"builtin tool '{structure}' alone, body included (target <= 3 s)",
            f"{time.perf_counter() - t:.2f} s",
        )
    engine.close()
    ctx = ChatContext(volume, "bench-report", [ChatTurn("user", "report")])
    t = time.perf_counter()
    list(engine.chat(ctx, threading.Event()))
    row("builtin report, all tools on a fresh volume (target <= 8 s)", f"{time.perf_counter() - t:.2f} s")


def real_chest_ct(shape: Tuple[int, int, int] = (300, 512, 512)) -> Tuple[np.ndarray, np.ndarray]:
    """The real chest CT of medmllm.samples resampled (linear) onto a `shape` ([k, j, i]) grid over
    the same field of view: real anatomy at the size of a clinical scan."""
    import SimpleITK as sitk
    from medmllm import samples
    from medmllm.geometry.volume import Volume

    image = samples.load_real_scan(samples.real_scan("chest-ct")).to_sitk()
    size = shape[::-1]
    spacing = [n * s / m for n, s, m in zip(image.GetSize(), image.GetSpacing(), size)]
    out = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        spacing,
        image.GetDirection(),
        -1024,
    )
    volume = Volume.from_sitk(sitk.Cast(out, sitk.sitkInt16))
    return volume.voxels, volume.ijk_to_ras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="builtin", help="engine the server runs (default builtin)")
    parser.add_argument("--question", default="how big are the lungs?")
    parser.add_argument("--skip-tools", action="store_true", help="skip the in-process builtin tool timings")
    parser.add_argument("--uploads", type=int, default=3, help="distinct volumes uploaded (default 3)")
    parser.add_argument(
        "--tools-only", action="store_true", help="only the builtin tool timings (no server, no codec)"
    )
    parser.add_argument(
        "--ct",
        choices=("synthetic", "real"),
        default="synthetic",
        help="synthetic phantom, or the real chest CT of medmllm.samples resampled to 512x512x300",
    )
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"load average: {load()}")
    t = time.perf_counter()
    ct, matrix = synthetic_ct() if args.ct == "synthetic" else real_chest_ct()
    row(
        f"{args.ct} CT {ct.shape[::-1]} int16, {ct.nbytes / 1e6:.0f} MB",
        f"built in {time.perf_counter() - t:.1f} s",
    )
    if not args.tools_only:
        bench_server(ct, matrix, args.engine, args.question, args.uploads)
        bench_codec(ct)
    if not args.skip_tools:
        bench_tools(ct, matrix)
    print(f"load average: {load()}")


if __name__ == "__main__":
    main()
