"""End to end: phantom volume -> the panel starts a real local server (built-in engine) -> answers
land in the fake scene at the right RAS places; plus the module's own Slicer self-test under the fakes.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from slicer_fakes.fixtures import add_phantom, fake_slicer, wait_until  # noqa: F401

# The committed screenshot is refreshed with `scripts/screenshot`; plain test runs leave the tree alone.
SCREENSHOT_ENV = "MEDMLLM_SCREENSHOT"


@pytest.fixture
def module(fake_slicer, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HOME", str(tmp_path))  # the local server's default volume store goes here
    import MedMLLMSlicer

    return MedMLLMSlicer


def test_panel_with_local_builtin_server(module, fake_slicer, tmp_path):  # noqa: F811
    from MedMLLMSlicerLib.chat_panel import ChatPanel

    voxels, ijk_to_ras = module.phantom_ct()
    add_phantom(fake_slicer, voxels, ijk_to_ras)
    panel = ChatPanel()
    panel.widget.resize(460, 860)
    panel.widget.show()
    try:
        panel.accept_intended_use()
        panel.mode_combo.setCurrentIndex(0)
        panel.input.setPlainText("where are the lungs?")
        panel.send()
        assert panel.job is None and "Starting local server" in panel.status_label.text()
        assert wait_until(lambda: panel.job is not None, 60), panel.status_label.text()
        assert wait_until(lambda: panel.job is None, 60)
        assert panel.server.running and panel.model_combo.count() >= 1
        assert (
            "Licence: Apache-2.0" in panel.model_info.text()
            and "not for diagnosis" in panel.model_info.text()
        )
        boxes = {i.label: i for i in panel.conversation.turns[-1].items}
        for label, centre_i in (("Right lung", 20), ("Left lung", 44)):
            roi = fake_slicer.mrmlScene.GetNodeByID(boxes[label].node_id)
            centre = [0.0, 0.0, 0.0]
            roi.GetCenter(centre)
            assert np.allclose(centre, (ijk_to_ras @ [centre_i, 30, 20, 1])[:3], atol=2.6), label
        panel.input.setPlainText("segment the bones")
        panel.send()
        assert wait_until(lambda: panel.job is None, 60)
        mask = panel.conversation.turns[-1].items[0]
        segmentation = fake_slicer.mrmlScene.GetNodeByID(mask.node_id)
        centre = segmentation.GetSegmentCenterRAS(mask.segment_id)
        assert np.allclose(centre, (ijk_to_ras @ [32, 50, 20, 1])[:3], atol=2.6)
        panel.select_roi(fake_slicer.mrmlScene.GetNodeByID(boxes["Left lung"].node_id))
        panel.input.setPlainText("how big is the left lung?")
        panel.send()
        assert wait_until(lambda: panel.job is None, 60)
        assert panel.conversation.turns[-2].text.startswith("[about region 'Left lung']")
        assert "left lung" in panel.conversation.turns[-1].text.lower()
        shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "chat-panel.png")
        _screenshot_mid_answer(panel, shot)
        assert panel.conversation.turns[-1].status == "done"
        segments = {i.label for i in panel.conversation.turns[-1].items if i.kind == "mask"}
        assert segments == {"Right lung", "Left lung (2)"}, "Slicer's names; the earlier left lung kept"
        server = panel.server
    finally:
        panel.cleanup()
    assert not server.running, "cleanup stops the local server"
    assert all(server.token not in line for line in server.log), "the token is never logged"


class _HeldStream:
    """The real server's answer, replayed with a pause halfway through its words: the built-in engine
    answers in milliseconds, too fast to photograph an answer while it streams."""

    def __init__(self, client):
        self.client, self.halfway, self.release = client, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.client, name)

    def chat(self, volume_id, **request):
        events = list(self.client.chat(volume_id, **request))
        tokens = [n for n, e in enumerate(events) if e["type"] == "token"]
        for n, event in enumerate(events):
            if n == tokens[len(tokens) // 2]:
                self.halfway.set()
                self.release.wait(30)
            yield event
            time.sleep(0.01)


def _screenshot_mid_answer(panel, shot: Path) -> None:
    real_factory = panel.client_factory
    held = []
    panel.client_factory = lambda url, token: held.append(_HeldStream(real_factory(url, token))) or held[-1]
    panel.select_roi(None)
    panel.input.setPlainText("segment the lungs")
    panel.send()
    assert wait_until(lambda: held and held[0].halfway.is_set(), 60)
    wait_until(lambda: False, 0.3)  # let the streamed words render
    assert panel.stop_button.isEnabled() and "Answering" in panel.status_label.text()
    panel.input.setPlainText("which one is larger?")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert panel.widget.grab().save(str(shot))
    held[0].release.set()
    assert wait_until(lambda: panel.job is None, 60)
    panel.client_factory = real_factory


def test_slicer_self_test_runs_under_the_fakes(module):
    import unittest

    result = unittest.TestResult()
    module.MedMLLMSlicerTest("test_builtin_engine_grounds_phantom").run(result)
    assert result.wasSuccessful(), result.failures + result.errors
