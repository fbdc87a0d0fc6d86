"""`.mrk.json` ROI writer/reader, schema validation, file names from labels."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from medmllm.io.markups import (
    MARKUPS_SCHEMA_URL,
    read_roi_json,
    roi_document,
    safe_filename,
    unique_names,
    validate_markups,
    write_roi_json,
)

SCHEMA_PATH = Path(__file__).resolve().parent / "data" / "slicer" / "markups-schema-v1.0.3.json"


@pytest.fixture(scope="module")
def schema_path() -> Path:
    """Slicer's markups schema, vendored in the repository (source and licence: Testing/data/slicer)."""
    return SCHEMA_PATH


def _quaternion_rotation(q) -> np.ndarray:
    w, x, y, z = np.asarray(q, float) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _corners(center, size, axes) -> np.ndarray:
    signs = np.array(list(itertools.product((-0.5, 0.5), repeat=3)))
    points = center + (signs * size) @ np.asarray(axes).T
    return points[np.lexsort(np.round(points, 9).T)]


def test_written_file_is_slicer_lps_layout_and_valid(tmp_path, schema_path):
    path = write_roi_json(
        tmp_path / "lesion.mrk.json",
        "lesion 1",
        center=(10.0, -20.0, 30.0),
        size=(4.0, 5.0, 6.0),
        axes=np.eye(3),
        color=(0.2, 0.4, 0.6),
        description="found by M3D",
        locked=True,
    )
    document = json.loads(path.read_text(encoding="utf-8"))
    validate_markups(document, schema_path)
    assert document["@schema"] == MARKUPS_SCHEMA_URL
    (markup,) = document["markups"]
    assert markup["type"] == "ROI" and markup["roiType"] == "Box"
    assert markup["coordinateSystem"] == "LPS" and markup["coordinateUnits"] == "mm"
    assert markup["center"] == [-10.0, 20.0, 30.0]
    assert markup["orientation"] == [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0]
    assert markup["size"] == [4.0, 5.0, 6.0]
    (point,) = markup["controlPoints"]
    assert point["position"] == markup["center"] and point["positionStatus"] == "defined"
    assert markup["locked"] is True and markup["name"] == "lesion 1"
    assert markup["display"]["color"] == markup["display"]["selectedColor"] == [0.2, 0.4, 0.6]


@settings(max_examples=60, deadline=None)
@given(
    q=st.tuples(*[st.floats(-1, 1)] * 4),
    center=st.tuples(*[st.floats(-500, 500)] * 3),
    size=st.tuples(*[st.floats(0, 300)] * 3),
)
def test_oblique_roi_round_trip(tmp_path_factory, schema_path, q, center, size):
    assume(np.linalg.norm(q) > 0.1)
    axes = _quaternion_rotation(q)
    path = write_roi_json(tmp_path_factory.mktemp("r") / "a.mrk.json", "box", center, size, axes)
    validate_markups(json.loads(path.read_text(encoding="utf-8")), schema_path)
    roi = read_roi_json(path)
    np.testing.assert_allclose(roi["center_ras"], center, atol=1e-9)
    np.testing.assert_allclose(roi["size"], size, atol=1e-9)
    np.testing.assert_allclose(roi["axes_ras"], axes, atol=1e-9)
    assert roi["name"] == "box"


def test_read_returns_all_documented_keys(tmp_path):
    path = write_roi_json(
        tmp_path / "a.mrk.json", "肝 病灶", (1, 2, 3), (1, 1, 1), np.eye(3), (0, 1, 0), "note"
    )
    roi = read_roi_json(path)
    assert set(roi) == {"name", "center_ras", "size", "axes_ras", "color", "description", "locked"}
    assert roi["name"] == "肝 病灶" and roi["description"] == "note"
    assert roi["color"] == (0.0, 1.0, 0.0) and roi["locked"] is False


def test_left_handed_axes_give_the_same_box_with_a_rotation(tmp_path):
    axes = np.diag([1.0, 1.0, -1.0]) @ _quaternion_rotation((0.9, 0.1, 0.3, -0.2))
    assert np.linalg.det(axes) < 0
    center, size = np.array([5.0, 6.0, 7.0]), np.array([10.0, 20.0, 30.0])
    roi = read_roi_json(write_roi_json(tmp_path / "l.mrk.json", "l", center, size, axes))
    assert np.linalg.det(roi["axes_ras"]) > 0
    np.testing.assert_allclose(roi["axes_ras"][:, :2], axes[:, :2], atol=1e-12)
    np.testing.assert_allclose(
        _corners(center, size, axes), _corners(roi["center_ras"], roi["size"], roi["axes_ras"])
    )


def test_reads_ras_files_micrometres_and_center_from_control_point(tmp_path):
    ras = {
        "@schema": MARKUPS_SCHEMA_URL,
        "markups": [
            {"type": "Fiducial", "controlPoints": []},
            {
                "type": "ROI",
                "coordinateSystem": "RAS",
                "coordinateUnits": ["um", "UCUM", "micrometer"],
                "center": [1000.0, 2000.0, 3000.0],
                "size": [500.0, 500.0, 500.0],
            },
        ],
    }
    (tmp_path / "ras.mrk.json").write_text(json.dumps(ras), encoding="utf-8")
    roi = read_roi_json(tmp_path / "ras.mrk.json")
    np.testing.assert_allclose(roi["center_ras"], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(roi["size"], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(roi["axes_ras"], np.eye(3))
    forum_style = {
        "@schema": MARKUPS_SCHEMA_URL,
        "markups": [
            {
                "type": "ROI",
                "roiType": "Box",
                "controlPoints": [{"position": [5.9, -12.3, -10.2]}],
                "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
                "size": [39.3, 32.4, 32.4],
            }
        ],
    }
    (tmp_path / "cp.mrk.json").write_text(json.dumps(forum_style), encoding="utf-8")
    roi = read_roi_json(tmp_path / "cp.mrk.json")
    np.testing.assert_allclose(roi["center_ras"], [-5.9, 12.3, -10.2])
    np.testing.assert_allclose(roi["axes_ras"], np.eye(3))
    assert roi["color"] == (1.0, 0.5, 0.5)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(type="Box"), "type"),
        (lambda m: m["display"].update(color=[1.5, 0, 0]), "color"),
        (lambda m: m.update(orientation=[1.0] * 8), "orientation"),
        (lambda m: m.update(coordinateSystem="IJK"), "coordinateSystem"),
    ],
)
def test_schema_validation_reports_the_problem(schema_path, edit, message):
    document = roi_document("a", (0, 0, 0), (1, 1, 1), np.eye(3))
    edit(document["markups"][0])
    with pytest.raises(ValueError, match=message):
        validate_markups(document, schema_path)


def test_schema_validation_requires_a_markups_schema_id(schema_path):
    document = roi_document("a", (0, 0, 0), (1, 1, 1), np.eye(3))
    document["@schema"] = "https://example.org/other.json"
    with pytest.raises(ValueError, match="@schema"):
        validate_markups(document, schema_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"center": (0, float("nan"), 0)}, "NaN"),
        ({"center": (0, 0)}, "center must be 3 numbers"),
        ({"size": (1, -1, 1)}, ">= 0"),
        ({"axes": np.ones((3, 3))}, "orthonormal"),
        ({"axes": np.eye(3) * 2}, "orthonormal"),
        ({"axes": np.eye(2)}, "3x3"),
        ({"color": (0, 0, 2)}, "0..1"),
        ({"name": None}, "strings"),
    ],
)
def test_bad_roi_input_raises_clear_value_error(tmp_path, kwargs, message):
    arguments = {"name": "a", "center": (0, 0, 0), "size": (1, 1, 1), "axes": np.eye(3), **kwargs}
    with pytest.raises(ValueError, match=message):
        write_roi_json(tmp_path / "bad.mrk.json", **arguments)
    assert not (tmp_path / "bad.mrk.json").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"markups": [', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"@schema": "x"}', "no 'markups' list"),
        ('{"markups": [{"type": "Fiducial"}]}', "no ROI"),
        ('{"markups": [{"type": "ROI", "center": [0, 0, 0]}]}', "no 'size'"),
        ('{"markups": [{"type": "ROI", "size": [1, 1, 1]}]}', "no 'center'"),
        ('{"markups": [{"type": "ROI", "center": [0, 0, 0], "size": [1, 1]}]}', "size must be 3"),
        (
            '{"markups": [{"type": "ROI", "center": [0,0,0], "size": [1,1,1], "orientation": [1]}]}',
            "orientation",
        ),
        (
            '{"markups": [{"type": "ROI", "center": [0,0,0], "size": [1,1,1], "coordinateSystem": "XYZ"}]}',
            "LPS",
        ),
        (
            '{"markups": [{"type": "ROI", "center": [0,0,0], "size": [1,1,1], "coordinateUnits": "cm"}]}',
            "'mm'",
        ),
        ('{"markups": [{"type": "ROI", "center": ["a", 0, 0], "size": [1,1,1]}]}', "center must be 3"),
    ],
)
def test_malformed_markups_files_raise_clear_value_error(tmp_path, content, message):
    path = tmp_path / "bad.mrk.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_roi_json(path)


def test_unreadable_files_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        read_roi_json(tmp_path / "missing.mrk.json")
    (tmp_path / "latin1.mrk.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_roi_json(tmp_path / "latin1.mrk.json")


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("liver lesion", "liver lesion"),
        ("肝脏/病灶", "肝脏_病灶"),
        ('a\\b:c*d?e"f<g>h|i', "a_b_c_d_e_f_g_h_i"),
        ("  ..hidden.  ", "hidden"),
        ("line\nbreak\ttab", "line_break_tab"),
        ("../../etc/passwd", "_.._etc_passwd"),
        ("", "unnamed"),
        ("...", "unnamed"),
        ("CON", "CON_"),
        ("com1.txt", "com1.txt_"),
    ],
)
def test_safe_filename(label, expected):
    assert safe_filename(label) == expected


def test_safe_filename_bounds_utf8_bytes_without_splitting_characters():
    name = safe_filename("病" * 100, max_bytes=50)
    assert name == "病" * 16 and len(name.encode("utf-8")) <= 50


def test_safe_filename_rejects_non_strings():
    with pytest.raises(ValueError, match="string"):
        safe_filename(None)


def test_unique_names_resolve_collisions_case_insensitively_and_stay_bounded():
    names = unique_names(["Lesion", "lesion", "lesion_2", "a/b", "a_b", "x" * 40, "x" * 40], max_bytes=20)
    assert names == ["Lesion", "lesion_2", "lesion_2_2", "a_b", "a_b_2", "x" * 20, "x" * 18 + "_2"]
    assert len({n.casefold() for n in names}) == len(names)
