"""2D slice export: radiological display orientation, exact pixel <-> IJK, boxes and PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from medmllm.geometry.boxes import IJKBox
from medmllm.geometry.slices import default_window_limits, export_slice
from medmllm.geometry.transforms import ijk_to_ras_points
from medmllm.geometry.volume import Volume, VolumeError
from PIL import Image
from test_geometry_support import aligned_grids, oblique_grids, rotation_from_quaternion, shapes

orientations = st.sampled_from(["axial", "coronal", "sagittal"])
# orientation -> (RAS direction towards the image top, RAS direction towards the image left)
TOP_LEFT = {
    "axial": ((0, 1, 0), (1, 0, 0)),  # anterior at top, patient right on the left
    "coronal": ((0, 0, 1), (1, 0, 0)),  # superior at top, patient right on the left
    "sagittal": ((0, 0, 1), (0, 1, 0)),  # superior at top, anterior on the left
}


def ramp_volume(shape, matrix):
    """Every voxel holds its own flat index, so an exported pixel says which voxel it came from."""
    return Volume.from_array(np.arange(np.prod(shape), dtype=np.float64).reshape(shape), matrix)


@settings(max_examples=60, deadline=None)
@given(aligned_grids(), shapes, orientations, st.data())
def test_display_orientation_on_any_aligned_grid(matrix, shape, orientation, data):
    volume = ramp_volume(shape, matrix)
    axis = {"axial": 2, "coronal": 1, "sagittal": 0}[orientation]
    slice_axis = int(np.argmax(np.abs(matrix[axis, :3])))  # the IJK axis along that RAS axis
    index = data.draw(st.integers(0, shape[::-1][slice_axis] - 1))
    image = export_slice(volume, orientation, index=index, window=(0.0, 1.0))
    assert image.slice_axis == slice_axis and image.index == index
    up, left = (np.array(v, dtype=float) for v in TOP_LEFT[orientation])
    rows, cols = image.height, image.width
    centres = image.pixels_to_ijk([[0, 0], [cols - 1, 0], [0, rows - 1]])
    ras = ijk_to_ras_points(matrix, centres)
    if cols > 1:
        assert (ras[0] - ras[1]) @ left > 0  # column 0 lies further towards the image-left direction
    if rows > 1:
        assert (ras[0] - ras[2]) @ up > 0  # row 0 lies further towards the image-top direction


small_tilts = st.tuples(st.just(1.0), *[st.floats(-0.25, 0.25)] * 3)


@settings(max_examples=60, deadline=None)
@given(aligned_grids(), small_tilts, shapes, orientations)
def test_display_orientation_on_tilted_grids(aligned, tilt, shape, orientation):
    """Up to ~40 degrees of tilt: image top and left still point the right way in the patient."""
    matrix = aligned.copy()
    matrix[:3, :3] = rotation_from_quaternion(tilt) @ aligned[:3, :3]
    image = export_slice(ramp_volume(shape, matrix), orientation)
    up, left = (np.array(v, dtype=float) for v in TOP_LEFT[orientation])
    corners = [[0, 0], [image.width - 1, 0], [0, image.height - 1]]
    ras = ijk_to_ras_points(matrix, image.pixels_to_ijk(corners))
    assert image.width == 1 or (ras[0] - ras[1]) @ left > 0
    assert image.height == 1 or (ras[0] - ras[2]) @ up > 0


def test_standard_dicom_axial_is_the_array_slice_as_is():
    voxels = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    volume = Volume.from_array(voxels, np.diag([-0.7, -0.7, 2.0, 1.0]))  # LPS grid
    image = export_slice(volume, "axial", index=2, window=(59.5, 119.0))
    assert np.array_equal(image.pixel_to_ijk, [[1, 0, 0], [0, 1, 0], [0, 0, 2]])
    expected = np.rint(np.clip((voxels[2] - 0.0) * 255.0 / 119.0, 0, 255)).astype(np.uint8)
    assert np.array_equal(image.pixels, expected)
    assert image.pixel_spacing == (0.7, 0.7)
    coronal = export_slice(volume, "coronal", window=(0, 1))
    assert coronal.slice_axis == 1 and coronal.index == 2 and coronal.pixels.shape == (4, 6)


@settings(max_examples=60, deadline=None)
@given(oblique_grids(), shapes, orientations)
def test_each_pixel_shows_the_voxel_pixel_to_ijk_names(matrix, shape, orientation):
    ramp = np.arange(np.prod(shape)).reshape(shape) % 256
    volume = Volume.from_array(ramp.astype(np.uint8), matrix)
    image = export_slice(volume, orientation, window=(127.5, 255.0))  # 0..255 maps to itself
    rows, cols = np.mgrid[0 : image.height, 0 : image.width]
    pixels = np.column_stack([cols.ravel(), rows.ravel()])
    ijk = image.pixels_to_ijk(pixels)
    assert np.array_equal(ijk, np.rint(ijk))
    i, j, k = np.rint(ijk).astype(int).T
    assert np.array_equal(image.pixels.ravel(), volume.voxels[k, j, i])
    assert np.array_equal(image.ijk_to_pixels(ijk), pixels)
    assert set(ijk[:, image.slice_axis]) == {image.index}
    assert image.height * image.width * shape[::-1][image.slice_axis] == ramp.size


@settings(max_examples=60, deadline=None)
@given(oblique_grids(), shapes, orientations, st.data())
def test_box_fractions_to_ijk_to_fractions_is_identity(matrix, shape, orientation, data):
    image = export_slice(ramp_volume(shape, matrix), orientation)
    x0, x1 = sorted(data.draw(st.integers(0, image.width)) for _ in range(2))
    y0, y1 = sorted(data.draw(st.integers(0, image.height)) for _ in range(2))
    fractions = (x0 / image.width, y0 / image.height, x1 / image.width, y1 / image.height)
    box = image.box_to_ijk(fractions)
    assert box.hi[image.slice_axis] - box.lo[image.slice_axis] == 1.0
    assert np.allclose(image.ijk_box_to_fractions(box), fractions, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(oblique_grids(), shapes, orientations, st.data())
def test_pixel_box_to_voxels_and_back(matrix, shape, orientation, data):
    """A box of whole pixels covers exactly the voxels those pixels show."""
    image = export_slice(ramp_volume(shape, matrix), orientation)
    c0, c1 = sorted(data.draw(st.integers(0, image.width - 1)) for _ in range(2))
    r0, r1 = sorted(data.draw(st.integers(0, image.height - 1)) for _ in range(2))
    w, h = image.width, image.height
    box = image.box_to_ijk((c0 / w, r0 / h, (c1 + 1) / w, (r1 + 1) / h))
    first, last = box.voxel_range()
    shown = image.pixels_to_ijk([[c0, r0], [c1, r1]])
    assert np.array_equal(np.minimum(*shown), first) and np.array_equal(np.maximum(*shown), last)


def test_box_missing_the_slice_or_the_image_gives_none():
    volume = ramp_volume((5, 6, 7), np.eye(4))
    image = export_slice(volume, "axial", index=2)
    assert image.ijk_box_to_fractions(IJKBox.from_voxels(0, 0, 3, 2, 2, 4)) is None
    assert image.ijk_box_to_fractions(IJKBox((10.0, 0, 1.5), (12.0, 2, 2.5))) is None
    clipped = image.ijk_box_to_fractions(IJKBox.from_voxels(-3, 0, 2, 3, 5, 2))
    assert clipped is not None and all(0 <= v <= 1 for v in clipped)


def test_default_windows():
    ct = Volume.from_array(np.full((2, 3, 4), -1000, dtype=np.int16), np.eye(4))
    assert default_window_limits(ct) == (-160.0, 240.0)
    mri = np.zeros((10, 10, 10), dtype=np.float32)
    mri[:, :, 5:] = np.linspace(0, 500, 500).reshape(10, 10, 5)
    lo, hi = default_window_limits(Volume.from_array(mri, np.eye(4)))
    assert (lo, hi) == tuple(np.percentile(mri, (0.5, 99.5)))
    mostly_empty = np.zeros((10, 10, 10))
    mostly_empty[0, 0, 0] = 7
    assert default_window_limits(Volume.from_array(mostly_empty, np.eye(4))) == (0.0, 7.0)
    flat = export_slice(Volume.from_array(np.ones((3, 3, 3)), np.eye(4)), "axial")
    assert not flat.pixels.any()


def test_png_keeps_pixels_and_resizes_on_request():
    image = export_slice(ramp_volume((4, 5, 6), np.eye(4)), "axial", window=(60, 120))
    native = Image.open(io.BytesIO(image.to_png_bytes()))
    assert native.mode == "L" and np.array_equal(np.asarray(native), image.pixels)
    assert image.png_size(448) == (448, 448) and image.png_size((300, 200)) == (300, 200)
    assert Image.open(io.BytesIO(image.to_png_bytes(448))).size == (448, 448)
    with pytest.raises(VolumeError, match="PNG size"):
        image.png_size(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"orientation": "oblique"}, "orientation must be one of"),
        ({"orientation": "axial", "index": 5}, r"axial slice index 5 is out of range: valid 0\.\.4 .*k"),
        ({"orientation": "sagittal", "index": -1}, r"valid 0\.\.6 along array axis i"),
        ({"orientation": "axial", "index": 1.5}, "integer"),
        ({"orientation": "axial", "window": (40, 0)}, "positive width"),
    ],
)
def test_bad_slice_requests(kwargs, message):
    with pytest.raises(VolumeError, match=message):
        export_slice(ramp_volume((5, 6, 7), np.eye(4)), **kwargs)


def test_bad_box_fractions():
    image = export_slice(ramp_volume((5, 6, 7), np.eye(4)), "axial")
    with pytest.raises(VolumeError, match=r"\[0, 1\]"):
        image.box_to_ijk((0.1, 0.2, 1.2, 0.5))
    with pytest.raises(VolumeError, match="4 finite"):
        image.box_to_ijk((0.1, 0.2, np.inf, 0.5))
    assert image.box_to_ijk((0.5, 0.6, 0.1, 0.2)) == image.box_to_ijk((0.1, 0.2, 0.5, 0.6))
    with pytest.raises(VolumeError, match=r"\(N, 2\)"):
        image.pixels_to_ijk([3, 4])
    with pytest.raises(VolumeError, match=r"\(N, 3\)"):
        image.ijk_to_pixels([1, 2, 3])
