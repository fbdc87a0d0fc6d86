"""HTTP API over a real server on loopback: handshake, auth, volume store, bad uploads."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests
from conftest import ScriptedEngine, oblique_matrix, phantom_ct, wait_until
from medmllm.client import AuthError, BadRequest, MedMLLMClient, ServerUnreachable, VolumeTooLarge
from medmllm.geometry.wire import encode_volume, volume_sha256
from medmllm.protocol import API_VERSION


def _raw_body(shape, dtype="<i2", matrix=None, payload=None) -> bytes:
    """A hand-made wire body, for shapes the encoder itself refuses (2-D, 4-D)."""
    matrix = np.eye(4).tolist() if matrix is None else matrix
    header = {"magic": "medmllm-volume/1", "dtype": dtype, "shape": list(shape), "ijk_to_ras": matrix}
    data = payload if payload is not None else bytes(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + data


def _put(server, body: bytes, volume_id=None, headers=None) -> requests.Response:
    import hashlib

    volume_id = volume_id or hashlib.sha256(body).hexdigest()
    return requests.put(f"{server.url}/v1/volumes/{volume_id}", data=body, headers=headers or {}, timeout=10)


def test_health_and_models_describe_the_server(live_server):
    client = live_server.client()
    health = client.health()
    assert health["api_version"] == API_VERSION and health["engine"] == "scripted" and health["auth"] is False
    assert health["max_volume_bytes"] == 2 << 30
    (model,) = client.models()
    assert model["model"] == "scripted-1" and model["licence"] == "MIT"
    assert model["capabilities"]["input"] == "volume3d" and model["capabilities"]["masks"] is True


def test_token_is_required_everywhere_but_healthz(serve):
    server = serve(token="s3cret")
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    for path in ("/v1/models", "/docs", "/openapi.json", "/v1/results/abc"):
        assert requests.get(server.url + path, timeout=5).status_code == 401, path
    with pytest.raises(AuthError, match="rejected the token"):
        server.client(token="wrong").models()
    with pytest.raises(AuthError):
        server.client(token=None).models()
    assert server.client().models()[0]["model"] == "scripted-1"


def test_volume_is_uploaded_once_and_survives_a_restart(serve, tmp_path):
    server = serve(store=tmp_path / "store")
    voxels, matrix = phantom_ct()
    client = server.client()
    volume_id = client.ensure_volume(voxels, matrix)
    assert volume_id == volume_sha256(voxels, matrix)
    assert client.last_upload_bytes == len(encode_volume((voxels, matrix)))
    assert client.ensure_volume(voxels.copy(), matrix) == volume_id
    assert client.last_upload_bytes == 0
    assert wait_until(lambda: (tmp_path / "store" / "volumes" / f"{volume_id}.vol").is_file())
    again = serve(store=tmp_path / "store").client()
    assert again.ensure_volume(voxels, matrix) == volume_id and again.last_upload_bytes == 0
    assert [p.name for p in (tmp_path / "store" / "volumes").iterdir()] == [f"{volume_id}.vol"]


def test_gzip_upload_is_accepted_and_smaller(live_server):
    voxels, matrix = phantom_ct()
    client = live_server.client()
    volume_id = client.ensure_volume(voxels, matrix, compress=True)
    assert 0 < client.last_upload_bytes < voxels.nbytes / 2
    assert requests.head(f"{live_server.url}/v1/volumes/{volume_id}", timeout=5).status_code == 200


def test_corrupt_upload_is_refused_and_not_stored(live_server):
    voxels, matrix = phantom_ct()
    body = encode_volume((voxels, matrix))
    volume_id = volume_sha256(voxels, matrix)
    damaged = body[:-1] + bytes([body[-1] ^ 1])
    response = _put(live_server, damaged, volume_id)
    assert response.status_code == 400 and "corrupted" in response.json()["detail"]
    assert requests.head(f"{live_server.url}/v1/volumes/{volume_id}", timeout=5).status_code == 404
    garbage = _put(live_server, b"not gzip at all", volume_id, {"Content-Encoding": "gzip"})
    assert garbage.status_code == 400 and "gzip" in garbage.json()["detail"]
    assert not list((live_server.store / "tmp").iterdir())


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (_raw_body((16, 16)), "3 positive integers"),
        (_raw_body((2, 4, 4, 4)), "3 positive integers"),
        (_raw_body((4, 4, 4, 3), dtype="|u1"), "3 positive integers"),
        (_raw_body((0, 4, 4)), "3 positive integers"),
        (_raw_body((4, 4, 4), payload=bytes(10)), "truncated"),
        (b"GIF89a" + bytes(100), "bad magic"),
    ],
    ids=["2d", "4d", "rgb", "zero-size", "truncated", "not-a-volume"],
)
def test_malformed_volumes_get_422_with_the_reason(live_server, body, words):
    response = _put(live_server, body)
    assert response.status_code == 422 and words in response.json()["detail"]


def test_rgb_nan_and_inf_volumes_are_refused_through_the_client(live_server):
    client = live_server.client()
    with pytest.raises(ValueError, match="3-D"):
        client.ensure_volume(np.zeros((4, 4, 4, 3), np.uint8), np.eye(4))
    for bad, words in ((np.nan, "1 NaN"), (np.inf, "1 infinite")):
        voxels = np.zeros((4, 5, 6), np.float32)
        voxels[1, 2, 3] = bad
        with pytest.raises(BadRequest, match=words):
            client.ensure_volume(voxels, np.eye(4))


def test_over_the_size_limit_is_413_raw_and_compressed(serve):
    server = serve(max_volume_bytes=20_000)
    client = server.client()
    big = np.zeros((10, 40, 40), np.int16)  # 32 kB of voxels
    with pytest.raises(VolumeTooLarge, match="limit of 20000 bytes"):
        client.ensure_volume(big, np.eye(4))
    with pytest.raises(VolumeTooLarge):  # a tiny gzip that inflates past the limit
        client.ensure_volume(big, np.eye(4), compress=True)
    with pytest.raises(VolumeTooLarge):  # refused while the client is still sending 6 MB
        client.ensure_volume(np.zeros((300, 100, 100), np.int16), np.eye(4))
    assert not list((server.store / "tmp").iterdir())


@pytest.mark.parametrize("bad_id", ["..%2F..%2Fetc%2Fpasswd", "..", "ABC", "a" * 63, "A" * 64, "g" * 64])
def test_bad_volume_ids_never_touch_the_disk(live_server, bad_id):
    url = f"{live_server.url}/v1/volumes/{bad_id}"
    assert requests.put(url, data=b"x", timeout=5).status_code in (400, 404, 405)
    assert requests.head(url, timeout=5).status_code in (400, 404, 405)
    assert not list((live_server.store / "volumes").iterdir())


def test_constant_and_oblique_volumes_are_accepted(live_server):
    client = live_server.client()
    constant = client.ensure_volume(np.full((6, 6, 6), 7, np.int16), np.eye(4))
    events = list(client.chat(constant, "hello"))
    assert any(e["type"] == "warning" and "single intensity" in e["message"] for e in events)
    voxels, _ = phantom_ct()
    oblique = client.ensure_volume(voxels, oblique_matrix())
    box = next(e for e in client.chat(oblique, "box please") if e["type"] == "box")
    axes = np.array(box["roi"]["axes"])
    assert np.allclose(axes[:, 0], [np.cos(np.radians(30)), np.sin(np.radians(30)), 0])


def test_disk_bound_evicts_least_recently_used(serve):
    server = serve(max_store_bytes=60_000)
    client = server.client()
    volumes = server.store / "volumes"
    first = client.ensure_volume(np.full((10, 40, 40), 1, np.int16), np.eye(4))
    assert wait_until(lambda: {p.stem for p in volumes.iterdir()} == {first})
    second = client.ensure_volume(np.full((10, 40, 40), 2, np.int16), np.eye(4))
    assert wait_until(lambda: {p.stem for p in volumes.iterdir()} == {second})
    assert client.ensure_volume(np.full((10, 40, 40), 2, np.int16), np.eye(4)) == second
    assert client.last_upload_bytes == 0


def test_the_volume_in_use_outlives_an_idle_one_when_the_disk_bound_bites(serve):
    server = serve(max_store_bytes=80_000)  # room for two 32 kB volumes, not three
    client = server.client()
    volumes = server.store / "volumes"
    a, b, c = (np.full((10, 40, 40), n, np.int16) for n in (1, 2, 3))
    a_id = client.ensure_volume(a, np.eye(4))
    time.sleep(0.02)  # distinct modification times on coarse filesystems
    b_id = client.ensure_volume(b, np.eye(4))
    time.sleep(0.02)
    for _ in range(3):  # the user keeps asking about A (HEAD + chat, served from memory)
        assert client.ensure_volume(a, np.eye(4)) == a_id and client.last_upload_bytes == 0
        assert list(client.chat(a_id, "hi"))[-1]["type"] == "done"
    time.sleep(0.02)
    client.ensure_volume(c, np.eye(4))
    assert wait_until(lambda: b_id not in {p.stem for p in volumes.iterdir()})
    assert a_id in {p.stem for p in volumes.iterdir()}, "the busy volume is kept, the idle one evicted"
    assert client.ensure_volume(a, np.eye(4)) == a_id and client.last_upload_bytes == 0


def test_chat_request_problems_are_sentences(live_server):
    client = live_server.client()
    voxels, matrix = phantom_ct()
    volume_id = client.ensure_volume(voxels, matrix)
    with pytest.raises(BadRequest, match="unknown volume"):
        list(client.chat("0" * 64, "hi"))
    with pytest.raises(BadRequest, match="not nope"):
        list(client.chat(volume_id, "hi", model="nope"))
    with pytest.raises(BadRequest, match="6 numbers"):
        list(client.chat(volume_id, "hi", roi=[1, 2, 3]))
    with pytest.raises(BadRequest, match="outside the volume"):
        list(client.chat(volume_id, "hi", roi=[500, 500, 500, 600, 600, 600]))
    with pytest.raises(BadRequest, match="orientation"):
        list(client.chat(volume_id, "hi", view={"orientation": "oblique"}))
    with pytest.raises(BadRequest, match="question or messages"):
        list(client.chat(volume_id, None))


def test_server_down_is_a_clear_error():
    from conftest import free_port

    client = MedMLLMClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ServerUnreachable, match="is it running"):
        client.health()


def test_unknown_engine_name_is_refused_before_serving():
    from medmllm.engines.base import EngineError
    from medmllm.engines.registry import create_engine

    with pytest.raises(EngineError, match="unknown engine 'nope'"):
        create_engine("nope", ScriptedEngine().options)


def test_openapi_documents_the_routes(live_server):
    paths = requests.get(f"{live_server.url}/openapi.json", timeout=5).json()["paths"]
    for route in (
        "/healthz",
        "/v1/models",
        "/v1/volumes/{volume_id}",
        "/v1/chat",
        "/v1/sessions/{session_id}/cancel",
    ):
        assert route in paths


def test_a_restart_sweeps_the_anatomy_labels_of_volumes_removed_while_it_was_down(serve):
    """Labels of a volume whose file is gone (deleted by hand, a smaller store) are dropped at start;
    those of held volumes stay."""
    from medmllm.anatomy.runner import Plan
    from medmllm.engines.base import EngineOptions
    from medmllm.engines.builtin import BuiltinEngine

    engine = BuiltinEngine(EngineOptions())
    server = serve(engine=engine)
    kept = server.client().ensure_volume(np.full((10, 40, 40), 1, np.int16), np.eye(4))
    plan, labels = Plan("total", "cpu", True, None), np.ones((10, 40, 40), np.uint8)
    engine.anatomy.runner.cache.store(kept, plan, labels)
    engine.anatomy.runner.cache.store("f" * 64, plan, labels)  # no such volume in the store
    anatomy = server.store / "engines" / "builtin" / "anatomy"
    assert sorted(p.name for p in anatomy.iterdir()) == sorted([kept, "f" * 64])
    serve(engine=BuiltinEngine(EngineOptions()), store=server.store)
    assert [p.name for p in anatomy.iterdir()] == [kept]


def test_evicting_or_dropping_a_damaged_volume_drops_its_anatomy_labels(serve):
    """The builtin engine's TotalSegmentator labels (`<store>/engines/builtin/anatomy/<id>/`) go
    with their volume; they were kept forever before. Labels are written by the real LabelCache."""
    from medmllm.anatomy.runner import Plan
    from medmllm.engines.base import EngineOptions
    from medmllm.engines.builtin import BuiltinEngine

    engine = BuiltinEngine(EngineOptions())
    server = serve(engine=engine, max_store_bytes=60_000)  # room for one 32 kB volume
    client, cache = server.client(), engine.anatomy.runner.cache
    labels = np.ones((10, 40, 40), np.uint8)
    first = client.ensure_volume(np.full((10, 40, 40), 1, np.int16), np.eye(4))
    cache.store(first, Plan("total", "cpu", True, None), labels)
    assert (server.store / "engines" / "builtin" / "anatomy" / first).is_dir()
    second = client.ensure_volume(np.full((10, 40, 40), 2, np.int16), np.eye(4))
    cache.store(second, Plan("total", "cpu", True, None), labels)
    assert not (cache.root / first).exists() and cache.find(first, "total", []) is None
    assert cache.find(second, "total", []) is not None, "the kept volume keeps its labels"
    stored = server.store / "volumes" / f"{second}.vol"
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x09")  # damaged on disk, found after a restart
    engine = BuiltinEngine(EngineOptions())
    restarted = serve(engine=engine, store=server.store, max_store_bytes=60_000)
    with pytest.raises(BadRequest, match="damaged"):
        list(restarted.client().chat(second, "how big are the lungs?"))
    assert (
        not (cache.root / second).exists() and engine.anatomy.runner.cache.find(second, "total", []) is None
    )
