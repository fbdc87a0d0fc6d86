"""Brain masks: the classical method on a head phantom, deepbet on the real MNI152 template.

The MNI152 checks read the nilearn and deepbet wheels from the medmllm cache, which
`scripts/setup` fills (`python -m medmllm.samples`); tests themselves never download.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from medmllm import samples
from medmllm.engines.builtin import mri_tools
from medmllm.engines.builtin.mri_tools import BrainMaskError, brain_mask, otsu_threshold
from medmllm.geometry.volume import Volume


def _oblique(spacing: float, shape, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    m = np.eye(4)
    m[:3, :3] = rot * spacing
    m[:3, 3] = -m[:3, :3] @ ((np.array(shape[::-1]) - 1) / 2)
    return m


def test_classical_brain_on_an_oblique_head_phantom():
    shape = (64, 70, 66)
    volume = samples.head_mr_phantom(shape, _oblique(2.5, shape, 15), centre=(3.0, -4.0, 2.0))
    mask, method = brain_mask(volume.voxels, volume.ijk_to_ras, "classical")
    assert "classical" in method and "Otsu" in method
    truth = volume.voxels == samples.MR_INTENSITY["brain"]
    assert not (mask & ~truth).any(), "no scalp or skull in the brain mask"
    assert np.count_nonzero(mask) / np.count_nonzero(truth) > 0.995
    sphere_ml = 4 / 3 * math.pi * samples.HEAD_RADII["brain"] ** 3 / 1000
    assert mask.sum() * 2.5**3 / 1000 == pytest.approx(sphere_ml, rel=0.03)


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
@pytest.mark.parametrize("signs", [(1, 1, 1), (-1, -1, 1), (1, -1, -1)])
def test_canonical_reorder_round_trips_and_points_to_ras(perm, signs):
    m = np.eye(4)
    m[:3, :3] = np.eye(3)[:, list(perm)] * np.array(signs)  # column c: IJK axis c along +-RAS perm[c]
    rng = np.random.default_rng(0)
    array = rng.random((3, 4, 5))
    axes, flips = mri_tools._canonical_axes(m)
    canonical = mri_tools._to_canonical(array, axes, flips)
    assert np.array_equal(mri_tools._from_canonical(canonical, axes, flips), array)
    k, j, i = np.indices(array.shape)
    for ras_axis in range(3):
        coordinate = m[ras_axis, 0] * i + m[ras_axis, 1] * j + m[ras_axis, 2] * k
        along = mri_tools._to_canonical(coordinate, axes, flips)
        assert (np.diff(along, axis=ras_axis) > 0).all(), "canonical axes must run towards R, A, S"


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(10, 2, 5000), rng.normal(100, 5, 3000)])
    assert 20 < otsu_threshold(values) < 90


def test_no_tissue_is_a_clear_error():
    flat = np.zeros((20, 20, 20), np.float32)
    with pytest.raises(BrainMaskError, match="no bright tissue"):
        brain_mask(flat, np.eye(4), "classical")
    with pytest.raises(ValueError, match="unknown brain-mask method"):
        brain_mask(flat, np.eye(4), "best")


@pytest.fixture(scope="module")
def mni():
    paths = [samples.find_asset(a) for a in samples.SAMPLE_ASSETS]
    missing = [a.member for a, p in zip(samples.SAMPLE_ASSETS, paths) if p is None]
    assert not missing, f"sample wheels not cached: {missing} (scripts/setup fetches them)"
    t1 = Volume.from_file(paths[0])
    tissue = (Volume.from_file(paths[1]).voxels.astype(float) + Volume.from_file(paths[2]).voxels) / 255 > 0.5
    return t1, tissue


def test_deepbet_on_mni152_covers_grey_and_white_matter(mni):
    t1, tissue = mni
    mask, method = brain_mask(t1.voxels, t1.ijk_to_ras, "deepbet")
    assert method.startswith("deepbet")
    assert mask.shape == t1.shape
    assert np.count_nonzero(mask & tissue) / np.count_nonzero(tissue) > 0.99
    assert np.count_nonzero(mask & ~tissue) / np.count_nonzero(mask) < 0.2  # CSF and partial volume
    assert 1500 < mask.sum() / 1000 < 2100  # mL at 1 mm
