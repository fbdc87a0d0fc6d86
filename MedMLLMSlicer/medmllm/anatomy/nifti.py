"""Volumes to NIfTI for TotalSegmentator, and its label images back onto the volume's own grid.

TotalSegmentator reads NIfTI (RAS affine) and answers on the grid it was given, but NIfTI headers
keep the affine in float32 and readers reorient (nibabel's closest-canonical), so the answer may
come back as the same voxels with axes permuted or flipped. When the two grids share their voxel
centres, labels are copied index for index (exact: no interpolation, oblique grids included);
only a grid that really differs is resampled, by physical position, nearest label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from medmllm.geometry.volume import Volume

AXIS_TOLERANCE = 1e-3  # |cosine| error allowed for "the same axis" (float32 headers)
OFFSET_TOLERANCE = 1e-2  # voxels: how far a voxel centre may drift and still be "the same voxel"


def write_nifti(volume: Volume, path: Path) -> Path:
    """The volume as a NIfTI file (SimpleITK writes the RAS affine TotalSegmentator reads)."""
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(path), useCompression=True)
    return Path(path)


def labels_on_grid(path: Path, volume: Volume) -> np.ndarray:
    """The label image at `path` on `volume`'s voxel grid ([k, j, i], labels outside it are 0)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path} is not a 3-D label image")
    labels = Volume.from_sitk(image)
    index_map = shared_grid(labels.ijk_to_ras, volume.ijk_to_ras)
    if index_map is not None:
        return copy_labels(labels.voxels, index_map, volume.shape)
    reference = sitk.Image([int(n) for n in volume.shape[::-1]], sitk.sitkUInt8)
    geometry = volume_geometry_only(volume)
    reference.SetSpacing(geometry.GetSpacing())
    reference.SetDirection(geometry.GetDirection())
    reference.SetOrigin(geometry.GetOrigin())
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(resampled)


def volume_geometry_only(volume: Volume):
    """A 1-voxel SimpleITK image carrying the volume's spacing, direction and origin."""
    tiny = Volume(np.zeros((1, 1, 1), np.uint8), volume.ijk_to_ras)
    return tiny.to_sitk()


def shared_grid(source_ijk_to_ras: np.ndarray, target_ijk_to_ras: np.ndarray) -> Optional[np.ndarray]:
    """The 4x4 integer matrix taking target IJK to source IJK when both grids have the same voxel
    centres (a signed permutation plus a whole-voxel shift); None when they do not."""
    mapping = np.linalg.inv(source_ijk_to_ras) @ target_ijk_to_ras
    rounded = np.round(mapping)
    part = rounded[:3, :3]
    is_permutation = (np.abs(part).sum(axis=0) == 1).all() and (np.abs(part).sum(axis=1) == 1).all()
    if not is_permutation:
        return None
    if np.abs(mapping[:3, :3] - part).max() > AXIS_TOLERANCE:
        return None
    if np.abs(mapping[:3, 3] - rounded[:3, 3]).max() > OFFSET_TOLERANCE:
        return None
    return rounded.astype(int)


def copy_labels(source: np.ndarray, index_map: np.ndarray, shape: Tuple[int, int, int]) -> np.ndarray:
    """`source` ([K, J, I]) read at target voxels through `index_map` (target IJK -> source IJK)."""
    source_ijk = source.transpose(2, 1, 0)
    target_ijk_shape = shape[::-1]
    order, indices = [], []
    for axis in range(3):
        row = int(np.flatnonzero(index_map[:3, axis])[0])  # source axis fed by this target axis
        order.append(row)
        indices.append(index_map[row, axis] * np.arange(target_ijk_shape[axis]) + index_map[row, 3])
    moved = source_ijk.transpose(order)
    valid = [(ix >= 0) & (ix < moved.shape[a]) for a, ix in enumerate(indices)]
    clipped = [np.clip(ix, 0, moved.shape[a] - 1) for a, ix in enumerate(indices)]
    out = moved[np.ix_(*clipped)]
    inside = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    out = np.where(inside, out, 0).astype(source.dtype)
    return np.ascontiguousarray(out.transpose(2, 1, 0))
