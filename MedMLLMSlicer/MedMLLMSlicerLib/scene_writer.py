"""Answers into the scene: boxes -> ROI nodes, masks -> segments, report -> text node, chat -> scene.

One conversation = one vtkMRMLTextNode holding the chat JSON (saved with the scene), placed in a
Subject Hierarchy folder under the volume's study, with references to its Segmentation node (one
per conversation, reference geometry = the volume) and its report node. New masks are always
*appended* as new segments, renamed "name (2)" on a clash: a user's edited segment is never
overwritten (no scene undo point is made: Slicer keeps scene undo off, so it would do nothing).
Each finding is also a node reference of the conversation node, because loading a scene into a
non-empty one renames clashing node IDs and only references follow. Only MRML methods that every
supported Slicer release has are used (5.8.1 .. main, see Testing/slicer_fakes/manifest.py).
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import slicer

from MedMLLMSlicerLib import terminology
from MedMLLMSlicerLib.conversation import Conversation, Item, Turn

ROLE = "MedMLLMSlicer.Role"
LABEL_TAG = "MedMLLMSlicer.Label"
REF_VOLUME = "MedMLLMSlicer.Volume"
REF_SEGMENTATION = "MedMLLMSlicer.Segmentation"
REF_REPORT = "MedMLLMSlicer.Report"
REF_FINDING = "MedMLLMSlicer.Finding."  # + a key per finding: one reference role each
PALETTE = ((0.95, 0.6, 0.1), (0.2, 0.7, 0.95), (0.55, 0.85, 0.3), (0.9, 0.3, 0.6), (0.7, 0.5, 0.95))


class SceneError(Exception):
    """The scene cannot take the result (volume gone, scene closing); message shown in the chat."""


def volume_arrays(volume_node: Any) -> Tuple[np.ndarray, np.ndarray]:
    """The voxels ([k, j, i]) as Slicer's live view into VTK memory (no copy: the panel copies it
    in slices, see `worker.VolumeSnapshot`) and the 4x4 IJK->RAS matrix."""
    if volume_node is None:
        raise SceneError("select a volume first")
    if volume_node.GetParentTransformNode() is not None:
        raise SceneError("the volume is under a transform: harden the transform first (Data module)")
    voxels = live_voxels(volume_node)
    if voxels is None:
        raise SceneError(f"volume '{volume_node.GetName()}' has no image data (is it still loading?)")
    if voxels.ndim != 3:
        raise SceneError("the selected volume has no 3D scalar voxels")
    return voxels, _ijk_to_ras(volume_node)


def live_voxels(volume_node: Any) -> Optional[np.ndarray]:
    """`arrayFromVolume`, or None for a node without image data (where Slicer's raises)."""
    if volume_node.GetImageData() is None:
        return None
    return slicer.util.arrayFromVolume(volume_node)


def _ijk_to_ras(volume_node: Any) -> np.ndarray:
    matrix = slicer.util.vtkMatrixFromArray(np.eye(4))
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _check_same_grid(volume_node: Any, label: str, mask: np.ndarray, ijk_to_ras: Any) -> None:
    """Masks are written on the volume's own grid; anything else means the volume changed meanwhile."""
    voxels = live_voxels(volume_node)
    same = (
        voxels is not None
        and mask.shape == voxels.shape
        and ijk_to_ras is not None
        and np.allclose(np.asarray(ijk_to_ras, dtype=float), _ijk_to_ras(volume_node), atol=1e-4)
    )
    if not same:
        raise SceneError(
            f"mask '{label}' does not fit the volume's current grid (was the volume changed or "
            "resampled during the answer?): it was not added"
        )


def roi_request(roi_node: Any) -> Dict[str, List]:
    """An ROI node as the server's RAS ROI {center, size, axes} (axes: rows of a matrix whose columns
    are the ROI's x, y, z directions), world coordinates so parent transforms are honoured."""
    center = [0.0, 0.0, 0.0]
    roi_node.GetCenterWorld(center)
    columns = []
    for getter in (roi_node.GetXAxisWorld, roi_node.GetYAxisWorld, roi_node.GetZAxisWorld):
        axis = [0.0, 0.0, 0.0]
        getter(axis)
        columns.append(axis)
    size = [0.0, 0.0, 0.0]
    roi_node.GetSizeWorld(size)
    if min(size) <= 0:
        raise SceneError(f"ROI '{roi_node.GetName()}' has zero size: drag its handles to cover the region")
    return {"center": center, "size": size, "axes": np.array(columns).T.tolist()}


def _unique(name: str, taken: Set[str]) -> str:
    lowered = {t.lower() for t in taken}
    if name.lower() not in lowered:
        return name
    index = 2
    while f"{name} ({index})".lower() in lowered:
        index += 1
    return f"{name} ({index})"


class ConversationScene:
    """The scene side of one conversation about one volume."""

    def __init__(self, node: Any) -> None:
        self.node = node

    @classmethod
    def create(cls, volume_node: Any) -> ConversationScene:
        scene = slicer.mrmlScene
        node = scene.AddNewNodeByClass("vtkMRMLTextNode", f"{volume_node.GetName()} chat")
        node.SetAttribute(ROLE, "conversation")
        node.SetNodeReferenceID(REF_VOLUME, volume_node.GetID())
        sh = scene.GetSubjectHierarchyNode()
        volume_item = sh.GetItemByDataNode(volume_node)
        folder = sh.CreateFolderItem(sh.GetItemParent(volume_item) or sh.GetSceneItemID(), node.GetName())
        sh.SetItemParent(sh.GetItemByDataNode(node), folder)
        return cls(node)

    @classmethod
    def latest(cls, volume_node: Any) -> Optional[ConversationScene]:
        """The most recent conversation stored in the scene for this volume (after reopening a scene)."""
        nodes = [
            n
            for n in slicer.util.getNodesByClass("vtkMRMLTextNode")
            if n.GetAttribute(ROLE) == "conversation"
            and n.GetNodeReferenceID(REF_VOLUME) == volume_node.GetID()
        ]
        return cls(nodes[-1]) if nodes else None

    @property
    def volume(self) -> Any:
        return self.node.GetNodeReference(REF_VOLUME)

    def _check_alive(self) -> Any:
        scene = slicer.mrmlScene
        if scene.IsClosing():
            raise SceneError("the scene was closed: the answer was not added")
        if not scene.IsNodePresent(self.node):
            raise SceneError("the conversation's text node was deleted: the answer was not added")
        volume = self.volume
        if volume is None:
            raise SceneError("the volume was deleted: the answer was not added to the scene")
        return volume

    def _folder(self) -> int:
        sh = slicer.mrmlScene.GetSubjectHierarchyNode()
        return sh.GetItemParent(sh.GetItemByDataNode(self.node))

    def _place(self, node: Any) -> None:
        sh = slicer.mrmlScene.GetSubjectHierarchyNode()
        sh.SetItemParent(sh.GetItemByDataNode(node), self._folder())

    def save(self, conversation: Conversation) -> None:
        if slicer.mrmlScene.IsNodePresent(self.node):
            self.node.SetText(conversation.to_json())

    def load(self) -> Conversation:
        """The stored conversation, its findings' node IDs refreshed from the node references
        (an import may have renamed them; "" when the node was deleted)."""
        conversation = Conversation.from_json(self.node.GetText())
        for turn in conversation.turns:
            for item in turn.items:
                if item.ref:
                    node = self.node.GetNodeReference(item.ref)
                    item.node_id = node.GetID() if node is not None else ""
        return conversation

    def _reference(self, node: Any) -> str:
        """A new reference role on the conversation node pointing at a finding's node."""
        role = REF_FINDING + uuid.uuid4().hex[:12]
        self.node.SetNodeReferenceID(role, node.GetID())
        return role

    def add_box(self, event: Dict[str, Any], index: int) -> Item:
        """A box event's RAS ROI as a Markups ROI node named after its label."""
        self._check_alive()
        roi = event.get("roi") or {}
        center, size = roi.get("center"), roi.get("size")
        if center is None or size is None:
            raise SceneError("the server sent a box without an ROI")
        label = str(event.get("label") or "box")
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", label)
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(roi.get("axes") or np.eye(3), dtype=float)
        matrix[:3, 3] = center
        node.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(matrix))
        node.SetCenter(*[float(v) for v in center])
        node.SetSize(*[float(v) for v in size])
        node.SetAttribute(LABEL_TAG, label)
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(*self._color(event, index))
        self._place(node)
        center = [float(v) for v in center]
        return Item("box", label, node_id=node.GetID(), center=center, ref=self._reference(node))

    @staticmethod
    def _color(event: Dict[str, Any], index: int) -> Sequence[float]:
        color = event.get("color")
        if isinstance(color, (list, tuple)) and len(color) == 3:
            return [float(c) / (255.0 if max(color) > 1 else 1.0) for c in color]
        return PALETTE[index % len(PALETTE)]

    def segmentation(self) -> Any:
        """The conversation's Segmentation node, created on first use with the volume as geometry."""
        volume = self._check_alive()
        node = self.node.GetNodeReference(REF_SEGMENTATION)
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{volume.GetName()} findings"
            )
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            self.node.SetNodeReferenceID(REF_SEGMENTATION, node.GetID())
            self._place(node)
        return node

    def add_mask(self, event: Dict[str, Any]) -> Item:
        """A mask event (voxels already read on a worker thread) as a new segment of the conversation's
        segmentation: always appended, never overwriting a user's segment; name,
        colour and terminology from Slicer's terminology when the model's phrase matches one."""
        volume = self._check_alive()
        raw = str(event.get("label") or "mask")
        mask = event.get("mask")
        if mask is None:
            raise SceneError(f"mask '{raw}' could not be read from the server's file")
        _check_same_grid(volume, raw, mask, event.get("mask_ijk_to_ras"))
        target = self.segmentation()
        segmentation = target.GetSegmentation()
        count = segmentation.GetNumberOfSegments()
        term = terminology.lookup(raw) or terminology.sent(raw, event.get("terminology"), event.get("color"))
        taken = {segmentation.GetNthSegment(i).GetName() for i in range(count)}
        name = _unique(term.name if term else raw, taken)
        color = term.color if term else terminology.fallback_color(count)
        segment_id = segmentation.AddEmptySegment("", name, list(color))
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, target, segment_id, volume)
        segment = segmentation.GetSegment(segment_id)
        segment.SetTag(LABEL_TAG, raw)
        if term is not None:  # the tag, not SetTerminology: that exists only from Slicer 5.10 on
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), term.entry)
        return Item("mask", name, node_id=target.GetID(), segment_id=segment_id, ref=self._reference(target))

    def set_report(self, markdown: str) -> Any:
        """The answer's report into the conversation's report text node (created on first use)."""
        volume = self._check_alive()
        node = self.node.GetNodeReference(REF_REPORT)
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode", f"{volume.GetName()} report")
            node.SetAttribute(ROLE, "report")
            self.node.SetNodeReferenceID(REF_REPORT, node.GetID())
            self._place(node)
        node.SetText(markdown)
        return node


def apply_event(conversation_scene: ConversationScene, answer: Turn, event: Dict[str, Any]) -> Optional[str]:
    """One server event into the answer turn and the scene; returns a notice for warnings/errors.

    Shared by the chat panel and the headless `MedMLLMSlicerLogic.ask`; raises SceneError when
    the scene can no longer take results.
    """
    kind = event.get("type")
    if kind == "token":
        answer.text += str(event.get("text", ""))
    elif kind == "box":
        answer.items.append(conversation_scene.add_box(event, len(answer.items)))
    elif kind == "mask":
        mask = event.get("mask")
        if mask is not None and not mask.any():
            return f"the mask for '{event.get('label') or 'mask'}' is empty: no segment was added"
        answer.items.append(conversation_scene.add_mask(event))
    elif kind == "report":
        answer.report = str(event.get("markdown", ""))
        conversation_scene.set_report(answer.report)
    elif kind in ("warning", "error"):
        return str(event.get("message") or kind)
    return None


def focus(item: Item) -> str:
    """Centre the slice views on a grounded item (Slicer's own jump, as clicking a control point
    does); returns a status sentence."""
    node = slicer.mrmlScene.GetNodeByID(item.node_id) if item.node_id else None
    if node is None:
        return f"'{item.label}' is no longer in the scene"
    if item.kind == "mask":
        if node.GetSegmentation().GetSegment(item.segment_id) is None:
            return f"segment '{item.label}' was deleted"
        found = node.GetSegmentCenterRAS(item.segment_id)
        if found is None:
            return f"segment '{item.label}' is empty: paint it in Segment Editor, or delete it"
        center = [float(v) for v in found]
    else:
        center = [0.0, 0.0, 0.0]
        node.GetCenterWorld(center)
    slicer.modules.markups.logic().JumpSlicesToLocation(center[0], center[1], center[2], True)
    return f"centred on {item.label} at R {center[0]:.1f}, A {center[1]:.1f}, S {center[2]:.1f} mm"
