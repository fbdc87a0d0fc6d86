"""Scores the built-in CT tools on the real scans of medmllm.samples against TotalSegmentator.

For every real CT and structure: our volume, the reference volume, the volume difference, Dice,
which side of the patient the mask lies on, and the time each tool took (`time.perf_counter`, on
this machine, as loaded as it is: the load average is printed). The reference is TotalSegmentator's
own segmentation shipped in its 2.18.0 sdist (lungs: union of the lobes; bones: vertebrae, ribs,
sacrum, hips, femurs, humeri, scapulae, claviculae, sternum, skull). Where that segmentation was
made on a coarser grid than the scan's (TotalSegmentator `--fast` segments at 3 mm), the table
also gives Dice on that grid and the ceiling: the Dice our own mask reaches against itself once
re-made on that grid, i.e. what a segmentation exactly like ours can score against a reference
with that grid's blocky boundary. Prints a Markdown table; asserts nothing. Run with
`scripts/eval_realct` (uses .venv/bin/python); the sample cache must be filled by set-up
(`python -m medmllm.samples`).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

# Our segment name -> reference group in medmllm.samples.REFERENCE_GROUPS.
COMPARED = {"Right lung": "Right lung", "Left lung": "Left lung", "Lungs": "Lungs", "Bone": "Bone"}
TOOLS = ("body", "lung", "airway", "bone")


@dataclass(frozen=True)
class Row:
    scan: str
    structure: str
    ours_ml: float
    reference_ml: Optional[float]  # None: the scan has no reference segmentation
    dice: Optional[float]
    centre_x_mm: Optional[float]  # RAS x of our mask's centroid minus the body's midline (+ = right)
    width_mm: Optional[float]  # R-L extent of our mask
    dice_on_reference_grid: Optional[float] = None  # both masks on the reference model's grid
    ceiling: Optional[float] = None  # our mask against itself re-made on that grid

    @property
    def volume_error(self) -> Optional[float]:
        if self.reference_ml is None or self.reference_ml == 0:
            return None
        return self.ours_ml / self.reference_ml - 1.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 2.0 * np.count_nonzero(a & b) / total if total else 1.0


def on_grid(mask: np.ndarray, spacing_ijk, mm: float) -> np.ndarray:
    """`mask` sampled on an isotropic `mm` grid over the same extent (linear, >= 0.5), the way a
    model working at `mm` sees it."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(mask.astype(np.float32))
    image.SetSpacing([float(s) for s in spacing_ijk])
    size = [max(1, round(n * s / mm)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    coarse = sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), (mm, mm, mm), image.GetDirection()
    )
    return sitk.GetArrayFromImage(coarse) >= 0.5


def reblocked(mask: np.ndarray, spacing_ijk, mm: float) -> np.ndarray:
    """`mask` re-made on the `mm` grid and put back on its own grid by nearest neighbour, as
    TotalSegmentator returns a segmentation made at `mm`."""
    import SimpleITK as sitk

    coarse = sitk.GetImageFromArray(on_grid(mask, spacing_ijk, mm).astype(np.uint8))
    coarse.SetSpacing((mm, mm, mm))
    target = sitk.Image(list(mask.shape[::-1]), sitk.sitkUInt8)
    target.SetSpacing([float(s) for s in spacing_ijk])
    back = sitk.Resample(coarse, target, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(back).astype(bool)


def grid_scores(ours: np.ndarray, reference: np.ndarray, spacing_ijk, mm: Optional[float]) -> tuple:
    """(Dice on the reference model's grid, ceiling); (None, None) unless that grid is coarser
    than the scan's."""
    if mm is None or min(spacing_ijk) >= mm:
        return None, None
    ours_coarse = on_grid(ours, spacing_ijk, mm)
    on_reference_grid = dice(ours_coarse, on_grid(reference, spacing_ijk, mm))
    return on_reference_grid, dice(ours, reblocked(ours, spacing_ijk, mm))


def score(name: str) -> tuple:
    """(rows, seconds per tool) for one real CT scan."""
    from medmllm import samples
    from medmllm.engines.builtin.ct_tools import CTAnalysis

    scan = samples.real_scan(name)
    volume = samples.load_real_scan(scan)
    ct = CTAnalysis(volume.voxels, volume.ijk_to_ras, volume.spacing)
    masks: Dict[str, np.ndarray] = {}
    seconds: Dict[str, float] = {}
    for tool in TOOLS:
        started = time.perf_counter()
        masks.update(getattr(ct, f"{tool}_masks")())
        seconds[tool] = time.perf_counter() - started
    sides = [m for k, m in masks.items() if k.endswith(" lung")]
    if sides:
        masks["Lungs"] = np.logical_or.reduce(sides)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    x = _x_ras(volume)
    midline = float(x[masks["Body"]].mean()) if "Body" in masks else 0.0
    rows = []
    for structure in ("Right lung", "Left lung", "Lungs", "Bone", "Airway"):
        ours = masks.get(structure, np.zeros(volume.shape, bool))
        reference = None
        if scan.reference_map is not None and structure in COMPARED:
            reference = samples.reference_mask(scan, COMPARED[structure], volume)
        if not ours.any() and (reference is None or not reference.any()):
            continue
        xs = x[ours] if ours.any() else None
        coarse = (None, None)
        if reference is not None:
            coarse = grid_scores(ours, reference, volume.spacing, scan.reference_mm)
        rows.append(
            Row(
                name,
                structure,
                float(ours.sum()) * voxel_ml,
                None if reference is None else float(reference.sum()) * voxel_ml,
                None if reference is None else dice(ours, reference),
                None if xs is None else float(xs.mean()) - midline,
                None if xs is None else float(xs.max() - xs.min()),
                *coarse,
            )
        )
    return rows, seconds


def _x_ras(volume) -> np.ndarray:
    m = volume.ijk_to_ras[0]
    k, j, i = np.ogrid[: volume.shape[0], : volume.shape[1], : volume.shape[2]]
    return np.broadcast_to((m[0] * i + m[1] * j + m[2] * k + m[3]).astype(np.float32), volume.shape)


def table(results: List[tuple]) -> str:
    lines = [
        "| scan | structure | ours (mL) | reference (mL) | volume diff | Dice | side (centre x vs midline) "
        "| R-L width | Dice on the reference's grid | ceiling there |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rows, _ in results:
        for r in rows:
            ref = "no reference" if r.reference_ml is None else f"{r.reference_ml:.0f}"
            err = "" if r.volume_error is None else f"{r.volume_error:+.1%}"
            d = "" if r.dice is None else f"{r.dice:.3f}"
            side = "" if r.centre_x_mm is None else _side(r.centre_x_mm)
            width = "" if r.width_mm is None else f"{r.width_mm:.0f} mm"
            coarse = "" if r.dice_on_reference_grid is None else f"{r.dice_on_reference_grid:.3f}"
            ceiling = "" if r.ceiling is None else f"{r.ceiling:.3f}"
            lines.append(
                f"| {r.scan} | {r.structure} | {r.ours_ml:.0f} | {ref} | {err} | {d} | {side} | {width} "
                f"| {coarse} | {ceiling} |"
            )
    return "\n".join(lines)


def _side(dx: float) -> str:
    return f"{'right' if dx > 0 else 'left'} ({dx:+.0f} mm)"


def timing_table(names: List[str], results: List[tuple]) -> str:
    from medmllm import samples

    lines = [
        "| scan | voxels | " + " | ".join(TOOLS) + " | all four |",
        "|---|---" + "|---" * (len(TOOLS) + 1) + "|",
    ]
    for name, (_, seconds) in zip(names, results):
        shape = samples.load_real_scan(samples.real_scan(name)).shape
        cells = " | ".join(f"{seconds[t]:.2f} s" for t in TOOLS)
        lines.append(
            f"| {name} | {shape[2]}x{shape[1]}x{shape[0]} | {cells} | {sum(seconds.values()):.2f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    from medmllm import samples

    ct_scans = [n for n, s in samples.REAL_SCANS.items() if s.modality == "CT"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", nargs="*", default=ct_scans, choices=ct_scans)
    args = parser.parse_args()
    results = [score(name) for name in args.scans]
    print(table(results))
    print()
    print(timing_table(args.scans, results))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nload average while measuring: {load} ({os.cpu_count()} CPUs)")
    print(f"data: {samples.TOTALSEG_SDIST.attribution}; {samples.TOTALSEG_SDIST.licence}.")
    print(f"      pyradiomics 3.0.1 sdist test data, {samples.PYRADIOMICS_SDIST.licence}.")


if __name__ == "__main__":
    main()
