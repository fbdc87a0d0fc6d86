"""Box -> 3D mask: the hook 2D grounding models use to turn a box on one slice into a segment.

A 2D model can only point (a box on the slice it saw); a segmenter grows that into a 3D mask.
The built-in `region-growing` needs no weights; `anatomy` picks the TotalSegmentator structure
that fills the box (falling back to region growing); others (MedSAM2, nnInteractive, ...) plug in
as installed packages that declare an entry point in the group `medmllm.segmenters`::

    [project.entry-points."medmllm.segmenters"]
    medsam2 = "my_package.seg:MedSAM2Segmenter"   # a class (or factory) called with no arguments

SimpleITK is imported inside `segment` so that importing this module stays cheap inside Slicer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, List, Protocol, Tuple

import numpy as np

from medmllm.geometry.volume import VolumeError
from medmllm.plugins import PluginError, Registry

if TYPE_CHECKING:
    from medmllm.geometry.boxes import IJKBox
    from medmllm.geometry.volume import Volume

ENTRY_POINT_GROUP = "medmllm.segmenters"
DEFAULT_SEGMENTER = "region-growing"


class SegmenterError(Exception):
    """A box that cannot become a mask (outside the volume, no contrast, runaway growth); shown as is."""


class BoxSegmenter(Protocol):
    """Turns a box on one slice into a 3D mask of the structure it frames."""

    name: str

    def segment(self, volume: Volume, box: IJKBox, slice_axis: int) -> np.ndarray:
        """Bool mask shaped like `volume.voxels` ([k, j, i]).

        `box` is in continuous IJK edges (usually one slice thick); `slice_axis` is the IJK axis
        (i=0, j=1, k=2) normal to the slice the box was drawn on.
        """


def clipped_ranges(box: IJKBox, shape: Tuple[int, int, int]) -> List[Tuple[int, int]]:
    """The box's voxel index ranges per numpy axis [k, j, i], clipped to the array (half-open)."""
    try:
        inside, _ = box.clamp(shape)
        return [(s.start, s.stop) for s in inside.voxel_slices(shape)]
    except VolumeError as exc:
        raise SegmenterError(f"the box lies outside the volume; nothing to segment ({exc})") from exc


def _central(start: int, stop: int, fraction: float) -> Tuple[int, int]:
    """The middle `fraction` of [start, stop), at least one voxel: the seed avoids the box's border."""
    length = stop - start
    keep = max(1, round(length * fraction))
    first = start + (length - keep) // 2
    return first, first + keep


class RegionGrowingSegmenter:
    """3D region growing from the box centre, deterministic and weight-free.

    Seeds are the voxels of the box's central part on its slice; the intensity window is the
    seeds' median ± `sigmas` robust standard deviations (never narrower than `min_tolerance` of
    the local intensity range, so quantised or noiseless data still grows). Growth is
    6-connected and confined to a crop: the box plus `margin` in-plane, and along the slice
    normal as deep as `depth_factor` times the box's larger in-plane size (in mm), because a
    structure's depth is rarely far from its width. Holes are filled; more than `max_voxels`
    voxels means the structure is not separable by intensity and is refused.
    """

    name = DEFAULT_SEGMENTER

    def __init__(
        self,
        sigmas: float = 3.0,
        min_tolerance: float = 0.05,
        seed_fraction: float = 0.33,
        margin: float = 0.25,
        depth_factor: float = 1.25,
        max_voxels: int = 20_000_000,
    ) -> None:
        self.sigmas = sigmas
        self.min_tolerance = min_tolerance
        self.seed_fraction = seed_fraction
        self.margin = margin
        self.depth_factor = depth_factor
        self.max_voxels = max_voxels

    def segment(self, volume: Volume, box: IJKBox, slice_axis: int) -> np.ndarray:
        if slice_axis not in (0, 1, 2):
            raise SegmenterError(f"slice_axis must be 0 (i), 1 (j) or 2 (k), got {slice_axis!r}")
        voxels = volume.voxels
        normal = 2 - slice_axis  # numpy axes are [k, j, i]
        box_ranges = clipped_ranges(box, voxels.shape)
        crop = self._crop_ranges(box_ranges, normal, voxels.shape, np.asarray(volume.spacing, float))
        region = voxels[tuple(slice(a, b) for a, b in crop)]

        seed_ranges = [
            r if axis == normal else _central(r[0], r[1], self.seed_fraction)
            for axis, r in enumerate(box_ranges)
        ]
        seed_values = voxels[tuple(slice(a, b) for a, b in seed_ranges)].astype(np.float64)
        lower, upper = self._window(seed_values, region)
        grown = self._grow(region, seed_ranges, crop, lower, upper)

        count = int(grown.sum())
        if count > self.max_voxels:
            raise SegmenterError(
                f"region growing reached {count} voxels (limit {self.max_voxels}): the structure is "
                "not separable from its surroundings by intensity"
            )
        mask = np.zeros(voxels.shape, dtype=bool)
        mask[tuple(slice(a, b) for a, b in crop)] = grown
        return mask

    def _crop_ranges(
        self,
        box_ranges: List[Tuple[int, int]],
        normal: int,
        shape: Tuple[int, ...],
        spacing_ijk: np.ndarray,
    ) -> List[Tuple[int, int]]:
        spacing = spacing_ijk[::-1]  # mm along numpy axes [k, j, i]
        in_plane_mm = max((b - a) * spacing[axis] for axis, (a, b) in enumerate(box_ranges) if axis != normal)
        crop = []
        for axis, (a, b) in enumerate(box_ranges):
            if axis == normal:
                centre = (a + b) / 2.0
                half = max(1.0, self.depth_factor * in_plane_mm / 2.0 / spacing[axis])
                lo, hi = math.floor(centre - half), math.ceil(centre + half)
            else:
                pad = max(2, math.ceil((b - a) * self.margin))
                lo, hi = a - pad, b + pad
            crop.append((max(0, lo), min(shape[axis], hi)))
        return crop

    def _window(self, seed_values: np.ndarray, region: np.ndarray) -> Tuple[float, float]:
        centre = float(np.median(seed_values))
        spread = 1.4826 * float(np.median(np.abs(seed_values - centre)))
        low, high = np.percentile(region, [1.0, 99.0])
        tolerance = max(self.sigmas * spread, self.min_tolerance * float(high - low))
        return centre - tolerance, centre + tolerance

    def _grow(
        self,
        region: np.ndarray,
        seed_ranges: List[Tuple[int, int]],
        crop: List[Tuple[int, int]],
        lower: float,
        upper: float,
    ) -> np.ndarray:
        import SimpleITK as sitk

        local = [(a - c[0], b - c[0]) for (a, b), c in zip(seed_ranges, crop)]
        seed_block = region[tuple(slice(a, b) for a, b in local)]
        inside = np.argwhere((seed_block >= lower) & (seed_block <= upper))
        if inside.size == 0:
            raise SegmenterError("no voxel at the box centre falls inside the seed intensity window")
        offsets = np.array([a for a, _ in local])
        seeds = [tuple(int(v) for v in (p + offsets)[::-1]) for p in inside]  # ITK index order (i, j, k)
        image = sitk.GetImageFromArray(region.astype(np.float32))
        grown = sitk.ConnectedThreshold(image, seedList=seeds, lower=lower, upper=upper, replaceValue=1)
        filled = sitk.BinaryFillhole(grown, fullyConnected=False, foregroundValue=1)
        return sitk.GetArrayFromImage(filled).astype(bool)


# `anatomy`: TotalSegmentator's structure filling the box, region growing where none does
# (`medmllm.anatomy.boxes`; needs the `anatomy` extra, else it is region growing alone).
SEGMENTERS = Registry(
    "segmenter",
    ENTRY_POINT_GROUP,
    {
        DEFAULT_SEGMENTER: "medmllm.segmenters:RegionGrowingSegmenter",
        "anatomy": "medmllm.anatomy.boxes:AnatomySegmenter",
    },
    check=callable,
)


def segmenter_names() -> List[str]:
    """Built-in segmenters plus those installed packages declare under `medmllm.segmenters`."""
    return sorted(SEGMENTERS.names())


def get_segmenter(name: str) -> BoxSegmenter:
    """A ready segmenter by name; unknown names and broken plug-ins raise SegmenterError."""
    try:
        factory = SEGMENTERS.load(name)
        segmenter = factory()
    except PluginError as exc:
        raise SegmenterError(str(exc)) from exc
    except Exception as exc:
        raise SegmenterError(f"segmenter {name!r} failed to load: {exc}") from exc
    if not callable(getattr(segmenter, "segment", None)):
        raise SegmenterError(f"segmenter {name!r} has no segment() method")
    return segmenter
