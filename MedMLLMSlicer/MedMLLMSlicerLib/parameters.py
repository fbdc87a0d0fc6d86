"""The chat panel's scene state in the module's parameter node, so it is saved with the scene.

Which volume, ROI and conversation are selected lives here as node references (they follow the
nodes through save and reload); machine preferences stay in Qt settings (`settings.py`) and the
remote token in memory.
"""

from __future__ import annotations

import slicer
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

MODULE_NAME = "MedMLLMSlicer"


@parameterNodeWrapper
class ChatParameters:
    """Typed access to the parameter node: `params.volume = node` stores a node reference."""

    volume: slicer.vtkMRMLScalarVolumeNode
    roi: slicer.vtkMRMLMarkupsROINode
    conversation: slicer.vtkMRMLTextNode


def chat_parameters() -> ChatParameters:
    """The module's singleton parameter node in the current scene (created on first use), wrapped."""
    logic = ScriptedLoadableModuleLogic()
    logic.moduleName = MODULE_NAME
    return ChatParameters(logic.getParameterNode())
