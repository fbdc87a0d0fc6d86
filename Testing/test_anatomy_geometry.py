"""TotalSegmentator's NIfTI answer back on the volume's own grid: exact for every orientation.

TotalSegmentator reads our NIfTI with nibabel and reorients it to the closest canonical (RAS)
orientation before predicting. A label image on that reoriented grid (or on the grid as written)
must land voxel for voxel on the original one: oblique, LPS-style, flipped and permuted axes.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import oblique_matrix
from medmllm.anatomy import nifti
from medmllm.geometry.volume import Volume

SHAPE = (9, 11, 13)  # k, j, i


def _grids():
    lps_like = np.diag([-0.8, -0.9, 2.5, 1.0])
    lps_like[:3, 3] = (40.0, 60.0, -30.0)
    permuted = np.array([[0, 0, 1.5, -5], [-0.7, 0, 0, 10], [0, 1.1, 0, 3], [0, 0, 0, 1]], float)
    flipped_oblique = oblique_matrix(degrees=25.0) @ np.diag([1.0, -1.0, 1.0, 1.0])
    return {"oblique": oblique_matrix(), "lps": lps_like, "permuted": permuted, "flipped": flipped_oblique}


def _labels_at(ijk_to_ras: np.ndarray, shape) -> np.ndarray:
    """A label image defined by physical position: the same at the same RAS point on any grid."""
    k, j, i = np.indices(shape)
    ras = np.tensordot(ijk_to_ras[:3, :3], np.stack([i, j, k]), axes=1) + ijk_to_ras[:3, 3, None, None, None]
    x, y, z = ras
    cells = np.floor(x / 1.3 + 0.123) + 3 * np.floor(y / 1.7 + 0.377) + 5 * np.floor(z / 2.9 + 0.211)
    return (1 + cells % 13).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(_grids()))
def test_canonical_answer_lands_voxel_for_voxel(name, tmp_path):
    matrix = _grids()[name]
    volume = Volume(np.zeros(SHAPE, np.int16), matrix)
    written = nifti.write_nifti(volume, tmp_path / "volume.nii.gz")
    canonical = nib.as_closest_canonical(nib.load(str(written)))  # what TotalSegmentator predicts on
    labels = _labels_at(canonical.affine, canonical.shape[::-1]).transpose(2, 1, 0)
    nib.save(nib.Nifti1Image(labels, canonical.affine), str(tmp_path / "labels.nii.gz"))
    back = nifti.labels_on_grid(tmp_path / "labels.nii.gz", volume)
    assert back.shape == SHAPE
    assert np.array_equal(back, _labels_at(matrix, SHAPE))
    assert nifti.shared_grid(canonical.affine, matrix) is not None  # copied index for index
    if name != "oblique":  # these grids really were reoriented
        assert not np.allclose(canonical.affine, matrix, atol=1e-3)


def test_answer_on_the_written_grid_is_unchanged(tmp_path):
    volume = Volume(np.zeros(SHAPE, np.int16), _grids()["flipped"])
    written = nib.load(str(nifti.write_nifti(volume, tmp_path / "v.nii.gz")))
    labels = _labels_at(volume.ijk_to_ras, SHAPE)
    nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), written.affine), str(tmp_path / "l.nii.gz"))
    assert np.array_equal(nifti.labels_on_grid(tmp_path / "l.nii.gz", volume), labels)


def test_shared_grid_refuses_grids_that_only_look_alike():
    matrix = _grids()["oblique"]
    half_voxel = matrix.copy()
    half_voxel[:3, 3] += matrix[:3, 0] * 0.5
    assert nifti.shared_grid(matrix, matrix) is not None
    assert nifti.shared_grid(half_voxel, matrix) is None
    assert nifti.shared_grid(oblique_matrix(degrees=31.0), matrix) is None


def test_a_really_different_grid_is_resampled_by_position(tmp_path):
    """A 2x coarser answer grid: nearest label by physical position, close to the truth."""
    matrix = np.diag([1.0, 1.0, 1.0, 1.0])
    volume = Volume(np.zeros((20, 20, 20), np.int16), matrix)
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = 0.5
    k, j, i = np.indices((10, 10, 10))
    sphere = ((2 * i + 0.5 - 10) ** 2 + (2 * j + 0.5 - 10) ** 2 + (2 * k + 0.5 - 10) ** 2 <= 36).astype(
        np.uint8
    )
    nib.save(nib.Nifti1Image(sphere.transpose(2, 1, 0), coarse), str(tmp_path / "coarse.nii.gz"))
    back = nifti.labels_on_grid(tmp_path / "coarse.nii.gz", volume)
    kk, jj, ii = np.indices((20, 20, 20))
    truth = (ii - 10) ** 2 + (jj - 10) ** 2 + (kk - 10) ** 2 <= 36
    dice = 2 * (back.astype(bool) & truth).sum() / (back.astype(bool).sum() + truth.sum())
    assert dice > 0.8


def test_a_non_label_file_is_a_clear_error(tmp_path):
    volume = Volume(np.zeros(SHAPE, np.int16), np.eye(4))
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.uint8), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(ValueError, match="not a 3-D label image"):
        nifti.labels_on_grid(tmp_path / "flat.nii.gz", volume)
