"""The chat panel under the PySide6 shim, talking to a real server on loopback (scripted engine).

Covers: an answer with box, mask and report landing in the fake scene; grounded links; Enter to
send; Stop; responsiveness while tokens stream; and the bad inputs (no volume, server down,
wrong token, volume deleted / scene closed mid-answer, remote consent).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import BONE_VOXELS, phantom_ct
from slicer_fakes.fixtures import add_phantom, fake_slicer, wait_until  # noqa: F401


@pytest.fixture
def panel(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib.chat_panel import ChatPanel

    panel = ChatPanel()
    panel.accept_intended_use()
    panel.mode_combo.setCurrentIndex(1)  # remote
    yield panel
    panel.cleanup()
    panel.widget.deleteLater()


def _connect(panel, url, token=""):
    panel.url_combo.setEditText(url)
    panel.token_edit.setText(token)


def _ask(panel, question, timeout=20.0):
    panel.input.setPlainText(question)
    panel.send()
    assert wait_until(lambda: panel.job is None, timeout), "the answer did not finish"


def _notices(panel):
    return [t.text for t in panel.conversation.turns if t.role == "notice"]


def test_answer_lands_in_scene_with_links(panel, fake_slicer, live_server):  # noqa: F811
    voxels, ijk_to_ras = phantom_ct()
    volume = add_phantom(fake_slicer, voxels, ijk_to_ras)
    _connect(panel, live_server.url)
    _ask(panel, "show the box and mask and report")
    answer = panel.conversation.turns[-1]
    assert answer.status == "done", _notices(panel)
    assert answer.text.startswith("Echo: show the box")
    assert [i.kind for i in answer.items] == ["box", "mask"]
    roi = fake_slicer.mrmlScene.GetNodeByID(answer.items[0].node_id)
    centre = [0.0, 0.0, 0.0]
    roi.GetCenter(centre)
    i0, j0, k0, i1, j1, k1 = BONE_VOXELS
    expected = (ijk_to_ras @ [(i0 + i1) / 2, (j0 + j1) / 2, (k0 + k1) / 2, 1.0])[:3]
    assert np.allclose(centre, expected) and roi.GetName() == "bone block"
    assert np.allclose(
        roi.GetSize(), np.abs(np.diag(ijk_to_ras)[:3]) * [i1 - i0 + 1, j1 - j0 + 1, k1 - k0 + 1]
    )
    seg_node = fake_slicer.mrmlScene.GetNodeByID(answer.items[1].node_id)
    segment = seg_node.GetSegmentation().GetSegment(answer.items[1].segment_id)
    assert segment.GetName() == "Bone" and (segment.mask == (voxels > 300)).all()
    terminology = [""]
    assert segment.GetTag(segment.GetTerminologyEntryTagName(), terminology)
    assert "SCT^272673000^Bone" in terminology[0]
    assert np.allclose(segment.ijk_to_ras, ijk_to_ras)
    report = fake_slicer.mrmlScene.GetNodeByID(panel.scene.node.GetNodeReferenceID("MedMLLMSlicer.Report"))
    assert "scripted findings" in report.GetText()
    assert wait_until(lambda: "medmllm:item/1/0" in panel.view.toHtml(), 2), "links rendered in the chat"
    from PySide6 import QtCore

    panel._link_clicked(QtCore.QUrl("medmllm:item/1/0"))
    assert fake_slicer.mrmlScene.nodes("vtkMRMLSliceNode")[0].jumps[-1] == pytest.approx(tuple(expected))
    assert "centred on bone block" in panel.status_label.text()
    stored = panel.scene.load()
    assert stored.turns[-1].items == answer.items and panel.scene.volume is volume
    assert wait_until(lambda: "scripted findings" in panel.view.toPlainText(), 2), "report shown in the chat"
    from MedMLLMSlicerLib.chat_panel import ChatPanel

    reopened = ChatPanel()  # e.g. after saving and reopening the scene
    assert reopened.conversation == panel.conversation
    reopened.cleanup()


def test_follow_up_sends_history_and_reuses_the_upload(panel, fake_slicer, live_server):  # noqa: F811
    add_phantom(fake_slicer, *phantom_ct())
    _connect(panel, live_server.url)
    _ask(panel, "hello")
    _ask(panel, "history please")
    assert "[3 turns]" in panel.conversation.turns[-1].text
    assert len(live_server.engine.prepared) == 1, "the volume is uploaded and prepared once"


def test_enter_sends_and_shift_enter_adds_a_line(panel, fake_slicer, live_server):  # noqa: F811
    from PySide6 import QtCore, QtTest

    add_phantom(fake_slicer, *phantom_ct())
    _connect(panel, live_server.url)
    panel.input.setPlainText("first line")
    panel.input.moveCursor(panel.input.textCursor().MoveOperation.End)
    QtTest.QTest.keyClick(panel.input, QtCore.Qt.Key_Return, QtCore.Qt.ShiftModifier)
    assert panel.input.toPlainText() == "first line\n" and panel.job is None
    QtTest.QTest.keyClick(panel.input, QtCore.Qt.Key_Return)
    assert panel.job is not None and panel.input.toPlainText() == ""
    assert wait_until(lambda: panel.job is None)


def test_stop_aborts_fast_and_ui_stays_responsive(panel, fake_slicer, live_server):  # noqa: F811
    from PySide6 import QtCore

    add_phantom(fake_slicer, *phantom_ct(shape=(60, 128, 128)))
    _connect(panel, live_server.url)
    gaps, last = [], [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    probe = QtCore.QTimer()
    probe.timeout.connect(tick)
    probe.start(5)
    panel.input.setPlainText("slow answer please")
    panel.send()
    assert wait_until(lambda: panel.conversation.turns[-1].text.count(".") >= 20)
    streaming = len(gaps)
    wait_until(lambda: False, timeout=0.5)
    worst = max(gaps[streaming:])
    stop_at = time.perf_counter()
    panel.stop()
    stopped_ui = time.perf_counter() - stop_at
    assert live_server.engine.cancelled.wait(5), "the server was not told to stop"
    server_stop = time.perf_counter() - stop_at
    probe.stop()
    print(
        f"\nworst main-thread stall while streaming: {worst * 1000:.1f} ms; Stop: UI idle after "
        f"{stopped_ui * 1000:.1f} ms, engine cancelled after {server_stop * 1000:.0f} ms"
    )
    assert panel.job is None and panel.conversation.turns[-1].status == "stopped"
    assert panel.send_button.isEnabled() and not panel.stop_button.isEnabled()
    text = panel.conversation.turns[-1].text
    wait_until(lambda: False, timeout=0.3)
    assert panel.conversation.turns[-1].text == text, "nothing is shown after Stop"
    assert worst < 0.5, "the UI froze while tokens streamed"


def test_no_volume_selected(panel, live_server):
    _connect(panel, live_server.url)
    panel.input.setPlainText("anything")
    panel.send()
    assert panel.job is None and "Select a volume first" in _notices(panel)[-1]


def test_intended_use_must_be_accepted_first(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib.chat_panel import ChatPanel

    add_phantom(fake_slicer, *phantom_ct())
    panel = ChatPanel()
    assert not panel.intended_use.isHidden()
    panel.input.setPlainText("q")
    panel.send()
    assert panel.job is None and "intended use" in panel.status_label.text()
    panel.cleanup()


def test_server_down(panel, fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib.backends import free_port

    add_phantom(fake_slicer, *phantom_ct())
    _connect(panel, f"127.0.0.1:{free_port()}")
    _ask(panel, "hello?")
    assert panel.conversation.turns[-1].status == "error"
    assert "no server" in _notices(panel)[-1].lower() or "refused" in _notices(panel)[-1].lower()


def test_wrong_token(panel, fake_slicer, serve):  # noqa: F811
    server = serve(token="right-token")
    add_phantom(fake_slicer, *phantom_ct())
    _connect(panel, server.url, "wrong-token")
    _ask(panel, "hello?")
    assert "token" in _notices(panel)[-1].lower()
    assert "wrong-token" not in panel.settings.stored_keys()


@pytest.mark.parametrize("how", ["volume deleted", "scene closed"])
def test_volume_deleted_or_scene_closed_mid_answer(panel, fake_slicer, live_server, how):  # noqa: F811
    volume = add_phantom(fake_slicer, *phantom_ct())
    _connect(panel, live_server.url)
    panel.input.setPlainText("slow")
    panel.send()
    assert wait_until(lambda: "." in panel.conversation.turns[-1].text)
    if how == "volume deleted":
        fake_slicer.mrmlScene.RemoveNode(volume)
        assert "volume was deleted" in _notices(panel)[-1]
    else:
        fake_slicer.mrmlScene.Clear()
        assert panel.conversation.turns == [] and panel.scene is None
    assert panel.job is None
    assert live_server.engine.cancelled.wait(5)
    wait_until(lambda: False, timeout=0.2)
    assert panel.volume_combo.count() == 0


def test_remote_upload_needs_inline_consent(panel, fake_slicer):  # noqa: F811
    sent = []

    class RecordingClient:
        def health(self):
            return {"api_version": "1"}

        def ensure_volume(self, voxels, ijk_to_ras):
            return "0" * 64

        def chat(self, volume_id, **request):
            sent.append(request)
            yield {"type": "token", "text": "ok"}
            yield {"type": "done"}

    panel.client_factory = lambda url, token: RecordingClient()
    add_phantom(fake_slicer, *phantom_ct())
    _connect(panel, "gpu-box.example.org:8765", "t")
    panel.input.setPlainText("question")
    panel.send()
    assert panel.consent_banner.visible and panel.job is None and sent == []
    assert "gpu-box.example.org" in panel.consent_banner.label.text()
    panel.consent_banner.cancel_button.click()
    assert not panel.consent_banner.visible and panel._pending is None
    panel.send()
    panel.consent_banner.button.click()
    assert wait_until(lambda: panel.job is None)
    assert sent[0]["messages"][-1] == {"role": "user", "content": "question"}
    assert panel.conversation.turns[-1].text == "ok"


def _stall_probe():
    """A 5 ms QTimer recording the gaps between its ticks: the longest gap is the worst main-thread stall."""
    from PySide6 import QtCore

    gaps, last = [], [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QtCore.QTimer()
    timer.timeout.connect(tick)
    timer.start(5)
    return timer, gaps


SEPARATE_SERVER = """
import sys
import uvicorn
from conftest import ScriptedEngine
from medmllm.server.app import create_app

uvicorn.run(create_app(ScriptedEngine(), sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]))
"""


@pytest.fixture
def separate_server(tmp_path):
    """The scripted server in a process of its own, as in Slicer: its GIL is not the panel's."""
    import subprocess
    import sys
    from pathlib import Path

    import requests
    from MedMLLMSlicerLib.backends import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", SEPARATE_SERVER, str(port), str(tmp_path / "store")],
        cwd=Path(__file__).parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return requests.get(url + "/healthz", timeout=0.5).status_code == 200
        except requests.exceptions.RequestException:
            return False

    try:
        assert wait_until(ready, 30), "the separate server did not start"
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("shape", [(200, 256, 256), (300, 512, 512)])
def test_big_volume_send_keeps_main_thread_slices_short(panel, fake_slicer, separate_server, shape):  # noqa: F811
    voxels, ijk_to_ras = phantom_ct(shape=shape)
    volume = add_phantom(fake_slicer, voxels, ijk_to_ras)
    _connect(panel, separate_server)
    started = time.perf_counter()
    np.array(voxels, copy=True)
    one_copy = time.perf_counter() - started
    slices = []

    def timed_drain():  # the panel's main-thread work arrives through the dispatcher's queue
        begin = time.perf_counter()
        panel.dispatcher.drain()
        slices.append(time.perf_counter() - begin)

    panel.dispatcher._timer.timeout.disconnect()
    panel.dispatcher._timer.timeout.connect(timed_drain)
    timer, gaps = _stall_probe()
    panel.input.setPlainText("show the box and mask")
    panel.send()
    job = panel.job
    assert wait_until(lambda: panel.job is None, 60), "the answer did not finish"
    timer.stop()
    print(
        f"\n{shape} int16 ({voxels.nbytes / 1e6:.0f} MB), Send to imported mask: longest main-thread "
        f"slice of the panel's work {max(slices) * 1000:.1f} ms; worst wall-clock gap between 5 ms "
        f"ticks {max(gaps) * 1000:.1f} ms (also counts other threads and processes on this shared "
        f"machine); voxels copied in {job.copy_steps} steps (one copy in one go: {one_copy * 1000:.1f} ms)"
    )
    answer = panel.conversation.turns[-1]
    assert answer.status == "done", _notices(panel)
    mask = answer.items[-1]
    segment = fake_slicer.mrmlScene.GetNodeByID(mask.node_id).GetSegmentation().GetSegment(mask.segment_id)
    assert np.array_equal(segment.mask, voxels > 300)
    assert fake_slicer.util.arrayFromVolume(volume) is volume._array, "the scene's voxels were not replaced"


def test_volume_reallocated_while_being_copied(panel, fake_slicer, live_server):  # noqa: F811
    voxels, ijk_to_ras = phantom_ct(shape=(120, 64, 64))
    volume = add_phantom(fake_slicer, voxels, ijk_to_ras)
    _connect(panel, live_server.url)
    panel.input.setPlainText("hello")
    panel.send()
    volume._array = voxels.copy()  # what Slicer does when a module replaces the image data
    assert wait_until(lambda: panel.job is None, 10)
    assert "volume changed while it was being read" in _notices(panel)[-1]
    assert live_server.engine.calls == [], "nothing half-copied reached the server"


def test_api_version_handshake_before_the_first_send(panel, fake_slicer, live_server, monkeypatch):  # noqa: F811
    import medmllm.client

    add_phantom(fake_slicer, *phantom_ct())
    _connect(panel, live_server.url)
    monkeypatch.setattr(medmllm.client, "API_VERSION", "999")
    _ask(panel, "hello")
    assert "API version 1, this client 999" in _notices(panel)[-1]
    assert live_server.engine.prepared == [], "no upload to a server of another API version"
    monkeypatch.undo()
    checks = []
    real_health = medmllm.client.MedMLLMClient.health
    monkeypatch.setattr(
        medmllm.client.MedMLLMClient, "health", lambda self: checks.append(1) or real_health(self)
    )
    _ask(panel, "hello")
    _ask(panel, "hello again")
    assert checks == [1], "checked once per server"
    assert panel.conversation.turns[-1].status == "done"


def test_selection_and_conversation_live_in_the_parameter_node(panel, fake_slicer, live_server):  # noqa: F811
    from MedMLLMSlicerLib.chat_panel import ChatPanel

    scene = fake_slicer.mrmlScene
    add_phantom(fake_slicer, *phantom_ct(), name="first")
    second = add_phantom(fake_slicer, *phantom_ct(), name="second")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "region")
    roi.SetSize(10.0, 10.0, 10.0)
    panel.select_volume(second)
    panel.select_roi(roi)
    _connect(panel, live_server.url)
    _ask(panel, "hello")
    node = scene.GetSingletonNode("MedMLLMSlicer", "vtkMRMLScriptedModuleNode")
    assert node.GetAttribute("ModuleName") == "MedMLLMSlicer"
    assert node.GetNodeReferenceID("volume") == second.GetID()
    assert node.GetNodeReferenceID("roi") == roi.GetID()
    assert node.GetNodeReferenceID("conversation") == panel.scene.node.GetID()
    reopened = ChatPanel()  # e.g. the module opened again, or the scene reloaded
    assert reopened.volume_node() is second and reopened._roi_node() is roi
    assert reopened.conversation == panel.conversation
    reopened.cleanup()
    panel.new_conversation()
    assert node.GetNodeReferenceID("conversation") is None
    scene.Clear()
    assert scene.GetSingletonNode("MedMLLMSlicer", "vtkMRMLScriptedModuleNode") is node
    assert node.GetNodeReferenceID("volume") is None and panel.params.volume is None


def test_conversation_survives_scene_save_and_load(panel, fake_slicer, live_server):  # noqa: F811
    """The chat JSON (over 256 characters) lives in a storage file that Import reads after every
    NodeAddedEvent: the panel must wait for EndImportEvent, then show the stored conversation, and
    the next Send must extend it, not overwrite it."""
    scene = fake_slicer.mrmlScene
    add_phantom(fake_slicer, *phantom_ct())
    _connect(panel, live_server.url)
    _ask(panel, "show the box please")
    before = panel.conversation
    assert len(before.to_json()) > 256
    scene.SetURL("memory://chat.mrml")
    scene.Commit()
    scene.Clear()
    assert panel.conversation.turns == []
    scene.Import()
    assert "Could not restore" not in panel.status_label.text()
    assert panel.conversation.turns == before.turns and panel.scene is not None
    _ask(panel, "and again")
    assert [t.role for t in panel.scene.load().turns] == ["user", "assistant"] * 2


def test_new_conversation_stays_new_when_nodes_are_added(panel, fake_slicer, live_server):  # noqa: F811
    """Placing an ROI or Segment Editor's temporary labelmap adds nodes: only a volume change may
    switch conversations."""
    scene = fake_slicer.mrmlScene
    add_phantom(fake_slicer, *phantom_ct())
    _connect(panel, live_server.url)
    _ask(panel, "hello")
    panel.new_conversation()
    scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "placed")
    scene.AddNewNodeByClass("vtkMRMLTextNode", "something else")
    assert panel.scene is None and panel.conversation.turns == []
    _ask(panel, "fresh start")
    conversations = [n for n in scene.nodes("vtkMRMLTextNode") if n.GetAttribute("MedMLLMSlicer.Role")]
    assert len([n for n in conversations if n.GetAttribute("MedMLLMSlicer.Role") == "conversation"]) == 2
    assert [t.text for t in panel.conversation.turns if t.role == "user"] == ["fresh start"]


def test_volume_without_image_data_is_a_notice_not_a_crash(panel, fake_slicer, live_server):  # noqa: F811
    empty = fake_slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "being loaded")
    panel.select_volume(empty)
    _connect(panel, live_server.url)
    panel.input.setPlainText("hello")
    panel.send()
    assert panel.job is None and "has no image data" in _notices(panel)[-1]
    assert live_server.engine.calls == []
