"""Chat over a real server: streamed events, RAS boxes, mask downloads, sessions, cancel, concurrency."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import requests
from conftest import BONE_VOXELS, ScriptedEngine, oblique_matrix, phantom_ct
from medmllm.geometry.boxes import IJKBox
from medmllm.io.segnrrd import read_seg_nrrd
from medmllm.protocol import EVENT_TYPES


@pytest.fixture
def uploaded(live_server):
    voxels, matrix = phantom_ct()
    client = live_server.client()
    return client, client.ensure_volume(voxels, matrix), voxels, matrix


def test_answer_streams_tokens_then_done_with_timings(uploaded):
    client, volume_id, _, _ = uploaded
    events = list(client.chat(volume_id, "hello there"))
    assert [e["type"] for e in events] == ["token", "token", "done"]
    assert "".join(e["text"] for e in events if e["type"] == "token") == "Echo: hello there"
    done = events[-1]
    assert done["timings"]["tokens"] == 2 and done["cancelled"] is False
    assert 0 <= done["timings"]["first_event_s"] <= done["timings"]["total_s"]
    assert all(e["type"] in EVENT_TYPES for e in events)


def test_box_event_carries_ijk_voxels_ras_roi_and_markups(uploaded, tmp_path):
    client, volume_id, _, matrix = uploaded
    box = next(e for e in client.chat(volume_id, "box the bone") if e["type"] == "box")
    expected = IJKBox.from_voxels(*BONE_VOXELS)
    assert box["label"] == "bone block" and box["ijk"] == {"lo": list(expected.lo), "hi": list(expected.hi)}
    assert box["voxels"] == {"min": list(BONE_VOXELS[:3]), "max": list(BONE_VOXELS[3:])}
    centre = matrix @ np.array([*expected.center, 1.0])
    assert np.allclose(box["roi"]["center"], centre[:3])
    assert np.allclose(box["roi"]["size"], [8 * 1.0, 8 * 1.5, 10 * 2.0])
    markup = box["markups"]["markups"][0]
    assert markup["type"] == "ROI" and markup["coordinateSystem"] == "LPS"
    assert np.allclose(markup["center"], [-centre[0], -centre[1], centre[2]])
    path = client.download(box["url"], tmp_path / box["file"])
    assert path.name == "bone block.mrk.json"


def test_mask_event_and_segmentation_in_the_original_geometry(uploaded, tmp_path):
    client, volume_id, voxels, matrix = uploaded
    events = list(client.chat(volume_id, "mask the bone"))
    mask = next(e for e in events if e["type"] == "mask")
    expected = voxels > 300
    assert mask["voxel_count"] == int(expected.sum())
    assert mask["volume_ml"] == pytest.approx(expected.sum() * 1.0 * 1.5 * 2.0 / 1000)
    assert mask["bbox"]["voxels"] == {"min": list(BONE_VOXELS[:3]), "max": list(BONE_VOXELS[3:])}
    assert mask["color"] == [0.9, 0.9, 0.8] and mask["stats"] == {"mean": 700.0}
    path = client.download(mask["url"], tmp_path / "seg.seg.nrrd")
    segments, seg_matrix = read_seg_nrrd(path)
    assert [s.name for s in segments] == ["bone"]
    assert np.array_equal(segments[0].mask, expected) and np.allclose(seg_matrix, matrix)
    files = client.result_files(events[-1]["result_id"])
    assert {"answer.md", "chat.json", "segmentation.seg.nrrd", "preview.png"} <= set(files)


def test_session_keeps_the_conversation_for_follow_ups(uploaded, live_server):
    client, volume_id, _, _ = uploaded
    first = list(client.chat(volume_id, "first question", session_id="conv-1"))
    assert first[-1]["session_id"] == "conv-1"
    list(client.chat(volume_id, "history please", session_id="conv-1"))
    turns = live_server.engine.calls[-1].messages
    assert [(t.role, t.content) for t in turns] == [
        ("user", "first question"),
        ("assistant", "Echo: first question"),
        ("user", "history please"),
    ]
    other = client.ensure_volume(np.ones((3, 3, 3), np.int16), np.eye(4))
    with pytest.raises(Exception, match="another volume"):
        list(client.chat(other, "hi", session_id="conv-1"))


def test_user_roi_in_ras_reaches_the_engine_as_an_ijk_box(uploaded, live_server):
    client, volume_id, _, matrix = uploaded
    lo = matrix @ np.array([9.5, 11.5, 4.5, 1.0])
    hi = matrix @ np.array([17.5, 19.5, 14.5, 1.0])
    list(
        client.chat(
            volume_id, "what is here", roi=[*lo[:3], *hi[:3]], view={"orientation": "coronal", "index": 3}
        )
    )
    ctx = live_server.engine.calls[-1]
    assert ctx.roi.voxel_range() == ((10, 12, 5), (17, 19, 14))
    assert ctx.view.orientation == "coronal" and ctx.view.index == 3


def test_engine_errors_become_error_events_and_the_stream_closes(uploaded):
    client, volume_id, _, _ = uploaded
    for question, words in (("fail now", "failed on purpose"), ("crash now", "RuntimeError: boom")):
        events = list(client.chat(volume_id, question))
        assert [e["type"] for e in events][-2:] == ["error", "done"]
        assert words in events[-2]["message"]


def test_box_outside_the_volume_is_a_warning_not_a_crash(uploaded):
    client, volume_id, _, _ = uploaded
    events = list(client.chat(volume_id, "outside please"))
    assert not any(e["type"] == "box" for e in events)
    assert any(e["type"] == "warning" and "outside the volume" in e["message"] for e in events)


def test_cancel_endpoint_stops_the_engine(uploaded, live_server):
    client, volume_id, _, _ = uploaded
    events = []
    for event in client.chat(volume_id, "slow answer", session_id="stop-me"):
        events.append(event)
        if len(events) == 5:
            client.cancel("stop-me")
    assert events[-1]["type"] == "done" and events[-1]["cancelled"] is True
    assert live_server.engine.cancelled.wait(5)


def test_client_disconnect_mid_stream_cancels_the_engine(uploaded, live_server):
    client, volume_id, _, _ = uploaded
    stream = client.chat(volume_id, "slow answer")
    assert next(stream)["type"] == "token"
    stream.close()
    assert live_server.engine.cancelled.wait(10)
    assert [e["type"] for e in client.chat(volume_id, "after")][-1] == "done"


def test_two_clients_at_once_each_get_their_own_answer(live_server):
    voxels, matrix = phantom_ct()
    results = {}

    def ask(name: str, m) -> None:
        client = live_server.client()
        volume_id = client.ensure_volume(voxels, m)
        results[name] = list(client.chat(volume_id, f"box for {name}"))

    threads = [threading.Thread(target=ask, args=(n, m)) for n, m in (("a", matrix), ("b", oblique_matrix()))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name, m in (("a", matrix), ("b", oblique_matrix())):
        text = "".join(e["text"] for e in results[name] if e["type"] == "token")
        assert text == f"Echo: box for {name}"
        box = next(e for e in results[name] if e["type"] == "box")
        centre = m @ np.array([*IJKBox.from_voxels(*BONE_VOXELS).center, 1.0])
        assert np.allclose(box["roi"]["center"], centre[:3])


def test_a_busy_session_refuses_a_second_question(uploaded):
    client, volume_id, _, _ = uploaded
    stream = client.chat(volume_id, "slow answer", session_id="busy")
    next(stream)
    with pytest.raises(Exception, match="still answering"):
        list(client.chat(volume_id, "again", session_id="busy"))
    client.cancel("busy")
    assert list(stream)[-1]["cancelled"] is True


def test_result_files_cannot_escape_the_result_folder(uploaded, live_server):
    client, volume_id, _, _ = uploaded
    done = list(client.chat(volume_id, "hello"))[-1]
    base = f"{live_server.url}/v1/results/{done['result_id']}"
    for name in ("..%2F..%2Fvolumes", "..", "%2Fetc%2Fpasswd", "nope.txt"):
        assert requests.get(f"{base}/{name}", timeout=5).status_code == 404
    assert requests.get(f"{live_server.url}/v1/results/../../etc", timeout=5).status_code == 404


def test_engine_prepares_each_volume_once(serve):
    engine = ScriptedEngine()
    client = serve(engine=engine).client()
    voxels, matrix = phantom_ct()
    volume_id = client.ensure_volume(voxels, matrix)
    for _ in range(3):
        list(client.chat(volume_id, "hi"))
    assert engine.prepared == [volume_id]


def test_mask_url_works_while_the_answer_still_streams(uploaded, tmp_path):
    client, volume_id, voxels, _ = uploaded
    stream = client.chat(volume_id, "mask then slow", session_id="mid")
    mask = next(e for e in stream if e["type"] == "mask")
    segments, _ = read_seg_nrrd(client.download(mask["url"], tmp_path / "early.seg.nrrd"))
    assert len(segments) == 1 and np.array_equal(segments[0].mask, voxels > 300)
    client.cancel("mid")
    done = list(stream)[-1]
    assert done["cancelled"] is True
    assert "segmentation.seg.nrrd" in client.result_files(done["result_id"])


def test_builtin_engine_end_to_end_through_the_server(serve, tmp_path):
    from medmllm.engines.base import EngineOptions
    from medmllm.engines.registry import create_engine

    server = serve(engine=create_engine("builtin", EngineOptions()))
    voxels, _ = phantom_ct()
    matrix = oblique_matrix()
    client = server.client()
    volume_id = client.ensure_volume(voxels, matrix)
    mask = next(e for e in client.chat(volume_id, "show me the bones") if e["type"] == "mask")
    segments, seg_matrix = read_seg_nrrd(client.download(mask["url"], tmp_path / "bone.seg.nrrd"))
    assert np.array_equal(segments[0].mask, voxels > 300) and np.allclose(seg_matrix, matrix)
    box = next(e for e in client.chat(volume_id, "where is the bone?") if e["type"] == "box")
    expected = IJKBox.from_voxels(*BONE_VOXELS).to_roi(matrix)
    assert np.allclose(box["roi"]["center"], expected.center) and np.allclose(
        box["roi"]["size"], expected.size
    )
