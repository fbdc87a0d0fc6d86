"""IJKBox <-> RoiRAS on oblique, flipped and anisotropic grids; clamping; voxel ranges."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from medmllm.geometry.boxes import IJKBox, RoiRAS
from medmllm.geometry.transforms import ijk_to_ras_points
from medmllm.geometry.volume import Volume, VolumeError
from test_geometry_support import oblique_grids

voxel_ranges = st.tuples(*[st.integers(-5, 40)] * 3, *[st.integers(0, 30)] * 3).map(
    lambda v: (v[0], v[1], v[2], v[0] + v[3], v[1] + v[4], v[2] + v[5])
)


def test_from_voxels_edges_range_and_numpy_index():
    box = IJKBox.from_voxels(1, 2, 3, 4, 5, 6)
    assert box.lo == (0.5, 1.5, 2.5) and box.hi == (4.5, 5.5, 6.5)
    assert box.voxel_range() == ((1, 2, 3), (4, 5, 6))
    volume = np.zeros((10, 10, 10), dtype=bool)
    volume[box.voxel_slices()] = True
    k, j, i = np.nonzero(volume)
    assert (i.min(), i.max(), j.min(), j.max(), k.min(), k.max()) == (1, 4, 2, 5, 3, 6)


def test_voxel_range_uses_voxel_centres_half_open_and_keeps_thin_boxes():
    # a centre on the upper edge is outside, as in nearest-neighbour resampling of the model's mask
    assert IJKBox((0.2, 0.0, 0.0), (2.7, 1.0, 1.0)).voxel_range() == ((1, 0, 0), (2, 0, 0))
    assert IJKBox((2.1, 0.0, 0.0), (2.3, 0.0, 0.0)).voxel_range() == ((2, 0, 0), (2, 0, 0))
    near_half = IJKBox((2.5 - 1e-12, 0, 0), (4.5 + 1e-12, 0, 0))
    assert near_half.voxel_range()[0][0] == 3 and near_half.voxel_range()[1][0] == 4


def test_bad_boxes_are_refused():
    with pytest.raises(VolumeError, match="lo <= hi"):
        IJKBox((1, 0, 0), (0, 1, 1))
    with pytest.raises(VolumeError, match="3 finite numbers"):
        IJKBox((np.nan, 0, 0), (1, 1, 1))
    with pytest.raises(VolumeError, match="first <= last"):
        IJKBox.from_voxels(3, 0, 0, 2, 0, 0)
    with pytest.raises(VolumeError, match="starts outside"):
        IJKBox.from_voxels(-1, 0, 0, 2, 0, 0).voxel_slices()
    with pytest.raises(VolumeError, match="ends outside"):
        IJKBox.from_voxels(0, 0, 0, 10, 0, 0).voxel_slices(shape=(5, 5, 10))


def test_clamp_clips_and_warns_or_refuses():
    shape = (4, 6, 8)  # k, j, i
    inside = IJKBox.from_voxels(1, 1, 1, 2, 2, 2)
    assert inside.clamp(shape) == (inside, None)
    clipped, warning = IJKBox.from_voxels(-3, 2, 1, 20, 3, 9).clamp(shape)
    assert clipped.voxel_range() == ((0, 2, 1), (7, 3, 3))
    assert "clipped" in warning
    with pytest.raises(VolumeError, match="outside the volume"):
        IJKBox.from_voxels(9, 0, 0, 12, 1, 1).clamp(shape)
    with pytest.raises(VolumeError, match="outside the volume"):
        IJKBox((-3.0, 0, 0), (-0.5, 1, 1)).clamp(shape)


@settings(max_examples=80, deadline=None)
@given(oblique_grids(), voxel_ranges)
def test_box_to_roi_to_box_is_exact(matrix, voxels):
    box = IJKBox.from_voxels(*voxels)
    roi = box.to_roi(matrix)
    assert np.all(roi.size > 0)
    assert np.allclose(roi.axes.T @ roi.axes, np.eye(3), atol=1e-9)
    assert np.linalg.det(roi.axes) == pytest.approx(1.0)
    back = roi.to_ijk_box(matrix)
    assert np.allclose(back.lo, box.lo, atol=1e-6) and np.allclose(back.hi, box.hi, atol=1e-6)
    assert back.voxel_range() == box.voxel_range()
    again = back.to_roi(matrix)
    assert np.allclose(again.center, roi.center, atol=1e-6) and np.allclose(again.size, roi.size, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(oblique_grids(), voxel_ranges)
def test_roi_corners_are_the_box_corners_in_ras(matrix, voxels):
    box = IJKBox.from_voxels(*voxels)
    corners = box.to_roi(matrix).corners()
    expected = box.to_ras_corners(matrix)
    distances = np.linalg.norm(corners[:, None, :] - expected[None, :, :], axis=2)
    assert distances.min(axis=1).max() < 1e-6


def test_volume_can_stand_in_for_its_matrix():
    m = np.diag([-0.5, 2.0, 3.0, 1.0])
    volume = Volume.from_array(np.zeros((3, 4, 5)), m)
    box = IJKBox.from_voxels(0, 1, 2, 3, 3, 2)
    assert np.array_equal(box.to_roi(volume).center, box.to_roi(m).center)
    assert box.to_roi(volume).to_ijk_box(volume) == box.to_roi(m).to_ijk_box(m)


def test_roi_size_is_in_mm_along_the_volume_axes():
    m = np.diag([-0.5, 2.0, 3.0, 1.0])  # i flipped: left-handed grid
    roi = IJKBox.from_voxels(0, 0, 0, 3, 1, 0).to_roi(m)
    assert np.allclose(roi.size, [2.0, 4.0, 3.0])
    assert np.allclose(roi.center, ijk_to_ras_points(m, [1.5, 0.5, 0.0]))
    assert np.linalg.det(roi.axes) == pytest.approx(1.0)


def test_sheared_grid_gives_a_bounding_roi():
    m = np.eye(4)
    m[0, 1] = 0.5  # j leans towards R
    box = IJKBox.from_voxels(0, 0, 0, 3, 3, 3)
    roi = box.to_roi(m)
    back = roi.to_ijk_box(m)
    assert all(b <= a + 1e-9 for a, b in zip(box.lo, back.lo))
    assert all(b >= a - 1e-9 for a, b in zip(box.hi, back.hi))


def test_from_bounds_and_non_aligned_roi_to_box():
    roi = RoiRAS.from_bounds([0, 0, 0], [4, 2, 2])
    assert np.array_equal(roi.center, [2, 1, 1]) and np.array_equal(roi.axes, np.eye(3))
    box = roi.to_ijk_box(np.diag([2.0, 1.0, 1.0, 1.0]))
    assert box.lo == (0.0, 0.0, 0.0) and box.hi == (2.0, 2.0, 2.0)
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    rotated = RoiRAS([0, 0, 0], [2, 2, 2], [[c, -s, 0], [s, c, 0], [0, 0, 1]])
    bounding = rotated.to_ijk_box(np.eye(4))
    assert np.allclose(bounding.hi, [np.sqrt(2), np.sqrt(2), 1.0])


def test_bad_rois_are_refused():
    with pytest.raises(VolumeError, match="orthonormal"):
        RoiRAS([0, 0, 0], [1, 1, 1], np.diag([2.0, 1.0, 1.0]))
    with pytest.raises(VolumeError, match="negative"):
        RoiRAS([0, 0, 0], [1, -1, 1], np.eye(3))
    with pytest.raises(VolumeError, match="ras_min <= ras_max"):
        RoiRAS.from_bounds([1, 0, 0], [0, 1, 1])
    with pytest.raises(VolumeError, match="3x3"):
        RoiRAS([0, 0, 0], [1, 1, 1], np.eye(4))
    with pytest.raises(VolumeError, match="singular"):
        IJKBox.from_voxels(0, 0, 0, 1, 1, 1).to_roi([[1, 2, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
