"""Measurements of one mask (volume, extent in RAS, intensity statistics) and the sentences that
teach where a structure is and how big it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from medmllm.geometry.transforms import ijk_to_ras_points, voxel_volume_mm3

# Centroid offsets under this fraction of the reference width count as "in the midline".
MIDLINE_FRACTION = 0.1


@dataclass(frozen=True)
class Measurement:
    """`voxel_lo`/`voxel_hi` are inclusive voxel indices (i, j, k); RAS ranges cover voxel edges."""

    label: str
    voxel_count: int
    volume_ml: float
    voxel_lo: Tuple[int, int, int]
    voxel_hi: Tuple[int, int, int]
    ras_min: Tuple[float, float, float]
    ras_max: Tuple[float, float, float]
    centroid_ras: Tuple[float, float, float]
    mean: float
    std: float
    minimum: float
    maximum: float

    @property
    def extent_mm(self) -> Tuple[float, float, float]:
        """Size along R-L, A-P, S-I in mm (of the structure's bounding box)."""
        return tuple(float(b - a) for a, b in zip(self.ras_min, self.ras_max))  # type: ignore[return-value]

    def stats(self) -> Dict[str, float]:
        """Flat numbers for `MaskOut.stats` and the report."""
        rl, ap, si = self.extent_mm
        return {
            "volume_ml": round(self.volume_ml, 2),
            "voxels": float(self.voxel_count),
            "mean": round(self.mean, 2),
            "std": round(self.std, 2),
            "min": self.minimum,
            "max": self.maximum,
            "extent_rl_mm": round(rl, 1),
            "extent_ap_mm": round(ap, 1),
            "extent_si_mm": round(si, 1),
        }


def measure(label: str, mask: np.ndarray, voxels: np.ndarray, ijk_to_ras: np.ndarray) -> Measurement:
    """Measure a non-empty boolean mask shaped like `voxels` ([k, j, i])."""
    if mask.shape != voxels.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's {voxels.shape}")
    count = int(np.count_nonzero(mask))
    if count == 0:
        raise ValueError(f"{label}: empty mask, nothing to measure")
    # Per-axis profiles instead of np.nonzero: a body mask can hold tens of millions of voxels.
    profiles = [mask.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64) for axis in (2, 1, 0)]
    lo = tuple(int(np.flatnonzero(p)[0]) for p in profiles)
    hi = tuple(int(np.flatnonzero(p)[-1]) for p in profiles)
    mean_ijk = np.array([float(p @ np.arange(p.size)) / count for p in profiles])
    corners = np.array(
        [
            [a, b, c]
            for a in (lo[0] - 0.5, hi[0] + 0.5)
            for b in (lo[1] - 0.5, hi[1] + 0.5)
            for c in (lo[2] - 0.5, hi[2] + 0.5)
        ]
    )
    ras = ijk_to_ras_points(ijk_to_ras, corners)
    centroid = ijk_to_ras_points(ijk_to_ras, mean_ijk)
    box = (slice(lo[2], hi[2] + 1), slice(lo[1], hi[1] + 1), slice(lo[0], hi[0] + 1))
    values = voxels[box][mask[box]]
    voxel_ml = voxel_volume_mm3(ijk_to_ras) / 1000.0
    return Measurement(
        label=label,
        voxel_count=count,
        volume_ml=count * voxel_ml,
        voxel_lo=(lo[0], lo[1], lo[2]),
        voxel_hi=(hi[0], hi[1], hi[2]),
        ras_min=_tuple3(ras.min(axis=0)),
        ras_max=_tuple3(ras.max(axis=0)),
        centroid_ras=_tuple3(centroid),
        mean=float(values.mean(dtype=np.float64)),
        std=float(values.std(dtype=np.float64)),
        minimum=float(values.min()),
        maximum=float(values.max()),
    )


def _tuple3(v: Sequence[float]) -> Tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def side_phrase(m: Measurement, reference: Optional[Measurement]) -> str:
    """Patient side of the structure, relative to the reference (body or head) centre. RAS +x = right."""
    if reference is None:
        return ""
    dx = m.centroid_ras[0] - reference.centroid_ras[0]
    if abs(dx) < MIDLINE_FRACTION * reference.extent_mm[0]:
        return "in the midline"
    return "on the patient's right side" if dx > 0 else "on the patient's left side"


def where_sentence(m: Measurement, reference: Optional[Measurement]) -> str:
    """Teaching sentence: side, then superior/inferior and anterior/posterior extent in RAS mm."""
    side = side_phrase(m, reference)
    where = f"lies {side}; it" if side else ""
    (x0, y0, z0), (x1, y1, z1) = m.ras_min, m.ras_max
    return (
        f"The {m.label.lower()} {where} spans from S {z1:.0f} mm (top) down to S {z0:.0f} mm (bottom), "
        f"R-L from x = {x0:.0f} to {x1:.0f} mm and A-P from y = {y0:.0f} to {y1:.0f} mm (RAS); "
        f"its centre is at ({_fmt3(m.centroid_ras)}) mm."
    ).replace("  ", " ")


def size_sentence(m: Measurement, unit: str) -> str:
    """Volume, extents and intensity statistics in one sentence."""
    rl, ap, si = m.extent_mm
    return (
        f"The {m.label.lower()} measures {m.volume_ml:.1f} mL ({m.voxel_count} voxels), "
        f"{rl:.0f} mm right-left x {ap:.0f} mm anterior-posterior x {si:.0f} mm superior-inferior; "
        f"{unit} inside: mean {m.mean:.0f}, std {m.std:.0f}, min {m.minimum:.0f}, max {m.maximum:.0f}."
    )


def _fmt3(v: Sequence[float]) -> str:
    return ", ".join(str(round(x)) for x in v)
