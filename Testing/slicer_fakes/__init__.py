"""Fake `slicer`, `qt` and `ctk` modules so the MedMLLMSlicer module runs under pytest.

`install()` puts them in `sys.modules`. `slicer.util` offers only functions that exist in Slicer's
`slicer/util.py` (checked against the manifest by the tests), and MRML classes accept only Slicer's
method names (see `mrml.py`).
"""

from __future__ import annotations

import sys
import tempfile
import types
import typing
import unittest
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from . import mrml


class _Util(types.ModuleType):
    """`slicer.util`: only names that Slicer's util.py defines."""

    def __init__(self, slicer: types.ModuleType) -> None:
        super().__init__("slicer.util")
        self._slicer = slicer

    def arrayFromVolume(self, volumeNode: mrml.vtkMRMLVolumeNode) -> np.ndarray:
        """Raises as Slicer's does on a volume node without image data (`None.GetPointData()`)."""
        if volumeNode.GetImageData() is None:
            raise AttributeError("'NoneType' object has no attribute 'GetPointData'")
        return volumeNode._array

    def vtkMatrixFromArray(self, narray: Any) -> mrml.FakeMatrix4x4:
        return mrml.FakeMatrix4x4(np.asarray(narray, dtype=float))

    def arrayFromVTKMatrix(self, vmatrix: mrml.FakeMatrix4x4) -> np.ndarray:
        return vmatrix.array.copy()

    def addVolumeFromArray(
        self,
        narray: np.ndarray,
        ijkToRAS: Any = None,
        name: Optional[str] = None,
        nodeClassName: Optional[str] = None,
    ) -> mrml.vtkMRMLScalarVolumeNode:
        node = self._slicer.mrmlScene.AddNewNodeByClass(
            nodeClassName or "vtkMRMLScalarVolumeNode", name or "Volume"
        )
        node._array = np.asarray(narray)
        if ijkToRAS is not None:
            node.SetIJKToRASMatrix(mrml.FakeMatrix4x4(np.asarray(ijkToRAS, dtype=float)))
        return node

    def getNodesByClass(self, className: str, scene: Any = None) -> List[mrml.vtkMRMLNode]:
        return (scene or self._slicer.mrmlScene).nodes(className)

    def getNode(self, pattern: str = "*", index: int = 0, scene: Any = None) -> mrml.vtkMRMLNode:
        scene = scene or self._slicer.mrmlScene
        node = scene.GetNodeByID(pattern) or scene.GetFirstNodeByName(pattern)
        if node is None:
            raise self._slicer.util.MRMLNodeNotFoundException(
                f"could not find nodes in the scene by name or id '{pattern}'"
            )
        return node

    def updateSegmentBinaryLabelmapFromArray(
        self,
        narray: np.ndarray,
        segmentationNode: mrml.vtkMRMLSegmentationNode,
        segmentId: str,
        referenceVolumeNode: Optional[mrml.vtkMRMLVolumeNode] = None,
    ) -> None:
        """Deep-copies the voxels (> 0 = inside) onto the reference volume's grid, as Slicer does."""
        reference = referenceVolumeNode or segmentationNode.GetNodeReference("referenceImageGeometryRef")
        if reference is None:
            raise RuntimeError("No reference volume is found in the input segmentationNode")
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise RuntimeError(f"no segment {segmentId!r}")
        segment.mask = np.asarray(narray) > 0
        segment.ijk_to_ras = reference._ijk_to_ras.copy()

    def tempDirectory(
        self, key: str = "__SlicerTemp__", tempDir: Optional[str] = None, includeDateTime: bool = True
    ) -> str:
        return tempfile.mkdtemp(prefix="slicer-")

    def loadUI(self, path: str) -> Any:
        from PySide6 import QtCore, QtUiTools

        ui_file = QtCore.QFile(path)
        if not ui_file.open(QtCore.QIODevice.ReadOnly):
            raise RuntimeError(f"Could not load UI file {path}")
        try:
            return QtUiTools.QUiLoader().load(ui_file)
        finally:
            ui_file.close()

    def childWidgetVariables(self, widget: Any) -> Any:
        from PySide6 import QtCore

        children = widget.findChildren(QtCore.QObject)
        return types.SimpleNamespace(**{c.objectName(): c for c in children if c.objectName()})

    def pip_install(self, requirements: Any) -> None:
        """Slicer 5.8/5.10's signature (no keywords); runs synchronously like theirs."""
        self._slicer.pip_requests.append(requirements)


class _MRMLNodeNotFoundException(Exception):
    pass


class _MarkupsLogic:
    """`slicer.modules.markups.logic()` (vtkSlicerMarkupsLogic, outside the MRML manifest): its one
    method we use, declared the same in 5.8.1 .. main (`vtkSlicerMarkupsLogic.h`):
    `void JumpSlicesToLocation(double x, double y, double z, bool centered, int viewGroup = -1,
    vtkMRMLSliceNode* exclude = nullptr)`, which runs `vtkMRMLSliceNode::JumpAllSlices`."""

    def __init__(self, slicer: types.ModuleType) -> None:
        self._slicer = slicer
        self.jumps: List[tuple] = []

    def JumpSlicesToLocation(
        self, x: float, y: float, z: float, centered: bool, viewGroup: int = -1, exclude: Any = None
    ) -> None:
        self.jumps.append((float(x), float(y), float(z), bool(centered), int(viewGroup)))
        for node in self._slicer.mrmlScene.nodes("vtkMRMLSliceNode"):
            if node is not exclude and (viewGroup < 0 or node.GetViewGroup() == viewGroup):
                node.jumps.append((float(x), float(y), float(z)))


def _scripted_loadable_module(slicer: types.ModuleType) -> types.ModuleType:
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent: Any) -> None:
            self.parent = parent
            self.moduleName = type(self).__name__

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent: Any = None) -> None:
            from PySide6 import QtWidgets

            self.moduleName = type(self).__name__[: -len("Widget")]
            self.parent = parent or QtWidgets.QWidget()
            self.layout = self.parent.layout() or QtWidgets.QVBoxLayout(self.parent)

        def setup(self) -> None:
            pass

        def cleanup(self) -> None:
            pass

        def resourcePath(self, filename: str) -> str:
            return str(Path(sys.modules[self.__module__].__file__).parent / "Resources" / filename)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent: Any = None) -> None:
            self.moduleName = type(self).__name__[: -len("Logic")]
            self.isSingletonParameterNode = True

        def getParameterNode(self) -> mrml.vtkMRMLScriptedModuleNode:
            """As Slicer's: the singleton node tagged with the module name, created when missing."""
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is not None:
                if node.GetAttribute("ModuleName") != self.moduleName:
                    node.SetAttribute("ModuleName", self.moduleName)
                return node
            return slicer.mrmlScene.AddNode(self.createParameterNode())

        def createParameterNode(self) -> mrml.vtkMRMLScriptedModuleNode:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message: str, requestedDelay: Any = None, msec: Any = None) -> None:
            pass

    module.ScriptedLoadableModule = ScriptedLoadableModule
    module.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    module.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    module.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    module.__all__ = [
        "ScriptedLoadableModule",
        "ScriptedLoadableModuleWidget",
        "ScriptedLoadableModuleLogic",
        "ScriptedLoadableModuleTest",
    ]
    return module


def _parameter_node_wrapper() -> types.ModuleType:
    """`slicer.parameterNodeWrapper` for the one kind of parameter the module uses: MRML nodes.

    Stored as Slicer's NodeSerializer stores them (an empty string parameter marks the parameter as
    present, the node itself is a node reference of the same name); other types raise TypeError
    here instead of pretending to work.
    """
    module = types.ModuleType("slicer.parameterNodeWrapper")

    def node_property(name: str, kind: type) -> property:
        def write(self: Any, value: Any) -> None:
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"Value must be of type '{kind}', is type '{type(value)}' value '{value}'")
            self.parameterNode.SetParameter(name, "")
            self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)

        return property(lambda self: self.parameterNode.GetNodeReference(name), write)

    def wrap(cls: type) -> type:
        hints = typing.get_type_hints(cls)
        for name, kind in hints.items():
            if not (isinstance(kind, type) and issubclass(kind, mrml.vtkMRMLNode)):
                raise TypeError(f"the fake parameterNodeWrapper supports only MRML node parameters ({name})")
            setattr(cls, name, node_property(name, kind))

        def __init__(self: Any, parameterNode: Any) -> None:
            self.parameterNode = parameterNode
            for name in hints:
                if not parameterNode.HasParameter(name):
                    parameterNode.SetParameter(name, "")
                    parameterNode.SetNodeReferenceID(name, None)

        cls.__init__ = __init__
        cls.allParameters = dict(hints)
        return cls

    def parameterNodeWrapper(classtype: Optional[type] = None) -> Any:
        return wrap if classtype is None else wrap(classtype)

    module.parameterNodeWrapper = parameterNodeWrapper
    return module


def install() -> types.ModuleType:
    """Create (or reset) the fake modules; returns the fake `slicer` with a fresh scene."""
    from PySide6 import QtWidgets

    from . import ctk, qt

    slicer = sys.modules.get("slicer")
    if slicer is None or not getattr(slicer, "_is_fake", False):
        slicer = types.ModuleType("slicer")
        slicer._is_fake = True
        slicer.util = _Util(slicer)
        slicer.util.MRMLNodeNotFoundException = _MRMLNodeNotFoundException
        slicer.ScriptedLoadableModule = _scripted_loadable_module(slicer)
        slicer.parameterNodeWrapper = _parameter_node_wrapper()
        for name in dir(mrml):
            if name.startswith("vtk"):
                setattr(slicer, name, getattr(mrml, name))
        sys.modules.update(
            {
                "slicer": slicer,
                "slicer.util": slicer.util,
                "slicer.ScriptedLoadableModule": slicer.ScriptedLoadableModule,
                "slicer.parameterNodeWrapper": slicer.parameterNodeWrapper,
                "qt": qt,
                "ctk": ctk,
            }
        )
    slicer.app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    slicer.mrmlScene = mrml.vtkMRMLScene()
    slicer.pip_requests = []
    markups_logic = _MarkupsLogic(slicer)
    slicer.modules = types.SimpleNamespace(markups=types.SimpleNamespace(logic=lambda: markups_logic))
    return slicer


MODULE_DIR = Path(__file__).resolve().parents[2] / "MedMLLMSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
