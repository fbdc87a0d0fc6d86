"""Modality guess and the templated Markdown report of a volume and what the tools found."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from medmllm.engines.builtin.measure import Measurement

# CT air sits at about -1000 HU; no MR or other modality produces large regions this negative.
CT_AIR_HU = -500.0
CT_AIR_MIN_FRACTION = 0.005
SAMPLE_STRIDE = 4  # the guess looks at every 4th voxel per axis: enough, and cheap on big scans


def guess_modality(voxels: np.ndarray) -> Tuple[str, str]:
    """("CT" | "MR", reason). Not CT means treated as MR: the tools have no other path."""
    sample = voxels[::SAMPLE_STRIDE, ::SAMPLE_STRIDE, ::SAMPLE_STRIDE]
    air = float(np.count_nonzero(sample <= CT_AIR_HU)) / sample.size
    lo, hi = float(voxels.min()), float(voxels.max())
    if air >= CT_AIR_MIN_FRACTION:
        return "CT", f"{air:.0%} of voxels are at or below {CT_AIR_HU:.0f}, the Hounsfield range of air"
    return "MR", (
        f"intensities {lo:.0f}..{hi:.0f} have no air-range Hounsfield values, so not CT; treated as MR"
    )


def volume_report(
    describe: Dict, modality: Tuple[str, str], findings: Sequence[Measurement], notes: Sequence[str]
) -> str:
    """Markdown: header facts from `Volume.describe()`, then one table row per finding."""
    unit = "HU" if modality[0] == "CT" else "intensity"
    ni, nj, nk = describe["shape"][2], describe["shape"][1], describe["shape"][0]
    lo, hi = describe["intensity_range"]
    lines: List[str] = [
        "# Volume report",
        "",
        "_Built-in image-analysis tools (thresholds, connected components), not a language model. "
        "For teaching and research; not a diagnosis._",
        "",
        f"- **Modality guess:** {modality[0]} ({modality[1]})",
        f"- **Dimensions (i x j x k):** {ni} x {nj} x {nk} voxels ({describe['dtype']})",
        "- **Spacing (i, j, k):** " + ", ".join(f"{s:.3g}" for s in describe["spacing"]) + " mm",
        f"- **Orientation (IJK axes point towards):** {describe['orientation']}",
        "- **Origin (RAS):** " + ", ".join(f"{x:.1f}" for x in describe["origin"]) + " mm",
        f"- **Intensity range:** {lo:g} .. {hi:g}",
        "",
        "## Findings",
        "",
    ]
    if findings:
        lines += [
            f"| structure | volume (mL) | mean {unit} | std | min | max "
            "| extent R-L x A-P x S-I (mm) | centre RAS (mm) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [_row(m) for m in findings]
    else:
        lines.append("No structure found by the tools for this kind of volume.")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def _row(m: Measurement) -> str:
    rl, ap, si = m.extent_mm
    centre = ", ".join(str(round(x)) for x in m.centroid_ras)
    return (
        f"| {m.label} | {m.volume_ml:.1f} | {m.mean:.0f} | {m.std:.0f} | {m.minimum:.0f} | {m.maximum:.0f} "
        f"| {rl:.0f} x {ap:.0f} x {si:.0f} | {centre} |"
    )
