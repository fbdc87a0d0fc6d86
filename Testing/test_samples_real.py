"""Real scans from the pinned TotalSegmentator / pyradiomics sdists, as set-up left them in the cache.

These tests read the sample cache (`python -m medmllm.samples`, run by scripts/setup) and never
download; without it they fail with the message that says how to fill it.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from medmllm import samples


def test_label_map_is_read_from_the_pinned_release():
    total = samples.label_map("total")
    assert [total[n] for n in (10, 14, 16, 51, 91, 116, 117)] == [
        "lung_upper_lobe_left",
        "lung_lower_lobe_right",
        "trachea",
        "heart",
        "skull",
        "sternum",
        "costal_cartilages",
    ]
    assert "liver" in samples.label_map("total_mr").values()
    with pytest.raises(samples.SampleError, match="no task"):
        samples.label_map("no_such_task")


@pytest.mark.parametrize("name", sorted(samples.REAL_SCANS))
def test_every_real_scan_loads_with_its_reference(name):
    scan = samples.real_scan(name)
    volume = samples.load_real_scan(scan)
    assert min(volume.shape) >= 20 and volume.voxels.dtype.kind in "iu"
    assert scan.sdist.attribution in scan.attribution and scan.sdist.licence in scan.attribution
    if scan.reference is not None:
        assert scan.reference_path.is_file()


def test_licences_stated_are_the_ones_in_the_sdists():
    ts = (samples.TOTALSEG_SDIST.folder / "LICENSE").read_text()
    pr = (samples.PYRADIOMICS_SDIST.folder / "LICENSE.txt").read_text()
    assert "Apache License" in ts and "Version 2.0" in ts and "Apache-2.0" in samples.TOTALSEG_SDIST.licence
    assert "Redistribution and use in source and binary forms" in pr and "Harvard Medical School" in pr
    assert "BSD-3-Clause" in samples.PYRADIOMICS_SDIST.licence


def test_reference_follows_physical_position_on_the_flipped_dicom_grid():
    """example_seg_dicom.nii.gz stores j flipped against the DICOM series: resampled by position,
    the reference's bones sit on bright voxels and its liver on soft tissue."""
    scan = samples.real_scan("ct-dicom")
    volume = samples.load_real_scan(scan)
    bone = samples.reference_mask(scan, "Bone", volume)
    assert bone.sum() > 10_000
    assert np.median(volume.voxels[bone]) > 200
    assert not samples.reference_mask(scan, "Lungs", volume).any()  # this series is below the lungs


def test_missing_cache_says_how_to_fill_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMLLM_CACHE", str(tmp_path))
    with pytest.raises(samples.SampleError, match=r"python -m medmllm\.samples"):
        _ = samples.real_scan("chest-ct").image_path
    with pytest.raises(samples.SampleError, match="known: chest-ct"):
        samples.real_scan("nope")


def test_unpack_takes_only_listed_regular_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMLLM_CACHE", str(tmp_path))
    sdist = samples.Sdist("pkg", "1.0", "0" * 64, "MIT", "someone", ("LICENSE", "data/a.nrrd"))
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("pkg-1.0/LICENSE", "pkg-1.0/data/a.nrrd", "pkg-1.0/data/other", "pkg-1.0/../evil"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    samples._unpack(sdist, archive)
    found = sorted(str(p.relative_to(sdist.folder)) for p in sdist.folder.rglob("*") if p.is_file())
    assert found == ["LICENSE", "data/a.nrrd"]
    assert not (tmp_path / "evil").exists()
    short = samples.Sdist("pkg", "1.0", "0" * 64, "MIT", "someone", ("LICENSE", "data/missing.nrrd"))
    with pytest.raises(samples.SampleError, match=r"lacks data/missing\.nrrd"):
        samples._unpack(short, archive)
