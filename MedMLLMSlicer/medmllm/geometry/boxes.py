"""Boxes in the voxel grid (`IJKBox`) and in the scene (`RoiRAS`, what a Slicer ROI node stores).

An `IJKBox` keeps continuous voxel *edges*, not voxel indices, because model boxes land between
voxel centres; `voxel_range` decides which voxels that covers with one rule (centre inside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from medmllm.geometry.transforms import apply_affine, axis_directions, ras_to_ijk_points
from medmllm.geometry.volume import VolumeError, check_ijk_to_ras

Vec3 = Tuple[float, float, float]
# Columns of an ROI orientation must be orthonormal to this tolerance.
_ORTHONORMAL_TOLERANCE = 1e-6
# Corner signs in a fixed order: x varies fastest, then y, then z.
_CORNER_SIGNS = np.array([[x, y, z] for z in (-1, 1) for y in (-1, 1) for x in (-1, 1)], dtype=np.float64)


def _vec3(values: Any, what: str) -> Vec3:
    a = np.asarray(values, dtype=np.float64)
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise VolumeError(f"{what} must be 3 finite numbers; got {values!r}")
    return (float(a[0]), float(a[1]), float(a[2]))


def _grid_matrix(grid: Any) -> np.ndarray:
    """The checked IJK->RAS of a `Volume` or of a 4x4 matrix (docs name both)."""
    return check_ijk_to_ras(getattr(grid, "ijk_to_ras", grid))


def _bounds_to_box(points_ijk: np.ndarray) -> IJKBox:
    return IJKBox(tuple(points_ijk.min(axis=0)), tuple(points_ijk.max(axis=0)))


@dataclass(frozen=True)
class IJKBox:
    """Continuous IJK edges ordered (i, j, k): voxels i0..i1 inclusive are lo=i0-0.5, hi=i1+0.5."""

    lo: Vec3
    hi: Vec3

    def __post_init__(self) -> None:
        lo, hi = _vec3(self.lo, "IJKBox.lo"), _vec3(self.hi, "IJKBox.hi")
        if any(a > b for a, b in zip(lo, hi)):
            raise VolumeError(f"IJKBox needs lo <= hi on every axis; got lo={lo}, hi={hi}")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    @classmethod
    def from_voxels(cls, i0: int, j0: int, k0: int, i1: int, j1: int, k1: int) -> IJKBox:
        """The box covering voxels i0..i1, j0..j1, k0..k1 (inclusive)."""
        lo, hi = (i0, j0, k0), (i1, j1, k1)
        if any(a > b for a, b in zip(lo, hi)):
            raise VolumeError(f"voxel range needs first <= last; got {lo} .. {hi}")
        return cls(tuple(a - 0.5 for a in lo), tuple(b + 0.5 for b in hi))

    @property
    def center(self) -> Vec3:
        return _vec3([(a + b) / 2 for a, b in zip(self.lo, self.hi)], "centre")

    def voxel_range(self) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
        """Inclusive ((i0, j0, k0), (i1, j1, k1)) of the voxels whose centre lies in [lo, hi).

        Half-open like nearest-neighbour resampling, so a model's box and its mask agree on a
        centre that falls exactly on the upper edge. An axis too thin to hold a voxel centre keeps
        the one voxel nearest the box middle, so a thin model box never vanishes.
        """
        first, last = [], []
        for lo, hi in zip(self.lo, self.hi):
            a, b = math.ceil(lo), math.ceil(hi) - 1
            if a > b:
                a = b = math.floor((lo + hi) / 2 + 0.5)
            first.append(a)
            last.append(b)
        return (first[0], first[1], first[2]), (last[0], last[1], last[2])

    def voxel_slices(self, shape: Optional[Sequence[int]] = None) -> Tuple[slice, slice, slice]:
        """numpy index [k0:k1+1, j0:j1+1, i0:i1+1]; raises rather than let numpy wrap or truncate."""
        (i0, j0, k0), (i1, j1, k1) = self.voxel_range()
        if min(i0, j0, k0) < 0:
            raise VolumeError(f"box starts outside the volume (voxel {(i0, j0, k0)}); clamp it first")
        if shape is not None and (k1 >= shape[0] or j1 >= shape[1] or i1 >= shape[2]):
            raise VolumeError(
                f"box ends outside the volume (voxel {(i1, j1, k1)}, shape {tuple(shape)}); clamp it first"
            )
        return slice(k0, k1 + 1), slice(j0, j1 + 1), slice(i0, i1 + 1)

    def clamp(self, shape: Sequence[int]) -> Tuple[IJKBox, Optional[str]]:
        """Clip to a volume of numpy shape (k, j, i); returns (box, warning or None).

        A box entirely outside raises VolumeError: there is nothing left to show.
        """
        limits = (shape[2] - 0.5, shape[1] - 0.5, shape[0] - 0.5)
        lo = tuple(min(max(a, -0.5), top) for a, top in zip(self.lo, limits))
        hi = tuple(min(max(b, -0.5), top) for b, top in zip(self.hi, limits))
        missed = any(b < -0.5 or a > top for a, b, top in zip(self.lo, self.hi, limits))
        flattened = any(a == b and a0 < b0 for a, b, a0, b0 in zip(lo, hi, self.lo, self.hi))
        if missed or flattened:
            raise VolumeError(f"box lo={self.lo}, hi={self.hi} is outside the volume of shape {tuple(shape)}")
        if lo == self.lo and hi == self.hi:
            return self, None
        return IJKBox(lo, hi), f"box clipped to the volume: lo {self.lo} -> {lo}, hi {self.hi} -> {hi}"

    def to_ras_corners(self, ijk_to_ras: Any) -> np.ndarray:
        """(8, 3) RAS corners of the box (edges, not voxel centres); takes a matrix or a Volume."""
        lo, hi = np.array(self.lo), np.array(self.hi)
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        return apply_affine(_grid_matrix(ijk_to_ras), mid + _CORNER_SIGNS * half)

    def to_roi(self, ijk_to_ras: Any) -> RoiRAS:
        """The ROI along the volume axes (oblique and flipped grids included), size positive;
        takes the grid's IJK->RAS matrix or the `Volume` itself.

        A left-handed grid gets its third ROI axis negated: Slicer wants a rotation, and the box is
        symmetric, so the region is the same. A sheared grid (non-orthogonal axes) cannot be an
        ROI exactly: it gets the nearest rotation and the box bounding the sheared corners.
        """
        m = _grid_matrix(ijk_to_ras)
        axes = axis_directions(m)
        if np.linalg.det(axes) < 0:
            axes[:, 2] = -axes[:, 2]
        if not np.allclose(axes.T @ axes, np.eye(3), rtol=0, atol=_ORTHONORMAL_TOLERANCE):
            u, _, vt = np.linalg.svd(axes)
            axes = u @ vt
        center = apply_affine(m, np.array(self.center))
        along = (self.to_ras_corners(m) - center) @ axes
        return RoiRAS(center, along.max(axis=0) - along.min(axis=0), axes)


@dataclass(frozen=True, eq=False)
class RoiRAS:
    """An oriented box in RAS mm: centre, full side lengths, and axes whose COLUMNS are the unit
    RAS directions of the ROI's x, y, z (Slicer's ROI node; markups JSON `orientation` row-major)."""

    center: np.ndarray
    size: np.ndarray
    axes: np.ndarray

    def __post_init__(self) -> None:
        center = np.array(_vec3(self.center, "ROI centre"))
        size = np.array(_vec3(self.size, "ROI size"))
        if np.any(size < 0):
            raise VolumeError(f"ROI size must not be negative; got {size.tolist()}")
        axes = np.array(self.axes, dtype=np.float64)
        if axes.shape != (3, 3) or not np.all(np.isfinite(axes)):
            raise VolumeError(f"ROI axes must be a finite 3x3 matrix; got {self.axes!r}")
        if not np.allclose(axes.T @ axes, np.eye(3), rtol=0, atol=_ORTHONORMAL_TOLERANCE):
            raise VolumeError("ROI axes must be orthonormal columns (a rotation matrix)")
        for name, value in (("center", center), ("size", size), ("axes", axes)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    @classmethod
    def from_bounds(cls, ras_min: Any, ras_max: Any) -> RoiRAS:
        """Axis-aligned ROI (identity axes) between two RAS corners."""
        lo, hi = np.array(_vec3(ras_min, "ras_min")), np.array(_vec3(ras_max, "ras_max"))
        if np.any(lo > hi):
            raise VolumeError(f"need ras_min <= ras_max on every axis; got {lo.tolist()} and {hi.tolist()}")
        return cls((lo + hi) / 2, hi - lo, np.eye(3))

    def corners(self) -> np.ndarray:
        """(8, 3) RAS corners."""
        return self.center + (_CORNER_SIGNS * (self.size / 2)) @ self.axes.T

    def to_ijk_box(self, ijk_to_ras: Any) -> IJKBox:
        """IJK bounding box of the 8 corners: the exact inverse of `IJKBox.to_roi` on that grid.

        Takes the grid's IJK->RAS matrix or the `Volume` itself.
        """
        return _bounds_to_box(ras_to_ijk_points(_grid_matrix(ijk_to_ras), self.corners()))
