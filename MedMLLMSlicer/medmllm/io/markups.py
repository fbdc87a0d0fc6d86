"""Markups ROI files (`.mrk.json`) as 3D Slicer writes and reads them, and file names from labels.

Slicer writes ROIs in LPS: `center` x and y negated and the first six numbers of the row-major
`orientation` (the ROI-to-world 3x3 whose columns are the ROI axes) negated
(`vtkMRMLMarkupsROIJsonStorageNode`). Everything in memory here is RAS, as in the rest of `medmllm`.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

# The schema ID Slicer itself writes (its reader accepts any markups-schema-v1.x.y).
MARKUPS_SCHEMA_URL = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
_SCHEMA_PATTERN = re.compile(r"markups-schema-v1\.\d+\.\d+\.json#*$", re.IGNORECASE)
# Slicer's default selected colour: what a markup shows in when the file gives none.
DEFAULT_COLOR = (1.0, 0.5, 0.5)
_LPS_SIGNS = np.array([-1.0, -1.0, 1.0])
_UNIT_SCALE = {"mm": 1.0, "um": 0.001}
_RESERVED_CHARS = re.compile(r'[<>:"/\\|?*]')
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{n}" for p in ("COM", "LPT") for n in range(1, 10)}


def roi_document(
    name: str,
    center: Sequence[float],
    size: Sequence[float],
    axes: np.ndarray,
    color: Sequence[float] = (1.0, 1.0, 0.0),
    description: str = "",
    locked: bool = False,
) -> dict:
    """The markups JSON document (a dict) for one box ROI; arguments as for `write_roi_json`."""
    center_ras = _vector(center, "center")
    size_mm = _vector(size, "size")
    if np.any(size_mm < 0):
        raise ValueError(f"ROI size must be >= 0 mm along each axis, got {size_mm.tolist()}")
    rotation = _rotation(axes)
    rgb = [float(c) for c in _vector(color, "color")]
    if not all(0.0 <= c <= 1.0 for c in rgb):
        raise ValueError(f"color must be (r, g, b) with each in 0..1, got {rgb}")
    if not isinstance(name, str) or not isinstance(description, str):
        raise ValueError("name and description must be strings")
    center_lps = (_LPS_SIGNS * center_ras).tolist()
    markup = {
        "type": "ROI",
        "name": name,
        "description": description,
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": bool(locked),
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": 1,
        "roiType": "Box",
        "center": center_lps,
        "orientation": (_LPS_SIGNS[:, None] * rotation).ravel().tolist(),
        "size": size_mm.tolist(),
        "insideOut": False,
        "controlPoints": [_centre_point(name, center_lps, locked)],
        "measurements": [],
        "display": {"visibility": True, "opacity": 1.0, "color": rgb, "selectedColor": rgb},
    }
    return {"@schema": MARKUPS_SCHEMA_URL, "markups": [markup]}


def _centre_point(name: str, center_lps: List[float], locked: bool) -> dict:
    """A placed box ROI keeps one control point at its centre (Slicer's UpdateControlPointsFromBoxROI)."""
    return {
        "id": "1",
        "label": f"{name}-1",
        "description": "",
        "associatedNodeID": "",
        "position": center_lps,
        "orientation": (_LPS_SIGNS[:, None] * np.eye(3)).ravel().tolist(),
        "selected": True,
        "locked": bool(locked),
        "visibility": True,
        "positionStatus": "defined",
    }


def write_roi_json(
    path: PathLike,
    name: str,
    center: Sequence[float],
    size: Sequence[float],
    axes: np.ndarray,
    color: Sequence[float] = (1.0, 1.0, 0.0),
    description: str = "",
    locked: bool = False,
) -> Path:
    """Write one box ROI as a Slicer `.mrk.json`; return the path.

    `center` is RAS mm, `size` the full side lengths in mm along the ROI axes, `axes` a 3x3 matrix
    whose columns are the ROI's x, y, z unit directions in RAS (orthonormal). A left-handed `axes`
    is stored with its z column negated: the box is the same, and Slicer expects a rotation.
    `description` is kept for our reader and other tools (Slicer does not read one for a markup).
    """
    document = roi_document(name, center, size, axes, color, description, locked)
    target = Path(path)
    target.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return target


def read_roi_json(path: PathLike) -> Dict[str, object]:
    """Read the first ROI of a markups JSON file (ours or Slicer's) into RAS.

    Returns a dict with `name`, `center_ras` (3,), `size` (3,) mm, `axes_ras` (3x3, columns = ROI
    axes), `color` (r, g, b), `description` and `locked`. Raises ValueError for anything unreadable.
    """
    document = _load_json(Path(path))
    markup = _first_roi(document, Path(path))
    system = markup.get("coordinateSystem", "LPS")
    if system not in ("LPS", "RAS"):
        raise ValueError(f"{path}: coordinateSystem must be 'LPS' or 'RAS', got {system!r}")
    signs = _LPS_SIGNS if system == "LPS" else np.ones(3)
    scale = _unit_scale(markup.get("coordinateUnits", "mm"), Path(path))
    orientation = np.eye(3)
    if "orientation" in markup:
        orientation = _vector(markup["orientation"], f"{path}: orientation", length=9).reshape(3, 3)
    if "size" not in markup:
        raise ValueError(f"{path}: the ROI has no 'size'")
    display = markup.get("display") or {}
    color = display.get("selectedColor", display.get("color", DEFAULT_COLOR))
    return {
        "name": str(markup.get("name", "")),
        "center_ras": signs * _roi_center(markup, Path(path)) * scale,
        "size": _vector(markup["size"], f"{path}: size") * scale,
        "axes_ras": signs[:, None] * orientation,
        "color": tuple(float(c) for c in _vector(color, f"{path}: display color")),
        "description": str(markup.get("description", "")),
        "locked": bool(markup.get("locked", True)),
    }


def validate_markups(document: dict, schema_path: PathLike) -> None:
    """Check `document` against Slicer's markups JSON schema file; raise ValueError listing problems.

    jsonschema is imported here (not at module import): it is a development/CLI dependency only.
    """
    try:
        import jsonschema
    except ImportError as exc:
        raise ImportError("validate_markups needs the 'jsonschema' package (pip install jsonschema)") from exc
    schema = _load_json(Path(schema_path))
    validator_class = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_class(schema).iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors[:10]]
        raise ValueError("markups document does not match the schema:\n" + "\n".join(lines))
    if not _SCHEMA_PATTERN.search(str(document.get("@schema", ""))):
        raise ValueError(f"'@schema' must name a markups-schema-v1.x.y.json, got {document.get('@schema')!r}")


def safe_filename(label: str, max_bytes: int = 120) -> str:
    """A file-name stem made from a label: letters of any script kept, path separators, characters
    that Windows forbids and control characters replaced by '_', at most `max_bytes` UTF-8 bytes.

    The default bound leaves room for a suffix and an extension within the usual 255-byte limit.
    """
    if not isinstance(label, str):
        raise ValueError(f"label must be a string, got {type(label).__name__}")
    if max_bytes < 8:
        raise ValueError(f"max_bytes must be at least 8, got {max_bytes}")
    text = unicodedata.normalize("NFC", label)
    text = "".join("_" if unicodedata.category(c)[0] == "C" else c for c in text)
    text = _RESERVED_CHARS.sub("_", text)
    text = re.sub(r"\s+", " ", text).strip(" .")
    text = _truncate_utf8(text, max_bytes).rstrip(" .")
    if not text:
        return "unnamed"
    if text.split(".")[0].upper() in _WINDOWS_DEVICES:
        text = _truncate_utf8(text, max_bytes - 1) + "_"
    return text


def unique_names(labels: Sequence[str], max_bytes: int = 120) -> List[str]:
    """`safe_filename` of each label, made unique (ignoring case, for Windows and macOS) with `_2`, `_3`...

    Order is kept, so names map back to labels by position.
    """
    used = set()
    names = []
    for label in labels:
        base = safe_filename(label, max_bytes)
        name, number = base, 1
        while name.casefold() in used:
            number += 1
            suffix = f"_{number}"
            name = _truncate_utf8(base, max_bytes - len(suffix)) + suffix
        used.add(name.casefold())
        names.append(name)
    return names


# ---------------------------------------------------------------- helpers


def _vector(values: object, what: str, length: int = 3) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be {length} numbers, got {values!r}") from None
    if array.shape != (length,):
        raise ValueError(f"{what} must be {length} numbers, got {values!r}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contains NaN or infinite values: {array.tolist()}")
    return array


def _rotation(axes: np.ndarray) -> np.ndarray:
    matrix = np.asarray(axes, dtype=np.float64)
    if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"axes must be a finite 3x3 matrix (columns = ROI axes in RAS), got {axes!r}")
    if not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-6):
        raise ValueError("axes must be orthonormal: columns are unit ROI directions at right angles")
    if np.linalg.det(matrix) < 0:
        matrix = matrix * np.array([1.0, 1.0, -1.0])
    return matrix


def _truncate_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _load_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return document


def _first_roi(document: dict, path: Path) -> dict:
    markups = document.get("markups")
    if not isinstance(markups, list):
        raise ValueError(f"{path}: no 'markups' list; not a Slicer markups file")
    for markup in markups:
        if isinstance(markup, dict) and markup.get("type") == "ROI":
            return markup
    raise ValueError(f"{path}: contains no ROI markup")


def _unit_scale(units: object, path: Path) -> float:
    """Coordinates in mm: Slicer allows 'mm' or 'um', as a string or a coded [value, 'UCUM', meaning]."""
    code = units[0] if isinstance(units, list) and units else units
    if code not in _UNIT_SCALE:
        raise ValueError(f"{path}: coordinateUnits must be 'mm' or 'um', got {units!r}")
    return _UNIT_SCALE[code]


def _roi_center(markup: dict, path: Path) -> np.ndarray:
    """`center`, or for files written without one the single control point (a box ROI's centre)."""
    if "center" in markup:
        return _vector(markup["center"], f"{path}: center")
    points = markup.get("controlPoints") or []
    if len(points) == 1 and isinstance(points[0], dict) and "position" in points[0]:
        return _vector(points[0]["position"], f"{path}: control point position")
    raise ValueError(f"{path}: the ROI has no 'center' (nor one control point giving it)")
