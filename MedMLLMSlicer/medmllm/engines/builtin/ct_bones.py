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
MIN_PART_ML = 0.5  # bone fragments smaller than this are noise


def find_bones(
    hu_c: np.ndarray, inside: np.ndarray, spacing_kji, voxel_ml: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Coarse masks (whole bones within `inside`, the body dilated; contrast-filled lumens)."""
    from scipy import ndimage

    dense = (hu_c >= BONE_MIN_HU) & inside
    if not dense.any():
        return dense, dense
    vessels = _vessels(hu_c, dense, spacing_kji)
    dense &= ~vessels
    dense = drop_small(dense, MIN_PART_ML / voxel_ml)
    element = grid.ball(CLOSING_MM, spacing_kji)
    pad = max(element.shape) // 2
    closed = ndimage.binary_closing(np.pad(dense, pad), element)[pad:-pad, pad:-pad, pad:-pad]
    filled = grid.fill_holes_every_orientation(closed) & ~vessels  # a lumen is no marrow
    return drop_small(filled, MIN_PART_ML / voxel_ml), vessels


def _vessels(hu_c: np.ndarray, dense: np.ndarray, spacing_kji) -> np.ndarray:
    """Lumen cores (deep inside dense regions, at contrast-blood density) grown through the dense
    voxels around them."""
    from scipy import ndimage

    # depth of the smoothed dense region: a heterogeneously enhancing organ is solid once smoothed
    solid = ndimage.uniform_filter(hu_c.astype(np.float32), 3) >= BONE_MIN_HU
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


def drop_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    labels, sizes = grid.components(mask)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]
