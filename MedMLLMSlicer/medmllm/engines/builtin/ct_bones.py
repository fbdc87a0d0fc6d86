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
# marrow connected to the outside in every direction. An in-plane closing this wide bridges those
# gaps; a hole it makes counts as marrow only if it is no bigger than a marrow cross-section (a
# sacrum is ~40 cm2; the pelvis or abdomen enclosed by bridged bones is far bigger) and at least
# half of its rim is the bone's own cortex (a pocket of soft tissue between two bones is mostly
# rimmed by the bridges).
GAP_BRIDGE_MM = 9.0
MARROW_HOLE_MAX_CM2 = 40.0
MIN_CORTEX_RIM = 0.5
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
    vessels = _vessels(hu_c, dense, spacing_kji)
    dense &= ~vessels
    dense = drop_small(dense, MIN_PART_ML / voxel_ml)
    element = grid.ball(CLOSING_MM, spacing_kji)
    pad = max(element.shape) // 2
    closed = ndimage.binary_closing(np.pad(dense, pad), element)[pad:-pad, pad:-pad, pad:-pad]
    filled = grid.fill_holes_every_orientation(closed) | _marrow_behind_gaps(closed, axis, spacing_kji)
    filled &= ~vessels  # a lumen is no marrow
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


def _marrow_behind_gaps(closed: np.ndarray, axis: int, spacing_kji) -> np.ndarray:
    """Holes per slice of `closed` after a wide in-plane closing, kept where they are marrow-sized
    and mostly rimmed by `closed` itself (GAP_BRIDGE_MM)."""
    from scipy import ndimage

    disc = grid.ball(GAP_BRIDGE_MM, spacing_kji)
    disc = np.take(disc, [disc.shape[axis] // 2], axis=axis)  # the ball's in-plane section
    pad = [(n // 2, n // 2) for n in disc.shape]
    wide = ndimage.binary_closing(np.pad(closed, pad), disc)
    wide = wide[tuple(slice(a, n - b) for (a, b), n in zip(pad, wide.shape))]
    holes = grid.fill_holes_per_slice(wide, axis) & ~wide
    plane = np.zeros((3, 3, 3), bool)  # 4-connected within a slice
    np.moveaxis(plane, axis, 0)[1] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(holes, plane)
    sizes = np.bincount(labels.ravel())
    pixel_cm2 = float(np.prod(np.delete(np.asarray(spacing_kji, float), axis))) / 100.0
    rimmed = ndimage.grey_dilation(labels, footprint=plane)  # a hole's label on its rim
    rim = (rimmed > 0) & (labels == 0)
    rim_all = np.bincount(rimmed[rim], minlength=sizes.size)
    rim_cortex = np.bincount(rimmed[rim & closed], minlength=sizes.size)
    keep = (sizes * pixel_cm2 <= MARROW_HOLE_MAX_CM2) & (rim_cortex >= MIN_CORTEX_RIM * rim_all)
    keep[0] = False
    return keep[labels]


def drop_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    labels, sizes = grid.components(mask)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]
