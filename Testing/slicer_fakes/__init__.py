"""Fake `slicer`, `qt` and `ctk` modules so the MedMLLMSlicer module runs under pytest.

`install()` puts them in `sys.modules`. `slicer.util` offers only functions that exist in Slicer's
`slicer/util.py` (checked against the manifest by the tests), and MRML classes accept only Slicer's
method names (see `mrml.py`).
"""

from __future__ import annotations

import sys
import tempfile
import types
import unittest
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from . import mrml


def _read_seg_nrrd(path: str) -> List[mrml.vtkSegment]:
    """Segments of a `.seg.nrrd` in the file's own grid, as Slicer would load them."""
    from medmllm.io.segnrrd import read_seg_nrrd

    segments, ijk_to_ras = read_seg_nrrd(path)
    loaded = []
    for segment in segments:
        fake = mrml.vtkSegment(segment.name, segment.mask, ijk_to_ras)
        fake.SetColor(*segment.color)
        loaded.append(fake)
    return loaded


class _Util(types.ModuleType):
    """`slicer.util`: only names that Slicer's util.py defines."""

    def __init__(self, slicer: types.ModuleType) -> None:
        super().__init__("slicer.util")
        self._slicer = slicer

    def arrayFromVolume(self, volume_node: mrml.vtkMRMLVolumeNode) -> np.ndarray:
        return volume_node._array

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

    def loadSegmentation(
        self, filename: str, properties: Optional[Dict] = None, returnNode: bool = False
    ) -> Any:
        scene = self._slicer.mrmlScene
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", Path(filename).name.split(".")[0])
        for segment in _read_seg_nrrd(filename):
            node.GetSegmentation().AddSegment(segment)
        return (True, node) if returnNode else node

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

    def pip_install(self, requirements: Any, **kwargs: Any) -> None:
        self._slicer.pip_requests.append(requirements)


class _MRMLNodeNotFoundException(Exception):
    pass


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
        slicer.modules = types.SimpleNamespace()
        for name in dir(mrml):
            if name.startswith("vtk"):
                setattr(slicer, name, getattr(mrml, name))
        sys.modules.update(
            {
                "slicer": slicer,
                "slicer.util": slicer.util,
                "slicer.ScriptedLoadableModule": slicer.ScriptedLoadableModule,
                "qt": qt,
                "ctk": ctk,
            }
        )
    slicer.app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    slicer.mrmlScene = mrml.vtkMRMLScene()
    slicer.pip_requests = []
    return slicer


MODULE_DIR = Path(__file__).resolve().parents[2] / "MedMLLMSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
