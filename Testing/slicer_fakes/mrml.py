"""A small fake MRML scene whose classes accept only methods that exist in Slicer.

Every VTK-style (CamelCase) attribute is checked against `api-manifest.json` (taken from Slicer's
headers): a name is valid on class C if C or a class in its chain declares it. So a call that
Slicer does not have fails here with AttributeError instead of passing silently; names that do
exist but are not implemented by the fake fail the same way (with a different message).

Behaviour the module depends on follows Slicer's sources (`Libs/MRML/Core/vtkMRMLScene.cxx`,
`vtkMRMLNode.cxx`, `vtkMRMLTextNode.cxx`): `Import` adds every node (NodeAddedEvent) before any
storage node is read, so a text node whose text lives in a file (over 256 characters) is empty
while its NodeAddedEvent runs and is filled just before EndImportEvent; imported IDs that clash with
the scene's are renamed and references to them updated, while anything that kept the old ID as a
plain string does not follow; singleton nodes are merged into the scene's; `SaveStateForUndo` does
nothing while the scene's undo flag is off (Slicer's default).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .manifest import MANIFEST
from .signatures import signature_arity

_CLASSES = MANIFEST["classes"]


def _chain(vtk_class: str) -> List[str]:
    return [vtk_class, *_CLASSES[vtk_class]["chain"]]


def manifest_allows(vtk_class: str, name: str, static: bool = False) -> bool:
    """True if Slicer's `vtk_class` has `name` (a method, or a constant; static-only when `static`)."""
    for cls in _chain(vtk_class):
        info = _CLASSES[cls]
        if name in info.get("constants", {}):
            return True
        if name in (info["static_methods"] if static else info["methods"]):
            return True
    return False


def _is_vtk_name(name: str) -> bool:
    return name[:1].isupper()


def call_arities(vtk_class: str, name: str) -> Optional[List[Tuple[int, int]]]:
    """Every overload's argument range along the class chain, or None when any is unknown."""
    arities = []
    for cls in _chain(vtk_class):
        for signature in _CLASSES[cls].get("signatures", {}).get(name, []):
            arity = signature_arity(signature, name)
            if arity is None:
                return None
            arities.append(arity)
    return arities or None


def _checked_call(vtk_class: str, name: str, method: Callable) -> Callable:
    """Calls with an argument count no overload of Slicer's method takes raise TypeError, as VTK does."""
    arities = call_arities(vtk_class, name)
    if arities is None or not callable(method):
        return method

    def call(*args: Any, **kwargs: Any) -> Any:
        n = len(args) + len(kwargs)
        if not any(lo <= n <= hi for lo, hi in arities):
            raise TypeError(f"{vtk_class}.{name} takes {arities} arguments in Slicer, got {n}")
        return method(*args, **kwargs)

    return call


class _CheckedMeta(type):
    def __getattribute__(cls, name: str) -> Any:
        if _is_vtk_name(name):
            vtk_class = type.__getattribute__(cls, "_vtk_class")
            if not manifest_allows(vtk_class, name, static=True):
                raise AttributeError(f"{vtk_class}.{name} is not a static method or constant in Slicer")
        return type.__getattribute__(cls, name)


class FakeVTKObject(metaclass=_CheckedMeta):
    """Base of all fakes: CamelCase attributes must be in Slicer's API manifest."""

    _vtk_class = "vtkObject"

    def __init__(self) -> None:
        self._observers: Dict[int, Tuple[str, Callable]] = {}
        self._mtime = 0

    def __getattribute__(self, name: str) -> Any:
        if _is_vtk_name(name):
            vtk_class = type(self)._vtk_class
            if not manifest_allows(vtk_class, name):
                raise AttributeError(f"'{vtk_class}' has no method '{name}' in Slicer's API")
            try:
                method = object.__getattribute__(self, name)
            except AttributeError:
                raise AttributeError(f"fake {vtk_class}.{name} exists in Slicer but is not faked") from None
            return _checked_call(vtk_class, name, method)
        return object.__getattribute__(self, name)

    # vtkObject / vtkObjectBase
    _tags = itertools.count(1)

    def AddObserver(self, event: Any, callback: Callable, priority: float = 0.0) -> int:
        tag = next(FakeVTKObject._tags)
        self._observers[tag] = (str(event), callback)
        return tag

    def RemoveObserver(self, tag: int) -> None:
        self._observers.pop(tag, None)

    def InvokeEvent(self, event: Any, calldata: Any = None) -> None:
        for name, callback in list(self._observers.values()):
            if name == str(event):
                callback(self, str(event))

    def Modified(self) -> None:
        self._mtime += 1
        self.InvokeEvent("ModifiedEvent")

    def GetMTime(self) -> int:
        return self._mtime

    def GetClassName(self) -> str:
        return type(self)._vtk_class

    def IsA(self, name: str) -> int:
        return int(name in _chain(type(self)._vtk_class))


class FakeMatrix4x4:
    """Stand-in for vtkMatrix4x4 (a VTK class, outside the MRML manifest)."""

    def __init__(self, array: Optional[np.ndarray] = None) -> None:
        self.array = np.eye(4) if array is None else np.array(array, dtype=float)

    def GetElement(self, row: int, col: int) -> float:
        return float(self.array[row, col])

    def SetElement(self, row: int, col: int, value: float) -> None:
        self.array[row, col] = value

    def DeepCopy(self, other: FakeMatrix4x4) -> None:
        self.array = other.array.copy()


def _fill(out: Any, values: Any) -> None:
    for index, value in enumerate(values):
        out[index] = float(value)


class vtkMRMLNode(FakeVTKObject):
    _vtk_class = "vtkMRMLNode"

    def __init__(self) -> None:
        super().__init__()
        self._id: Optional[str] = None
        self._name = ""
        self._attributes: Dict[str, str] = {}
        self._references: Dict[str, List[str]] = {}
        self._scene: Optional[vtkMRMLScene] = None
        self._selected = 0
        self._hide = 0
        self._singleton: Optional[str] = None

    def GetID(self) -> Optional[str]:
        return self._id

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        self._name = str(name)
        self.Modified()

    def GetScene(self) -> Optional[vtkMRMLScene]:
        return self._scene

    def SetAttribute(self, name: str, value: str) -> None:
        self._attributes[name] = str(value)

    def GetAttribute(self, name: str) -> Optional[str]:
        return self._attributes.get(name)

    def SetNodeReferenceID(self, role: str, node_id: Optional[str]) -> None:
        """As Slicer: replaces the role's references; None removes them."""
        if node_id:
            self._references[role] = [node_id]
        else:
            self._references.pop(role, None)

    def AddNodeReferenceID(self, role: str, node_id: str) -> None:
        self._references.setdefault(role, []).append(node_id)

    def RemoveNodeReferenceIDs(self, role: str) -> None:
        self._references.pop(role, None)

    def GetNumberOfNodeReferences(self, role: str) -> int:
        return len(self._references.get(role, []))

    def GetNthNodeReferenceID(self, role: str, n: int) -> Optional[str]:
        ids = self._references.get(role, [])
        return ids[n] if 0 <= n < len(ids) else None

    def GetNodeReferenceID(self, role: str) -> Optional[str]:
        return self.GetNthNodeReferenceID(role, 0)

    def GetNthNodeReference(self, role: str, n: int) -> Optional[vtkMRMLNode]:
        node_id = self.GetNthNodeReferenceID(role, n)
        return self._scene.GetNodeByID(node_id) if self._scene and node_id else None

    def GetNodeReference(self, role: str) -> Optional[vtkMRMLNode]:
        return self.GetNthNodeReference(role, 0)

    def _update_reference_ids(self, renamed: Dict[str, str]) -> None:
        """What Slicer's UpdateReferenceID does after an import renamed node IDs."""
        for ids in self._references.values():
            ids[:] = [renamed.get(i, i) for i in ids]

    def SetSelected(self, selected: int) -> None:
        self._selected = int(selected)

    def GetSelected(self) -> int:
        return self._selected

    def SetHideFromEditors(self, hide: int) -> None:
        self._hide = int(hide)

    def GetHideFromEditors(self) -> int:
        return self._hide

    def SetSingletonTag(self, tag: str) -> None:
        self._singleton = tag

    def GetSingletonTag(self) -> Optional[str]:
        return self._singleton

    def Reset(self, default_node: Any = None) -> None:
        """What a scene close does to singleton nodes: back to defaults, same ID."""
        self._attributes, self._references = {}, {}


class vtkMRMLDisplayNode(vtkMRMLNode):
    _vtk_class = "vtkMRMLDisplayNode"

    def __init__(self) -> None:
        super().__init__()
        self._color = (0.5, 0.5, 0.5)
        self._selected_color = (1.0, 0.5, 0.5)
        self._visibility = 1

    def SetColor(self, *rgb: Any) -> None:
        self._color = tuple(float(v) for v in (rgb[0] if len(rgb) == 1 else rgb))

    def GetColor(self) -> Tuple[float, ...]:
        return self._color

    def SetSelectedColor(self, *rgb: Any) -> None:
        self._selected_color = tuple(float(v) for v in (rgb[0] if len(rgb) == 1 else rgb))

    def GetSelectedColor(self) -> Tuple[float, ...]:
        return self._selected_color

    def SetVisibility(self, visible: int) -> None:
        self._visibility = int(visible)

    def GetVisibility(self) -> int:
        return self._visibility


class vtkMRMLMarkupsDisplayNode(vtkMRMLDisplayNode):
    _vtk_class = "vtkMRMLMarkupsDisplayNode"


class vtkMRMLSegmentationDisplayNode(vtkMRMLDisplayNode):
    _vtk_class = "vtkMRMLSegmentationDisplayNode"


class vtkMRMLDisplayableNode(vtkMRMLNode):
    _vtk_class = "vtkMRMLDisplayableNode"
    _display_class = vtkMRMLDisplayNode

    def __init__(self) -> None:
        super().__init__()
        self._display: Optional[vtkMRMLDisplayNode] = None

    def CreateDefaultDisplayNodes(self) -> None:
        if self._display is None:
            self._display = type(self)._display_class()
            if self._scene is not None:
                self._scene.AddNode(self._display)

    def GetDisplayNode(self) -> Optional[vtkMRMLDisplayNode]:
        return self._display

    def GetStorageNode(self) -> None:
        return None

    def GetParentTransformNode(self) -> None:
        return None


class vtkMRMLVolumeNode(vtkMRMLDisplayableNode):
    _vtk_class = "vtkMRMLVolumeNode"

    def __init__(self) -> None:
        super().__init__()
        self._ijk_to_ras = np.eye(4)
        self._array: Optional[np.ndarray] = None

    def GetImageData(self) -> Optional[np.ndarray]:
        """None when the node has no voxels (as a freshly created volume node in Slicer)."""
        return self._array

    def GetIJKToRASMatrix(self, matrix: FakeMatrix4x4) -> None:
        matrix.array = self._ijk_to_ras.copy()

    def SetIJKToRASMatrix(self, matrix: FakeMatrix4x4) -> None:
        self._ijk_to_ras = matrix.array.copy()


class vtkMRMLScalarVolumeNode(vtkMRMLVolumeNode):
    _vtk_class = "vtkMRMLScalarVolumeNode"


class vtkMRMLMarkupsNode(vtkMRMLDisplayableNode):
    _vtk_class = "vtkMRMLMarkupsNode"
    _display_class = vtkMRMLMarkupsDisplayNode

    def __init__(self) -> None:
        super().__init__()
        self._locked = 0

    def SetLocked(self, locked: int) -> None:
        self._locked = int(locked)

    def GetLocked(self) -> int:
        return self._locked


class vtkMRMLMarkupsROINode(vtkMRMLMarkupsNode):
    _vtk_class = "vtkMRMLMarkupsROINode"

    def __init__(self) -> None:
        super().__init__()
        self._center = np.zeros(3)
        self._size = np.zeros(3)
        self._object_to_node = FakeMatrix4x4()

    def SetCenter(self, *xyz: Any) -> None:
        self._center = np.array(xyz[0] if len(xyz) == 1 else xyz, dtype=float)

    def GetCenter(self, out: Any = None) -> Optional[Tuple[float, float, float]]:
        """Both of Slicer's overloads: fill `out`, or return the centre (a vtkVector3d there)."""
        if out is None:
            return tuple(float(v) for v in self._center)
        _fill(out, self._center)
        return None

    def SetSize(self, *xyz: Any) -> None:
        self._size = np.array(xyz[0] if len(xyz) == 1 else xyz, dtype=float)

    def GetSize(self) -> Tuple[float, float, float]:
        return tuple(float(v) for v in self._size)

    def SetAndObserveObjectToNodeMatrix(self, matrix: FakeMatrix4x4) -> None:
        self._object_to_node = FakeMatrix4x4(matrix.array)

    def GetObjectToNodeMatrix(self) -> FakeMatrix4x4:
        return self._object_to_node

    # The fake has no parent transforms, so world == node coordinates.
    def GetCenterWorld(self, out: Any = None) -> Optional[Tuple[float, float, float]]:
        """Both of Slicer's overloads: fill `out`, or return the centre (a vtkVector3d there)."""
        if out is None:
            return tuple(float(v) for v in self._center)
        _fill(out, self._center)
        return None

    def GetSizeWorld(self, out: Any) -> None:
        _fill(out, self.GetSize())

    def GetXAxisWorld(self, out: Any) -> None:
        _fill(out, self._object_to_node.array[:3, 0])

    def GetYAxisWorld(self, out: Any) -> None:
        _fill(out, self._object_to_node.array[:3, 1])

    def GetZAxisWorld(self, out: Any) -> None:
        _fill(out, self._object_to_node.array[:3, 2])


class vtkMRMLTextNode(vtkMRMLNode):
    _vtk_class = "vtkMRMLTextNode"

    def __init__(self) -> None:
        super().__init__()
        self._text = ""

    def SetText(self, text: str, encoding: int = -1) -> None:
        self._text = str(text)
        self.Modified()

    def GetText(self) -> str:
        return self._text


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    _vtk_class = "vtkMRMLScriptedModuleNode"

    def __init__(self) -> None:
        super().__init__()
        self._parameters: Dict[str, str] = {}

    def SetParameter(self, name: str, value: str) -> None:
        self._parameters[name] = str(value)

    def GetParameter(self, name: str) -> str:
        return self._parameters.get(name, "")

    def HasParameter(self, name: str) -> bool:
        return name in self._parameters

    def UnsetParameter(self, name: str) -> None:
        self._parameters.pop(name, None)

    def Reset(self, default_node: Any = None) -> None:
        super().Reset(default_node)
        self._parameters = {}


class vtkSegment(FakeVTKObject):
    """A segment; the fake keeps its voxels as `mask` ([k, j, i] bool) with `ijk_to_ras`."""

    _vtk_class = "vtkSegment"

    def __init__(self, name: str = "", mask: Optional[np.ndarray] = None, ijk_to_ras: Any = None) -> None:
        super().__init__()
        self._name = name
        self._color = (0.5, 0.5, 0.5)
        self._tags: Dict[str, str] = {}
        self.mask = mask
        self.ijk_to_ras = np.eye(4) if ijk_to_ras is None else np.asarray(ijk_to_ras, dtype=float)

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        self._name = str(name)

    def GetColor(self) -> Tuple[float, ...]:
        return self._color

    def SetColor(self, *rgb: Any) -> None:
        self._color = tuple(float(v) for v in (rgb[0] if len(rgb) == 1 else rgb))

    def SetTag(self, tag: str, value: Any) -> None:
        self._tags[tag] = str(value)

    def GetTag(self, tag: str, out: Optional[List[str]] = None) -> bool:
        if out is not None and tag in self._tags:
            out[0] = self._tags[tag]
        return tag in self._tags

    def HasTag(self, tag: str) -> bool:
        return tag in self._tags

    @staticmethod
    def GetTerminologyEntryTagName() -> str:
        """The tag every release stores a segment's terminology under (`vtkSegment.cxx`)."""
        return "TerminologyEntry"


class vtkSegmentation(FakeVTKObject):
    _vtk_class = "vtkSegmentation"
    _ids = itertools.count(1)

    def __init__(self) -> None:
        super().__init__()
        self._segments: Dict[str, vtkSegment] = {}

    def AddSegment(self, segment: vtkSegment, segment_id: str = "") -> bool:
        segment_id = segment_id or f"2.25.{next(vtkSegmentation._ids)}"
        while segment_id in self._segments:
            segment_id += "_1"
        self._segments[segment_id] = segment
        self.Modified()
        return True

    def GetNumberOfSegments(self) -> int:
        return len(self._segments)

    def GetNthSegmentID(self, index: int) -> str:
        return list(self._segments)[index]

    def GetNthSegment(self, index: int) -> vtkSegment:
        return list(self._segments.values())[index]

    def GetSegment(self, segment_id: str) -> Optional[vtkSegment]:
        return self._segments.get(segment_id)

    def GetSegmentIdBySegmentName(self, name: str) -> str:
        for segment_id, segment in self._segments.items():
            if segment.GetName().lower() == name.lower():
                return segment_id
        return ""

    def GetSegmentIdBySegment(self, segment: vtkSegment) -> str:
        return next((sid for sid, seg in self._segments.items() if seg is segment), "")

    def RemoveSegment(self, segment_id: str) -> None:
        self._segments.pop(segment_id, None)

    def AddEmptySegment(self, segment_id: str = "", name: str = "", color: Any = None) -> str:
        segment = vtkSegment(name or f"Segment_{self.GetNumberOfSegments() + 1}")
        if color is not None:
            segment.SetColor(*color)
        self.AddSegment(segment, segment_id)
        return self.GetSegmentIdBySegment(segment)


class vtkMRMLSegmentationNode(vtkMRMLDisplayableNode):
    _vtk_class = "vtkMRMLSegmentationNode"
    _display_class = vtkMRMLSegmentationDisplayNode

    def __init__(self) -> None:
        super().__init__()
        self._segmentation = vtkSegmentation()

    def GetSegmentation(self) -> vtkSegmentation:
        return self._segmentation

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volume: vtkMRMLScalarVolumeNode) -> None:
        self.SetNodeReferenceID("referenceImageGeometryRef", volume.GetID())

    def GetSegmentCenterRAS(self, segment_id: str) -> Optional[Tuple[float, float, float]]:
        segment = self._segmentation.GetSegment(segment_id)
        kji = np.argwhere(segment.mask)
        if not len(kji):
            return None  # what Slicer's double* overload gives for an empty segment
        lo, hi = kji.min(axis=0), kji.max(axis=0)
        ijk = np.append(((lo + hi) / 2.0)[::-1], 1.0)
        return tuple(float(v) for v in (segment.ijk_to_ras @ ijk)[:3])


class vtkMRMLSliceNode(vtkMRMLNode):
    _vtk_class = "vtkMRMLSliceNode"

    def __init__(self) -> None:
        super().__init__()
        self.jumps: List[Tuple[float, float, float]] = []
        self._view_group = 0

    def JumpSliceByCentering(self, r: float, a: float, s: float) -> None:
        self.jumps.append((float(r), float(a), float(s)))

    def SetViewGroup(self, group: int) -> None:
        self._view_group = int(group)

    def GetViewGroup(self) -> int:
        return self._view_group


class vtkMRMLSubjectHierarchyNode(vtkMRMLNode):
    """Items are ints; the scene item is 1, invalid is 0; data nodes get an item when added."""

    _vtk_class = "vtkMRMLSubjectHierarchyNode"

    def __init__(self) -> None:
        super().__init__()
        self._next = itertools.count(2)
        self.items: Dict[int, Dict[str, Any]] = {1: {"name": "Scene", "parent": 0, "level": "Scene"}}

    @staticmethod
    def GetSubjectHierarchyNode(scene: vtkMRMLScene) -> vtkMRMLSubjectHierarchyNode:
        return scene.GetSubjectHierarchyNode()

    def GetSceneItemID(self) -> int:
        return 1

    @staticmethod
    def GetInvalidItemID() -> int:
        return 0

    def _create(self, parent: int, name: str, level: str, node: Optional[vtkMRMLNode] = None) -> int:
        item = next(self._next)
        self.items[item] = {"name": name, "parent": parent, "level": level, "node": node}
        return item

    def CreateFolderItem(self, parent: int, name: str) -> int:
        return self._create(parent, name, "Folder")

    def CreateSubjectItem(self, parent: int, name: str) -> int:
        return self._create(parent, name, "Patient")

    def CreateStudyItem(self, parent: int, name: str) -> int:
        return self._create(parent, name, "Study")

    def GetItemByDataNode(self, node: vtkMRMLNode) -> int:
        return next((i for i, v in self.items.items() if v.get("node") is node), 0)

    def GetItemDataNode(self, item: int) -> Optional[vtkMRMLNode]:
        return self.items.get(item, {}).get("node")

    def GetItemParent(self, item: int) -> int:
        return self.items[item]["parent"] if item in self.items else 0

    def SetItemParent(self, item: int, parent: int, enable_circular_check: bool = True) -> None:
        self.items[item]["parent"] = parent

    def GetItemName(self, item: int) -> str:
        return self.items.get(item, {}).get("name", "")

    def GetItemLevel(self, item: int) -> str:
        return self.items.get(item, {}).get("level", "")

    def GetItemAncestorAtLevel(self, item: int, level: str) -> int:
        item = self.GetItemParent(item)
        while item:
            if self.items[item]["level"] == level:
                return item
            item = self.GetItemParent(item)
        return 0

    def SetItemAttribute(self, item: int, name: str, value: str) -> None:
        self.items[item].setdefault("attributes", {})[name] = value

    def GetItemAttribute(self, item: int, name: str) -> str:
        return self.items.get(item, {}).get("attributes", {}).get(name, "")

    def RemoveItem(self, item: int, remove_data_node: bool = True, recursive: bool = True) -> bool:
        return self.items.pop(item, None) is not None

    def children(self, parent: int) -> List[int]:
        """Test helper (not Slicer API): direct children of an item."""
        return [i for i, v in self.items.items() if v["parent"] == parent]


_NODE_CLASSES = {
    cls._vtk_class: cls
    for cls in (
        vtkMRMLScalarVolumeNode,
        vtkMRMLMarkupsROINode,
        vtkMRMLTextNode,
        vtkMRMLScriptedModuleNode,
        vtkMRMLSegmentationNode,
        vtkMRMLSliceNode,
        vtkMRMLMarkupsDisplayNode,
        vtkMRMLSegmentationDisplayNode,
    )
}


TEXT_IN_FILE_OVER = 256  # longer texts are saved in a storage node file, read last by Import
_SAVED: Dict[str, List[vtkMRMLNode]] = {}  # url -> the nodes a Commit wrote there


def _detached_copies(nodes: List[vtkMRMLNode]) -> List[vtkMRMLNode]:
    """Deep copies without scene or observers (one deepcopy: nodes that share objects still do)."""
    kept = [(n, n._scene, n._observers) for n in nodes]
    for node in nodes:
        node._scene, node._observers = None, {}
    try:
        return copy.deepcopy(nodes)
    finally:
        for node, scene, observers in kept:
            node._scene, node._observers = scene, observers


class vtkMRMLScene(FakeVTKObject):
    """Scene with IDs, names, observers (NodeAdded/Removed, Start/EndClose, Start/EndImport),
    Commit/Import through an in-memory store, undo flag and subject hierarchy."""

    _vtk_class = "vtkMRMLScene"
    NodeAddedEvent = "NodeAddedEvent"
    StartImportEvent = "StartImportEvent"
    EndImportEvent = "EndImportEvent"
    NodeAboutToBeRemovedEvent = "NodeAboutToBeRemovedEvent"
    NodeRemovedEvent = "NodeRemovedEvent"
    StartCloseEvent = "StartCloseEvent"
    EndCloseEvent = "EndCloseEvent"

    def __init__(self) -> None:
        super().__init__()
        self._nodes: List[vtkMRMLNode] = []
        self._counts: Dict[str, int] = {}
        self._closing = False
        self._importing = False
        self._undo_flag = False
        self._undo_levels = 0
        self._url = ""
        self._sh = vtkMRMLSubjectHierarchyNode()
        self._add_views()

    def _add_views(self) -> None:
        for name in ("Red", "Yellow", "Green"):
            node = vtkMRMLSliceNode()
            node._name = name
            self.AddNode(node)

    def GetSubjectHierarchyNode(self) -> vtkMRMLSubjectHierarchyNode:
        return self._sh

    def CreateNodeByClass(self, class_name: str) -> vtkMRMLNode:
        if class_name not in _NODE_CLASSES:
            raise AttributeError(f"the fake scene cannot create {class_name}")
        return _NODE_CLASSES[class_name]()

    def AddNode(self, node: vtkMRMLNode) -> vtkMRMLNode:
        return self._add(node)

    def _add(self, node: vtkMRMLNode, keep_id: Optional[str] = None) -> vtkMRMLNode:
        """Add with a new ID, or with `keep_id` (import) unless the scene already uses it."""
        cls = node.GetClassName()
        if keep_id and self.GetNodeByID(keep_id) is None:
            node._id = keep_id
        else:
            self._counts[cls] = self._counts.get(cls, 0) + 1
            while self.GetNodeByID(f"{cls}{self._counts[cls]}") is not None:
                self._counts[cls] += 1
            node._id = f"{cls}{self._counts[cls]}"
        node._scene = self
        self._nodes.append(node)
        if not isinstance(node, (vtkMRMLDisplayNode, vtkMRMLSliceNode, vtkMRMLScriptedModuleNode)):
            self._sh._create(1, node.GetName(), "", node)
        self.InvokeEvent(self.NodeAddedEvent, node)
        return node

    def AddNewNodeByClass(self, class_name: str, base_name: str = "") -> vtkMRMLNode:
        node = self.CreateNodeByClass(class_name)
        node._name = self.GenerateUniqueName(base_name) if base_name else ""
        return self.AddNode(node)

    def RemoveNode(self, node: vtkMRMLNode) -> None:
        if node not in self._nodes:
            return
        self.InvokeEvent(self.NodeAboutToBeRemovedEvent, node)
        self._nodes.remove(node)
        self._sh.items.pop(self._sh.GetItemByDataNode(node), None)
        node._scene = None
        self.InvokeEvent(self.NodeRemovedEvent, node)

    def IsNodePresent(self, node: vtkMRMLNode) -> int:
        return int(node in self._nodes)

    def GetNodeByID(self, node_id: Optional[str]) -> Optional[vtkMRMLNode]:
        return next((n for n in self._nodes if n.GetID() == node_id), None)

    def GetFirstNodeByName(self, name: str) -> Optional[vtkMRMLNode]:
        return next((n for n in self._nodes if n.GetName() == name), None)

    def GetNumberOfNodes(self) -> int:
        return len(self._nodes)

    def GetSingletonNode(self, tag: str, class_name: str) -> Optional[vtkMRMLNode]:
        return next((n for n in self.nodes(class_name) if n.GetSingletonTag() == tag), None)

    def GenerateUniqueName(self, base: str) -> str:
        names = {n.GetName() for n in self._nodes}
        if base not in names:
            return base
        return next(f"{base}_{i}" for i in itertools.count(1) if f"{base}_{i}" not in names)

    def SaveStateForUndo(self, *nodes: Any) -> None:
        """As Slicer's: nothing at all while the undo flag is off (the default)."""
        if self._undo_flag:
            self._undo_levels += 1

    def SetUndoFlag(self, flag: bool) -> None:
        self._undo_flag = bool(flag)

    def GetUndoFlag(self) -> bool:
        return self._undo_flag

    def GetNumberOfUndoLevels(self) -> int:
        return self._undo_levels

    def SetURL(self, url: str) -> None:
        self._url = str(url)

    def GetURL(self) -> str:
        return self._url

    def Commit(self, url: Optional[str] = None, userMessages: Any = None) -> int:
        """Save the scene (kept in memory under the URL; slice views are not saved)."""
        _SAVED[url or self._url] = _detached_copies(
            [n for n in self._nodes if not isinstance(n, vtkMRMLSliceNode)]
        )
        return 1

    def IsImporting(self) -> bool:
        return self._importing

    def Import(self, userMessages: Any = None) -> int:
        """Add the scene saved at GetURL() to this one, in Slicer's order: all nodes (clashing IDs
        renamed, singletons merged), then references updated, then storage files read."""
        nodes = _detached_copies(_SAVED[self._url])
        self._importing = True
        self.InvokeEvent(self.StartImportEvent)
        renamed: Dict[str, str] = {}
        in_files = []
        for node in nodes:
            old_id = node._id
            target = self._merge_singleton(node)
            if target is None:
                if isinstance(node, vtkMRMLTextNode) and len(node._text) > TEXT_IN_FILE_OVER:
                    in_files.append((node, node._text))
                    node._text = ""
                target = self._add(node, keep_id=old_id)
            renamed[old_id] = target._id
        for node in self._nodes:
            node._update_reference_ids({k: v for k, v in renamed.items() if k != v})
        for node, text in in_files:
            node.SetText(text)
        self._importing = False
        self.InvokeEvent(self.EndImportEvent)
        return 1

    def _merge_singleton(self, node: vtkMRMLNode) -> Optional[vtkMRMLNode]:
        existing = (
            self.GetSingletonNode(node.GetSingletonTag(), node.GetClassName())
            if node.GetSingletonTag()
            else None
        )
        if existing is not None:
            existing.__dict__.update(
                {k: v for k, v in node.__dict__.items() if k not in ("_id", "_scene", "_observers")}
            )
        return existing

    def IsClosing(self) -> bool:
        return self._closing

    def Clear(self, remove_singletons: int = 0) -> None:
        self._closing = True
        self.InvokeEvent(self.StartCloseEvent)
        for node in [n for n in self._nodes if not isinstance(n, vtkMRMLSliceNode)]:
            if node.GetSingletonTag():
                node.Reset(None)
            else:
                self.RemoveNode(node)
        self._closing = False
        self.InvokeEvent(self.EndCloseEvent)

    def nodes(self, class_name: str) -> List[vtkMRMLNode]:
        """Test helper (not Slicer API): nodes that are (or derive from) `class_name`."""
        return [n for n in self._nodes if n.IsA(class_name)]
