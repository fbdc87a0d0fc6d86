"""Engine `openai` behind the real MedMLLMSlicer server: the Slicer module's path, end to end over HTTP."""

from __future__ import annotations

import numpy as np
from fake_openai_server import FakeOpenAIServer, grounded_answer
from medmllm.engines.base import EngineOptions
from medmllm.engines.registry import create_engine
from test_openai_engine import LESION_CENTRE, phantom


def test_box_event_through_the_server_lands_on_the_lesion(serve) -> None:
    answer = lambda body, images: grounded_answer("internvl", images[0], "lesion")  # noqa: E731
    volume = phantom()
    with FakeOpenAIServer(answer, model="medrega") as model_server:
        engine = create_engine(
            "openai", EngineOptions(model="medrega", base_url=model_server.base_url, dialect="internvl")
        )
        client = serve(engine=engine).client()
        volume_id = client.ensure_volume(volume.voxels, volume.ijk_to_ras)
        events = list(
            client.chat(volume_id, "Where is the lesion?", view={"orientation": "axial", "index": 20})
        )
        follow_up = list(client.chat(volume_id, "And its size?", session_id=events[-1].get("session_id")))
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done" and "error" not in kinds
    (box,) = [e for e in events if e["type"] == "box"]
    assert box["label"] == "lesion"
    centre = np.asarray(box["roi"]["center"], dtype=float)
    lesion_ras = (volume.ijk_to_ras @ np.append(LESION_CENTRE, 1.0))[:3]
    assert np.all(np.abs(np.linalg.solve(volume.ijk_to_ras[:3, :3], centre - lesion_ras)) <= 0.5)
    # the follow-up question carried the first turn and the model's answer as history
    assert follow_up[-1]["type"] == "done"
    history = model_server.requests[1].body["messages"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    assert "<ref>lesion</ref>" in history[2]["content"]
