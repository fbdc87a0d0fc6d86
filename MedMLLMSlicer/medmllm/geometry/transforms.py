"""Point and matrix conversions between IJK, RAS and LPS.

Files store LPS and the scene is RAS; the two differ only by the sign of the first two
coordinates. Every function here is vectorised over (N, 3) point arrays so that callers never
loop over voxels in Python.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

ArrayLike = Union[np.ndarray, Sequence[float], Sequence[Sequence[float]]]

_FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))
# An axis counts as aligned with a patient axis when its other direction cosines are below this.
_ALIGNED_TOLERANCE = 1e-4


def _flip(points_or_matrix: ArrayLike) -> np.ndarray:
    """RAS<->LPS is its own inverse: negate x and y of points, or the first two rows of a 4x4."""
    a = np.asarray(points_or_matrix, dtype=np.float64)
    if a.shape == (4, 4):
        return _FLIP_XY @ a
    if a.ndim in (1, 2) and a.shape[-1] == 3:
        return a * np.array([-1.0, -1.0, 1.0])
    raise ValueError(f"expected a point (3,), points (N, 3) or a 4x4 matrix; got shape {a.shape}")


def ras_to_lps(points_or_matrix: ArrayLike) -> np.ndarray:
    """RAS points (3,) / (N, 3), or a 4x4 matrix whose output is RAS, to LPS."""
    return _flip(points_or_matrix)


def lps_to_ras(points_or_matrix: ArrayLike) -> np.ndarray:
    """LPS points (3,) / (N, 3), or a 4x4 matrix whose output is LPS, to RAS."""
    return _flip(points_or_matrix)


def _as_points(points: ArrayLike) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim not in (1, 2) or p.shape[-1] != 3:
        raise ValueError(f"expected a point (3,) or points (N, 3); got shape {p.shape}")
    return p


def _as_matrix(matrix: ArrayLike) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix; got shape {m.shape}")
    return m


def apply_affine(matrix: ArrayLike, points: ArrayLike) -> np.ndarray:
    """Apply a 4x4 affine to points (3,) or (N, 3); the result has the same shape."""
    m = _as_matrix(matrix)
    return _as_points(points) @ m[:3, :3].T + m[:3, 3]


def ijk_to_ras_points(ijk_to_ras: ArrayLike, ijk: ArrayLike) -> np.ndarray:
    """Continuous IJK points (i, j, k) to RAS mm."""
    return apply_affine(ijk_to_ras, ijk)


def ras_to_ijk_points(ijk_to_ras: ArrayLike, ras: ArrayLike) -> np.ndarray:
    """RAS mm points to continuous IJK (i, j, k); takes the IJK->RAS matrix, inverts it here."""
    return apply_affine(np.linalg.inv(_as_matrix(ijk_to_ras)), ras)


def axis_directions(ijk_to_ras: ArrayLike) -> np.ndarray:
    """3x3 whose columns are the unit RAS directions of the i, j and k axes."""
    m = _as_matrix(ijk_to_ras)[:3, :3]
    return m / np.linalg.norm(m, axis=0)


def orientation_code(ijk_to_ras: ArrayLike) -> str:
    """Three letters naming where i, j and k point *towards* ('LPS' = i to Left, j to Posterior,
    k to Superior: the usual DICOM axial stack), or 'oblique' when an axis is not aligned."""
    directions = axis_directions(ijk_to_ras)
    letters = []
    for column in directions.T:
        dominant = int(np.argmax(np.abs(column)))
        others = np.delete(column, dominant)
        if np.any(np.abs(others) > _ALIGNED_TOLERANCE):
            return "oblique"
        letters.append(_AXIS_LETTERS[dominant][int(column[dominant] > 0)])
    if len(set("".join(letters).translate(str.maketrans("LPI", "RAS")))) != 3:
        return "oblique"
    return "".join(letters)


def nearest_axis(ijk_to_ras: ArrayLike, ras_direction: ArrayLike) -> int:
    """Index (i=0, j=1, k=2) of the volume axis most parallel (either sign) to a RAS direction.

    Used to pick the slice axis for 'axial' (S), 'coronal' (A) and 'sagittal' (R) on any grid,
    oblique or flipped; on an exact 45 degree tie the lower axis index wins.
    """
    d = np.asarray(ras_direction, dtype=np.float64)
    norm = np.linalg.norm(d)
    if d.shape != (3,) or not np.isfinite(norm) or norm == 0:
        raise ValueError(f"expected a non-zero finite RAS direction (3,); got {ras_direction!r}")
    return int(np.argmax(np.abs(axis_directions(ijk_to_ras).T @ (d / norm))))


def voxel_volume_mm3(ijk_to_ras: np.ndarray) -> float:
    """Volume of one voxel: |det| of the 3x3, right for oblique and sheared (gantry-tilt) grids too."""
    return abs(float(np.linalg.det(np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3])))
