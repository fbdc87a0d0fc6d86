"""Airway on CT: the trachea found as a midline air tube in the upper body, with the main bronchi
that stay wide enough to survive a small opening (thin branches and leaks are cut).

The trachea is the longest lumen-air (< -900 HU) tube whose upper end is in the superior half of
the body, is narrow (a tube, not a gas-filled bowel loop) and lies within a few centimetres of the
midline. A scan without a trachea (abdomen, pelvis) gives nothing.
"""

from __future__ import annotations

import numpy as np

from medmllm.engines.builtin import grid

AIRWAY_MAX_HU = -900.0  # lumen air; lung parenchyma (about -850) stays out
TOP_MM = 15.0  # the tube's upper 15 mm are measured
TRACHEA_AREA_MM2 = (15.0, 900.0)  # lumen below -900 HU: 4 to 34 mm across
TRACHEA_MAX_WIDTH_MM = 40.0
MIDLINE_TOLERANCE_MM = 30.0
MIN_LENGTH_MM = 25.0
BRONCHUS_RADIUS_MM = 2.5  # the opening keeps tubes wider than about 5 mm


def find_airway(
    lumen: np.ndarray,
    axis: int,
    superior_first: np.ndarray,
    x_ras: np.ndarray,
    midline_x: float,
    spacing_kji,
) -> np.ndarray:
    """Coarse mask of the trachea and main bronchi; all False when no trachea is found."""
    from scipy import ndimage

    if superior_first.size == 0:
        return np.zeros_like(lumen)
    rank = np.full(lumen.shape[axis], superior_first.size)
    rank[superior_first] = np.arange(superior_first.size)  # 0 = most superior body slice
    labels, sizes = grid.components(lumen)
    best, best_size = 0, 0
    for lab, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or sizes[lab] <= best_size:
            continue
        part = labels[box] == lab
        if _is_trachea(part, rank[box[axis]], superior_first.size, axis, x_ras[box], midline_x, spacing_kji):
            best, best_size = lab, sizes[lab]
    if best == 0:
        return np.zeros_like(lumen)
    tube = labels == best
    opened = ndimage.binary_opening(tube, grid.ball(BRONCHUS_RADIUS_MM, spacing_kji))
    kept_labels, kept_sizes = grid.components(opened)
    if kept_sizes.size < 2:
        return tube
    kept = kept_labels == int(np.argmax(kept_sizes[1:]) + 1)
    # give back the lumen wall layer the opening shaved off
    return ndimage.binary_dilation(kept, iterations=1) & tube


def _is_trachea(
    part: np.ndarray, rank: np.ndarray, body_slices: int, axis: int, x_ras, midline_x: float, spacing_kji
) -> bool:
    """`rank`: superior-first order of each slice of `part` (0 = the body's top slice)."""
    slice_mm = spacing_kji[axis]
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(np.any(part, axis=other))
    if present.size * slice_mm < MIN_LENGTH_MM or rank[present].min() > body_slices / 2:
        return False
    top_n = max(1, round(TOP_MM / slice_mm))
    top = present[np.argsort(rank[present])[:top_n]]
    part_top = np.take(part, top, axis=axis)
    area = part_top.sum() / len(top) * float(np.prod([spacing_kji[a] for a in other]))
    xs = np.take(x_ras, top, axis=axis)[part_top]
    return bool(
        TRACHEA_AREA_MM2[0] <= area <= TRACHEA_AREA_MM2[1]
        and xs.max() - xs.min() <= TRACHEA_MAX_WIDTH_MM
        and abs(float(xs.mean()) - midline_x) <= MIDLINE_TOLERANCE_MM
    )
