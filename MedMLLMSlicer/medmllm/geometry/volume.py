"""`Volume`: a scalar 3-D voxel array plus its IJK->RAS matrix, validated once on creation.

Everything downstream (model grids, slices, boxes, masks) trusts a `Volume`, so every way to build
one (array, file, DICOM folder, upload) goes through the same checks. SimpleITK is imported only
by the file functions, so this module also runs where only numpy is at hand.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

from medmllm.geometry.transforms import lps_to_ras, orientation_code, ras_to_lps

PathLike = Union[str, "os.PathLike[str]"]

# Relative size of |det| against the product of the axis lengths below which the grid is degenerate.
_SINGULAR_TOLERANCE = 1e-9
_AXIS_NAMES = ("i", "j", "k")


class VolumeError(ValueError):
    """Input that cannot be a volume, a box or a slice of one; the message says what was wrong."""


def _check_voxels(voxels: Any) -> np.ndarray:
    v = np.asarray(voxels)
    if v.ndim != 3:
        hint = ""
        if v.ndim == 4 and v.shape[-1] in (3, 4):
            hint = " (it looks like a multi-component RGB/vector volume; convert it to a scalar volume)"
        raise VolumeError(
            f"expected a 3-D scalar array indexed [k, j, i]; got a {v.ndim}-D array of shape {v.shape}{hint}"
        )
    if v.dtype.kind not in "biuf":
        raise VolumeError(f"expected numeric voxels (bool, integer or float); got dtype {v.dtype}")
    if 0 in v.shape:
        raise VolumeError(f"the volume is empty: shape (k, j, i) = {v.shape}")
    if v.dtype.kind == "f" and not (np.isfinite(v.min()) and np.isfinite(v.max())):
        n_nan = int(np.count_nonzero(np.isnan(v)))
        n_inf = int(np.count_nonzero(np.isinf(v)))
        raise VolumeError(f"the volume has {n_nan} NaN and {n_inf} infinite voxels; replace them first")
    return v


def window_limits(window: Sequence[float]) -> Tuple[float, float]:
    """(low, high) of an intensity window given as (centre, width); width must be positive."""
    try:
        centre, width = (float(x) for x in window)
    except (TypeError, ValueError):
        raise VolumeError(f"window must be (centre, width); got {window!r}") from None
    if not (math.isfinite(centre) and math.isfinite(width)) or width <= 0:
        raise VolumeError(f"window needs a finite centre and a positive width; got {window!r}")
    return centre - width / 2, centre + width / 2


def check_ijk_to_ras(matrix: Any) -> np.ndarray:
    """Return `matrix` as a 4x4 float64 copy, or raise VolumeError if it is not a usable grid."""
    try:
        m = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"IJK->RAS must be a 4x4 array of numbers: {exc}") from None
    if m.shape != (4, 4):
        raise VolumeError(f"IJK->RAS must be 4x4; got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise VolumeError("IJK->RAS contains NaN or infinite values")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], rtol=0, atol=1e-12):
        raise VolumeError(f"IJK->RAS is not affine: last row must be [0, 0, 0, 1]; got {m[3].tolist()}")
    lengths = np.linalg.norm(m[:3, :3], axis=0)
    for name, length in zip(_AXIS_NAMES, lengths):
        if length == 0:
            raise VolumeError(f"IJK->RAS has zero spacing along {name}")
    if abs(np.linalg.det(m[:3, :3])) <= _SINGULAR_TOLERANCE * float(np.prod(lengths)):
        raise VolumeError("IJK->RAS is singular: its i, j, k axes do not span 3-D space")
    return m


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxels indexed [k, j, i] (not copied) and a 4x4 IJK->RAS (voxel centres at integer IJK).

    Construction validates both (see `from_array`), so a `Volume` in hand is always usable.
    """

    voxels: np.ndarray
    ijk_to_ras: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "voxels", _check_voxels(self.voxels))
        matrix = check_ijk_to_ras(self.ijk_to_ras)
        matrix.setflags(write=False)
        object.__setattr__(self, "ijk_to_ras", matrix)

    @classmethod
    def from_array(cls, voxels: Any, ijk_to_ras: Any) -> Volume:
        """Validate and wrap: 3-D numeric finite non-empty voxels, invertible affine, no zero spacing."""
        return cls(voxels, ijk_to_ras)

    @classmethod
    def from_file(cls, path: PathLike) -> Volume:
        """Read NRRD / NIfTI / MHA / anything SimpleITK reads, or a DICOM folder (largest series)."""
        import SimpleITK as sitk

        path = os.fspath(path)
        if not os.path.exists(path):
            raise VolumeError(f"{path}: no such file or folder")
        try:
            image = _read_dicom_folder(sitk, path) if os.path.isdir(path) else sitk.ReadImage(path)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
            raise VolumeError(f"{path}: cannot be read as an image ({reason})") from None
        try:
            return cls.from_sitk(image)
        except VolumeError as exc:
            raise VolumeError(f"{path}: {exc}") from None

    @classmethod
    def from_sitk(cls, image: Any) -> Volume:
        """Wrap a SimpleITK image, turning its LPS origin/direction/spacing into IJK->RAS."""
        import SimpleITK as sitk

        if image.GetNumberOfComponentsPerPixel() != 1:
            raise VolumeError(
                f"expected a scalar image; got {image.GetNumberOfComponentsPerPixel()} components "
                "per voxel (RGB/vector); convert it to a scalar volume"
            )
        if image.GetDimension() != 3:
            raise VolumeError(f"expected a 3-D image; got a {image.GetDimension()}-D image")
        direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)
        ijk_to_lps[:3, 3] = image.GetOrigin()
        return cls(sitk.GetArrayFromImage(image), lps_to_ras(ijk_to_lps))

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Array shape (k, j, i)."""
        k, j, i = self.voxels.shape
        return (k, j, i)

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size in mm along i, j, k (lengths of the matrix columns)."""
        si, sj, sk = np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)
        return (float(si), float(sj), float(sk))

    @property
    def ras_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras)

    @property
    def nbytes(self) -> int:
        return int(self.voxels.nbytes)

    def sha256(self) -> str:
        """Content hash of the upload encoding (see `medmllm.geometry.wire`)."""
        from medmllm.geometry.wire import volume_sha256

        return volume_sha256(self.voxels, self.ijk_to_ras)

    def to_sitk(self) -> Any:
        """SimpleITK image with LPS geometry, ready for `sitk.WriteImage` (NRRD, NIfTI, MHA)."""
        import SimpleITK as sitk

        ijk_to_lps = ras_to_lps(self.ijk_to_ras)
        spacing = np.array(self.spacing)
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.voxels))
        image.SetSpacing(spacing.tolist())
        image.SetDirection((ijk_to_lps[:3, :3] / spacing).ravel().tolist())
        image.SetOrigin(ijk_to_lps[:3, 3].tolist())
        return image

    def describe(self) -> Dict[str, Any]:
        """Plain-data summary for logs, the CLI and the chat header."""
        return {
            "shape": list(self.shape),
            "spacing": [round(s, 6) for s in self.spacing],
            "orientation": orientation_code(self.ijk_to_ras),
            "origin": [round(float(x), 6) for x in self.ijk_to_ras[:3, 3]],
            "intensity_range": [float(self.voxels.min()), float(self.voxels.max())],
            "dtype": str(self.voxels.dtype),
        }


def _read_dicom_folder(sitk: Any, folder: str) -> Any:
    """Read the DICOM series with the most files in `folder` (a folder may hold scouts, dose reports)."""
    series: List[Tuple[str, ...]] = [
        tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    ]
    if not series:
        raise VolumeError(f"{folder}: no DICOM series found in this folder")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(max(series, key=len)))
    return reader.Execute()
