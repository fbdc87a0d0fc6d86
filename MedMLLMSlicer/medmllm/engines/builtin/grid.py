"""Array plumbing shared by the tools: a coarse working grid mapped back exactly, components, axes.

Connectivity decisions (largest component, hole filling) are made on a strided coarse grid, where
they are cheap; the voxel-exact boundary is then re-decided on the full grid by the tool's own
threshold inside a thin band around the coarse boundary. So a 512x512x300 CT costs seconds, and
the mask still follows the full-resolution intensities.
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import numpy as np

Factors = Tuple[int, int, int]

# Volumes at or under this many voxels are analysed at full resolution (phantoms, small scans).
FULL_RES_MAX_VOXELS = 3_000_000
# Coarse voxel edge aimed for on big volumes; 2.5 mm keeps a 15 mm trachea ~6 voxels wide and
# a 512x512x300 CT at 0.7 mm near 2.5 M coarse voxels (seconds on two cores).
COARSE_TARGET_MM = 2.5


def coarse_factors(shape: Sequence[int], spacing_kji: Sequence[float]) -> Factors:
    """Stride per array axis ([k, j, i]) for the working grid; (1, 1, 1) for small volumes."""
    if int(np.prod(shape)) <= FULL_RES_MAX_VOXELS:
        return (1, 1, 1)
    f = [max(1, round(COARSE_TARGET_MM / max(s, 1e-6))) for s in spacing_kji]
    return (f[0], f[1], f[2])


def ball(radius_mm: float, spacing_kji: Sequence[float]) -> np.ndarray:
    """Boolean ellipsoidal structuring element of a physical radius on an anisotropic grid."""
    r = [max(1, int(radius_mm // s)) for s in spacing_kji]
    k, j, i = np.ogrid[-r[0] : r[0] + 1, -r[1] : r[1] + 1, -r[2] : r[2] + 1]
    d2 = (k * spacing_kji[0]) ** 2 + (j * spacing_kji[1]) ** 2 + (i * spacing_kji[2]) ** 2
    return d2 <= max(radius_mm, max(spacing_kji)) ** 2


def components(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """26-connected labels and the voxel count of each label (index 0: background)."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    return labels, np.bincount(labels.ravel())


def downsample(array: np.ndarray, f: Factors) -> np.ndarray:
    return array[:: f[0], :: f[1], :: f[2]]


def upsample(coarse: np.ndarray, f: Factors, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour inverse of `downsample`: full voxel v takes coarse voxel v // f.

    Repeats the fastest-varying axis first: each step then copies longer contiguous runs (six
    times faster than starting with the slice axis on a 512x512x300 grid)."""
    out = coarse
    for axis in (2, 1, 0):
        if f[axis] > 1:
            out = np.repeat(out, f[axis], axis=axis)
    return out[: shape[0], : shape[1], : shape[2]]


def refine(
    coarse: np.ndarray, f: Factors, hu: np.ndarray, keep: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Full-resolution mask: coarse interior kept, boundary band re-decided voxel by voxel by
    `keep(hu)` (the tool's own threshold). Only the mask's bounding box is touched at full size."""
    if f == (1, 1, 1):
        return coarse
    from scipy import ndimage

    out = np.zeros(hu.shape, dtype=bool)
    outer = ndimage.binary_dilation(coarse)
    boxes = ndimage.find_objects(outer.view(np.uint8))
    if not boxes:
        return out
    box = boxes[0]
    inner = ndimage.binary_erosion(coarse)[box]
    code = inner.view(np.uint8) * np.uint8(2) + (outer[box] & ~inner).view(np.uint8)
    full_box = tuple(slice(b.start * n, min(b.stop * n, size)) for b, n, size in zip(box, f, hu.shape))
    code_full = upsample(code, f, [s.stop - s.start for s in full_box])
    out[full_box] = (code_full == 2) | ((code_full == 1) & keep(hu[full_box]))
    return out


def largest_components(mask: np.ndarray, count: int = 1) -> list:
    """The `count` largest 26-connected components, biggest first, as boolean arrays."""
    labels, sizes = components(mask)
    order = np.argsort(sizes[1:])[::-1][:count]
    return [labels == (i + 1) for i in order]


def fill_holes_every_orientation(mask: np.ndarray) -> np.ndarray:
    """Union of 2D hole filling across all three slice directions: a shell with a gap in one
    direction (a vertebral body's vein foramen) is usually closed in another."""
    return fill_holes_per_slice(mask, 0) | fill_holes_per_slice(mask, 1) | fill_holes_per_slice(mask, 2)


def fill_holes_per_slice(mask: np.ndarray, axis: int) -> np.ndarray:
    """2D hole filling slice by slice: closes lungs and bowel inside the body outline even when
    the airway opens the 3D cavity at the top of the scan."""
    from scipy import ndimage

    out = np.empty_like(mask)
    src = np.moveaxis(mask, axis, 0)
    dst = np.moveaxis(out, axis, 0)
    for n in range(src.shape[0]):
        dst[n] = ndimage.binary_fill_holes(src[n])
    return out


def axial_axis(ijk_to_ras: np.ndarray) -> int:
    """Array axis ([k, j, i] order) closest to superior-inferior: the axis slices are taken across."""
    from medmllm.geometry.transforms import nearest_axis

    return 2 - nearest_axis(ijk_to_ras, (0.0, 0.0, 1.0))
