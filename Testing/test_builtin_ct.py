"""CT tools of the built-in engine on synthetic chest phantoms with analytic anatomy.

The phantom is defined in RAS mm (medmllm.samples), so the same patient appears on axis-aligned,
flipped (LPS-like) and oblique grids; volumes are checked against the analytic shapes, masks
against the voxels whose centres lie inside those shapes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from medmllm import samples
from medmllm.engines.builtin import grid
from medmllm.engines.builtin.ct_tools import CTAnalysis
from medmllm.engines.builtin.measure import measure

SHAPE = (100, 88, 128)  # k, j, i
LUNG_ML = 4.0 / 3.0 * math.pi * np.prod(samples.LUNG_SEMI_AXES) / 1000.0


def _matrix(kind: str) -> np.ndarray:
    """IJK->RAS placing the phantom's patient (centred on the origin) inside the SHAPE grid."""
    spacing = np.array([2.5, 2.5, 3.0])
    m = np.eye(4)
    m[:3, :3] = np.diag(spacing)
    if kind == "flipped":  # i to the left, j to posterior: the usual DICOM axial stack
        m[:3, :3] = np.diag(spacing * [-1, -1, 1])
    elif kind == "oblique":  # rotated 20 degrees about S, then tilted 10 degrees about R
        a, b = math.radians(20), math.radians(10)
        rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
        m[:3, :3] = rx @ rz @ np.diag(spacing)
    centre_ijk = (np.array(SHAPE[::-1]) - 1) / 2
    m[:3, 3] = -m[:3, :3] @ centre_ijk
    return m


def _ras_grid(volume):
    k, j, i = np.indices(volume.shape, dtype=np.float64)
    m = volume.ijk_to_ras
    return [m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3)]


def _lung_truth(volume, centre):
    x, y, z = _ras_grid(volume)
    a, b, c = samples.LUNG_SEMI_AXES
    return ((x - centre[0]) / a) ** 2 + ((y - centre[1]) / b) ** 2 + ((z - centre[2]) / c) ** 2 <= 1.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module", params=["aligned", "flipped", "oblique"])
def phantom(request):
    volume = samples.chest_ct_phantom(SHAPE, _matrix(request.param))
    return volume, CTAnalysis(volume.voxels, volume.ijk_to_ras, volume.spacing)


def test_lungs_named_by_side_in_ras_with_analytic_volume(phantom):
    volume, ct = phantom
    lungs = ct.lung_masks()
    assert sorted(lungs) == ["Left lung", "Right lung"]
    right = measure("Right lung", lungs["Right lung"], volume.voxels, volume.ijk_to_ras)
    left = measure("Left lung", lungs["Left lung"], volume.voxels, volume.ijk_to_ras)
    assert right.centroid_ras[0] == pytest.approx(samples.LUNG_CENTRES[0][0], abs=2.0)
    assert left.centroid_ras[0] == pytest.approx(samples.LUNG_CENTRES[1][0], abs=2.0)
    for m in (right, left):
        assert m.volume_ml == pytest.approx(LUNG_ML, rel=0.02)
        assert m.mean == pytest.approx(samples.HU["lung"], abs=3)
        assert m.std == pytest.approx(10, abs=2)


def test_lung_mask_matches_voxels_inside_the_ellipsoid(phantom):
    volume, ct = phantom
    lungs = ct.lung_masks()
    truth = _lung_truth(volume, samples.LUNG_CENTRES[0])
    assert _dice(lungs["Right lung"], truth) > 0.99
    assert not (lungs["Right lung"] & lungs["Left lung"]).any()


def test_airway_is_the_trachea_not_the_lungs(phantom):
    volume, ct = phantom
    airway = ct.airway_masks()["Airway"]
    x, y, z = _ras_grid(volume)
    tx, ty, tr, tz = samples.TRACHEA
    truth = ((x - tx) ** 2 + (y - ty) ** 2 <= tr**2) & (z >= tz)
    body = (x / samples.BODY_SEMI_AXES[0]) ** 2 + (y / samples.BODY_SEMI_AXES[1]) ** 2 <= 1.0
    assert _dice(airway, truth & body) > 0.95
    assert not (airway & ct.lung_masks()["Right lung"]).any()


def test_bone_and_body_volumes(phantom):
    volume, ct = phantom
    x, y, _ = _ras_grid(volume)
    sx, sy, sr = samples.SPINE
    spine = (x - sx) ** 2 + (y - sy) ** 2 <= sr**2
    bone = ct.bone_masks()["Bone"]
    assert _dice(bone, spine) > 0.98
    bone_m = measure("Bone", bone, volume.voxels, volume.ijk_to_ras)
    assert bone_m.mean == pytest.approx(samples.HU["bone"], abs=3)
    body_truth = (x / samples.BODY_SEMI_AXES[0]) ** 2 + (y / samples.BODY_SEMI_AXES[1]) ** 2 <= 1.0
    body = ct.body_masks()["Body"]
    assert _dice(body, body_truth) > 0.99
    assert body[ct.lung_masks()["Left lung"]].all(), "the body outline includes the lungs inside it"


def test_box_bounds_are_the_mask_voxel_bounds():
    volume = samples.chest_ct_phantom(SHAPE, _matrix("aligned"))
    truth = _lung_truth(volume, samples.LUNG_CENTRES[1])
    mask = CTAnalysis(volume.voxels, volume.ijk_to_ras, volume.spacing).lung_masks()["Left lung"]
    m = measure("Left lung", mask, volume.voxels, volume.ijk_to_ras)
    k, j, i = np.nonzero(truth)
    assert m.voxel_lo == (i.min(), j.min(), k.min())
    assert m.voxel_hi == (i.max(), j.max(), k.max())
    # RAS extent of the left lung (edges of its voxels) brackets the analytic ellipsoid
    cx, _, cz = samples.LUNG_CENTRES[1]
    a, _, c = samples.LUNG_SEMI_AXES
    assert m.ras_min[0] <= cx - a + 2.5 and m.ras_max[0] >= cx + a - 2.5
    assert m.ras_min[2] <= cz - c + 3.0 and m.ras_max[2] >= cz + c - 3.0


def test_coarse_grid_path_maps_back_to_full_resolution(monkeypatch):
    volume = samples.chest_ct_phantom(SHAPE, _matrix("flipped"))
    full = CTAnalysis(volume.voxels, volume.ijk_to_ras, volume.spacing)
    monkeypatch.setattr(grid, "FULL_RES_MAX_VOXELS", 0)
    monkeypatch.setattr(grid, "COARSE_TARGET_MM", 5.0)
    coarse = CTAnalysis(volume.voxels, volume.ijk_to_ras, volume.spacing)
    assert coarse.f == (2, 2, 2)  # round(5 / 3), round(5 / 2.5)
    for name in ("Right lung", "Left lung"):
        assert coarse.lung_masks()[name].shape == volume.shape
        assert _dice(coarse.lung_masks()[name], full.lung_masks()[name]) > 0.98
    assert _dice(coarse.body_masks()["Body"], full.body_masks()["Body"]) > 0.99
    assert _dice(coarse.bone_masks()["Bone"], full.bone_masks()["Bone"]) > 0.97
    assert _dice(coarse.airway_masks()["Airway"], full.airway_masks()["Airway"]) > 0.9


def test_upsample_gives_each_voxel_its_coarse_sample():
    rng = np.random.default_rng(1)
    full = rng.random((7, 9, 11)) > 0.5
    f = (2, 3, 2)
    coarse = grid.downsample(full, f)
    up = grid.upsample(coarse, f, full.shape)
    assert up.shape == full.shape
    k, j, i = np.indices(full.shape)
    assert np.array_equal(up, coarse[k // f[0], j // f[1], i // f[2]])


def test_no_lungs_or_airway_when_the_body_holds_no_air():
    volume = samples.chest_ct_phantom((40, 40, 40), _centred(np.diag([8.0, 8.0, 8.0, 1.0]), 40), noise_hu=0)
    inside = grid.fill_holes_per_slice(volume.voxels > -500, axis=0)
    solid = np.where(inside, np.maximum(volume.voxels, 0), -1000).astype(np.int16)
    ct = CTAnalysis(solid, volume.ijk_to_ras, volume.spacing)
    assert ct.lung_masks() == {}
    assert ct.airway_masks() == {}
    assert ct.body_masks()["Body"].sum() == inside.sum()


def test_body_excludes_a_table_joined_by_a_thin_strip():
    volume = samples.chest_ct_phantom(SHAPE, _matrix("aligned"), noise_hu=0)
    _, y, _ = _ras_grid(volume)
    hu = volume.voxels.copy()
    hu[(y > -120) & (y < -110)] = 300  # table under the patient (posterior), 10 mm thick
    x_index = SHAPE[2] // 2
    hu[:, :, x_index][(y[:, :, x_index] >= -110) & (y[:, :, x_index] <= -100)] = 40  # one-voxel-wide link
    ct = CTAnalysis(hu, volume.ijk_to_ras, volume.spacing)
    body = ct.body_masks()["Body"]
    assert not body[(y > -119) & (y < -111)].any()
    assert ct.bone_masks()["Bone"][(y > -119) & (y < -111)].sum() == 0


def _centred(m: np.ndarray, n: int) -> np.ndarray:
    m = m.copy()
    m[:3, 3] = -m[:3, :3] @ np.full(3, (n - 1) / 2)
    return m
