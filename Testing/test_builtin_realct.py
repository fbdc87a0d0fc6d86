"""The built-in CT tools on real scans, scored against TotalSegmentator's own segmentations.

Scans and references come from the pinned TotalSegmentator 2.18.0 / pyradiomics 3.0.1 sdists in
the sample cache (scripts/setup fills it; tests never download). The numbers are the ones
`scripts/eval_realct` prints: these tests hold its floors. Targets of issue 11: lungs Dice >= 0.9
and each lung's volume within 10 % on every scan whose reference has lungs; the bone floors below
are what the tools reach today (the 0.9 bone target is not met on the crop, 0.892, nor on the DICOM
series, whose 3 mm `--fast` reference caps a mask at its 1 mm resolution near 0.86; docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_script

eval_realct = load_script("eval_realct")

BONE_DICE_FLOOR = {"abdomen-ct": 0.895, "abdomen-ct-crop": 0.885, "ct-dicom": 0.71}


@pytest.fixture(scope="module")
def scored():
    names = ("chest-ct", "abdomen-ct", "abdomen-ct-crop", "ct-dicom", "lung1-ct", "lung2-ct")
    return {name: {r.structure: r for r in eval_realct.score(name)[0]} for name in names}


@pytest.mark.parametrize("name", ["abdomen-ct", "abdomen-ct-crop"])
def test_lung_bases_are_found_as_lungs_not_bowel_gas(scored, name):
    rows = scored[name]
    for structure in ("Right lung", "Left lung", "Lungs"):
        assert rows[structure].dice >= 0.9, structure
        assert abs(rows[structure].volume_error) <= 0.10, structure
    assert rows["Right lung"].centre_x_mm > 0 > rows["Left lung"].centre_x_mm  # RAS +x: patient's right


def test_no_lungs_and_no_airway_below_the_diaphragm(scored):
    assert set(scored["ct-dicom"]) == {"Bone"}  # the DICOM series is upper abdomen only
    assert "Airway" not in scored["abdomen-ct"] and "Airway" not in scored["abdomen-ct-crop"]


@pytest.mark.parametrize("name", ["chest-ct", "lung1-ct", "lung2-ct"])
def test_chest_scans_give_two_lungs_on_their_sides_and_a_midline_airway(scored, name):
    rows = scored[name]
    right, left = rows["Right lung"], rows["Left lung"]
    assert right.centre_x_mm > 30 and left.centre_x_mm < -30
    assert 800 < left.ours_ml < right.ours_ml < 3500  # adult lungs; the right one is the larger
    airway = rows["Airway"]
    assert abs(airway.centre_x_mm) < 15 and airway.width_mm < 110  # trachea + main bronchi, not a lung
    assert 5 < airway.ours_ml < 80


@pytest.mark.parametrize("name", sorted(BONE_DICE_FLOOR))
def test_bones_hold_their_floor(scored, name):
    assert scored[name]["Bone"].dice >= BONE_DICE_FLOOR[name]


def test_dicom_reference_grid_caps_dice_below_the_target(scored):
    """The DICOM series' reference was made at 3 mm (`--fast`): re-made on that grid, our own mask
    scores about 0.86 against itself, so no mask at the scan's 1 mm reaches 0.9 against it."""
    bone = scored["ct-dicom"]["Bone"]
    assert 0.8 < bone.ceiling < 0.9
    assert bone.dice_on_reference_grid >= 0.735
    assert scored["abdomen-ct-crop"]["Bone"].ceiling is None  # reference made at 1.5 mm, scan at 3 mm


def test_reblocking_keeps_big_shapes_and_blurs_thin_ones():
    """`reblocked` is what a 3 mm model returns on a 1 mm grid: a 40 mm ball survives it, a 2 mm
    plate (a thin cortex or rib) comes back 3 mm thick or not at all."""
    k, j, i = np.ogrid[:60, :60, :60]
    ball = (k - 30) ** 2 + (j - 30) ** 2 + (i - 30) ** 2 <= 20**2
    plate = np.zeros_like(ball)
    plate[29:31] = True
    spacing = (1.0, 1.0, 1.0)
    assert eval_realct.dice(ball, eval_realct.reblocked(ball, spacing, 3.0)) > 0.9
    assert eval_realct.dice(plate, eval_realct.reblocked(plate, spacing, 3.0)) < 0.85
    assert eval_realct.grid_scores(ball, ball, spacing, 1.0) == (None, None)  # same grid: nothing to add
    assert eval_realct.grid_scores(ball, ball, spacing, 3.0)[0] == 1.0
