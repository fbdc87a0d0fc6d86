"""Volume validation, file and DICOM loading (LPS -> RAS), and the point transforms."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from medmllm.geometry.transforms import (
    ijk_to_ras_points,
    lps_to_ras,
    nearest_axis,
    orientation_code,
    ras_to_ijk_points,
    ras_to_lps,
)
from medmllm.geometry.volume import Volume, VolumeError, window_limits
from test_geometry_support import aligned_grids, oblique_grids, rotation_from_quaternion

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def oblique_lps_image(shape_kji=(6, 7, 8)):
    """A SimpleITK image with a known oblique LPS direction, anisotropic spacing and an origin."""
    voxels = np.arange(np.prod(shape_kji), dtype=np.int16).reshape(shape_kji)
    image = sitk.GetImageFromArray(voxels)
    direction = rotation_from_quaternion([0.9, 0.2, -0.3, 0.25])
    image.SetDirection(direction.ravel().tolist())
    image.SetSpacing((0.7, 1.3, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    expected = np.eye(4)
    expected[:3, :3] = direction * np.array([0.7, 1.3, 2.5])
    expected[:3, 3] = (10.0, -20.0, 30.0)
    expected[:2] *= -1  # LPS -> RAS flips the first two rows
    return image, voxels, expected


# --- transforms -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(oblique_grids(), st.lists(st.tuples(*[st.integers(0, 600)] * 3), min_size=1, max_size=20))
def test_voxel_to_ras_to_voxel_is_exact(matrix, voxels):
    ijk = np.array(voxels, dtype=np.float64)
    back = ras_to_ijk_points(matrix, ijk_to_ras_points(matrix, ijk))
    assert np.abs(back - ijk).max() < 1e-6
    assert np.array_equal(np.rint(back).astype(int), ijk.astype(int))


def test_ijk_to_ras_points_matches_the_matrix_by_hand():
    m = np.array([[0.0, 0.0, -2.0, 5.0], [0.0, 1.5, 0.0, -1.0], [0.5, 0.0, 0.0, 3.0], [0, 0, 0, 1]])
    assert np.allclose(ijk_to_ras_points(m, [1, 2, 3]), [5 - 6, -1 + 3, 3 + 0.5])
    assert ijk_to_ras_points(m, [[1, 2, 3], [0, 0, 0]]).shape == (2, 3)


def test_ras_lps_flip_points_and_matrices():
    assert np.array_equal(ras_to_lps([1.0, 2.0, 3.0]), [-1.0, -2.0, 3.0])
    assert np.array_equal(lps_to_ras([[1.0, 2.0, 3.0]]), [[-1.0, -2.0, 3.0]])
    m = np.arange(16, dtype=float).reshape(4, 4)
    assert np.array_equal(ras_to_lps(m)[:2], -m[:2]) and np.array_equal(ras_to_lps(m)[2:], m[2:])
    assert np.array_equal(lps_to_ras(ras_to_lps(m)), m)
    with pytest.raises(ValueError, match="4x4"):
        ras_to_lps(np.zeros((2, 2)))


@pytest.mark.parametrize(
    ("diagonal", "code"),
    [((1, 1, 1), "RAS"), ((-1, -1, 1), "LPS"), ((-2, 1.5, -3), "LAI")],
)
def test_orientation_code_of_aligned_grids(diagonal, code):
    assert orientation_code(np.diag([*diagonal, 1.0])) == code


def test_orientation_code_of_permuted_and_oblique_grids():
    sagittal = np.eye(4)[:, [1, 2, 0, 3]]  # i -> A, j -> S, k -> R
    assert orientation_code(sagittal) == "ASR"
    tilted = np.eye(4)
    tilted[:3, :3] = rotation_from_quaternion([1.0, 0.05, 0.0, 0.0])
    assert orientation_code(tilted) == "oblique"


@settings(max_examples=40, deadline=None)
@given(aligned_grids())
def test_nearest_axis_finds_the_axis_along_each_patient_direction(matrix):
    for direction in np.eye(3):
        axis = nearest_axis(matrix, direction)
        column = matrix[:3, axis]
        assert abs(column @ direction) == pytest.approx(np.linalg.norm(column))
        assert nearest_axis(matrix, -direction) == axis


def test_nearest_axis_rejects_a_zero_direction():
    with pytest.raises(ValueError, match="non-zero"):
        nearest_axis(np.eye(4), [0, 0, 0])


# --- Volume validation --------------------------------------------------------------------


def test_volume_properties():
    m = np.diag([-0.5, 0.75, 3.0, 1.0])
    m[:3, 3] = (1, 2, 3)
    v = Volume.from_array(np.zeros((4, 5, 6), dtype=np.int16), m)
    assert v.shape == (4, 5, 6)
    assert v.spacing == (0.5, 0.75, 3.0)
    assert np.allclose(v.ras_to_ijk @ m, np.eye(4))
    assert v.nbytes == 4 * 5 * 6 * 2
    d = v.describe()
    assert d["shape"] == [4, 5, 6] and d["orientation"] == "LAS" and d["dtype"] == "int16"
    assert d["intensity_range"] == [0.0, 0.0] and d["spacing"] == [0.5, 0.75, 3.0]


def test_volume_does_not_copy_voxels_and_freezes_its_matrix():
    voxels = np.zeros((2, 3, 4), dtype=np.float32)
    v = Volume.from_array(voxels, np.eye(4))
    assert v.voxels is voxels
    with pytest.raises(ValueError):
        v.ijk_to_ras[0, 0] = 5.0


@pytest.mark.parametrize(
    ("voxels", "message"),
    [
        (np.zeros((4, 5)), r"3-D scalar array.*got a 2-D array of shape \(4, 5\)"),
        (np.zeros((2, 3, 4, 5)), r"got a 4-D array of shape \(2, 3, 4, 5\)"),
        (np.zeros((2, 3, 4, 3), dtype=np.uint8), "RGB"),
        (np.zeros((0, 3, 4)), r"empty: shape \(k, j, i\) = \(0, 3, 4\)"),
        (np.zeros((2, 2, 2), dtype=complex), "numeric"),
        (np.array([[["a"]]]), "numeric"),
    ],
)
def test_bad_voxel_arrays_are_refused(voxels, message):
    with pytest.raises(VolumeError, match=message):
        Volume.from_array(voxels, np.eye(4))


def test_nan_and_inf_are_counted():
    voxels = np.zeros((3, 3, 3), dtype=np.float32)
    voxels[0, 0, :2] = np.nan
    voxels[1, 1, 1] = -np.inf
    with pytest.raises(VolumeError, match="2 NaN and 1 infinite"):
        Volume.from_array(voxels, np.eye(4))


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.diag([1.0, 0.0, 1.0, 1.0]), "zero spacing along j"),
        (np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "singular"),
        (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0.1, 1.0]]), "not affine"),
        (np.eye(3), "4x4"),
        (np.diag([1.0, np.nan, 1.0, 1.0]), "NaN"),
        ("not a matrix", "4x4 array of numbers"),
    ],
)
def test_bad_matrices_are_refused(matrix, message):
    with pytest.raises(VolumeError, match=message):
        Volume.from_array(np.zeros((2, 2, 2)), matrix)


def test_window_limits():
    assert window_limits((40, 400)) == (-160.0, 240.0)
    for bad in [(40, 0), (40, -1), (np.nan, 10), (1, 2, 3), "x"]:
        with pytest.raises(VolumeError, match="window"):
            window_limits(bad)


# --- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_file_round_trip_converts_lps_to_ras_exactly(tmp_path, suffix):
    image, voxels, expected = oblique_lps_image()
    path = tmp_path / f"oblique{suffix}"
    sitk.WriteImage(image, str(path))
    v = Volume.from_file(path)
    assert np.array_equal(v.voxels, voxels)
    assert np.allclose(v.ijk_to_ras, expected, atol=1e-5)  # NIfTI stores float32 geometry
    again = tmp_path / f"again{suffix}"
    sitk.WriteImage(v.to_sitk(), str(again))
    assert np.allclose(Volume.from_file(again).ijk_to_ras, expected, atol=1e-5)


def test_to_sitk_keeps_geometry_exactly_in_memory():
    image, voxels, expected = oblique_lps_image()
    v = Volume.from_array(voxels, expected)
    back = v.to_sitk()
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)
    assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-12)
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-12)
    assert np.allclose(Volume.from_sitk(back).ijk_to_ras, expected, atol=1e-12)


def test_rgb_and_4d_and_2d_files_are_refused(tmp_path):
    rgb = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), dtype=np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(VolumeError, match=r"rgb\.nrrd: .*3 components"):
        Volume.from_file(tmp_path / "rgb.nrrd")
    four_d = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), dtype=np.int16), isVector=False)
    sitk.WriteImage(four_d, str(tmp_path / "t.nii.gz"))
    with pytest.raises(VolumeError, match="4-D image"):
        Volume.from_file(tmp_path / "t.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), dtype=np.uint8)), str(tmp_path / "flat.png"))
    with pytest.raises(VolumeError, match="2-D image"):
        Volume.from_file(tmp_path / "flat.png")


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n\x00\x01")
    with pytest.raises(VolumeError, match=r"broken\.nrrd"):
        Volume.from_file(bad)
    junk = tmp_path / "junk.mha"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(VolumeError, match=r"junk\.mha"):
        Volume.from_file(junk)
    with pytest.raises(VolumeError, match="no such file"):
        Volume.from_file(tmp_path / "missing.nrrd")
    with pytest.raises(VolumeError, match="no DICOM series"):
        Volume.from_file(tmp_path)


def _ct_small():
    import pydicom

    return pydicom, os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "CT_small.dcm")


def test_dicom_folder_reads_the_largest_series_with_oblique_geometry(tmp_path):
    """Three CT_small slices written as an oblique series, plus a one-file decoy series."""
    pydicom, source = _ct_small()
    row, col = np.array([0.8, 0.6, 0.0]), np.array([0.0, 0.0, -1.0])  # LPS direction cosines
    normal = np.cross(row, col)
    first = np.array([-158.0, -179.0, -75.0])
    for n in range(3):
        ds = pydicom.dcmread(source)
        ds.ImageOrientationPatient = [*row.tolist(), *col.tolist()]
        ds.ImagePositionPatient = (first + 5.0 * n * normal).tolist()
        ds.InstanceNumber = n + 1
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{n + 1}"
        ds.PixelData = (ds.pixel_array + 10 * n).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(tmp_path / f"slice{n}.dcm")
    decoy = pydicom.dcmread(source)
    decoy.SeriesInstanceUID = decoy.SeriesInstanceUID + ".99"
    decoy.save_as(tmp_path / "decoy.dcm")

    v = Volume.from_file(tmp_path)
    ds = pydicom.dcmread(source)
    spacing = [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]), 5.0]
    expected = np.eye(4)
    expected[:3, :3] = np.column_stack([row, col, normal]) * spacing
    expected[:3, 3] = first
    expected = LPS @ expected
    assert v.shape == (3, 128, 128)
    assert np.allclose(v.ijk_to_ras, expected, atol=1e-4)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    for n in range(3):
        assert np.array_equal(v.voxels[n], hu + 10 * n)


def test_single_dicom_file_reads_as_one_slice(tmp_path):
    _, source = _ct_small()
    shutil.copy(source, tmp_path / "ct.dcm")
    v = Volume.from_file(tmp_path / "ct.dcm")
    assert v.shape == (1, 128, 128)
    assert v.describe()["orientation"] == "LPS"
    assert v.voxels.min() < -500


def test_voxel_volume_is_the_determinant_also_on_a_sheared_gantry_tilt_grid():
    from medmllm.geometry.transforms import voxel_volume_mm3

    tilted = np.array([[0.7, 0, 0, 0], [0, 0.7, 1.2, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]])  # k leans along A
    assert voxel_volume_mm3(tilted) == pytest.approx(0.7 * 0.7 * 2.5)
    assert voxel_volume_mm3(np.diag([-0.8, -0.8, 3.0, 1.0])) == pytest.approx(1.92)
