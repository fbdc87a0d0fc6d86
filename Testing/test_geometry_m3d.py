"""M3D-LaMed grid: preprocessing, torch == numpy resize, and the inverse for boxes and masks.

Resampling bounds checked here, with s = crop size / model size along an axis (volume voxels
per model voxel) and C the crop size:
- box fractions -> IJKBox -> fractions is the identity (values are index / size, 3 decimals);
- voxel box -> fractions -> IJKBox moves each edge by at most s/2 + 0.0005*C voxels (the model
  grid step plus M3D's 3-decimal rounding), or s + 0.0005*C for a box thinner than s;
- a cube mask -> model grid -> volume moves each face by less than s/2 + 1/2 voxels (so it is
  exact on an axis the model upsamples, s <= 1), provided the cube is thicker than s.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from medmllm.geometry.boxes import IJKBox
from medmllm.geometry.m3d_grid import MODEL_SHAPE, M3DGrid, _resize_numpy, resize_nearest, resize_trilinear
from medmllm.geometry.volume import Volume, VolumeError

SMALL_MODEL = (8, 16, 16)


@st.composite
def grids(draw, model_shape=SMALL_MODEL):
    """A crop of random size (smaller or larger than the model grid) inside a larger volume."""
    size = tuple(draw(st.integers(1, 4 * m)) for m in model_shape)
    offset = tuple(draw(st.integers(0, 5)) for _ in range(3))
    extra = tuple(draw(st.integers(0, 5)) for _ in range(3))
    volume_shape = tuple(o + n + e for o, n, e in zip(offset, size, extra))
    return M3DGrid(volume_shape, offset, size, model_shape)


def phantom():
    """CT-like: -3024 outside a field of view, -1000 air inside it, a 40 HU body with a 700 HU block."""
    voxels = np.full((30, 60, 70), -3024, dtype=np.int16)
    voxels[2:28, 5:55, 4:66] = -1000
    voxels[6:24, 15:45, 12:58] = 40
    voxels[10:14, 20:25, 30:40] = 700
    return Volume.from_array(voxels, np.diag([-0.8, -0.8, 2.5, 1.0]))


def test_prepare_crops_foreground_resizes_and_normalises():
    model, grid = M3DGrid.prepare(phantom())
    assert model.shape == MODEL_SHAPE and model.dtype == np.float32
    assert model.min() == 0.0 and model.max() == 1.0
    assert grid.volume_shape == (30, 60, 70)
    assert grid.crop_offset == (2, 5, 4) and grid.crop_size == (26, 50, 62)  # the field of view


def test_window_decides_what_counts_as_foreground():
    model, grid = M3DGrid.prepare(phantom(), window=(40, 400))
    assert grid.crop_offset == (6, 15, 12) and grid.crop_size == (18, 30, 46)  # the body only
    assert model.min() == 0.0 and model.max() == 1.0


def test_depth_axis_is_k():
    voxels = np.zeros((64, 20, 20), dtype=np.float32)
    voxels[:, 0, 0] = voxels[:, -1, -1] = 1.0  # keeps the crop the whole volume
    voxels[48:64, 5:15, 5:15] = 5.0  # slab in the last quarter of k
    model, grid = M3DGrid.prepare(Volume.from_array(voxels, np.eye(4)))
    bright = np.nonzero(model.max(axis=(1, 2)) > 0.5)[0]
    assert grid.crop_size == (64, 20, 20)
    assert bright.min() >= 23 and bright.max() == 31


def test_constant_volume_uses_the_whole_volume():
    model, grid = M3DGrid.prepare(Volume.from_array(np.full((5, 6, 7), 3.0), np.eye(4)))
    assert grid.crop_offset == (0, 0, 0) and grid.crop_size == (5, 6, 7)
    assert not model.any()


@settings(max_examples=25, deadline=None)
@given(st.tuples(*[st.integers(1, 40)] * 3), st.tuples(*[st.integers(1, 40)] * 3), st.integers(0, 2**32 - 1))
def test_numpy_resize_matches_torch(source, target, seed):
    x = np.random.default_rng(seed).random(source).astype(np.float32)
    assert np.abs(_resize_numpy(x, target) - resize_trilinear(x, target)).max() < 1e-5


def test_prepare_without_torch_matches_with_torch(monkeypatch):
    with_torch, grid = M3DGrid.prepare(phantom(), window=(40, 400))
    monkeypatch.setitem(sys.modules, "torch", None)
    without, grid_numpy = M3DGrid.prepare(phantom(), window=(40, 400))
    assert grid_numpy == grid
    assert np.abs(with_torch - without).max() < 1e-5


@settings(max_examples=80, deadline=None)
@given(grids(MODEL_SHAPE), st.data())
def test_box_fractions_to_ijk_to_fractions_is_identity(grid, data):
    first = [data.draw(st.integers(0, m - 1)) for m in MODEL_SHAPE]
    last = [data.draw(st.integers(a, m - 1)) for a, m in zip(first, MODEL_SHAPE)]
    fractions = tuple(round(v / m, 3) for v, m in zip(first + last, MODEL_SHAPE * 2))
    box = grid.box_to_ijk(fractions)
    assert grid.ijk_box_to_fractions(box) == fractions
    box.clamp(grid.volume_shape)  # lands inside the volume


@settings(max_examples=150, deadline=None)
@given(grids(), st.data())
def test_a_model_box_and_the_same_voxels_as_a_model_mask_land_on_the_same_voxels(grid, data):
    first = [data.draw(st.integers(0, m - 1)) for m in SMALL_MODEL]
    last = [data.draw(st.integers(a, m - 1)) for a, m in zip(first, SMALL_MODEL)]
    model_mask = np.zeros(SMALL_MODEL, bool)
    model_mask[first[0] : last[0] + 1, first[1] : last[1] + 1, first[2] : last[2] + 1] = True
    mask = grid.mask_to_volume(model_mask)
    assume(mask.any())  # a crop much smaller than the model grid can lose a one-voxel box
    box = grid.box_to_ijk(tuple(v / m for v, m in zip(first + last, SMALL_MODEL * 2)))
    k, j, i = np.nonzero(mask)
    assert box.voxel_range() == ((i.min(), j.min(), k.min()), (i.max(), j.max(), k.max()))


@settings(max_examples=80, deadline=None)
@given(grids(MODEL_SHAPE), st.data())
def test_voxel_box_to_fractions_to_box_stays_within_the_grid_step(grid, data):
    k0, j0, i0 = grid.crop_offset
    k_n, j_n, i_n = grid.crop_size
    lo = [data.draw(st.integers(o, o + n - 1)) for o, n in ((i0, i_n), (j0, j_n), (k0, k_n))]
    hi = [data.draw(st.integers(a, o + n - 1)) for a, o, n in zip(lo, (i0, j0, k0), (i_n, j_n, k_n))]
    box = IJKBox.from_voxels(*lo, *hi)
    back = grid.box_to_ijk(grid.ijk_box_to_fractions(box))
    step = np.array(grid.crop_size[::-1]) / np.array(grid.model_shape[::-1])
    rounding = 0.0005 * np.array(grid.crop_size[::-1])
    width = np.array(box.hi) - np.array(box.lo)
    bound = np.where(width >= step, step / 2, step) + rounding + 1e-9
    assert np.all(np.abs(np.array(back.lo) - box.lo) <= bound)
    assert np.all(np.abs(np.array(back.hi) - box.hi) <= bound)


def test_box_to_ijk_by_hand():
    grid = M3DGrid((100, 512, 512), (10, 0, 0), (64, 512, 512))
    box = grid.box_to_ijk([0.25, 0.5, 0.0, 0.5, 0.75, 0.5])
    # edge extents: D 10 + [0.25 * 64, (0.5 + 1/32) * 64) = [26, 44); H [256, 386); W [0, 258)
    assert box.voxel_range() == ((0, 256, 26), (257, 385, 43))
    assert grid.box_to_ijk([0.5, 0.75, 0.5, 0.25, 0.5, 0.0]) == box  # min/max swapped


def test_bad_boxes_are_refused():
    grid = M3DGrid((40, 40, 40), (5, 5, 5), (20, 20, 20))
    for bad, message in [
        ([0.1, 0.2, 0.3], "6 finite"),
        ([0.1, 0.2, np.nan, 0.3, 0.4, 0.5], "6 finite"),
        ([0.1, 0.2, 0.3, 0.4, 1.5, 0.5], r"\[0, 1\]"),
        ([-0.1, 0.2, 0.3, 0.4, 0.5, 0.5], r"\[0, 1\]"),
    ]:
        with pytest.raises(VolumeError, match=message):
            grid.box_to_ijk(bad)
    with pytest.raises(VolumeError, match="outside the M3D crop"):
        grid.ijk_box_to_fractions(IJKBox.from_voxels(30, 30, 30, 35, 35, 35))
    with pytest.raises(VolumeError, match="does not fit"):
        M3DGrid((10, 10, 10), (5, 0, 0), (6, 10, 10))


@settings(max_examples=40, deadline=None)
@given(grids(), st.data())
def test_cube_mask_survives_the_model_grid_within_half_a_step(grid, data):
    step = np.array(grid.crop_size) / np.array(grid.model_shape)
    lo, hi = [], []
    for o, n, s in zip(grid.crop_offset, grid.crop_size, step):
        thickness = math.floor(s) + 1
        assume(thickness <= n)  # a cube thicker than one model voxel must fit on this axis
        start = data.draw(st.integers(o, o + n - thickness))
        lo.append(start)
        hi.append(data.draw(st.integers(start + thickness - 1, o + n - 1)))
    cube = np.zeros(grid.volume_shape, dtype=bool)
    cube[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    crop = tuple(slice(o, o + n) for o, n in zip(grid.crop_offset, grid.crop_size))
    back = grid.mask_to_volume(resize_nearest(cube[crop], grid.model_shape))
    hits = np.nonzero(back)
    first = [int(h.min()) for h in hits]
    last = [int(h.max()) for h in hits]
    assert back.sum() == np.prod(np.array(last) - first + 1)  # still a box
    for axis, s in enumerate(step):
        assert abs(first[axis] - lo[axis]) < s / 2 + 0.5
        assert abs(last[axis] - hi[axis]) < s / 2 + 0.5
    if np.all(step <= 1):
        assert np.array_equal(back, cube)


def test_cube_probabilities_through_trilinear_resizing_both_ways():
    """Soft path (probabilities/logits): exact where the model upsamples, one voxel where it halves."""
    grid = M3DGrid((30, 520, 100), (3, 4, 0), (20, 512, 90))
    cube = np.zeros(grid.volume_shape, dtype=bool)
    cube[7:15, 30:71, 20:50] = True
    back = grid.mask_to_volume(grid.to_model(cube.astype(np.float32)))
    assert np.array_equal(back[:, 30:71, :], cube[:, 30:71, :])  # k and i: upsampled, exact
    assert (~back[:, :29, :]).all() and (~back[:, 72:, :]).all()  # j: 512 -> 256, within one voxel


def test_logits_threshold_equals_sigmoid_threshold():
    grid = M3DGrid.from_identity()
    logits = np.random.default_rng(0).normal(0, 3, MODEL_SHAPE).astype(np.float32)
    by_logits = grid.mask_to_volume(logits[None, None], logits=True)
    assert np.array_equal(by_logits, 1 / (1 + np.exp(-logits)) > 0.5)
    assert np.array_equal(grid.mask_to_volume(logits, threshold=0.9, logits=True), logits > math.log(9))


def test_all_minus_inf_logits_mean_no_mask():
    grid = M3DGrid((40, 300, 300), (0, 10, 10), (40, 280, 280))
    mask = grid.mask_to_volume(np.full(MODEL_SHAPE, -np.inf, dtype=np.float32), logits=True)
    assert mask.shape == (40, 300, 300) and not mask.any()


def test_bad_masks_are_refused():
    grid = M3DGrid.from_identity()
    with pytest.raises(VolumeError, match=r"shape \(32, 256, 256\)"):
        grid.mask_to_volume(np.zeros((32, 256)))
    with pytest.raises(VolumeError, match="NaN"):
        grid.mask_to_volume(np.full(MODEL_SHAPE, np.nan))
    with pytest.raises(VolumeError, match="threshold"):
        grid.mask_to_volume(np.zeros(MODEL_SHAPE), threshold=1.0)
    with pytest.raises(VolumeError, match="shaped like the volume"):
        grid.to_model(np.zeros((3, 3, 3)))


def test_identity_grid_for_the_official_demo_input():
    grid = M3DGrid.from_identity()
    assert grid.crop_offset == (0, 0, 0) and grid.crop_size == MODEL_SHAPE == grid.volume_shape
    assert grid.box_to_ijk([0.0, 0.0, 0.0, 0.5, 0.5, 0.5]).voxel_range() == ((0, 0, 0), (128, 128, 16))


def official_m3d_preprocessing(voxels: np.ndarray) -> tuple:
    """M3D's data scripts with MONAI's transforms: min-max, CropForeground (> 0), Resize trilinear."""
    import torch
    from monai.transforms import CropForeground, Resize, ScaleIntensity
    from monai.transforms.utils import generate_spatial_bounding_box

    image = ScaleIntensity()(torch.from_numpy(voxels.astype(np.float32))[None])
    start, end = generate_spatial_bounding_box(image)
    out = np.asarray(Resize(MODEL_SHAPE, mode="trilinear")(CropForeground()(image)))[0]
    crop = (tuple(int(s) for s in start), tuple(int(e - s) for s, e in zip(start, end)))
    return (out - out.min()) / (out.max() - out.min()), crop


@pytest.mark.parametrize("seed", [0, 1])
def test_prepare_matches_the_official_monai_transforms(seed):
    """Same crop as MONAI's CropForeground; values as its Resize up to rounding (we min-max after)."""
    rng = np.random.default_rng(seed)
    voxels = rng.normal(0, 100, (37, 90, 75)).astype(np.float32)
    voxels[:, :4], voxels[:2], voxels[..., -7:] = -1024, -1024, -1024  # background to crop away
    ours, grid = M3DGrid.prepare(Volume.from_array(voxels, np.eye(4)))
    theirs, (offset, size) = official_m3d_preprocessing(voxels)
    assert (grid.crop_offset, grid.crop_size) == (offset, size) == ((2, 4, 0), (35, 86, 68))
    assert np.abs(ours - theirs).max() < 1e-6


def test_logits_resize_is_monais_resize_bit_for_bit():
    import torch
    from monai.transforms import Resize

    logits = np.random.default_rng(3).normal(0, 3, MODEL_SHAPE).astype(np.float32)
    theirs = np.asarray(Resize((33, 255, 257), mode="trilinear")(torch.from_numpy(logits)[None]))[0]
    assert np.array_equal(resize_trilinear(logits, (33, 255, 257)), theirs)


def test_nearest_resize_is_exact_where_torch_rounds_a_tie_down():
    """(i + 0.5) * 2 / 61 is exactly 1 for i = 30; torch's float scale puts that voxel in source 0."""
    import torch

    ours = resize_nearest(np.arange(2).reshape(2, 1, 1), (61, 1, 1))[:, 0, 0]
    source = torch.arange(2.0)[None, None, :, None, None]
    exact = torch.nn.functional.interpolate(source, (61, 1, 1), mode="nearest-exact")
    assert ours[30] == 1 and exact[0, 0, 30, 0, 0] == 0
    assert (ours != exact[0, 0, :, 0, 0].numpy()).sum() == 1
