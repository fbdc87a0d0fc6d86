"""The fakes are only useful if they are as strict as Slicer: check them against the manifest."""

from __future__ import annotations

import inspect

import pytest
from slicer_fakes import mrml
from slicer_fakes.fixtures import fake_slicer  # noqa: F401


def _fake_classes():
    return [c for c in vars(mrml).values() if inspect.isclass(c) and issubclass(c, mrml.FakeVTKObject)]


@pytest.mark.parametrize("cls", _fake_classes(), ids=lambda c: c.__name__)
def test_every_faked_method_exists_in_slicer(cls):
    invented = [
        name
        for name, value in vars(cls).items()
        if name[:1].isupper() and callable(value) and not mrml.manifest_allows(cls._vtk_class, name)
    ]
    assert invented == []


def test_unknown_methods_raise_attribute_error(fake_slicer):  # noqa: F811
    roi = fake_slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "r")
    with pytest.raises(AttributeError, match="no method 'SetRadius'"):
        roi.SetRadius(3)
    with pytest.raises(AttributeError, match="not faked"):
        roi.GetPlanes  # noqa: B018 - exists in Slicer, not in the fake
    text = fake_slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode", "t")
    with pytest.raises(AttributeError):
        text.SetCenter(0, 0, 0)  # ROI method on a text node
    with pytest.raises(AttributeError):
        fake_slicer.vtkMRMLSubjectHierarchyNode.GetItemParent  # noqa: B018 - not static
    assert fake_slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(fake_slicer.mrmlScene)


def test_fake_util_offers_only_slicer_util_names(fake_slicer):  # noqa: F811
    names = set(mrml.MANIFEST["slicer.util"]) | set(mrml.MANIFEST["modules"]["slicer.util"]["classes"])
    public = {n for n in vars(type(fake_slicer.util)) if not n.startswith("_")}
    public |= {n for n in vars(fake_slicer.util) if not n.startswith("_")}
    assert public - names == set()


def test_scene_events_reach_observers(fake_slicer):  # noqa: F811
    scene = fake_slicer.mrmlScene
    seen = []
    tag = scene.AddObserver(scene.NodeRemovedEvent, lambda caller, event: seen.append(event))
    node = scene.AddNewNodeByClass("vtkMRMLTextNode", "t")
    scene.RemoveNode(node)
    scene.RemoveObserver(tag)
    scene.RemoveNode(scene.AddNewNodeByClass("vtkMRMLTextNode", "u"))
    assert seen == ["NodeRemovedEvent"]


def test_fake_parameter_node_wrapper_stores_nodes_as_slicer_does(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib.parameters import ChatParameters, chat_parameters

    assert "parameterNodeWrapper" in mrml.MANIFEST["modules"]["slicer.parameterNodeWrapper"]["exports"]
    params = chat_parameters()
    node = params.parameterNode
    assert node.GetSingletonTag() == "MedMLLMSlicer" and node.GetAttribute("ModuleName") == "MedMLLMSlicer"
    assert chat_parameters().parameterNode is node, "one parameter node per scene"
    assert all(node.HasParameter(name) for name in ("volume", "roi", "conversation"))
    text = fake_slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode", "chat")
    params.conversation = text
    assert (
        node.GetNodeReferenceID("conversation") == text.GetID() and ChatParameters(node).conversation is text
    )
    with pytest.raises(TypeError, match="must be of type"):
        params.volume = text
    with pytest.raises(TypeError, match="only MRML node parameters"):

        @fake_slicer.parameterNodeWrapper.parameterNodeWrapper
        class Numbers:
            threshold: float


def test_calls_with_an_argument_count_slicer_lacks_raise_type_error(fake_slicer):  # noqa: F811
    roi = fake_slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "r")
    roi.SetSize(1.0, 2.0, 3.0)
    with pytest.raises(TypeError, match="GetSizeWorld"):
        roi.GetSizeWorld()  # Slicer has only GetSizeWorld(double size_World[3])
    size = [0.0, 0.0, 0.0]
    roi.GetSizeWorld(size)
    assert size == [1.0, 2.0, 3.0]
    centre = [0.0, 0.0, 0.0]
    roi.GetCenterWorld(centre)  # both overloads exist: with an output array and without
    assert len(roi.GetCenterWorld()) == 3


def test_the_fake_accepts_only_what_every_supported_release_has(fake_slicer):  # noqa: F811
    """The manifest is the intersection of 5.8.1, 5.10.0, 5.12.3 and main (scripts/slicer_api_manifest.py):
    names added after 5.8.1 are refused although main has them."""
    from slicer_fakes.manifest import SUPPORTED_RELEASES

    assert SUPPORTED_RELEASES == ("5.8.1", "5.10.0", "5.12.3", "main")
    assert len({r["commit"] for r in mrml.MANIFEST["source"]["releases"].values()}) == 4
    segment = fake_slicer.vtkSegment("s")
    with pytest.raises(AttributeError, match="no method 'SetTerminology'"):
        segment.SetTerminology("x")  # vtkSegment gained it in 5.10
    for cls, name in (
        ("vtkMRMLScene", "RemoveUnreferencedStorageNodes"),
        ("vtkMRMLNode", "SetTypeDisplayName"),
    ):
        assert not mrml.manifest_allows(cls, name), f"{cls}.{name} is missing from 5.8.1"
    assert mrml.manifest_allows("vtkSegment", "GetTerminologyEntryTagName", static=True)
    segment.SetTag(fake_slicer.vtkSegment.GetTerminologyEntryTagName(), "entry")
    assert segment.HasTag("TerminologyEntry")


def test_fake_util_functions_take_only_parameters_every_release_has(fake_slicer):  # noqa: F811
    """`slicer.util.pip_install(requirements)` has no keyword arguments before 5.12: the fake refuses them."""
    import inspect
    import re

    for name, signature in mrml.MANIFEST["slicer.util"].items():
        fake = getattr(type(fake_slicer.util), name, None)  # the class's: fixtures patch some instances
        if fake is None or not callable(fake):
            continue
        fake = fake.__get__(fake_slicer.util)
        allowed = set(re.findall(r"(\w+)\s*(?::[^,=)]*)?(?:=[^,)]*)?(?=[,)])", signature.split("(", 1)[1]))
        fake_params = {
            p.name
            for p in inspect.signature(fake).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        assert fake_params <= allowed, f"slicer.util.{name}{signature}: fake has {fake_params - allowed}"
        if "**" not in signature:
            assert not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fake).parameters.values()), name
    with pytest.raises(TypeError):
        fake_slicer.util.pip_install(["x"], blocking=False)
