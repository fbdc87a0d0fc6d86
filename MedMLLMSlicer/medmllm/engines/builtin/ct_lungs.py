"""Lungs on CT: aerated regions told apart from bowel gas by their texture, split right/left.

Lung parenchyma is air mixed with tissue and vessels: the median of an aerated region lies near
-850 HU (measured: -777 to -796 HU on the real scans of medmllm.samples), while bowel and stomach
gas is nearly pure air with a median below -925 HU. Regions between -600 HU and partial volume
(fat-air seams at the skin) are neither. Lungs that touch (the anterior junction line) are split by
eroding until two cores remain and giving every voxel to the nearer core, falling back on the
patient's midline.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from medmllm.engines.builtin import grid

LUNG_MAX_HU = -400.0  # aerated lung and airway, excluding soft tissue and partial volume
GAS_MEDIAN_HU = -910.0  # a region whose median is below this is gas (bowel, stomach), not lung
SEAM_MEDIAN_HU = -600.0  # a region whose median is above this is a partial-volume seam
MIN_LUNG_ML = 2.0  # smaller aerated fragments are ignored
MIN_DEPTH_MM = 5.0  # a lung is thick; air seams between skin folds (arm against trunk: 4 mm) are not
BOTH_SIDES_FRACTION = 0.15  # a region with this much of itself on each side holds both lungs
MAX_SPLIT_EROSIONS = 10
CORE_MIN_FRACTION = 0.1  # each of the two cores must hold this share of the eroded region


def lung_regions(hu_c: np.ndarray, candidates: np.ndarray, spacing_kji) -> np.ndarray:
    """Union of the thick aerated regions whose median HU is that of lung parenchyma."""
    from scipy import ndimage

    aerated = candidates & (hu_c < LUNG_MAX_HU)
    labels, sizes = grid.components(aerated)
    big = np.flatnonzero(sizes * float(np.prod(spacing_kji)) / 1000.0 >= MIN_LUNG_ML)
    big = big[big > 0]
    if big.size == 0:
        return np.zeros_like(candidates)
    inside = labels > 0  # per-label statistics on the labelled voxels only (they sort their input)
    medians = np.asarray(ndimage.median(hu_c[inside], labels[inside], big))
    depth = ndimage.distance_transform_edt(aerated, sampling=spacing_kji)
    depths = np.asarray(ndimage.maximum(depth[inside], labels[inside], big))
    keep = np.zeros(sizes.size, bool)
    keep[big[(medians > GAS_MEDIAN_HU) & (medians < SEAM_MEDIAN_HU) & (depths >= MIN_DEPTH_MM)]] = True
    return keep[labels]


def split_sides(lungs: np.ndarray, x_ras: np.ndarray, midline_x: float) -> Dict[str, np.ndarray]:
    """{"Right lung": ..., "Left lung": ...} (either may be missing); RAS +x is the patient's right."""
    labels, sizes = grid.components(lungs)
    right = np.zeros_like(lungs)
    left = np.zeros_like(lungs)
    for lab in range(1, sizes.size):
        part = labels == lab
        on_right = float(np.mean(x_ras[part] > midline_x))
        if min(on_right, 1.0 - on_right) >= BOTH_SIDES_FRACTION:
            r, lf = _split_joined(part, x_ras, midline_x)
            right |= r
            left |= lf
        elif on_right >= 0.5:
            right |= part
        else:
            left |= part
    return {name: m for name, m in (("Right lung", right), ("Left lung", left)) if m.any()}


def _split_joined(part: np.ndarray, x_ras: np.ndarray, midline_x: float) -> Sequence[np.ndarray]:
    """Erode until two cores on opposite sides remain, then assign voxels to the nearer core."""
    from scipy import ndimage

    box = ndimage.find_objects(part.astype(np.uint8))[0]
    sub = part[box]
    eroded = sub
    for _ in range(MAX_SPLIT_EROSIONS):
        eroded = ndimage.binary_erosion(eroded)
        cores = _two_cores(eroded, x_ras[box], midline_x)
        if cores:
            seeds = np.zeros(sub.shape, np.uint8)
            seeds[cores[0]] = 1
            seeds[cores[1]] = 2
            _, index = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
            nearest = seeds[tuple(index)]
            return _placed(part, box, sub & (nearest == 1)), _placed(part, box, sub & (nearest == 2))
    side = x_ras > midline_x
    return part & side, part & ~side


def _two_cores(eroded: np.ndarray, x_ras: np.ndarray, midline_x: float) -> List[np.ndarray]:
    """[right core, left core] when erosion left two big parts on opposite sides, else []."""
    labels, sizes = grid.components(eroded)
    if sizes.size < 3:
        return []
    order = np.argsort(sizes[1:])[::-1][:2] + 1
    if sizes[order[1]] < CORE_MIN_FRACTION * sizes[1:].sum():
        return []
    a, b = (labels == order[0]), (labels == order[1])
    xa, xb = float(np.mean(x_ras[a])), float(np.mean(x_ras[b]))
    if (xa - midline_x) * (xb - midline_x) >= 0:
        return []
    return [a, b] if xa > xb else [b, a]


def _placed(like: np.ndarray, box, sub: np.ndarray) -> np.ndarray:
    out = np.zeros_like(like)
    out[box] = sub
    return out
