"""Bones on CT as whole bones: dense cortex and trabecular bone, minus contrast-filled vessels,
closed and hole-filled so the marrow (often below 100 HU) inside the cortex is part of the bone.

Contrast-filled vessels and heart chambers are as dense as trabecular bone, and on the real scans
no texture measure separated them (local SD overlaps), but their shape does: a lumen is a thick
solid region of dense voxels (the contrast aorta of the real chest CT reaches 8.5 mm deep at its
median), while the dense part of adult bone is a shell or a lattice (the T12 vertebra: 3 mm, at
most 5 mm deep). Deep dense cores at the density of contrast blood are removed with the dense rim
around them, before closing and filling, and stay out of the filled result. Undiluted contrast
(above 1000 HU, e.g. in the superior vena cava at injection) is as dense as cortex and stays in.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from medmllm.engines.builtin import grid

BONE_MIN_HU = 150.0  # cortex and trabecular bone; marrow below this is recovered by hole filling
MARROW_MIN_HU = -200.0  # fatty marrow is above this; filled holes below it are enclosed gas
VESSEL_DEPTH_MM = 9.0  # dense voxels this far inside a dense region are a vessel or heart lumen
VESSEL_STEPS = 5  # coarse voxels the lumen is grown by, through dense voxels, to take its rim
# Median HU of a deep dense core that is contrast blood: the real chest CT's heart and aorta cores
# are at 410-490 HU, deep cores of bone at 270-280 HU (trabecular), 700-900 HU (cortex-dominated,
# a few voxels) or near 3000 HU (metal implants).
VESSEL_CORE_HU = (350.0, 700.0)
MIN_CORE_ML = 0.5  # smaller cores are specks inside bone, not a lumen
# A deep core this large is an organ or heart chamber whatever its density (the enhancing spleen of
# the real chest CT); the deep cores of bone are a few mL (a femoral head: 3 mL at 3 mm).
ORGAN_CORE_ML = 15.0
CLOSING_MM = 3.0  # bridges gaps in thin cortex before hole filling
# A porous cortex (a vertebral body's open posterior wall at 3 mm, the sacral foramina) leaves the
# marrow connected to the outside. A closing cannot bridge a gap in a thin wall (the structuring
# element does not fit across it), so the cortex is dilated in-plane by GAP_BRIDGE_MM (closing gaps
# up to twice as wide), the holes this encloses are filled, and the dilation is taken back. An
# enclosed region counts as marrow if it is no bigger than a marrow cross-section (a sacrum is
# ~40 cm2; the abdomen enclosed by bridged ribs is far bigger) and its median is trabecular bone's,
# not soft tissue's (a pocket of muscle between two bones: 40-60 HU; the marrow missed on the real
# scans: 75-115 HU). Within it only voxels denser than the spinal canal's cord and fluid (0-40 HU)
# are kept: the canal joins the vertebral body's marrow through the posterior wall gap.
GAP_BRIDGE_MM = 6.0
MARROW_HOLE_MAX_CM2 = 40.0
MARROW_MEDIAN_MIN_HU = 60.0
CANAL_MAX_HU = 55.0  # of the 3x3x3 mean
MIN_PART_ML = 0.5  # bone fragments smaller than this are noise


def find_bones(
    hu_c: np.ndarray, inside: np.ndarray, spacing_kji, voxel_ml: float, axis: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Coarse masks (whole bones within `inside`, the body dilated; contrast-filled lumens).
    `axis` is the array axis slices are taken across (superior-inferior)."""
    from scipy import ndimage

    dense = (hu_c >= BONE_MIN_HU) & inside
    if not dense.any():
        return dense, dense
    smooth = ndimage.uniform_filter(hu_c.astype(np.float32), 3)  # mean over 3x3x3 coarse voxels
    vessels = _vessels(hu_c, smooth, dense, spacing_kji)
    dense &= ~vessels
    dense = drop_small(dense, MIN_PART_ML / voxel_ml)
    element = grid.ball(CLOSING_MM, spacing_kji)
    pad = max(element.shape) // 2
    closed = ndimage.binary_closing(np.pad(dense, pad), element)[pad:-pad, pad:-pad, pad:-pad]
    marrow = _marrow_behind_gaps(closed, hu_c, smooth, axis, spacing_kji)
    filled = grid.fill_holes_every_orientation(closed) | marrow
    filled &= ~vessels  # a lumen is no marrow
    return drop_small(filled, MIN_PART_ML / voxel_ml), vessels


def _vessels(hu_c: np.ndarray, smooth: np.ndarray, dense: np.ndarray, spacing_kji) -> np.ndarray:
    """Lumen cores (deep inside dense regions, at contrast-blood density) grown through the dense
    voxels around them."""
    from scipy import ndimage

    # depth of the smoothed dense region: a heterogeneously enhancing organ is solid once smoothed
    solid = smooth >= BONE_MIN_HU
    depth = ndimage.distance_transform_edt(solid, sampling=spacing_kji)
    labels, sizes = grid.components(depth >= VESSEL_DEPTH_MM)
    if sizes.size < 2:
        return np.zeros_like(dense)
    inside = labels > 0  # the median sorts its input: labelled voxels only
    medians = np.asarray(ndimage.median(hu_c[inside], labels[inside], np.arange(1, sizes.size)))
    ml = sizes[1:] * float(np.prod(spacing_kji)) / 1000.0
    blood = (medians >= VESSEL_CORE_HU[0]) | (ml >= ORGAN_CORE_ML)
    lumen = np.concatenate([[False], blood & (medians <= VESSEL_CORE_HU[1]) & (ml >= MIN_CORE_ML)])
    structure = np.ones((3, 3, 3), bool)
    return ndimage.binary_dilation(lumen[labels], structure, iterations=VESSEL_STEPS, mask=dense)


def _marrow_behind_gaps(
    closed: np.ndarray, hu_c: np.ndarray, smooth: np.ndarray, axis: int, spacing_kji
) -> np.ndarray:
    """Regions each slice of `closed` encloses once its gaps are bridged (GAP_BRIDGE_MM), kept
    where they are marrow-sized and marrow-dense, without the spinal canal."""
    from scipy import ndimage

    disc = grid.ball(GAP_BRIDGE_MM, spacing_kji)
    disc = np.take(disc, [disc.shape[axis] // 2], axis=axis)  # the ball's in-plane section
    pad = [(n // 2 + 1, n // 2 + 1) for n in disc.shape]
    bridged = grid.fill_holes_per_slice(ndimage.binary_dilation(np.pad(closed, pad), disc), axis)
    enclosed = ndimage.binary_erosion(bridged, disc, border_value=1)
    holes = enclosed[tuple(slice(a, n - b) for (a, b), n in zip(pad, enclosed.shape))] & ~closed
    plane = np.zeros((3, 3, 3), bool)  # 4-connected within a slice
    np.moveaxis(plane, axis, 0)[1] = ndimage.generate_binary_structure(2, 1)
    labels, count = ndimage.label(holes, plane)
    if not count:
        return holes
    sizes = np.bincount(labels.ravel())
    pixel_cm2 = float(np.prod(np.delete(np.asarray(spacing_kji, float), axis))) / 100.0
    medians = np.asarray(ndimage.median(hu_c[holes], labels[holes], np.arange(1, sizes.size)))
    keep = (sizes[1:] * pixel_cm2 <= MARROW_HOLE_MAX_CM2) & (medians >= MARROW_MEDIAN_MIN_HU)
    return np.concatenate([[False], keep])[labels] & (smooth > CANAL_MAX_HU)


def drop_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    labels, sizes = grid.components(mask)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]
