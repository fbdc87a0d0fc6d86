"""The volume upload format, shared by the Slicer client and the server (stdlib + numpy only).

Layout: one line of compact JSON (`{"magic":"medmllm-volume/1","dtype":"<i2","shape":[k,j,i],
"ijk_to_ras":[[...] x4]}`) and a newline, then the voxels as raw C-order little-endian bytes.
The volume's identity is the sha256 of exactly these bytes, so client and server agree on it
without the server having to re-encode anything.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, List, Tuple, Union

import numpy as np

MAGIC = "medmllm-volume/1"
MAX_HEADER_BYTES = 4096
# What an upload may carry; anything else (object, complex, strings) is refused.
_UPLOAD_TYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")
ALLOWED_DTYPES = frozenset(
    np.dtype(t).newbyteorder("<").str for t in (*_UPLOAD_TYPES, "float16", "float32", "float64")
)
_HEADER_PREFIX = b'{"magic":'


class WireError(ValueError):
    """An upload body that cannot be decoded; the message says why."""


def _little_endian(voxels: np.ndarray) -> np.ndarray:
    """C-contiguous little-endian view (a copy only when the input is neither)."""
    return np.ascontiguousarray(voxels, dtype=voxels.dtype.newbyteorder("<"))


def _matrix_rows(ijk_to_ras: Any) -> List[List[float]]:
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise WireError(f"ijk_to_ras must be a finite 4x4 matrix; got shape {m.shape}")
    # + 0.0 turns -0.0 into 0.0 so the same geometry always hashes the same.
    return [[float(x) + 0.0 for x in row] for row in m]


def _header(voxels: np.ndarray, ijk_to_ras: Any) -> bytes:
    if voxels.ndim != 3:
        raise WireError(f"expected a 3-D array [k, j, i]; got shape {voxels.shape}")
    dtype = voxels.dtype.str
    if dtype not in ALLOWED_DTYPES:
        raise WireError(f"voxel dtype {voxels.dtype} cannot be uploaded; use an integer or float type")
    matrix = _matrix_rows(ijk_to_ras)
    fields = {"magic": MAGIC, "dtype": dtype, "shape": list(voxels.shape), "ijk_to_ras": matrix}
    return json.dumps(fields, separators=(",", ":")).encode("ascii") + b"\n"


def _parts(volume: Any) -> Tuple[np.ndarray, Any]:
    if isinstance(volume, tuple) and len(volume) == 2:
        voxels, matrix = volume
    elif hasattr(volume, "voxels") and hasattr(volume, "ijk_to_ras"):
        voxels, matrix = volume.voxels, volume.ijk_to_ras
    else:
        raise WireError("expected a Volume or a (voxels, ijk_to_ras) tuple")
    return _little_endian(np.asarray(voxels)), matrix


def encode_volume_parts(volume: Union[Any, Tuple[np.ndarray, Any]]) -> Tuple[bytes, memoryview]:
    """(header line, voxel bytes as a view): the upload body without copying the array."""
    voxels, matrix = _parts(volume)
    return _header(voxels, matrix), memoryview(voxels.reshape(-1).view(np.uint8))


def encode_volume(volume: Union[Any, Tuple[np.ndarray, Any]]) -> bytes:
    """Header line + raw voxel bytes, for a `Volume` or a `(voxels [k, j, i], ijk_to_ras)` tuple."""
    header, payload = encode_volume_parts(volume)
    return header + payload.tobytes()


def volume_sha256(voxels: np.ndarray, ijk_to_ras: Any) -> str:
    """sha256 hex of `encode_volume((voxels, ijk_to_ras))`, hashing the array in place (no copy)."""
    header, payload = encode_volume_parts((voxels, ijk_to_ras))
    digest = hashlib.sha256(header)
    digest.update(payload)
    return digest.hexdigest()


def _read_header(data: memoryview) -> Tuple[dict, int]:
    if bytes(data[: len(_HEADER_PREFIX)]) != _HEADER_PREFIX:
        raise WireError("not a medmllm volume upload (bad magic)")
    end = bytes(data[:MAX_HEADER_BYTES]).find(b"\n")
    if end < 0:
        raise WireError(f"upload header too long (no end of header in the first {MAX_HEADER_BYTES} bytes)")
    try:
        header = json.loads(bytes(data[:end]).decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"upload header is not valid JSON: {exc}") from None
    magic = header.get("magic") if isinstance(header, dict) else None
    if magic != MAGIC:
        raise WireError(f"not a medmllm volume upload (bad magic {magic!r}, want {MAGIC!r})")
    return header, end + 1


def _header_geometry(header: dict) -> Tuple[np.dtype, Tuple[int, int, int], np.ndarray]:
    if not isinstance(header.get("dtype"), str) or header["dtype"] not in ALLOWED_DTYPES:
        raise WireError(f"upload dtype {header.get('dtype')!r} is not one of {sorted(ALLOWED_DTYPES)}")
    shape = header.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise WireError(f"upload shape must be 3 positive integers [k, j, i]; got {shape!r}")
    try:
        matrix = np.array(header.get("ijk_to_ras"), dtype=np.float64)
    except (TypeError, ValueError):
        raise WireError("upload ijk_to_ras must be a 4x4 array of numbers") from None
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise WireError(f"upload ijk_to_ras must be a finite 4x4 matrix; got shape {matrix.shape}")
    return np.dtype(header["dtype"]), (shape[0], shape[1], shape[2]), matrix


def decode_volume(data: Union[bytes, bytearray, memoryview], max_bytes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Parse an upload into (voxels [k, j, i], ijk_to_ras 4x4) without copying the voxels.

    The voxel array is a read-only view on `data`. Raises WireError for bad magic, a header that
    is too long or malformed, a body shorter or longer than shape x dtype, or more than `max_bytes`.
    """
    view = memoryview(data).cast("B")
    if view.nbytes > max_bytes:
        raise WireError(f"upload of {view.nbytes} bytes exceeds the limit of {max_bytes} bytes")
    header, offset = _read_header(view)
    dtype, shape, matrix = _header_geometry(header)
    expected = shape[0] * shape[1] * shape[2] * dtype.itemsize  # Python ints: no overflow
    if expected > max_bytes:
        raise WireError(f"volume {shape} {dtype} needs {expected} bytes, over the limit of {max_bytes} bytes")
    got = view.nbytes - offset
    if got < expected:
        raise WireError(f"upload truncated: header says {shape} {dtype} = {expected} bytes, body has {got}")
    if got > expected:
        raise WireError(f"shape/dtype mismatch: header says {shape} {dtype} = {expected} bytes, body {got}")
    voxels = np.frombuffer(view, dtype=dtype, count=expected // dtype.itemsize, offset=offset).reshape(shape)
    if not dtype.isnative:
        voxels = voxels.astype(dtype.newbyteorder("="))
    return voxels, matrix
