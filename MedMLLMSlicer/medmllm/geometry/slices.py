"""2D slice export for image models, keeping the exact pixel -> IJK mapping.

A 2D model sees one 8-bit image; its boxes are fractions of that image. `SliceImage` remembers
which voxel every pixel came from, so a box maps back to an `IJKBox` one slice thick, and a
user's ROI maps forward into the model's own box grammar.

Display follows the radiological convention, whatever the volume's orientation:
axial: anterior at the top, patient right on the image left; coronal: superior at the top,
patient right on the left; sagittal: superior at the top, anterior on the left.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from medmllm.geometry.boxes import IJKBox
from medmllm.geometry.transforms import axis_directions, nearest_axis
from medmllm.geometry.volume import Volume, VolumeError, window_limits

# orientation -> (slice normal, direction of increasing row, direction of increasing column), RAS.
_VIEWS = {
    "axial": ((0.0, 0.0, 1.0), (0.0, -1.0, 0.0), (-1.0, 0.0, 0.0)),
    "coronal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)),
    "sagittal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, -1.0, 0.0)),
}
_AXIS_NAMES = ("i", "j", "k")
CT_SOFT_TISSUE = (40.0, 400.0)
# Percentiles of the default non-CT window, taken from at most this many evenly strided voxels.
_PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLES = 2_000_000

Size = Union[None, int, Tuple[int, int]]


def default_window_limits(volume: Volume) -> Tuple[float, float]:
    """CT (minimum below -500): soft tissue W400/L40; otherwise the 0.5-99.5 percentiles.

    Computed over the whole volume (strided), so every slice of one volume gets the same window.
    """
    voxels = volume.voxels
    lowest, highest = float(voxels.min()), float(voxels.max())
    if lowest < -500:
        return window_limits(CT_SOFT_TISSUE)
    flat = voxels.reshape(-1)
    sample = flat[:: max(1, flat.size // _PERCENTILE_SAMPLES)].astype(np.float64)
    lo, hi = (float(v) for v in np.percentile(sample, _PERCENTILES))
    return (lo, hi) if hi > lo else (lowest, highest)


def _to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


def _in_plane_axes(
    volume: Volume, slice_axis: int, row_dir: np.ndarray, col_dir: np.ndarray
) -> Tuple[int, bool, int, bool]:
    """(row axis, row flipped, col axis, col flipped): the assignment most parallel to the view."""
    directions = axis_directions(volume.ijk_to_ras)
    a, b = (axis for axis in range(3) if axis != slice_axis)
    straight = abs(directions[:, a] @ row_dir) + abs(directions[:, b] @ col_dir)
    swapped = abs(directions[:, b] @ row_dir) + abs(directions[:, a] @ col_dir)
    row_axis, col_axis = (a, b) if straight >= swapped else (b, a)
    row_flip = bool(directions[:, row_axis] @ row_dir < 0)
    col_flip = bool(directions[:, col_axis] @ col_dir < 0)
    return row_axis, row_flip, col_axis, col_flip


@dataclass(frozen=True, eq=False)
class SliceImage:
    """One exported slice: uint8 `pixels[row, col]` and `pixel_to_ijk` (3x3: homogeneous
    (col, row, 1) pixel-centre coordinates -> continuous (i, j, k))."""

    pixels: np.ndarray
    pixel_to_ijk: np.ndarray
    slice_axis: int
    index: int
    orientation: str
    pixel_spacing: Tuple[float, float]

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    def pixels_to_ijk(self, col_row: Sequence[Sequence[float]]) -> np.ndarray:
        """(N, 2) pixel-centre (col, row) to (N, 3) continuous (i, j, k)."""
        p = np.asarray(col_row, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 2:
            raise VolumeError(f"expected pixel points (N, 2) as (col, row); got shape {p.shape}")
        return np.column_stack([p, np.ones(len(p))]) @ self.pixel_to_ijk.T

    def ijk_to_pixels(self, ijk: Sequence[Sequence[float]]) -> np.ndarray:
        """(N, 3) continuous (i, j, k) to (N, 2) pixel-centre (col, row), projected onto the slice."""
        p = np.asarray(ijk, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 3:
            raise VolumeError(f"expected IJK points (N, 3); got shape {p.shape}")
        linear, offset = self.pixel_to_ijk[:, :2], self.pixel_to_ijk[:, 2]
        # The two in-plane rows of the matrix are +-1 on distinct axes: its transpose inverts them.
        return (p - offset) @ linear

    def box_to_ijk(self, fractions: Sequence[float]) -> IJKBox:
        """Image box (x0, y0, x1, y1) as edge fractions of width/height -> IJKBox one slice thick.

        Values must lie in [0, 1]; a corner written after its partner is swapped.
        """
        f = np.asarray(fractions, dtype=np.float64)
        if f.shape != (4,) or not np.all(np.isfinite(f)):
            raise VolumeError(f"a 2D box is 4 finite numbers (x0, y0, x1, y1); got {fractions!r}")
        if np.any(f < 0) or np.any(f > 1):
            raise VolumeError(f"2D box fractions must lie in [0, 1]; got {f.tolist()}")
        scale = np.array([self.width, self.height], dtype=np.float64)
        corners = np.array([f[:2], f[2:]]) * scale - 0.5
        ijk = self.pixels_to_ijk(corners)
        lo, hi = ijk.min(axis=0), ijk.max(axis=0)
        lo[self.slice_axis], hi[self.slice_axis] = self.index - 0.5, self.index + 0.5
        return IJKBox(tuple(lo), tuple(hi))

    def ijk_box_to_fractions(self, box: IJKBox) -> Optional[Tuple[float, float, float, float]]:
        """A box as (x0, y0, x1, y1) edge fractions of this image, clipped to it; None if the box
        does not cover this slice or lies beside the image."""
        first, last = box.voxel_range()
        if not first[self.slice_axis] <= self.index <= last[self.slice_axis]:
            return None
        pixels = self.ijk_to_pixels([box.lo, box.hi])
        lo, hi = pixels.min(axis=0) + 0.5, pixels.max(axis=0) + 0.5
        size = np.array([self.width, self.height], dtype=np.float64)
        if np.any(hi < 0) or np.any(lo > size):
            return None
        lo_f, hi_f = np.clip(lo, 0, size) / size, np.clip(hi, 0, size) / size
        if np.any((lo_f == hi_f) & (lo < hi)):
            return None
        return (float(lo_f[0]), float(lo_f[1]), float(hi_f[0]), float(hi_f[1]))

    def png_size(self, size: Size = None) -> Tuple[int, int]:
        """(width, height) of the PNG `to_png_bytes(size)` writes: native, size x size, or (w, h).

        Box fractions are relative to the image edges, so a plain resize keeps them exact.
        """
        if size is None:
            return self.width, self.height
        w, h = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
        whole = all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in (w, h))
        if not whole or w <= 0 or h <= 0:
            raise VolumeError(f"PNG size must be a positive int or (width, height); got {size!r}")
        return int(w), int(h)

    def to_png_bytes(self, size: Size = None) -> bytes:
        """8-bit grayscale PNG, resized (bicubic, no padding) when `size` is given."""
        from PIL import Image

        image = Image.fromarray(self.pixels)
        target = self.png_size(size)
        if target != (self.width, self.height):
            image = image.resize(target, Image.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


def export_slice(
    volume: Volume,
    orientation: str,
    index: Optional[int] = None,
    window: Optional[Tuple[float, float]] = None,
) -> SliceImage:
    """One slice as a display-oriented uint8 image.

    `orientation` picks the volume axis nearest that view's normal (axial S, coronal A,
    sagittal R), so oblique and flipped grids work; `index` is the IJK index along that axis
    (None = middle); `window` is (centre, width), default `default_window_limits`.
    """
    view = _VIEWS.get(str(orientation).lower())
    if view is None:
        raise VolumeError(f"orientation must be one of {sorted(_VIEWS)}; got {orientation!r}")
    normal, row_dir, col_dir = (np.array(v) for v in view)
    slice_axis = nearest_axis(volume.ijk_to_ras, normal)
    sizes = volume.shape[::-1]
    index = _check_index(index, sizes[slice_axis], orientation, slice_axis)
    row_axis, row_flip, col_axis, col_flip = _in_plane_axes(volume, slice_axis, row_dir, col_dir)
    matrix = np.zeros((3, 3))
    matrix[col_axis, 0], matrix[col_axis, 2] = (-1.0, sizes[col_axis] - 1) if col_flip else (1.0, 0.0)
    matrix[row_axis, 1], matrix[row_axis, 2] = (-1.0, sizes[row_axis] - 1) if row_flip else (1.0, 0.0)
    matrix[slice_axis, 2] = index
    rows, cols = np.mgrid[0 : sizes[row_axis], 0 : sizes[col_axis]]
    i, j, k = (
        np.rint(matrix[a, 0] * cols + matrix[a, 1] * rows + matrix[a, 2]).astype(np.intp) for a in (0, 1, 2)
    )
    lo, hi = window_limits(window) if window is not None else default_window_limits(volume)
    matrix.setflags(write=False)
    spacing = volume.spacing
    return SliceImage(
        pixels=_to_uint8(volume.voxels[k, j, i], lo, hi),
        pixel_to_ijk=matrix,
        slice_axis=slice_axis,
        index=index,
        orientation=str(orientation).lower(),
        pixel_spacing=(spacing[col_axis], spacing[row_axis]),
    )


def _check_index(index: Optional[int], size: int, orientation: str, axis: int) -> int:
    if index is None:
        return size // 2
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise VolumeError(f"slice index must be an integer; got {index!r}")
    if not 0 <= index < size:
        raise VolumeError(
            f"{orientation} slice index {index} is out of range: "
            f"valid 0..{size - 1} along array axis {_AXIS_NAMES[axis]}"
        )
    return int(index)
