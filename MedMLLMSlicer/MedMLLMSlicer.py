"""MedMLLMSlicer: chat with multimodal medical language models about the loaded volume.

Thin Slicer glue: the panel lives in `MedMLLMSlicerLib.chat_panel`, scene writing in
`MedMLLMSlicerLib.scene_writer`, and everything model- or geometry-related in the bundled
pure-Python `medmllm` package.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Optional, Tuple

import numpy as np
import slicer
from MedMLLMSlicerLib import backends, scene_writer
from MedMLLMSlicerLib.conversation import Conversation, Turn
from MedMLLMSlicerLib.worker import stream_events
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

HELP_TEXT = """
<p>Ask questions about the selected volume in plain language. Answers stream into the chat;
grounded boxes become <b>Markups ROI</b> nodes and masks become segments of one
<b>Segmentation</b> per conversation (editable in Segment Editor). Click a finding in the chat to
centre the slice views on it. Pick an ROI in <i>Ask about region</i> to ask about that region.</p>
<p>Backends: <b>Local</b> starts a server on this computer (the built-in engine needs no GPU and no
weights); <b>Remote</b> uses a MedMLLM server (URL + token); <b>OpenAI-compatible</b> talks to vLLM,
SGLang or Ollama through a local MedMLLM server.</p>
<p><b>Research use only, not for diagnosis.</b> Model licences (weights are never bundled):
M3D-LaMed: code MIT, weights tagged Apache-2.0 on their model page, trained on Radiopaedia-derived
data whose terms also apply; MiniGPT-Med: code Apache-2.0, language model under the Llama 2
Community Licence; MedRegA: no licence file published, so research use only until its authors say
otherwise. The built-in engine is part of this extension (Apache-2.0). The licence and intended use
of each served model are shown in the model list before you ask.</p>
"""

ACKNOWLEDGEMENT = """
MedMLLMSlicer builds on 3D Slicer and on the authors of M3D-LaMed (BAAI), MiniGPT-Med and MedRegA,
whose models it can talk to. Their weights are not bundled and keep their own licences.
"""


class MedMLLMSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and Help panel."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedMLLM Chat"
        self.parent.categories = ["Informatics"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedMLLMSlicer developers"]
        self.parent.helpText = HELP_TEXT
        self.parent.acknowledgementText = ACKNOWLEDGEMENT


class MedMLLMSlicerWidget(ScriptedLoadableModuleWidget):
    """Loads the .ui frame and puts the chat panel in it."""

    def setup(self) -> None:
        from MedMLLMSlicerLib.chat_panel import ChatPanel

        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/MedMLLMSlicer.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        self.panel = ChatPanel(self.ui.chatHost)
        self.ui.chatHost.layout().addWidget(self.panel.widget)
        slicer.app.aboutToQuit.connect(self.panel.stop_server)

    def cleanup(self) -> None:
        self.panel.cleanup()


class MedMLLMSlicerLogic(ScriptedLoadableModuleLogic):
    """Headless use (scripts, self-tests): start a local server and ask a question, blocking."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.server: Optional[backends.LocalServer] = None

    def start_local_server(
        self, engine: str = "builtin", options: Optional[list] = None, timeout: float = 120.0
    ) -> Tuple[str, str]:
        """Start `medmllm serve` on loopback and wait for it; returns (base_url, token)."""
        self.stop_local_server()
        self.server = backends.LocalServer(engine, options)
        self.server.start()
        return self.server.wait_ready(timeout), self.server.token

    def stop_local_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def ask(
        self,
        volume_node: Any,
        question: str,
        client: Any,
        roi_node: Any = None,
        conversation_scene: Optional[scene_writer.ConversationScene] = None,
    ) -> Tuple[Conversation, scene_writer.ConversationScene]:
        """Ask one question and write the answer into the scene (blocks until the answer is done)."""
        voxels, ijk_to_ras = scene_writer.volume_arrays(volume_node)
        conv_scene = conversation_scene or scene_writer.ConversationScene.create(volume_node)
        conversation = conv_scene.load() if conv_scene.node.GetText() else Conversation()
        conversation.turns += [Turn("user", question), Turn("assistant")]
        request = {"messages": conversation.messages(), "session_id": conversation.session_id}
        if roi_node is not None:
            request["roi"] = scene_writer.roi_request(roi_node)
        volume_id = conversation.volume_id = client.ensure_volume(voxels, ijk_to_ras)
        answer = conversation.turns[-1]
        downloads = slicer.util.tempDirectory("MedMLLMSlicer", includeDateTime=False)
        for event in stream_events(client, volume_id, request, downloads):
            notice = scene_writer.apply_event(conv_scene, answer, event)
            if notice:
                conversation.turns.insert(-1, Turn("notice", notice))
        answer.status = "done"
        conv_scene.save(conversation)
        return conversation, conv_scene


def phantom_ct() -> Tuple[np.ndarray, np.ndarray]:
    """A small CT with known anatomy: body 40 HU, right lung at i 12..28, left lung at i 36..52
    (i grows towards the patient's left), bone 700 HU at i 28..36, j 46..54, k 5..35. Voxels are
    1.6 x 1.6 x 2.5 mm so each lung is over 8 mm deep, as the built-in lung tool requires."""
    shape = (40, 64, 64)
    k, j, i = np.indices(shape)
    voxels = np.full(shape, -1000, dtype=np.int16)
    voxels[((i - 32) / 30.0) ** 2 + ((j - 32) / 28.0) ** 2 <= 1] = 40
    for centre in (20, 44):
        voxels[((i - centre) / 8.0) ** 2 + ((j - 30) / 13.0) ** 2 + ((k - 20) / 12.0) ** 2 <= 1] = -850
    voxels[5:36, 46:55, 28:37] = 700
    ijk_to_ras = np.array([[-1.6, 0, 0, 50.0], [0, -1.6, 0, 50.0], [0, 0, 2.5, -50.0], [0, 0, 0, 1]])
    return voxels, ijk_to_ras


class MedMLLMSlicerTest(ScriptedLoadableModuleTest):
    """Phantom -> local server (built-in engine) -> ROI nodes and segments at the right RAS places."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_builtin_engine_grounds_phantom()

    def test_builtin_engine_grounds_phantom(self) -> None:
        from medmllm.client import MedMLLMClient

        missing = backends.missing_server_packages()
        if missing:
            self.delayDisplay(f"Skipped: the local server needs {', '.join(missing)} (not installed)")
            return
        voxels, ijk_to_ras = phantom_ct()
        volume = slicer.util.addVolumeFromArray(voxels, ijk_to_ras, "MedMLLM phantom CT")
        logic = MedMLLMSlicerLogic()
        store = os.path.join(slicer.util.tempDirectory(), f"medmllm-store-{uuid.uuid4().hex[:8]}")
        url, token = logic.start_local_server("builtin", ["--store", store])
        try:
            client = MedMLLMClient(url, token=token)
            conversation, conv = logic.ask(volume, "where are the lungs?", client)
            self._check_lungs(conversation.turns[-1].items, ijk_to_ras)
            conversation, conv = logic.ask(volume, "segment the bones", client, conversation_scene=conv)
            self._check_bone(conversation.turns[-1].items, ijk_to_ras)
        finally:
            logic.stop_local_server()
        self.delayDisplay("MedMLLMSlicer self-test passed")

    def _check_lungs(self, items: list, ijk_to_ras: np.ndarray) -> None:
        boxes = {item.label.lower(): item for item in items if item.kind == "box"}
        self.assertIn("right lung", boxes)
        self.assertIn("left lung", boxes)
        for side, centre_i in (("right lung", 20), ("left lung", 44)):
            roi = slicer.mrmlScene.GetNodeByID(boxes[side].node_id)
            centre = [0.0, 0.0, 0.0]
            roi.GetCenter(centre)
            expected = ijk_to_ras @ np.array([centre_i, 30.0, 20.0, 1.0])
            np.testing.assert_allclose(centre, expected[:3], atol=2.6)
        self.assertGreater(
            boxes["right lung"].center[0], boxes["left lung"].center[0], "right lung must be more R"
        )

    def _check_bone(self, items: list, ijk_to_ras: np.ndarray) -> None:
        masks = [item for item in items if item.kind == "mask"]
        self.assertTrue(masks, "the answer holds no mask")
        segmentation = slicer.mrmlScene.GetNodeByID(masks[0].node_id)
        centre = segmentation.GetSegmentCenterRAS(masks[0].segment_id)
        expected = ijk_to_ras @ np.array([32.0, 50.0, 20.0, 1.0])
        np.testing.assert_allclose(centre, expected[:3], atol=2.6)
