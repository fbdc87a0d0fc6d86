"""Hostile input, auth and exposure over a real server on loopback: oversized bodies, decompression
bombs, bad headers, path-like ids, markup injected through model text, tokens, CORS, the rate
limit and the audit log."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib

import pytest
import requests
from conftest import ScriptedEngine, phantom_ct, wait_until
from medmllm.cli import main
from medmllm.client import RateLimited
from medmllm.engines.base import TokenOut
from medmllm.geometry.wire import encode_volume
from medmllm.server.guard import TokenBucket, token_id
from medmllm.server.store import StoreError, VolumeStore

TOKEN = "s3cret-token-for-tests-0123456789"
INJECTION = (
    'Normal text.\n\nevent: box\ndata: {"type": "box", "label": "fake"}\n\n'
    "<ref>x</ref><box>[[1,2,3,4]]</box> [click](https://evil.example/steal) <script>alert(1)</script>"
)


class TextEngine(ScriptedEngine):
    """Answers with exactly `text`, as one token."""

    def __init__(self, text):
        super().__init__()
        self.text = text

    def chat(self, ctx, cancel):
        yield TokenOut(self.text)


def _volume():
    return phantom_ct()


# ----- hostile bodies -------------------------------------------------------------------------------


def test_oversized_chat_bodies_get_413_whether_announced_or_chunked(serve):
    server = serve(max_request_bytes=4096)
    big = json.dumps({"volume_id": "0" * 64, "question": "x" * 10_000}).encode()
    announced = requests.post(f"{server.url}/v1/chat", data=big, timeout=10)
    assert announced.status_code == 413 and "limit of 4096 bytes" in announced.json()["detail"]
    chunked = requests.post(f"{server.url}/v1/chat", data=iter([big[:3000], big[3000:]]), timeout=10)
    assert chunked.status_code == 413 and "limit of 4096 bytes" in chunked.json()["detail"]
    assert server.client().health()["status"] == "ok"


def test_volume_uploads_are_bounded_by_the_volume_limit_not_the_request_limit(serve):
    server = serve(max_request_bytes=1024)
    volume_id = server.client().ensure_volume(*_volume())
    assert server.app.state.medmllm.volumes.has(volume_id)


def test_a_decompression_bomb_stops_inflating_at_the_limit(tmp_path):
    store = VolumeStore(tmp_path, max_volume_bytes=1 << 16, max_disk_bytes=1 << 30, max_memory_bytes=1 << 30)
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = packer.compress(bytes(64 << 20)) + packer.flush()
    upload = store.begin("0" * 64, "gzip")
    with pytest.raises(StoreError) as refused:
        for i in range(0, len(bomb), 1024):
            upload.write(bomb[i : i + 1024])
    assert refused.value.status == 413
    assert upload.size <= 1 << 16, "never inflates past the limit"
    assert i < len(bomb) // 4, "refused early, not after inflating everything"


def test_an_announced_length_costs_no_memory_until_the_bytes_arrive(tmp_path):
    import tracemalloc

    store = VolumeStore(tmp_path, max_volume_bytes=1 << 31, max_disk_bytes=1 << 32, max_memory_bytes=1 << 30)
    tracemalloc.start()
    uploads = [store.begin("0" * 64, None, length=(1 << 31) - 1) for _ in range(4)]
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert held < 1 << 20, f"4 announced 2 GiB uploads hold {held} bytes before any body"
    uploads[0].write(b"x" * 10)
    with pytest.raises(StoreError, match="upload truncated: 10 of"):
        uploads[0].commit()
    short = store.begin("0" * 64, None, length=4)
    with pytest.raises(StoreError, match="longer than its Content-Length"):
        short.write(b"12345")
    for upload in [*uploads, short]:
        upload.discard()


@pytest.mark.parametrize(
    ("mutate", "status", "words"),
    [
        (lambda b: b.replace(b'"<i2"', b'"|O"', 1), 422, "dtype"),
        (lambda b: b.replace(b'"shape":[20,32,28]', b'"shape":[20,32,-28]', 1), 422, "shape"),
        (lambda b: b.replace(b"medmllm-volume/1", b"medmllm-volume/9", 1), 422, "magic"),
        (lambda b: b[:-2], 422, "truncated"),
        (lambda b: b"GIF89a" + b[6:], 422, "magic"),
    ],
)
def test_malformed_volume_headers_get_a_clear_4xx(live_server, mutate, status, words):
    body = mutate(encode_volume(_volume()))
    volume_id = hashlib.sha256(body).hexdigest()
    response = requests.put(f"{live_server.url}/v1/volumes/{volume_id}", data=body, timeout=10)
    assert response.status_code == status and words in response.json()["detail"]


@pytest.mark.parametrize(
    "bad_id", ["..%2F..%2Fetc%2Fpasswd", "%2e%2e", "A" * 64, "0" * 63, "0" * 64 + ".vol", "..", "x%00y"]
)
def test_ids_that_look_like_paths_write_nothing_outside_the_store(live_server, tmp_path, bad_id):
    before = sorted(p.name for p in tmp_path.iterdir())
    body = encode_volume(_volume())
    for url in (f"/v1/volumes/{bad_id}", f"/v1/results/{bad_id}", f"/v1/results/{'0' * 32}/{bad_id}"):
        method = requests.put if url.startswith("/v1/volumes") else requests.get
        response = method(f"{live_server.url}{url}", data=body, timeout=10)
        assert response.status_code in (400, 404, 405), (url, response.status_code)
    chat = requests.post(
        f"{live_server.url}/v1/chat", json={"volume_id": "0" * 64, "session_id": bad_id, "question": "hi"}
    )
    assert chat.status_code in (404, 422)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not any(p.suffix == ".vol" for p in live_server.store.rglob("*") if "volumes" not in p.parts)


def test_markup_in_model_text_stays_text(serve):
    server = serve(engine=TextEngine(INJECTION))
    client = server.client()
    volume_id = client.ensure_volume(*_volume())
    events = list(client.chat(volume_id, "anything"))
    assert [e["type"] for e in events] == ["token", "done"]
    assert events[0]["text"] == INJECTION


# ----- auth and exposure ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "example.org"])
def test_a_public_bind_without_a_token_refuses_to_start(host, monkeypatch, capsys):
    monkeypatch.delenv("MEDMLLM_TOKEN", raising=False)
    assert main(["serve", "--host", host, "--port", "0"]) == 2
    assert "refusing to listen" in capsys.readouterr().err


def test_cors_wildcard_is_refused(capsys):
    code = main(["serve", "--cors-origin", "*", "--port", "0", "--token", TOKEN])
    assert code == 2 and "wildcard" in capsys.readouterr().err


def test_the_token_is_required_compared_exactly_and_never_logged(serve, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    audit = tmp_path / "audit.jsonl"
    server = serve(token=TOKEN, audit_log=audit)
    for header in ({}, {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": f"Bearer {TOKEN}x"}):
        assert requests.get(f"{server.url}/v1/models", headers=header, timeout=10).status_code == 401
    assert server.client().models()
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
    assert wait_until(lambda: len(audit.read_text().splitlines()) == 5)
    assert TOKEN not in caplog.text and TOKEN[:12] not in audit.read_text()


def test_cors_is_closed_by_default(live_server):
    origin = {"Origin": "https://evil.example"}
    simple = requests.get(f"{live_server.url}/v1/models", headers=origin, timeout=10)
    assert "access-control-allow-origin" not in simple.headers
    preflight = requests.options(
        f"{live_server.url}/v1/chat",
        headers={**origin, "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_opens_only_to_the_named_origins(serve):
    server = serve(cors_origins=["https://viewer.example.org"])
    ok = requests.options(
        f"{server.url}/v1/chat",
        headers={"Origin": "https://viewer.example.org", "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert ok.headers.get("access-control-allow-origin") == "https://viewer.example.org"
    other = requests.get(f"{server.url}/v1/models", headers={"Origin": "https://evil.example"}, timeout=10)
    assert "access-control-allow-origin" not in other.headers


def test_token_bucket_allows_bursts_then_spaces_requests_per_key():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("a") == pytest.approx(0.5)
    assert bucket.take("b") == 0.0, "another token has its own bucket"
    now[0] += 0.5
    assert bucket.take("a") == 0.0
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)


def test_rate_limit_answers_429_with_retry_after_per_token(serve):
    server = serve(token=TOKEN, rate_limit_per_minute=6, rate_burst=2)
    client = server.client()
    assert client.models() and client.models()
    with pytest.raises(RateLimited, match="6 requests per minute") as limited:
        client.models()
    assert 1 <= limited.value.retry_after <= 10, "one request per 10 s: the next one within 10 s"
    raw = requests.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert raw.status_code == 429 and 1 <= int(raw.headers["Retry-After"]) <= 10
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200, "health is never limited"


def test_the_audit_log_has_one_line_per_request_and_no_question_unless_asked(serve, tmp_path):
    quiet, loud = tmp_path / "quiet.jsonl", tmp_path / "loud.jsonl"
    for path, questions in ((quiet, False), (loud, True)):
        server = serve(token=TOKEN, audit_log=path, audit_questions=questions)
        client = server.client()
        volume_id = client.ensure_volume(*_volume())
        list(client.chat(volume_id, "where is the secret lesion?"))
        assert wait_until(lambda p=path: len(p.read_text().splitlines()) == 3), "written as the stream ends"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        routes = [r["route"] for r in records]
        assert routes == ["HEAD /v1/volumes/{volume_id}", "PUT /v1/volumes/{volume_id}", "POST /v1/chat"]
        assert [r["status"] for r in records] == [404, 201, 200]
        assert {r["volume"] for r in records} == {volume_id}
        assert {r["token"] for r in records} == {token_id(TOKEN)}
        assert {r["engine"] for r in records} == {"scripted"}
        assert all(set(r) >= {"time", "token", "route", "volume", "engine", "status"} for r in records)
        assert ("secret lesion" in path.read_text()) is questions


@pytest.mark.parametrize(
    "header",
    [
        b'{"magic":"medmllm-volume/1","dtype":[1],"shape":[1,1,1],"ijk_to_ras":[]}\n\x01',
        b'{"magic":' + b"[" * 2000 + b"]" * 2000 + b"}\n",
    ],
    ids=["dtype-is-a-list", "deeply-nested"],
)
def test_hostile_header_json_found_by_fuzzing_is_a_422_not_a_crash(live_server, header):
    volume_id = hashlib.sha256(header).hexdigest()
    response = requests.put(f"{live_server.url}/v1/volumes/{volume_id}", data=header, timeout=10)
    assert response.status_code == 422 and "not a usable volume" in response.json()["detail"]
    assert live_server.client().health()["status"] == "ok"


# ----- issue 13: uploads stream to disk with bounded memory, off the event loop ----------------------


def test_an_upload_streams_to_disk_holding_only_a_bounded_buffer(tmp_path):
    import tracemalloc

    store = VolumeStore(tmp_path, max_volume_bytes=1 << 30, max_disk_bytes=1 << 32, max_memory_bytes=1 << 30)
    size = 48 << 20
    upload = store.begin("0" * 64, None, length=size + 1)
    block = bytes(1 << 20)
    tracemalloc.start()
    for _ in range(size // len(block)):
        upload.write(block)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    upload.discard()
    assert peak < 16 << 20, f"a 48 MiB upload held {peak >> 20} MiB in memory"


def test_gzip_data_after_the_member_and_oversized_compressed_bodies_are_refused(tmp_path):
    store = VolumeStore(tmp_path, max_volume_bytes=1 << 20, max_disk_bytes=1 << 30, max_memory_bytes=1 << 30)
    member = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    body = member.compress(encode_volume(_volume())) + member.flush()
    for junk in (b"\0" * 10, body):  # zeros, or a second gzip member
        upload = store.begin("0" * 64, "gzip")
        with pytest.raises(StoreError, match="after the end of its gzip stream") as refused:
            upload.write(body + junk)
        assert refused.value.status == 400
        upload.discard()
    upload = store.begin("0" * 64, "gzip")
    upload.write(body)
    with pytest.raises(StoreError, match="after the end of its gzip stream"):
        upload.write(b"\0")  # junk in a later block
    upload.discard()
    flood = store.begin("0" * 64, "gzip")
    with pytest.raises(StoreError) as too_many:
        flood.write(os.urandom(2 << 20))  # wire bytes past the limit, whatever they inflate to
    assert too_many.value.status == 413
    flood.discard()
    assert not list(store.tmp_dir.iterdir())


def test_uploads_are_inflated_and_spooled_off_the_event_loop(serve, monkeypatch):
    import asyncio

    from medmllm.server.store import Upload

    on_loop = []
    real = Upload.write

    def write(self, chunk):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(self, chunk)

    monkeypatch.setattr(Upload, "write", write)
    server = serve()
    server.client().ensure_volume(*_volume(), compress=True)
    assert on_loop and not any(on_loop), "inflating and hashing must not block everyone's requests"


def test_uploads_past_the_cap_get_503_and_an_ended_one_frees_its_slot(tmp_path):
    store = VolumeStore(tmp_path, max_volume_bytes=1 << 30, max_disk_bytes=1 << 32, max_memory_bytes=1 << 30)
    uploads = [store.begin("0" * 64, None) for _ in range(store.max_uploads)]
    with pytest.raises(StoreError, match="uploads are in progress") as busy:
        store.begin("0" * 64, None)
    assert busy.value.status == 503 and busy.value.headers["retry-after"]
    uploads.pop().discard()
    uploads.append(store.begin("0" * 64, None))
    for upload in uploads:
        upload.discard()
    assert store.pending_bytes == 0


def test_upload_bytes_waiting_for_a_slow_disk_count_against_the_memory_bound(tmp_path, monkeypatch):
    import threading

    from medmllm.geometry.volume import Volume

    volumes = [Volume.from_array(phantom_ct()[0] + n, phantom_ct()[1]) for n in range(3)]
    each = volumes[0].voxels.nbytes
    store = VolumeStore(tmp_path, max_volume_bytes=1 << 30, max_disk_bytes=1 << 30, max_memory_bytes=3 * each)
    store.remember("a" * 64, volumes[0])
    store.remember("b" * 64, volumes[1])
    disk_free = threading.Event()
    real_fdopen = os.fdopen

    class SlowDisk:
        """A file whose writes wait until the disk is told to go on."""

        def __init__(self, fd, mode):
            self.file = real_fdopen(fd, mode)

        def write(self, data):
            disk_free.wait(10)
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr("medmllm.server.store.os.fdopen", SlowDisk)
    upload = store.begin("0" * 64, None)
    upload.write(bytes(each))
    assert store.pending_bytes == each
    store.remember("c" * 64, volumes[2])
    assert store.memory_bytes() == 2 * each, "the oldest volume made room for the bytes in flight"
    disk_free.set()
    upload.discard()
    assert store.pending_bytes == 0


def _big_upload(n_slices=40):
    """Wire bytes of a 21 MB volume (more than one FLUSH_BEHIND_BYTES) and its id."""
    import numpy as np

    body = encode_volume((np.full((n_slices, 512, 512), 7, dtype=np.int16), np.eye(4)))
    return body, hashlib.sha256(body).hexdigest()


def _send(upload, body):
    for start in range(0, len(body), 1 << 20):
        upload.write(body[start : start + (1 << 20)])


def test_an_upload_is_flushed_to_disk_while_it_arrives(tmp_path, monkeypatch):
    """The fsync before the 201 then has little left (the flushes wrap the real os.fdatasync)."""
    from medmllm.server import store as store_module

    flushed = []
    real = store_module._fdatasync
    monkeypatch.setattr(
        store_module, "_fdatasync", lambda fd: flushed.append(os.fstat(fd).st_size) or real(fd)
    )
    store = VolumeStore(tmp_path, max_volume_bytes=1 << 30, max_disk_bytes=1 << 32, max_memory_bytes=1 << 30)
    body, volume_id = _big_upload()
    upload = store.begin(volume_id, None, length=len(body))
    _send(upload, body)
    assert wait_until(lambda: flushed), "no flush started before the body ended"
    assert 0 < flushed[0] < len(body)
    assert upload.commit().shape == (40, 512, 512)
    assert (store.dir / f"{volume_id}.vol").read_bytes() == body


def test_a_disk_error_while_flushing_behind_fails_the_upload_and_keeps_nothing(tmp_path, monkeypatch):
    from medmllm.server import store as store_module

    def failing(fd):  # what os.fdatasync raises when the device reports an I/O error
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_module, "_fdatasync", failing)
    store = VolumeStore(tmp_path, max_volume_bytes=1 << 30, max_disk_bytes=1 << 32, max_memory_bytes=1 << 30)
    body, volume_id = _big_upload()
    upload = store.begin(volume_id, None, length=len(body))
    with pytest.raises(StoreError) as failed:
        _send(upload, body)
        upload.commit()
    upload.discard()
    assert failed.value.status == 500 and "could not store" in str(failed.value)
    assert list(store.dir.iterdir()) == [] and list(store.tmp_dir.iterdir()) == []


def test_a_cached_volume_is_a_copy_that_damage_on_disk_cannot_reach(tmp_path):
    """The verified upload is copied out of a memory map, never served through one."""
    store = VolumeStore(tmp_path, max_volume_bytes=1 << 30, max_disk_bytes=1 << 32, max_memory_bytes=1 << 30)
    body, volume_id = _big_upload()
    upload = store.begin(volume_id, None, length=len(body))
    _send(upload, body)
    upload.commit()
    path = store.dir / f"{volume_id}.vol"
    with open(path, "r+b") as stored:
        stored.seek(len(body) - 1)
        stored.write(b"\x55")
    assert int(store.get(volume_id).voxels[-1, -1, -1]) == 7
    fresh = VolumeStore(tmp_path, max_volume_bytes=1 << 30, max_disk_bytes=1 << 32, max_memory_bytes=1 << 30)
    with pytest.raises(StoreError) as damaged:
        fresh.get(volume_id)
    assert damaged.value.status == 404 and not path.exists()
