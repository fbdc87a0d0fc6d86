"""Extension layout (CMake, resources) and a static check that our MRML calls exist in Slicer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from slicer_fakes import mrml

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "MedMLLMSlicer"
SLICER_SIDE = [MODULE / "MedMLLMSlicer.py", *sorted((MODULE / "MedMLLMSlicerLib").glob("*.py"))]


def _manifest_names() -> set:
    names = set()
    for info in mrml.MANIFEST["classes"].values():
        names |= set(info["methods"]) | set(info.get("constants", {}))
    return names


def test_every_vtk_style_call_is_a_slicer_method():
    """Also covers code paths the fake-scene tests do not run (e.g. Slicer-only branches)."""
    modules = {
        "threading",
        "subprocess",
        "socket",
        "queue",
        "qt",
        "backends",
        "scene_writer",
        "ctk",
        "json",
        "signal",
    }
    modules |= {"exceptions", "MedMLLMSlicer"}  # requests.exceptions.X; "MedMLLMSlicer.Role" attribute names
    modules |= {"requests", "worker"}  # requests.Response; worker.VolumeSnapshot in a docstring
    calls, sitk_calls = set(), set()
    for path in SLICER_SIDE:
        for receiver, name in re.findall(
            r"(\w+|\))\.([A-Z][A-Za-z0-9_]+)\b", path.read_text(encoding="utf-8")
        ):
            if receiver in ("sitk", "image"):  # SimpleITK (bundled with Slicer) reads mask files
                sitk_calls.add(name)
            elif (
                receiver not in modules
                and not receiver.startswith("Q")
                and not name.startswith("ScriptedLoadable")
            ):
                calls.add(name)
    from slicer_fakes import _MarkupsLogic  # vtkSlicerMarkupsLogic: outside the manifest, header cited there

    markups_logic = {name for name in vars(_MarkupsLogic) if name[:1].isupper()}
    unknown = calls - _manifest_names() - markups_logic
    assert unknown == set(), f"not in Slicer's API manifest: {sorted(unknown)}"
    import SimpleITK as sitk

    assert (
        sitk_calls and {n for n in sitk_calls if not hasattr(sitk, n) and not hasattr(sitk.Image, n)} == set()
    )
    util_calls = set()
    for path in SLICER_SIDE:
        util_calls |= set(re.findall(r"slicer\.util\.([A-Za-z_]+)", path.read_text(encoding="utf-8")))
    assert util_calls - set(mrml.MANIFEST["slicer.util"]) == set()


def test_cmake_lists_and_resources():
    root = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ):
        assert re.search(rf"set\({key} \S", root), key
    assert "add_subdirectory(MedMLLMSlicer)" in root
    module = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "WITH_GENERIC_TESTS" in module and "medmllm/*.py" in module
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module
    for resource in ("Resources/Icons/MedMLLMSlicer.png", "Resources/UI/MedMLLMSlicer.ui"):
        assert (MODULE / resource).is_file(), resource
    assert (ROOT / "Resources" / "MedMLLMSlicer.png").is_file()
    assert 'name="chatHost"' in (MODULE / "Resources/UI/MedMLLMSlicer.ui").read_text(encoding="utf-8")


def test_slicer_side_code_is_python39_syntax():
    import ast

    for path in SLICER_SIDE:
        ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=(3, 9))


def test_extensions_index_entry_matches_the_index_schema_and_cmake():
    """The file submitted to Slicer's ExtensionsIndex, checked as the index's CI does: schema v1.0.2,
    file name = CMake project name, category as in CMake, no dependencies since CMake has none."""
    import json

    import jsonschema

    entry_path = ROOT / "ExtensionsIndex" / "MedMLLMSlicer.json"
    entry = json.loads(entry_path.read_text(encoding="utf-8"))
    schema_path = (
        ROOT / "Testing" / "data" / "extensions-index" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
    )
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    jsonschema.validate(entry, schema)
    assert entry["$schema"] == schema["$id"]
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"project\(\s*([^\s)]+)", cmake).group(1) == entry_path.stem
    assert re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', cmake).group(1) == entry["category"]
    assert re.search(r'set\(EXTENSION_DEPENDS "NA"\)', cmake) and "build_dependencies" not in entry
    assert entry["scm_url"].startswith("https://") and entry["scm_url"] in cmake
    for bad in (
        {**entry, "homepage": "x"},
        {k: v for k, v in entry.items() if k != "scm_url"},
        {**entry, "tier": 7},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
