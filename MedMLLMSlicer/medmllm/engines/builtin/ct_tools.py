"""CT anatomy from Hounsfield units: body outline, lungs, airway, bones.

Classical image analysis (thresholds + connected components + hole filling, scipy.ndimage), no
learned weights. Thresholds are textbook HU ranges: air -1000, lung parenchyma about -850,
soft tissue 0..80, bone above a few hundred. Results are computed once per volume and kept.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from medmllm.engines.builtin import grid

BODY_MIN_HU = -500.0  # between air (-1000) and fat (-100): the patient's outline
LUNG_MAX_HU = -400.0  # aerated lung and airway, excluding soft tissue and partial volume
AIRWAY_MAX_HU = -900.0  # lumen air; lung parenchyma (about -850) stays out
BONE_MIN_HU = 250.0  # cortical/trabecular bone; contrast-filled vessels can reach this (documented)
MIN_PART_ML = 0.5  # bone fragments smaller than this are noise
SECOND_LUNG_MIN_RATIO = 0.2  # a second air region counts as the other lung only if this large
TOP_SLICES = 3  # the airway must enter through the body's top slices (not stomach gas below the lungs)


class CTAnalysis:
    """Lazily computed CT structures of one volume; each `*_masks()` returns {segment name: mask}."""

    def __init__(self, hu: np.ndarray, ijk_to_ras: np.ndarray, spacing_ijk) -> None:
        self.hu = hu
        self.ijk_to_ras = np.asarray(ijk_to_ras, float)
        self.spacing_kji = tuple(float(s) for s in spacing_ijk)[::-1]
        self.f = grid.coarse_factors(hu.shape, self.spacing_kji)
        self.axis = grid.axial_axis(self.ijk_to_ras)
        self._hu_c: Optional[np.ndarray] = None
        self._body_c: Optional[np.ndarray] = None
        self._airway_c: Optional[np.ndarray] = None
        self._done: Dict[str, Dict[str, np.ndarray]] = {}

    @property
    def coarse_voxel_ml(self) -> float:
        return float(np.prod([s * f for s, f in zip(self.spacing_kji, self.f)])) / 1000.0

    @property
    def hu_c(self) -> np.ndarray:
        if self._hu_c is None:
            self._hu_c = grid.downsample(self.hu, self.f)
        return self._hu_c

    def body_coarse(self) -> np.ndarray:
        """Largest non-air part after an opening (cuts thin links to the table); holes filled per slice."""
        if self._body_c is None:
            from scipy import ndimage

            solid = self.hu_c > BODY_MIN_HU
            parts = grid.largest_components(ndimage.binary_opening(solid), 1)
            # one dilation inside the threshold gives back the outline the opening shaved off
            body = ndimage.binary_dilation(parts[0]) & solid if parts else solid
            self._body_c = grid.fill_holes_per_slice(body, self.axis)
        return self._body_c

    def body_masks(self) -> Dict[str, np.ndarray]:
        def compute() -> Dict[str, np.ndarray]:
            body = self.body_coarse()
            if not body.any():
                return {}
            return {"Body": grid.refine(body, self.f, self.hu > BODY_MIN_HU)}

        return self._cached("body", compute)

    def airway_coarse(self) -> np.ndarray:
        """The lumen-air tube inside the body that reaches furthest superior (the trachea enters at
        the top of a chest scan; bowel gas lies below)."""
        if self._airway_c is None:
            candidates = (self.hu_c < AIRWAY_MAX_HU) & self.body_coarse()
            self._airway_c = self._most_superior_part(candidates)
        return self._airway_c

    def airway_masks(self) -> Dict[str, np.ndarray]:
        def compute() -> Dict[str, np.ndarray]:
            airway = self.airway_coarse()
            if not airway.any():
                return {}
            return {"Airway": grid.refine(airway, self.f, self.hu < AIRWAY_MAX_HU)}

        return self._cached("airway", compute)

    def lung_masks(self) -> Dict[str, np.ndarray]:
        return self._cached("lung", self._compute_lungs)

    def bone_masks(self) -> Dict[str, np.ndarray]:
        def compute() -> Dict[str, np.ndarray]:
            from scipy import ndimage

            dense = (self.hu_c >= BONE_MIN_HU) & ndimage.binary_dilation(self.body_coarse())
            kept = self._drop_small(dense, MIN_PART_ML)
            if not kept.any():
                return {}
            return {"Bone": grid.refine(kept, self.f, self.hu >= BONE_MIN_HU)}

        return self._cached("bone", compute)

    def _compute_lungs(self) -> Dict[str, np.ndarray]:
        from scipy import ndimage

        airway = ndimage.binary_dilation(self.airway_coarse(), iterations=2)
        aerated = (self.hu_c < LUNG_MAX_HU) & self.body_coarse() & ~airway
        parts = grid.largest_components(aerated, 2)
        parts = [p for p in parts if p.sum() * self.coarse_voxel_ml >= MIN_PART_ML]
        if len(parts) == 2 and parts[1].sum() < SECOND_LUNG_MIN_RATIO * parts[0].sum():
            parts = parts[:1]
        full = [
            grid.refine(grid.fill_holes_per_slice(p, self.axis), self.f, self.hu < LUNG_MAX_HU) for p in parts
        ]
        if not full:
            return {}
        if len(full) == 1:
            return {"Lungs": full[0]}
        return self._name_by_side(full)

    def _name_by_side(self, pair) -> Dict[str, np.ndarray]:
        """RAS +x is the patient's right: the lung whose centroid has the larger x is the right one."""
        xs = [self._centroid_ras(m)[0] for m in pair]
        right, left = (pair[0], pair[1]) if xs[0] > xs[1] else (pair[1], pair[0])
        return {"Right lung": right, "Left lung": left}

    def _centroid_ras(self, mask: np.ndarray) -> np.ndarray:
        k, j, i = (float(np.mean(a)) for a in np.nonzero(mask))
        return (self.ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]

    def _most_superior_part(self, candidates: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        labels, n = ndimage.label(candidates, structure=np.ones((3, 3, 3), bool))
        if n == 0:
            return np.zeros_like(candidates)
        sizes = np.bincount(labels.ravel())
        min_voxels = max(1.0, MIN_PART_ML / self.coarse_voxel_ml)
        body_slices = np.nonzero(
            np.any(self.body_coarse(), axis=tuple(a for a in range(3) if a != self.axis))
        )[0]
        top = [n for n in self._slice_order_superior_first() if n in set(body_slices.tolist())][:TOP_SLICES]
        for index in top:
            on_slice = np.unique(np.take(labels, index, axis=self.axis))
            big = [lab for lab in on_slice if lab and sizes[lab] >= min_voxels]
            if big:
                return labels == max(big, key=lambda lab: sizes[lab])
        return np.zeros_like(candidates)

    def _slice_order_superior_first(self) -> np.ndarray:
        column = 2 - self.axis
        n = self.hu_c.shape[self.axis]
        order = np.arange(n)
        return order[::-1] if self.ijk_to_ras[2, column] > 0 else order

    def _drop_small(self, mask: np.ndarray, min_ml: float) -> np.ndarray:
        from scipy import ndimage

        labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        if n == 0:
            return mask
        sizes = np.bincount(labels.ravel()) * self.coarse_voxel_ml
        keep = sizes >= min_ml
        keep[0] = False
        return keep[labels]

    def _cached(self, key: str, compute) -> Dict[str, np.ndarray]:
        if key not in self._done:
            self._done[key] = compute()
        return self._done[key]
