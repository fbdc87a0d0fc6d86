"""The outsider's view: a real `medmllm serve --engine builtin` process on loopback, attacked over
the socket the way a hostile or careless client would (docs/security.md, issue 13). Every attack is
bounded in count and time; each server runs with small limits so the whole file takes well under a
minute. The server runs the same `medmllm` the tests import (its folder goes first on PYTHONPATH).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List

import medmllm
import numpy as np
import pytest
import requests
from conftest import free_port, phantom_ct, wait_until
from medmllm.client import MedMLLMClient, ServerBusy
from medmllm.geometry.wire import encode_volume

PACKAGE_DIR = Path(medmllm.__file__).resolve().parents[1]
MiB = 1 << 20


@dataclass
class Outsider:
    url: str
    port: int
    store: Path
    proc: subprocess.Popen
    log: Path

    def put(self, body: bytes, volume_id: str = "", gzipped: bool = False) -> requests.Response:
        volume_id = volume_id or hashlib.sha256(body).hexdigest()
        headers = {"Content-Encoding": "gzip"} if gzipped else {}
        return requests.put(f"{self.url}/v1/volumes/{volume_id}", data=body, headers=headers, timeout=30)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


@contextmanager
def outsider(tmp_path: Path, *options: str) -> Iterator[Outsider]:
    """`medmllm serve --engine builtin OPTIONS` as a child process; its log is checked for tracebacks."""
    port = free_port()
    store = tmp_path / f"store-{port}"
    log = tmp_path / f"server-{port}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_DIR), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "medmllm.cli", "serve", "--engine", "builtin", "--port", str(port)]
    cmd += ["--store", str(store), "--log-level", "warning", *options]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{url}/healthz", timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        yield Outsider(url, port, store, proc, log)
    finally:
        proc.terminate()
        proc.wait(20)
    assert "Traceback" not in log.read_text(), log.read_text()


SHARED_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[Outsider]:
    """One server for the attacks that need no limits of their own: 1 MB volumes, at most 2 uploads
    at once, clients cut off after 2 s, memory for a single decoded volume."""
    memory_gb = str(1.2 * len(_volume()) / 2**30)
    options = ["--max-volume-mb", "1", "--max-uploads", "2", "--client-timeout", str(SHARED_TIMEOUT_S)]
    with outsider(tmp_path_factory.mktemp("shared"), *options, "--max-memory-gb", memory_gb) as server:
        yield server


def _volume(n: int = 0, shape=(20, 32, 28)) -> bytes:
    voxels, matrix = phantom_ct(shape)
    return encode_volume((voxels + np.int16(n), matrix))


def _connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def _closed_by_server(sock: socket.socket, within: float) -> bytes:
    """What the server sent before closing the connection; fails if it is still open after `within`."""
    sock.settimeout(within)
    received = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return received
            received += data
    except ConnectionResetError:
        return received
    except socket.timeout:
        raise AssertionError(f"the server kept the connection open for {within} s") from None


def _stalled_upload(port: int, body: bytes, declared: int) -> socket.socket:
    """A PUT that announces `declared` bytes, sends `body`, then goes silent."""
    volume_id = "0" * 64
    sock = _connect(port)
    head = f"PUT /v1/volumes/{volume_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {declared}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock


# ----- 1. gzip uploads ------------------------------------------------------------------------------


def test_junk_after_a_gzip_member_is_refused_and_nothing_is_stored(shared):
    volume = _volume(100)
    volume_id = hashlib.sha256(volume).hexdigest()
    refused = shared.put(gzip.compress(volume) + bytes(256 << 10), volume_id, gzipped=True)
    assert refused.status_code == 400, refused.text
    assert "after the end of its gzip stream" in refused.json()["detail"]
    flood = shared.put(gzip.compress(volume) + bytes(4 * MiB), volume_id, gzipped=True)
    assert flood.status_code == 413, "compressed bytes count against the limit too"
    second_member = gzip.compress(volume) + gzip.compress(b"more")
    assert shared.put(second_member, volume_id, gzipped=True).status_code == 400
    assert not (shared.store / "volumes" / f"{volume_id}.vol").exists()
    assert wait_until(lambda: not list((shared.store / "tmp").iterdir()))
    assert shared.put(gzip.compress(volume), volume_id, gzipped=True).status_code == 201


# ----- 2. eviction racing uploads and reads ---------------------------------------------------------


def test_uploads_and_questions_while_the_disk_bound_evicts_never_get_a_500(tmp_path):
    bound_gb = str(3 * len(_volume()) / 2**30)  # room for about three volumes
    memory_gb = str(1.2 * len(_volume()) / 2**30)  # one decoded volume: questions read from disk
    with outsider(
        tmp_path, "--max-store-gb", bound_gb, "--max-memory-gb", memory_gb, "--max-uploads", "16"
    ) as server:
        statuses: List[int] = []
        lock = threading.Lock()

        def upload_and_ask(n: int) -> None:
            body = _volume(n)
            volume_id = hashlib.sha256(body).hexdigest()
            put = requests.put(f"{server.url}/v1/volumes/{volume_id}", data=body, timeout=60)
            chat = requests.post(
                f"{server.url}/v1/chat",
                json={"volume_id": volume_id, "question": "how big is the body?"},
                timeout=60,
            )
            with lock:
                statuses.extend([put.status_code, chat.status_code])

        for round_ in range(3):
            threads = [threading.Thread(target=upload_and_ask, args=(16 * round_ + n,)) for n in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
        assert len(statuses) == 96
        assert all(s < 500 for s in statuses), sorted(statuses)
        assert statuses.count(201) == 48, "every upload is stored (then may be evicted)"
        assert set(statuses) <= {200, 201, 404}, "a question about an evicted volume is a 404, nothing else"


# ----- 3. NaN, Infinity, lone surrogates ------------------------------------------------------------

ZERO_ID = "0" * 64


BAD_JSON = [  # json.dumps writes NaN and Infinity as such, and lone surrogates as \\udXXX escapes
    json.dumps(body)
    for body in (
        {"volume_id": ZERO_ID, "question": "q", "temperature": float("nan")},
        {"volume_id": ZERO_ID, "question": "q", "roi": [float("inf"), 0, 0, 1, 1, 1]},
        {"volume_id": ZERO_ID, "question": "q", "view": {"window": [float("-inf"), 1]}},
        {"volume_id": "\ud800", "question": "q"},
        {"volume_id": ZERO_ID, "question": "\udfff hidden"},
        {"volume_id": ZERO_ID, "question": "q", "messages": [{"role": "\ud83d", "content": "x"}]},
    )
]


def test_nan_infinity_and_lone_surrogates_get_the_documented_json_422(shared):
    for body in BAD_JSON:
        response = requests.post(
            f"{shared.url}/v1/chat",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert response.status_code == 422, (body, response.status_code, response.text[:200])
        detail = response.json()["detail"]
        assert detail and all({"loc", "msg", "type"} <= set(d) for d in detail), body
        assert all("input" not in d for d in detail), "the offending input is not echoed"
    assert "Traceback" not in shared.log.read_text()


# ----- 4. forwarded headers ----------------------------------------------------------------------------


def _audit_clients(path: Path) -> List[str]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["client"] for r in records if r["route"] == "GET /v1/models"]


def test_x_forwarded_for_is_ignored_unless_the_operator_names_the_proxy(tmp_path):
    for trusted in (False, True):
        audit = tmp_path / f"audit-{trusted}.jsonl"
        options = ["--rate-limit", "60", "--rate-burst", "2", "--audit-log", str(audit)]
        options += ["--forwarded-allow-ips", "127.0.0.1"] if trusted else []
        with outsider(tmp_path, *options) as server:
            statuses = [
                requests.get(
                    f"{server.url}/v1/models", headers={"X-Forwarded-For": f"10.9.8.{n}"}, timeout=10
                )
                for n in range(4)
            ]
            assert wait_until(lambda a=audit: len(_audit_clients(a)) == 4)
        if trusted:  # behind a named proxy each forwarded client has its own bucket and audit name
            assert [r.status_code for r in statuses] == [200] * 4
            assert _audit_clients(audit) == [f"10.9.8.{n}" for n in range(4)]
        else:
            assert [r.status_code for r in statuses] == [200, 200, 429, 429], (
                "a spoofed header resets nothing"
            )
            assert _audit_clients(audit) == ["127.0.0.1"] * 4, "the audit log names the real peer"


# ----- 5. Host check (DNS rebinding) ----------------------------------------------------------------


def test_a_token_less_server_answers_only_loopback_host_names(shared):
    port = shared.port

    def status(host: str) -> int:
        return requests.get(f"{shared.url}/v1/models", headers={"Host": host}, timeout=10).status_code

    for foreign in (f"evil.example:{port}", "attacker.test", f"192.168.1.20:{port}", "127.0.0.1.nip.io", ""):
        assert status(foreign) == 421, foreign
    for local in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.2"):
        assert status(local) == 200, local
    refused = requests.get(f"{shared.url}/v1/models", headers={"Host": "evil.example"}, timeout=10)
    assert "loopback" in refused.json()["detail"]


# ----- 6. slow and idle clients, memory per upload, concurrent uploads ---------------------------------


def test_idle_sockets_slow_headers_and_stalled_bodies_are_timed_out(shared):
    idle = [_connect(shared.port) for _ in range(20)]
    slow = _connect(shared.port)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    stalled = _stalled_upload(shared.port, b"x" * 1000, declared=100_000)
    assert wait_until(lambda: len(list((shared.store / "tmp").iterdir())) == 1)
    stalled_chat = _connect(shared.port)
    head = "POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    stalled_chat.sendall(f"{head}Content-Length: 500\r\n\r\n".encode() + b'{"volume_id": "')
    for _ in range(4 * (SHARED_TIMEOUT_S + 2)):  # a header byte every 0.25 s keeps arriving: still cut off
        try:
            slow.sendall(b"a")
        except OSError:
            break
        time.sleep(0.25)
    limit = SHARED_TIMEOUT_S + 3
    assert _closed_by_server(slow, limit) == b""
    for sock in idle:
        assert _closed_by_server(sock, limit) == b""
    for sock in (stalled, stalled_chat):
        answer = _closed_by_server(sock, limit)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert wait_until(lambda: not list((shared.store / "tmp").iterdir())), "the stalled upload is removed"
    assert requests.get(f"{shared.url}/healthz", timeout=5).status_code == 200
    for sock in [*idle, slow, stalled, stalled_chat]:
        sock.close()


def test_stalled_uploads_hold_bounded_memory_on_the_server(tmp_path):
    size = 48 * MiB
    with outsider(tmp_path, "--max-volume-mb", "128") as server:
        for n in range(3):  # warm up the upload path so its one-time imports are not counted
            assert server.put(_volume(n)).status_code == 201
        before = server.rss_mb()
        stalled = [_stalled_upload(server.port, bytes(size), declared=size + 1) for _ in range(2)]
        tmp = server.store / "tmp"
        spooled = 2 * (size - 2 * MiB)  # all but the block still being gathered
        assert wait_until(lambda: sum(p.stat().st_size for p in tmp.iterdir()) >= spooled, 30)
        grown = server.rss_mb() - before
        for sock in stalled:
            sock.close()
        assert grown < 48, f"two stalled {size >> 20} MiB uploads grew the server by {grown:.0f} MB"


def test_concurrent_uploads_past_the_cap_get_503_with_retry_after(shared):
    stalled = [_stalled_upload(shared.port, b"x" * 100, declared=10_000) for _ in range(2)]
    assert wait_until(lambda: len(list((shared.store / "tmp").iterdir())) == 2)
    busy = shared.put(_volume(200))
    assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
    assert "uploads are in progress" in busy.json()["detail"]
    for sock in stalled:
        sock.close()
    assert wait_until(lambda: shared.put(_volume(200)).status_code == 201)


def test_the_client_waits_out_a_busy_server_and_says_so_when_it_stays_busy(shared):
    """503 + Retry-After (uploads at the cap): `ensure_volume` uploads once a slot frees within
    `busy_wait_s`; given no time to wait it raises ServerBusy with the server's own sentence."""
    stalled = [_stalled_upload(shared.port, b"x" * 100, declared=10_000) for _ in range(2)]
    assert wait_until(lambda: len(list((shared.store / "tmp").iterdir())) == 2)
    voxels, matrix = np.full((20, 32, 28), 7, np.int16), np.eye(4)
    with pytest.raises(ServerBusy, match="uploads are in progress") as busy:
        MedMLLMClient(shared.url, busy_wait_s=0).ensure_volume(voxels, matrix)
    assert busy.value.retry_after >= 1
    freeing = threading.Timer(1.5, lambda: [sock.close() for sock in stalled])
    freeing.start()
    volume_id = MedMLLMClient(shared.url, busy_wait_s=30).ensure_volume(voxels, matrix)
    freeing.join()
    assert requests.head(f"{shared.url}/v1/volumes/{volume_id}", timeout=10).status_code == 200


# ----- 7. what is on disk is checked, links are not followed -----------------------------------------


def test_a_damaged_volume_is_not_served_and_planted_links_are_not_followed(shared, tmp_path):
    client = MedMLLMClient(shared.url)
    damaged = client.ensure_volume(*phantom_ct())
    voxels, matrix = phantom_ct()
    kept = client.ensure_volume(voxels + np.int16(1), matrix)  # pushes `damaged` out of memory
    path = shared.store / "volumes" / f"{damaged}.vol"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    refused = requests.post(
        f"{shared.url}/v1/chat", json={"volume_id": damaged, "question": "hi"}, timeout=30
    )
    assert refused.status_code == 404 and "damaged" in refused.json()["detail"]
    assert not path.exists(), "the damaged copy is removed, so the client uploads it again"

    outside = tmp_path / "outside.vol"
    outside_body = _volume(7)
    outside.write_bytes(outside_body)
    linked_id = hashlib.sha256(outside_body).hexdigest()
    (shared.store / "volumes" / f"{linked_id}.vol").symlink_to(outside)
    linked = requests.post(
        f"{shared.url}/v1/chat", json={"volume_id": linked_id, "question": "hi"}, timeout=30
    )
    assert linked.status_code == 404, "a volume file that is a link out of the store is not read"
    assert requests.head(f"{shared.url}/v1/volumes/{linked_id}", timeout=10).status_code == 404

    done = list(client.chat(kept, "how big is the body?"))[-1]
    result = shared.store / "results" / done["result_id"]
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the network")
    (result / "leak.txt").symlink_to(secret)
    listed = requests.get(f"{shared.url}/v1/results/{done['result_id']}", timeout=10).json()["files"]
    assert "answer.md" in listed and "leak.txt" not in listed
    leak = requests.get(f"{shared.url}/v1/results/{done['result_id']}/leak.txt", timeout=10)
    assert leak.status_code == 404 and "not for the network" not in leak.text
    (shared.store / "results" / ("f" * 32)).symlink_to(tmp_path, target_is_directory=True)
    assert requests.get(f"{shared.url}/v1/results/{'f' * 32}", timeout=10).status_code == 404
