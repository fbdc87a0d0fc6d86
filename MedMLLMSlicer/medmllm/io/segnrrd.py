"""`.seg.nrrd` files as 3D Slicer writes and reads them.

Slicer opens these directly as a Segmentation node: one segment per mask, names, colours and
terminology kept. The layout follows Slicer's segmentation storage node: an LPS NRRD holding one
labelmap *layer* per image component (non-overlapping segments share a layer), and per-segment
metadata in `Segment{N}_*` key/value fields. Masks are indexed `[k, j, i]` and the geometry is a 4x4
IJK->RAS matrix, as everywhere in `medmllm`.

pynrrd handles the standard fields and the voxel data. The key/value fields are encoded here as
UTF-8 (pynrrd writes ASCII only and drops other bytes on reading), so segment names in any script
survive a round trip through Slicer.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import unicodedata
import uuid
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import nrrd
import numpy as np

PathLike = Union[str, "os.PathLike[str]"]
Color = Tuple[float, float, float]

SOURCE_REPRESENTATION = "Binary labelmap"
# Plain labelmaps with more distinct values than this are almost surely intensity images.
MAX_PLAIN_LABELS = 1000
# Colours for plain labelmaps, which carry no colour of their own.
_PLAIN_PALETTE: Tuple[Color, ...] = (
    (0.90, 0.30, 0.25),
    (0.25, 0.65, 0.30),
    (0.25, 0.45, 0.85),
    (0.95, 0.75, 0.20),
    (0.60, 0.35, 0.75),
    (0.20, 0.75, 0.80),
    (0.95, 0.50, 0.65),
    (0.55, 0.55, 0.55),
)
_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
# Sign flips that take each supported NRRD world space to RAS.
_SPACE_TO_RAS = {
    "left-posterior-superior": np.diag([-1.0, -1.0, 1.0, 1.0]),
    "right-anterior-superior": np.eye(4),
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0, 1.0]),
}
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")
_UNESCAPE = re.compile(r"\\([\\n])")


@dataclass(eq=False)
class Segment:
    """One segment: a boolean mask on the reference grid plus what Slicer shows for it.

    Compared by identity (`eq=False`): field-wise equality is ambiguous for numpy masks.

    `mask` is indexed `[k, j, i]`. `color` is (r, g, b) in 0..1. `label_value` is the voxel value in
    the segment's layer (chosen automatically when None). `terminology` is a Slicer TerminologyEntry
    string (`context~category~type~typeModifier~anatomicContext~region~regionModifier`, codes written
    `scheme^value^meaning`). `segment_id` is generated (DICOM UID form, as Slicer does) when None.
    """

    name: str
    mask: np.ndarray
    color: Color
    label_value: Optional[int] = None
    terminology: Optional[str] = None
    segment_id: Optional[str] = None


def write_seg_nrrd(
    path: PathLike,
    segments: Sequence[Segment],
    ijk_to_ras: np.ndarray,
    shape: Optional[Sequence[int]] = None,
) -> Path:
    """Write `segments` (masks on the grid `ijk_to_ras`) as a Slicer `.seg.nrrd`; return the path.

    `shape` is the reference volume's `[k, j, i]` shape; every mask must match it. The whole
    reference grid is stored (Slicer's default), so the file lines up with its volume voxel for
    voxel. Raises ValueError for inconsistent input.
    """
    matrix = _checked_matrix(ijk_to_ras)
    grid = _checked_shape(segments, shape)
    names = [_header_text(s.name, f"segment {n} name") for n, s in enumerate(segments)]
    colors = [_checked_color(s.color, names[n]) for n, s in enumerate(segments)]
    terms = [_checked_terminology(s.terminology, names[n]) for n, s in enumerate(segments)]
    ids = _unique_ids(segments)
    boxes = [_bounding_box(s.mask) for s in segments]
    layers, labels = _assign_layers(segments, boxes)
    voxels = _layer_voxels(segments, boxes, layers, labels, grid)

    fields = _segmentation_fields(matrix, grid)
    for n in range(len(segments)):
        fields.update(
            _segment_fields(n, ids[n], names[n], colors[n], labels[n], layers[n], boxes[n], terms[n])
        )
    _write_nrrd(Path(path), voxels, matrix, fields)
    return Path(path)


def read_seg_nrrd(path: PathLike) -> Tuple[List[Segment], np.ndarray]:
    """Read a `.seg.nrrd` (ours or Slicer's, one or several layers) or a plain labelmap NRRD.

    Returns the segments (masks `[k, j, i]` on the stored grid) and that grid's 4x4 IJK->RAS matrix.
    A plain labelmap gives one segment per non-zero value, named `Segment_<value>` as Slicer does.
    Raises ValueError when the file is not a readable segmentation.
    """
    header, voxels, fields = _read_nrrd(Path(path))
    spatial = voxels.shape[:3]
    ijk_to_ras = _header_matrix(header, voxels.ndim, Path(path))
    if "Segment0_ID" not in fields:
        return _plain_labelmap_segments(voxels, Path(path)), ijk_to_ras
    layer_data = voxels[..., None] if voxels.ndim == 3 else voxels
    segments_meta = _segments_metadata(fields, layer_data.shape[-1], Path(path))
    crops = _layer_crops(segments_meta, layer_data.shape[-1], spatial)
    segments = []
    for meta in segments_meta:
        mask = np.zeros(spatial, dtype=bool)
        crop = crops[meta.layer]
        mask[crop] = layer_data[..., meta.layer][crop] == meta.label_value
        segments.append(
            Segment(meta.name, mask, meta.color, meta.label_value, meta.terminology, meta.segment_id)
        )
    return segments, ijk_to_ras


# ---------------------------------------------------------------- writing: input checks


def _checked_matrix(ijk_to_ras: np.ndarray) -> np.ndarray:
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"ijk_to_ras must be a 4x4 matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("ijk_to_ras contains NaN or infinite values")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"ijk_to_ras last row must be [0, 0, 0, 1], got {matrix[3].tolist()}")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ValueError("ijk_to_ras is singular: the voxel axes do not span 3D space")
    return matrix


def _checked_shape(segments: Sequence[Segment], shape: Optional[Sequence[int]]) -> Tuple[int, int, int]:
    if len(segments) == 0:
        raise ValueError("no segments to write: a segmentation file needs at least one segment")
    grid = tuple(int(v) for v in shape) if shape is not None else None
    for n, segment in enumerate(segments):
        if not isinstance(segment, Segment):
            raise ValueError(f"segment {n} is a {type(segment).__name__}, expected Segment")
        mask = segment.mask
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            kind = mask.dtype if isinstance(mask, np.ndarray) else type(mask).__name__
            raise ValueError(f"segment {segment.name!r}: mask must be a bool numpy array, got {kind}")
        if grid is None:
            grid = mask.shape
        if mask.shape != grid:
            raise ValueError(
                f"segment {segment.name!r}: mask shape {mask.shape} does not match the reference "
                f"grid {grid} ([k, j, i])"
            )
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"masks must be 3-D [k, j, i] with every size >= 1, got shape {grid}")
    return grid  # type: ignore[return-value]


def _header_text(value: object, what: str) -> str:
    """Return `value` fit for one header line: control and line-break characters become spaces."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    cleaned = "".join(
        " " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c
        for c in unicodedata.normalize("NFC", value)
    )
    if cleaned != unicodedata.normalize("NFC", value):
        warnings.warn(f"{what} {value!r}: line breaks/control characters replaced by spaces", stacklevel=3)
    return cleaned


def _checked_color(color: object, name: str) -> Color:
    try:
        rgb = tuple(float(c) for c in color)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"segment {name!r}: color must be three numbers, got {color!r}") from None
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise ValueError(f"segment {name!r}: color must be (r, g, b) with each in 0..1, got {color!r}")
    return rgb  # type: ignore[return-value]


def _checked_terminology(terminology: Optional[str], name: str) -> Optional[str]:
    """Check a TerminologyEntry string; `|` and `:` would break the Tags field, so they are replaced."""
    if terminology is None:
        return None
    text = _header_text(terminology, f"segment {name!r} terminology")
    if len(text.split("~")) < 7:
        raise ValueError(
            f"segment {name!r}: terminology must be a Slicer TerminologyEntry string with 7 '~'-separated "
            f"parts (context~category~type~typeModifier~anatomicContext~region~regionModifier), got {text!r}"
        )
    safe = text.replace("|", "/").replace(":", "-")
    if safe != text:
        warnings.warn(
            f"segment {name!r}: '|' and ':' in terminology replaced (they break Slicer tags)", stacklevel=3
        )
    return safe


def _unique_ids(segments: Sequence[Segment]) -> List[str]:
    """Segment IDs as Slicer makes them: a DICOM UID when none is given, `_1`, `_2`... on repeats."""
    ids: List[str] = []
    for segment in segments:
        if segment.segment_id is None:
            base = f"2.25.{uuid.uuid4().int}"
        else:
            base = _SAFE_ID.sub("_", _header_text(segment.segment_id, "segment ID"))
            if base != segment.segment_id:
                warnings.warn(f"segment ID {segment.segment_id!r} made safe as {base!r}", stacklevel=3)
        candidate, suffix = base, 0
        while candidate in ids:
            suffix += 1
            candidate = f"{base}_{suffix}"
        ids.append(candidate)
    return ids


# ---------------------------------------------------------------- writing: layers and voxels


def _bounding_box(mask: np.ndarray) -> Optional[Tuple[slice, slice, slice]]:
    """The mask's tight `[k, j, i]` box as slices, or None when the mask is empty."""
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        bounds.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(bounds)  # type: ignore[return-value]


def _assign_layers(
    segments: Sequence[Segment], boxes: Sequence[Optional[Tuple[slice, slice, slice]]]
) -> Tuple[List[int], List[int]]:
    """First-fit layers (a segment joins the first layer it does not overlap), then label values.

    Given label values are kept, so a segment also moves on when its value is taken in a layer.
    Automatic values are the smallest free positive integers of the layer, in segment order.
    """
    unions: List[np.ndarray] = []
    taken: List[set] = []
    layers: List[int] = []
    for segment, box in zip(segments, boxes):
        wanted = _checked_label(segment)
        layer = 0
        while layer < len(unions):
            clash = box is not None and bool(np.any(unions[layer][box] & segment.mask[box]))
            if not clash and wanted not in taken[layer]:
                break
            layer += 1
        if layer == len(unions):
            unions.append(np.zeros(segment.mask.shape, dtype=bool))
            taken.append(set())
        if box is not None:
            unions[layer][box] |= segment.mask[box]
        if wanted is not None:
            taken[layer].add(wanted)
        layers.append(layer)
    labels: List[int] = []
    for segment, layer in zip(segments, layers):
        value = segment.label_value
        if value is None:
            value = 1
            while value in taken[layer]:
                value += 1
            taken[layer].add(value)
        labels.append(int(value))
    return layers, labels


def _checked_label(segment: Segment) -> Optional[int]:
    value = segment.label_value
    if value is None:
        return None
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or not 1 <= value <= 65535
    ):
        raise ValueError(
            f"segment {segment.name!r}: label_value must be an integer in 1..65535, got {value!r}"
        )
    return int(value)


def _layer_voxels(
    segments: Sequence[Segment],
    boxes: Sequence[Optional[Tuple[slice, slice, slice]]],
    layers: Sequence[int],
    labels: Sequence[int],
    grid: Tuple[int, int, int],
) -> np.ndarray:
    """Voxel array `[k, j, i]` (one layer) or `[k, j, i, layer]`, in the smallest type that fits."""
    dtype = np.uint8 if max(labels) <= 255 else np.uint16
    count = max(layers) + 1
    voxels = np.zeros((*grid, count), dtype=dtype)
    for segment, box, layer, label in zip(segments, boxes, layers, labels):
        if box is not None:
            voxels[(*box, layer)][segment.mask[box]] = label
    return voxels[..., 0] if count == 1 else voxels


# ---------------------------------------------------------------- writing: header fields


def _num(value: float) -> str:
    """A number the way Slicer prints geometry: integers bare, others with full precision."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _segmentation_fields(matrix: np.ndarray, grid: Tuple[int, int, int]) -> Dict[str, str]:
    k, j, i = grid
    geometry = ";".join(_num(v) for v in matrix.ravel()) + f";0;{i - 1};0;{j - 1};0;{k - 1};"
    return {
        "Segmentation_MasterRepresentation": SOURCE_REPRESENTATION,
        "Segmentation_ContainedRepresentationNames": SOURCE_REPRESENTATION + "|",
        "Segmentation_ConversionParameters": (
            f"Reference image geometry|{geometry}|IJK to RAS matrix (16 numbers, row by row) and extent "
            "(i0 i1 j0 j1 k0 k1) of the labelmap grid.&"
        ),
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }


def _segment_fields(
    n: int,
    segment_id: str,
    name: str,
    color: Color,
    label: int,
    layer: int,
    box: Optional[Tuple[slice, slice, slice]],
    terminology: Optional[str],
) -> Dict[str, str]:
    if box is None:
        extent = "0 -1 0 -1 0 -1"
    else:
        kb, jb, ib = box
        extent = f"{ib.start} {ib.stop - 1} {jb.start} {jb.stop - 1} {kb.start} {kb.stop - 1}"
    prefix = f"Segment{n}_"
    return {
        prefix + "ID": segment_id,
        prefix + "Name": name,
        prefix + "Color": " ".join(_num(c) for c in color),
        prefix + "LabelValue": str(label),
        prefix + "Layer": str(layer),
        prefix + "Extent": extent,
        prefix + "Tags": f"TerminologyEntry:{terminology}|" if terminology else "",
        prefix + "NameAutoGenerated": "0",
        prefix + "ColorAutoGenerated": "0",
    }


def _write_nrrd(path: Path, voxels: np.ndarray, matrix: np.ndarray, fields: Dict[str, str]) -> None:
    """pynrrd writes geometry and gzip data; the key/value lines are spliced in as UTF-8."""
    lps = _LPS_FLIP @ matrix
    directions = lps[:3, :3].T
    kinds = ["domain"] * 3
    if voxels.ndim == 4:
        directions = np.vstack([np.full((1, 3), np.nan), directions])
        kinds = ["list", *kinds]
    header = {
        "space": "left-posterior-superior",
        "space directions": directions,
        "space origin": lps[:3, 3],
        "kinds": kinds,
        "encoding": "gzip",
    }
    buffer = io.BytesIO()
    nrrd.write(buffer, voxels, header, index_order="C", compression_level=1)
    content = buffer.getvalue()
    end = content.index(b"\n\n") + 1
    extra = "".join(f"{key}:={_escape(value)}\n" for key, value in fields.items()).encode("utf-8")
    handle, partial = tempfile.mkstemp(prefix=path.name, suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(content[:end] + extra + content[end:])
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise


def _escape(value: str) -> str:
    """NRRD key/value escaping (the format spec: backslash and newline are written `\\\\` and `\\n`)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")


# ---------------------------------------------------------------- reading


def _read_nrrd(path: Path) -> Tuple[Dict[str, object], np.ndarray, Dict[str, str]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not raw:
        raise ValueError(f"{path} is empty, not a NRRD file")
    handle = io.BytesIO(raw)
    try:
        header = nrrd.read_header(handle)
    except (nrrd.NRRDError, StopIteration, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a readable NRRD file: {exc}") from exc
    missing = [key for key in ("type", "dimension", "sizes", "encoding") if key not in header]
    if missing:
        raise ValueError(f"{path} is not a readable NRRD file: header lacks {', '.join(missing)}")
    header_end = handle.tell()
    try:
        voxels = nrrd.read_data(header, handle, filename=str(path), index_order="C")
    except (nrrd.NRRDError, EOFError, OSError, zlib.error, ValueError, KeyError) as exc:
        raise ValueError(f"{path} has truncated or corrupt voxel data: {exc}") from exc
    if voxels.ndim not in (3, 4):
        raise ValueError(f"{path}: expected a 3-D labelmap or 4-D layered segmentation, got {voxels.ndim}-D")
    return header, voxels, _key_values(raw[:header_end])


def _key_values(header: bytes) -> Dict[str, str]:
    """`key:=value` lines, decoded as UTF-8 and unescaped per the NRRD format."""
    fields = {}
    for line in header.decode("utf-8", errors="replace").split("\n")[1:]:
        line = line.rstrip("\r")
        if line.startswith("#") or ":=" not in line:
            continue
        key, value = line.split(":=", 1)
        fields[key] = _UNESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else "\n", value)
    return fields


def _header_matrix(header: Dict[str, object], ndim: int, path: Path) -> np.ndarray:
    """IJK->RAS of the stored grid from `space`, `space directions` and `space origin`.

    A 4-D file must have its layer axis first (fastest), with no space direction, as Slicer writes.
    """
    space = header.get("space")
    if space not in _SPACE_TO_RAS:
        raise ValueError(
            f"{path}: NRRD space {space!r} is not supported (expected one of {sorted(_SPACE_TO_RAS)})"
        )
    if "space directions" not in header:
        raise ValueError(f"{path}: missing 'space directions', cannot place the voxels in patient space")
    directions = np.asarray(header["space directions"], dtype=np.float64)
    if ndim == 4 and directions.shape == (4, 3) and np.all(np.isnan(directions[0])):
        directions = directions[1:]
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
        raise ValueError(
            f"{path}: 'space directions' must give three 3-D axis vectors, after the layer axis "
            f"('none') when there is one; got {header['space directions']!r}"
        )
    matrix = np.eye(4)
    matrix[:3, :3] = directions.T
    matrix[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    return _checked_matrix(_SPACE_TO_RAS[space] @ matrix)


def _plain_labelmap_segments(voxels: np.ndarray, path: Path) -> List[Segment]:
    if voxels.ndim != 3:
        raise ValueError(f"{path}: a 4-D NRRD without Segment0_ID metadata is not a labelmap")
    values = np.unique(voxels)
    values = values[values != 0]
    if values.size > MAX_PLAIN_LABELS:
        raise ValueError(
            f"{path}: {values.size} distinct values; this looks like an intensity image, not a labelmap"
        )
    if not np.all(np.equal(np.mod(values, 1), 0)):
        raise ValueError(f"{path}: non-integer voxel values; a labelmap must hold integer labels")
    segments = []
    for n, value in enumerate(values):
        label = int(value)
        segments.append(
            Segment(
                name=f"Segment_{label}",
                mask=voxels == value,
                color=_PLAIN_PALETTE[n % len(_PLAIN_PALETTE)],
                label_value=label,
                segment_id=f"Segment_{label}",
            )
        )
    return segments


@dataclass
class _SegmentMeta:
    """What the header says about one segment; `extent` is (i0, i1, j0, j1, k0, k1) or None."""

    segment_id: str
    name: str
    color: Color
    label_value: int
    layer: int
    extent: Optional[Tuple[int, ...]]
    terminology: Optional[str]


def _segments_metadata(fields: Dict[str, str], layer_count: int, path: Path) -> List[_SegmentMeta]:
    """Per-segment metadata, counted like Slicer: `Segment0_ID`, `Segment1_ID`... until one is missing."""
    metas = []
    n = 0
    while f"Segment{n}_ID" in fields:
        prefix = f"Segment{n}_"
        segment_id = fields[prefix + "ID"]
        layer = _int_field(fields, prefix + "Layer", n, path)
        if not 0 <= layer < layer_count:
            raise ValueError(f"{path}: {prefix}Layer is {layer} but the file has {layer_count} layer(s)")
        extent = fields.get(prefix + "Extent")
        metas.append(
            _SegmentMeta(
                segment_id=segment_id,
                name=fields.get(prefix + "Name") or segment_id,
                color=_color_field(fields.get(prefix + "Color", "")),
                label_value=_int_field(fields, prefix + "LabelValue", 1, path),
                layer=layer,
                extent=_extent_field(extent, prefix, path) if extent else None,
                terminology=_tags(fields.get(prefix + "Tags", "")).get("TerminologyEntry"),
            )
        )
        n += 1
    return metas


def _int_field(fields: Dict[str, str], key: str, default: int, path: Path) -> int:
    text = fields.get(key, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: {key} must be an integer, got {text!r}") from None


def _color_field(text: str) -> Color:
    """Slicer reads missing or unreadable colour numbers as 0.5."""
    parts = text.split()
    rgb = []
    for index in range(3):
        try:
            rgb.append(min(max(float(parts[index]), 0.0), 1.0))
        except (IndexError, ValueError):
            rgb.append(0.5)
    return tuple(rgb)  # type: ignore[return-value]


def _extent_field(text: str, prefix: str, path: Path) -> Tuple[int, ...]:
    try:
        extent = tuple(int(v) for v in text.split())
    except ValueError:
        extent = ()
    if len(extent) != 6:
        raise ValueError(f"{path}: {prefix}Extent must be six integers i0 i1 j0 j1 k0 k1, got {text!r}")
    return extent


def _tags(text: str) -> Dict[str, str]:
    tags = {}
    for item in text.split("|"):
        if ":" in item:
            key, value = item.split(":", 1)
            tags[key] = value
    return tags


def _layer_crops(metas: Sequence[_SegmentMeta], layer_count: int, spatial: Tuple[int, ...]) -> List[tuple]:
    """Each layer is cut to the union of its segments' extents, as Slicer does on loading.

    A layer with a segment that has no Extent key keeps the whole grid.
    """
    crops: List[tuple] = []
    for layer in range(layer_count):
        extents = [m.extent for m in metas if m.layer == layer]
        if not extents or any(e is None for e in extents):
            crops.append(tuple(slice(0, size) for size in spatial))
            continue
        boxes = [e for e in extents if e[0] <= e[1] and e[2] <= e[3] and e[4] <= e[5]]
        if not boxes:
            crops.append((slice(0, 0),) * 3)
            continue
        lo = [min(b[axis] for b in boxes) for axis in (4, 2, 0)]
        hi = [max(b[axis] for b in boxes) for axis in (5, 3, 1)]
        crops.append(tuple(slice(max(a, 0), min(b + 1, size)) for a, b, size in zip(lo, hi, spatial)))
    return crops
