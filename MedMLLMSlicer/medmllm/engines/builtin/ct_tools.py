"""CT anatomy from Hounsfield units: body outline, lungs, airway, bones.

Classical image analysis (thresholds, connected components, morphology, hole filling; scipy.ndimage),
no learned weights. Decisions are made on a coarse working grid and the boundary is re-decided at
full resolution (`grid.refine`). The rules for each structure live in ct_lungs, ct_airway and
ct_bones; this class computes each once per volume and keeps it.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from medmllm.engines.builtin import ct_airway, ct_bones, ct_lungs, grid
from medmllm.geometry.transforms import nearest_axis

BODY_MIN_HU = -500.0  # between air (-1000) and fat (-100): the patient's outline
BODY_PART_MIN_FRACTION = 0.03  # arms outside the trunk are kept if at least this big ...
BODY_PART_MIN_THICKNESS_MM = 25.0  # ... and thick: a table or mattress is a thin plate


class CTAnalysis:
    """Lazily computed CT structures of one volume; each `*_masks()` returns {segment name: mask}."""

    def __init__(self, hu: np.ndarray, ijk_to_ras: np.ndarray, spacing_ijk) -> None:
        self.hu = hu
        self.ijk_to_ras = np.asarray(ijk_to_ras, float)
        self.spacing_kji = tuple(float(s) for s in spacing_ijk)[::-1]
        self.f = grid.coarse_factors(hu.shape, self.spacing_kji)
        self.spacing_c = tuple(s * f for s, f in zip(self.spacing_kji, self.f))
        self.axis = grid.axial_axis(self.ijk_to_ras)
        import scipy.ndimage  # noqa: F401  (imported here, when a volume arrives, not in the first answer)

        self._cache: Dict[str, np.ndarray] = {}
        self._done: Dict[str, Dict[str, np.ndarray]] = {}

    @property
    def coarse_voxel_ml(self) -> float:
        return float(np.prod(self.spacing_c)) / 1000.0

    @property
    def hu_c(self) -> np.ndarray:
        return self._memo("hu", lambda: grid.downsample(self.hu, self.f))

    def x_ras_c(self) -> np.ndarray:
        """RAS x (patient left-right, + = right) of every coarse voxel."""

        def compute() -> np.ndarray:
            k, j, i = (np.arange(n) * f for n, f in zip(self.hu_c.shape, self.f))
            m = self.ijk_to_ras[0]
            return (
                m[2] * k[:, None, None] + m[1] * j[None, :, None] + m[0] * i[None, None, :] + m[3]
            ).astype(np.float32)

        return self._memo("x", compute)

    def midline_x(self) -> float:
        """RAS x of the patient's midline: the body's centre."""
        return float(np.mean(self.x_ras_c()[self.body_coarse()])) if self.body_coarse().any() else 0.0

    def body_coarse(self) -> np.ndarray:
        return self._memo("body", self._compute_body)

    def _compute_body(self) -> np.ndarray:
        """Non-air parts after an opening (cuts thin links to the table): the largest, plus arms
        (big and thick; a table is a thin plate); holes filled per slice."""
        from scipy import ndimage

        solid = self.hu_c > BODY_MIN_HU
        labels, sizes = grid.components(ndimage.binary_opening(solid))
        if sizes.size < 2:
            return np.zeros_like(solid)
        ap_axis = 2 - nearest_axis(self.ijk_to_ras, (0.0, 1.0, 0.0))
        keep = np.zeros(sizes.size, bool)
        for lab in np.flatnonzero(sizes >= BODY_PART_MIN_FRACTION * sizes[1:].max()):
            part = labels == lab
            thickness = (
                sizes[lab] / max(1, np.count_nonzero(part.any(axis=ap_axis))) * self.spacing_c[ap_axis]
            )
            keep[lab] = lab > 0 and thickness >= BODY_PART_MIN_THICKNESS_MM
        keep[np.argmax(np.where(np.arange(sizes.size) > 0, sizes, 0))] = True
        body = ndimage.binary_dilation(keep[labels]) & solid  # gives back what the opening shaved
        return grid.fill_holes_per_slice(body, self.axis)

    def body_masks(self) -> Dict[str, np.ndarray]:
        def compute() -> Dict[str, np.ndarray]:
            body = self.body_coarse()
            return (
                {"Body": grid.refine(body, self.f, self.hu, lambda v: v > BODY_MIN_HU)} if body.any() else {}
            )

        return self._cached("body", compute)

    def airway_coarse(self) -> np.ndarray:
        def compute() -> np.ndarray:
            lumen = (self.hu_c < ct_airway.AIRWAY_MAX_HU) & self.body_coarse()
            order = self._superior_first_body_slices()
            return ct_airway.find_airway(
                lumen, self.axis, order, self.x_ras_c(), self.midline_x(), self.spacing_c
            )

        return self._memo("airway", compute)

    def airway_masks(self) -> Dict[str, np.ndarray]:
        def compute() -> Dict[str, np.ndarray]:
            airway = self.airway_coarse()
            if not airway.any():
                return {}
            return {"Airway": grid.refine(airway, self.f, self.hu, lambda v: v < ct_airway.AIRWAY_MAX_HU)}

        return self._cached("airway", compute)

    def lung_masks(self) -> Dict[str, np.ndarray]:
        def compute() -> Dict[str, np.ndarray]:
            from scipy import ndimage

            airway = ndimage.binary_dilation(self.airway_coarse(), iterations=2)
            regions = ct_lungs.lung_regions(self.hu_c, self.body_coarse() & ~airway, self.spacing_c)
            sides = ct_lungs.split_sides(regions, self.x_ras_c(), self.midline_x())
            full = {
                name: grid.refine(
                    grid.fill_holes_per_slice(m, self.axis),
                    self.f,
                    self.hu,
                    lambda v: v < ct_lungs.LUNG_MAX_HU,
                )
                for name, m in sides.items()
            }
            if len(full) == 2:  # the refined boundary bands of touching lungs overlap
                full["Left lung"] &= ~full["Right lung"]
            return full

        return self._cached("lung", compute)

    def bone_masks(self) -> Dict[str, np.ndarray]:
        def compute() -> Dict[str, np.ndarray]:
            from scipy import ndimage

            inside = ndimage.binary_dilation(self.body_coarse())
            bones, vessels = ct_bones.find_bones(
                self.hu_c, inside, self.spacing_c, self.coarse_voxel_ml, self.axis
            )
            if not bones.any():
                return {}
            full = grid.refine(bones, self.f, self.hu, lambda v: v >= ct_bones.BONE_MIN_HU)
            full &= self.hu > ct_bones.MARROW_MIN_HU  # enclosed gas is no marrow
            if vessels.any():  # the boundary band must not take lumen voxels back
                full &= ~grid.upsample(vessels, self.f, self.hu.shape)
            return {"Bone": full}

        return self._cached("bone", compute)

    def _superior_first_body_slices(self) -> np.ndarray:
        """Indices along the axial axis of slices holding body, the most superior first."""
        other = tuple(a for a in range(3) if a != self.axis)
        with_body = np.flatnonzero(np.any(self.body_coarse(), axis=other))
        column = 2 - self.axis
        return with_body[::-1] if self.ijk_to_ras[2, column] > 0 else with_body

    def _memo(self, key: str, compute) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _cached(self, key: str, compute) -> Dict[str, np.ndarray]:
        if key not in self._done:
            self._done[key] = compute()
        return self._done[key]
