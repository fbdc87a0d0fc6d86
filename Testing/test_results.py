"""ResultWriter on its own: engine events -> API events and the files Slicer opens."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import BONE_VOXELS, ScriptedEngine, oblique_matrix, phantom_ct
from medmllm.engines.base import BoxOut, ChatContext, ChatTurn, MaskOut, TokenOut
from medmllm.geometry.boxes import IJKBox
from medmllm.geometry.volume import Volume
from medmllm.io.markups import read_roi_json, validate_markups
from medmllm.io.segnrrd import read_seg_nrrd
from medmllm.results import ResultWriter, answer_events, mask_bbox, roi_to_ijk
from PIL import Image

SCHEMA = Path(__file__).resolve().parent / "data" / "slicer" / "markups-schema-v1.0.3.json"


def _writer(tmp_path, matrix=None, question="where is the bone?"):
    voxels, m = phantom_ct(ijk_to_ras=matrix)
    volume = Volume.from_array(voxels, m)
    return ResultWriter(tmp_path, volume, "v" * 64, [ChatTurn("user", question)]), volume


def test_files_of_an_answer_with_boxes_and_masks(tmp_path):
    writer, volume = _writer(tmp_path, oblique_matrix())
    box = IJKBox.from_voxels(*BONE_VOXELS)
    writer.add(TokenOut("It is here."))
    writer.add(BoxOut("bone", box))
    writer.add(BoxOut("bone", box))
    writer.add(MaskOut("bone", volume.voxels > 300))
    writer.add(MaskOut("bone", volume.voxels > 0, (0.1, 0.2, 0.3)))
    writer.done({"first_event_s": 0.0, "total_s": 0.1, "tokens": 1}, cancelled=False)
    names = {p.name for p in writer.write_files()}
    assert names == {
        "answer.md",
        "chat.json",
        "segmentation.seg.nrrd",
        "preview.png",
        "bone.mrk.json",
        "bone_2.mrk.json",
    }
    roi = read_roi_json(tmp_path / "bone_2.mrk.json")
    expected = box.to_roi(volume.ijk_to_ras)
    assert np.allclose(roi["center_ras"], expected.center) and np.allclose(roi["size"], expected.size)
    validate_markups(json.loads((tmp_path / "bone.mrk.json").read_text()), SCHEMA)
    validate_markups(writer.boxes[0]["markups"], SCHEMA)
    segments, matrix = read_seg_nrrd(tmp_path / "segmentation.seg.nrrd")
    assert [s.name for s in segments] == ["bone", "bone_2"] and np.allclose(matrix, volume.ijk_to_ras)
    assert np.array_equal(segments[1].mask, volume.voxels > 0) and tuple(segments[1].color) == (0.1, 0.2, 0.3)
    chat = json.loads((tmp_path / "chat.json").read_text())
    assert chat["messages"][-1] == {"role": "assistant", "content": "It is here."}
    assert [e["type"] for e in chat["events"]] == ["token", "box", "box", "mask", "mask", "done"]
    answer = (tmp_path / "answer.md").read_text()
    assert "# where is the bone?" in answer and "| mask: bone |" in answer and "not for diagnosis" in answer
    with Image.open(tmp_path / "preview.png") as image:
        assert image.width > image.height >= 256
        pixels = np.asarray(image.convert("RGB"))
    assert np.any(np.all(pixels == [229, 76, 63], axis=2)), "box outline colour missing from the preview"


def test_clamped_box_warns_and_bad_masks_are_skipped(tmp_path):
    writer, volume = _writer(tmp_path)
    out = writer.add(BoxOut("edge", IJKBox((-5.0, 0.0, 0.0), (3.0, 3.0, 3.0))))
    assert [e["type"] for e in out] == ["warning", "box"] and out[1]["voxels"]["min"] == [0, 0, 0]
    out = writer.add(MaskOut("wrong", np.zeros((2, 2, 2), bool)))
    assert [e["type"] for e in out] == ["warning"] and "does not match" in out[0]["message"]
    out = writer.add(MaskOut("empty", np.zeros(volume.shape, np.uint8), stats={"mean": np.float64("nan")}))
    assert out[0]["voxel_count"] == 0 and out[0]["bbox"] is None and out[1]["type"] == "warning"
    assert out[0]["stats"] == {"mean": None}


def test_answer_events_always_end_with_done(tmp_path):
    writer, volume = _writer(tmp_path, question="crash please")
    ctx = ChatContext(volume, "v" * 64, writer.messages)
    events = list(answer_events(ScriptedEngine(), ctx, writer, threading.Event()))
    assert [e["type"] for e in events] == ["token", "token", "error", "done"]
    assert events[-1]["timings"]["tokens"] == 2


def test_roi_to_ijk_accepts_corners_and_oriented_boxes():
    voxels, matrix = phantom_ct(ijk_to_ras=oblique_matrix())
    volume = Volume.from_array(voxels, matrix)
    box = IJKBox.from_voxels(*BONE_VOXELS)
    roi = box.to_roi(matrix)
    as_dict = {"center": roi.center.tolist(), "size": roi.size.tolist(), "axes": roi.axes.tolist()}
    assert roi_to_ijk(as_dict, volume).voxel_range() == box.voxel_range()
    with pytest.raises(ValueError, match="positive"):
        roi_to_ijk({"center": [0, 0, 0], "size": [0, 1, 1]}, volume)
    with pytest.raises(ValueError, match="finite"):
        roi_to_ijk([0, 0, 0, float("nan"), 1, 1], volume)


def test_mask_bbox_is_inclusive_ijk():
    mask = np.zeros((5, 6, 7), bool)
    mask[1:3, 2:5, 3:7] = True
    assert mask_bbox(mask) == (3, 2, 1, 6, 4, 2)
    assert mask_bbox(np.zeros((2, 2, 2), bool)) is None
