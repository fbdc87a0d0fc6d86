"""Scene writer against the manifest-checked fake MRML scene: ROI nodes, segments, report, chat."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import phantom_ct
from slicer_fakes.fixtures import add_phantom, fake_slicer  # noqa: F401


@pytest.fixture
def writer(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib import scene_writer

    voxels, ijk_to_ras = phantom_ct()
    volume = add_phantom(fake_slicer, voxels, ijk_to_ras)
    return scene_writer, volume, scene_writer.ConversationScene.create(volume)


def _box_event(center=(1.0, 2.0, 3.0), size=(4.0, 5.0, 6.0), axes=None, label="bone block"):
    roi = {"center": list(center), "size": list(size), "axes": axes or np.eye(3).tolist()}
    return {"type": "box", "label": label, "color": [0.9, 0.2, 0.1], "roi": roi}


def test_box_becomes_named_coloured_roi_in_conversation_folder(writer, fake_slicer):  # noqa: F811
    _sw, _volume, conv = writer
    axes = [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    item = conv.add_box(_box_event(axes=axes), 0)
    roi = fake_slicer.mrmlScene.GetNodeByID(item.node_id)
    assert roi.GetName() == "bone block" and item.kind == "box"
    center = [0.0, 0.0, 0.0]
    roi.GetCenter(center)
    assert center == [1.0, 2.0, 3.0] and roi.GetSize() == (4.0, 5.0, 6.0)
    assert np.allclose(roi.GetObjectToNodeMatrix().array[:3, :3], axes)
    assert roi.GetDisplayNode().GetSelectedColor() == (0.9, 0.2, 0.1)
    sh = fake_slicer.mrmlScene.GetSubjectHierarchyNode()
    folder = sh.GetItemParent(sh.GetItemByDataNode(roi))
    assert folder == sh.GetItemParent(sh.GetItemByDataNode(conv.node))
    assert sh.GetItemLevel(folder) == "Folder"


def test_folder_goes_under_the_volume_study(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib.scene_writer import ConversationScene

    volume = add_phantom(fake_slicer, *phantom_ct())
    sh = fake_slicer.mrmlScene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "CT study")
    sh.SetItemParent(sh.GetItemByDataNode(volume), study)
    conv = ConversationScene.create(volume)
    folder = sh.GetItemParent(sh.GetItemByDataNode(conv.node))
    assert sh.GetItemParent(folder) == study


def _mask_event(label, mask, ijk_to_ras, segment=0):
    return {
        "type": "mask",
        "label": label,
        "segment": segment,
        "url": "/v1/results/r/segmentation.seg.nrrd",
        "mask": mask.view(np.uint8),
        "mask_ijk_to_ras": ijk_to_ras,
    }


def test_masks_append_and_never_overwrite_user_segments(writer, fake_slicer):  # noqa: F811
    _sw, volume, conv = writer
    voxels, ijk_to_ras = phantom_ct()
    bone = voxels > 300
    first = conv.add_mask(_mask_event("bone", bone, ijk_to_ras))
    seg_node = fake_slicer.mrmlScene.GetNodeByID(first.node_id)
    segmentation = seg_node.GetSegmentation()
    user_segment = segmentation.GetSegment(first.segment_id)
    user_segment.mask[:] = False  # the user erased it in Segment Editor
    second = conv.add_mask(_mask_event("bones", bone, ijk_to_ras))
    assert [first.label, second.label] == ["Bone", "Bone (2)"]
    assert segmentation.GetNumberOfSegments() == 2
    assert not segmentation.GetSegment(first.segment_id).mask.any(), "user's edit must survive"
    assert (segmentation.GetSegment(second.segment_id).mask == bone).all()
    assert np.allclose(segmentation.GetSegment(second.segment_id).ijk_to_ras, ijk_to_ras)
    assert seg_node.GetNodeReferenceID("referenceImageGeometryRef") == volume.GetID()
    assert fake_slicer.mrmlScene.GetNumberOfUndoLevels() == 0, "Slicer's undo flag is off by default"
    assert len(fake_slicer.mrmlScene.nodes("vtkMRMLSegmentationNode")) == 1


def _terminology(segment) -> str:
    """The segment's TerminologyEntry tag, read as every supported Slicer can (no GetTerminology in 5.8)."""
    value = [""]
    segment.GetTag(segment.GetTerminologyEntryTagName(), value)
    return value[0]


def test_segments_take_slicer_terminology_or_keep_the_phrase(writer, fake_slicer):  # noqa: F811
    _sw, _volume, conv = writer
    voxels, ijk_to_ras = phantom_ct()
    mask = voxels > 300
    labels = ["Left lung", "lung, right", "bone", "the body outline", "sella turcica", "odd thing"]
    items = [conv.add_mask(_mask_event(label, mask, ijk_to_ras)) for label in labels]
    segmentation = fake_slicer.mrmlScene.GetNodeByID(items[0].node_id).GetSegmentation()
    segments = [segmentation.GetSegment(item.segment_id) for item in items]
    assert [s.GetName() for s in segments] == [
        "Left lung", "Right lung", "Bone", "Body", "sella turcica", "odd thing"
    ]  # fmt: skip
    assert _terminology(segments[0]) == (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
        "~SCT^39607008^Lung~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^"
    )
    assert "~SCT^39607008^Lung~SCT^24028007^Right~" in _terminology(segments[1])
    assert "~SCT^85756007^Tissue~SCT^272673000^Bone~^^~" in _terminology(segments[2])
    assert "~SCT^39937001^Skin~" in _terminology(segments[3])
    assert segments[0].GetColor() == pytest.approx((197 / 255, 165 / 255, 145 / 255))
    assert segments[2].GetColor() == pytest.approx((241 / 255, 214 / 255, 145 / 255))
    for unknown in segments[4:]:
        assert _terminology(unknown) == ""
    colors = [tuple(round(c, 3) for c in s.GetColor()) for s in segments]
    assert len(set(colors[4:]) | set(colors[:4])) == 5, "unknown phrases get colours of their own"
    tags = [[""] for _ in segments]
    assert all(s.GetTag("MedMLLMSlicer.Label", t) for s, t in zip(segments, tags))
    assert [t[0] for t in tags] == labels, "the model's own phrase is kept"


def test_terminology_sent_by_the_server_names_what_slicers_list_lacks(writer, fake_slicer):  # noqa: F811
    _sw, _volume, conv = writer
    voxels, ijk_to_ras = phantom_ct()
    entry = (
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure"
        "~SCT^66794005^L1 vertebra~^^~Anatomic codes - DICOM master list~^^~^^"
    )
    l1 = _mask_event("L1 vertebra", voxels > 300, ijk_to_ras)
    sent = dict(l1, terminology=entry, color=[0.9, 0.8, 0.7])
    liver = dict(_mask_event("Liver", voxels > 300, ijk_to_ras), terminology=entry, color=[0.1, 0.5, 0.1])
    broken = dict(_mask_event("odd", voxels > 300, ijk_to_ras), terminology="not~an~entry", color=[0, 0, 1])
    items = [conv.add_mask(e) for e in (sent, liver, broken)]
    segmentation = fake_slicer.mrmlScene.GetNodeByID(items[0].node_id).GetSegmentation()
    first, second, third = (segmentation.GetSegment(i.segment_id) for i in items)
    assert first.GetName() == "L1 vertebra" and _terminology(first) == entry
    assert first.GetColor() == pytest.approx((0.9, 0.8, 0.7))
    assert "~SCT^10200004^Liver~" in _terminology(second), "Slicer's own list wins where it knows the phrase"
    assert _terminology(third) == ""


def test_mask_on_another_grid_is_refused(writer, fake_slicer):  # noqa: F811
    sw, _volume, conv = writer
    voxels, ijk_to_ras = phantom_ct()
    with pytest.raises(sw.SceneError, match="does not fit the volume"):
        conv.add_mask(_mask_event("bone", voxels[1:] > 300, ijk_to_ras))
    shifted = ijk_to_ras.copy()
    shifted[0, 3] += 5.0
    with pytest.raises(sw.SceneError, match="does not fit the volume"):
        conv.add_mask(_mask_event("bone", voxels > 300, shifted))
    with pytest.raises(sw.SceneError, match="could not be read"):
        conv.add_mask({"type": "mask", "label": "x"})


def test_report_and_conversation_survive_in_scene(writer, fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib.conversation import Conversation, Turn

    sw, volume, conv = writer
    report = conv.set_report("## Report\nfine")
    assert report.GetText() == "## Report\nfine"
    assert conv.set_report("second") is report
    chat = Conversation(turns=[Turn("user", "where is the bone?"), Turn("assistant", "here", status="done")])
    conv.save(chat)
    restored = sw.ConversationScene.latest(volume).load()
    assert restored == chat


def test_volume_deleted_or_scene_closed_refuses_results(writer, fake_slicer):  # noqa: F811
    sw, volume, conv = writer
    fake_slicer.mrmlScene.RemoveNode(volume)
    with pytest.raises(sw.SceneError, match="volume was deleted"):
        conv.add_box(_box_event(), 0)
    errors = []

    def write_while_closing(caller, event):
        try:
            conv.set_report("x")
        except sw.SceneError as exc:
            errors.append(str(exc))

    scene = fake_slicer.mrmlScene
    scene.AddObserver(scene.StartCloseEvent, write_while_closing)
    scene.Clear()
    assert errors and "scene was closed" in errors[0]
    with pytest.raises(sw.SceneError, match="text node was deleted"):
        conv.set_report("x")


def test_focus_jumps_the_slice_views_through_the_markups_logic(writer, fake_slicer):  # noqa: F811
    """Slicer's own jump (`JumpSlicesToLocation`, centred, every view group), not a loop over slice
    nodes plus `SetSelected` (which shows nothing)."""
    sw, _volume, conv = writer
    box = conv.add_box(_box_event(center=(10.0, -5.0, 2.5)), 0)
    assert sw.focus(box).startswith("centred on bone block")
    assert fake_slicer.modules.markups.logic().jumps == [(10.0, -5.0, 2.5, True, -1)]
    for view in fake_slicer.mrmlScene.nodes("vtkMRMLSliceNode"):
        assert view.jumps[-1] == (10.0, -5.0, 2.5)
    voxels, ijk_to_ras = phantom_ct()
    mask = conv.add_mask(_mask_event("bone", voxels > 300, ijk_to_ras))
    sw.focus(mask)
    centre_ijk = np.array([(10 + 17) / 2, (12 + 19) / 2, (5 + 14) / 2, 1.0])
    expected = (ijk_to_ras @ centre_ijk)[:3]
    assert np.allclose(fake_slicer.mrmlScene.nodes("vtkMRMLSliceNode")[0].jumps[-1], expected)
    fake_slicer.mrmlScene.RemoveNode(fake_slicer.mrmlScene.GetNodeByID(box.node_id))
    assert "no longer in the scene" in sw.focus(box)


def test_bad_inputs_give_sentences(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib import scene_writer as sw

    with pytest.raises(sw.SceneError, match="select a volume"):
        sw.volume_arrays(None)
    roi = fake_slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "flat")
    roi.SetSize(10.0, 0.0, 5.0)
    with pytest.raises(sw.SceneError, match="zero size"):
        sw.roi_request(roi)
    volume = add_phantom(fake_slicer, *phantom_ct())
    conv = sw.ConversationScene.create(volume)
    with pytest.raises(sw.SceneError, match="without an ROI"):
        conv.add_box({"type": "box", "label": "x"}, 0)


def test_roi_request_and_volume_arrays(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib import scene_writer as sw

    voxels, ijk_to_ras = phantom_ct()
    volume = add_phantom(fake_slicer, voxels, ijk_to_ras)
    view, matrix = sw.volume_arrays(volume)
    assert view is fake_slicer.util.arrayFromVolume(volume), "no copy on the main thread"
    assert np.allclose(matrix, ijk_to_ras)
    roi = fake_slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "region")
    roi.SetCenter(1.0, 2.0, 3.0)
    roi.SetSize(4.0, 5.0, 6.0)
    assert sw.roi_request(roi) == {
        "center": [1.0, 2.0, 3.0],
        "size": [4.0, 5.0, 6.0],
        "axes": np.eye(3).tolist(),
    }


def test_empty_masks_are_a_notice_and_an_emptied_segment_focuses_with_a_sentence(writer, fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib.conversation import Turn

    sw, _volume, conv = writer
    voxels, ijk_to_ras = phantom_ct()
    answer = Turn("assistant")
    notice = sw.apply_event(conv, answer, _mask_event("liver", voxels > 5000, ijk_to_ras))
    assert (
        "empty" in notice
        and answer.items == []
        and conv.segmentation().GetSegmentation().GetNumberOfSegments() == 0
    )
    item = conv.add_mask(_mask_event("bone", voxels > 300, ijk_to_ras))
    segment = conv.segmentation().GetSegmentation().GetSegment(item.segment_id)
    segment.mask[:] = False  # the user erased it in Segment Editor
    assert "is empty" in sw.focus(item)


def test_no_undo_point_is_promised_while_slicer_keeps_undo_off(writer, fake_slicer):  # noqa: F811
    """`SaveStateForUndo` does nothing with the scene's undo flag off (Slicer's default): neither the
    code nor the docs may say that a mask comes "after an undo point"."""
    from pathlib import Path

    sw, _volume, conv = writer
    voxels, ijk_to_ras = phantom_ct()
    conv.add_mask(_mask_event("bone", voxels > 300, ijk_to_ras))
    assert fake_slicer.mrmlScene.GetUndoFlag() is False and fake_slicer.mrmlScene.GetNumberOfUndoLevels() == 0
    root = Path(__file__).resolve().parents[1]
    for path in (Path(sw.__file__), root / "docs" / "slicer-module.md", root / "README.md"):
        assert "after an undo point" not in path.read_text(encoding="utf-8"), path


def test_findings_survive_import_into_a_scene_that_renames_their_ids(writer, fake_slicer):  # noqa: F811
    """Loading a saved scene into a non-empty one renames clashing IDs: the chat's links must still
    reach the imported nodes, not the scene's nodes that now hold the old IDs."""
    sw, _volume, conv = writer
    scene = fake_slicer.mrmlScene
    voxels, ijk_to_ras = phantom_ct()
    box = conv.add_box(_box_event(center=(10.0, -5.0, 2.5)), 0)
    mask = conv.add_mask(_mask_event("bone", voxels > 300, ijk_to_ras))
    from MedMLLMSlicerLib.conversation import Conversation, Turn

    conv.save(Conversation(turns=[Turn("user", "q"), Turn("assistant", "a", [box, mask])]))
    scene.SetURL("memory://saved.mrml")
    scene.Commit()
    scene.GetNodeByID(box.node_id).SetCenter(99.0, 99.0, 99.0)  # the scene's own node moves on
    scene.Import()  # the saved scene again, into this (non-empty) scene
    conversations = [n for n in scene.nodes("vtkMRMLTextNode") if n.GetAttribute(sw.ROLE) == "conversation"]
    imported = sw.ConversationScene(conversations[-1])
    assert imported.node is not conv.node and imported.node.GetID() != conv.node.GetID()
    items = imported.load().turns[-1].items
    assert sw.focus(items[0]).startswith("centred on bone block")
    assert scene.nodes("vtkMRMLSliceNode")[0].jumps[-1] == (10.0, -5.0, 2.5), "centred on the imported box"
    assert items[1].node_id == imported.node.GetNodeReferenceID(sw.REF_SEGMENTATION) != mask.node_id
    scene.RemoveNode(scene.GetNodeByID(items[0].node_id))
    assert "no longer in the scene" in sw.focus(imported.load().turns[-1].items[0])


def test_a_volume_without_image_data_is_a_sentence(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib import scene_writer as sw

    empty = fake_slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels yet")
    with pytest.raises(sw.SceneError, match="has no image data"):
        sw.volume_arrays(empty)
