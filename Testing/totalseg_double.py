"""A stand-in for TotalSegmentator's Python entry point that answers with its REAL outputs.

Tests cannot run TotalSegmentator (its weights download from GitHub at run time), but its 2.18.0
sdist ships what it answered for real scans (`tests/update_test_files.sh` lists the calls). This
double:

- checks every call against `inspect.signature` of the installed
  `totalsegmentator.python_api.totalsegmentator`, so a misspelt or removed argument fails as it
  would for real;
- recognises the input image by its voxels (one of the sdist's scans, on whatever grid the caller
  wrote it) and answers only calls the sdist has an output for: the same scan, task and `fast`
  (`body_seg` and `force_split` only crop or split the work), and a `roi_subset` within the one
  the reference was made with (the references' subset is liver + brain, and neither scan shows a
  brain, so a liver-only crop is the same computation);
- writes that reference, put on the input's grid by physical position (SimpleITK, nearest label:
  an implementation independent of medmllm's), with nibabel on the input's affine, as
  TotalSegmentator does, and returns it as a `Nifti1Image`.

Anything else raises, saying there is no real output to give. `hang` never returns: it stands in
for a long run in the cancel test.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from medmllm import samples
from totalsegmentator.python_api import totalsegmentator as _real

REAL_SIGNATURE = inspect.signature(_real)
_REF = "tests/reference_files/"
# (scan, task, fast) -> (reference file, the roi_subset it was made with or None), from the
# sdist's tests/update_test_files.sh.
REFERENCES: Dict[Tuple[str, str, bool], Tuple[str, Optional[Tuple[str, ...]]]] = {
    ("abdomen-ct-crop", "total", False): ("example_seg.nii.gz", None),  # -bs --ml
    ("abdomen-ct-crop", "total", True): ("example_seg_fast.nii.gz", None),  # --fast --ml
    ("abdomen-ct", "total", True): ("example_seg_fast_force_split.nii.gz", None),  # --fast --ml -fs
    ("ct-dicom", "total", True): ("example_seg_dicom.nii.gz", None),  # --fast --ml
    ("abdomen-mr", "total_mr", False): ("example_seg_mr.nii.gz", None),  # -ta total_mr --ml
}
ROI_SUBSET_REFERENCES = {
    ("abdomen-ct-crop", "total", False): ("example_seg_roi_subset.nii.gz", ("liver", "brain")),
    ("abdomen-mr", "total_mr", False): ("example_seg_roi_subset_mr.nii.gz", ("liver", "brain")),
}
INPUT_SCANS = ("abdomen-ct-crop", "abdomen-ct", "ct-dicom", "abdomen-mr", "chest-ct")
calls = []  # every call's bound arguments, for tests that look at what was asked (same process)


def totalsegmentator(*args, **kwargs):
    bound = REAL_SIGNATURE.bind(*args, **kwargs)  # TypeError exactly where the real one would fail
    bound.apply_defaults()
    options = dict(bound.arguments)
    calls.append(options)
    if not options["ml"]:
        raise NotImplementedError("the double answers multilabel calls (ml=True) only")
    image = sitk.ReadImage(str(options["input"]))
    scan = _recognise(image)
    key = (scan, options["task"], bool(options["fast"]))
    subset = options["roi_subset"]
    table = ROI_SUBSET_REFERENCES if subset else REFERENCES
    if key not in table:
        raise LookupError(f"the TotalSegmentator sdist has no real output for {key} roi_subset={subset}")
    reference_name, made_with = table[key]
    if subset and not set(subset) <= set(made_with):
        raise LookupError(f"the sdist's roi_subset output covers {made_with}, not {subset}")
    labels = _on_grid(sitk.ReadImage(str(samples.TOTALSEG_SDIST.folder / _REF / reference_name)), image)
    if subset:
        numbers = [n for n, name in samples.label_map(options["task"]).items() if name in subset]
        labels = np.where(np.isin(labels, numbers), labels, 0).astype(labels.dtype)
    source = nib.load(str(options["input"]))
    result = nib.Nifti1Image(labels.transpose(2, 1, 0).astype(np.uint8), source.affine)
    if options["output"] is not None:
        Path(options["output"]).parent.mkdir(parents=True, exist_ok=True)
        nib.save(result, str(options["output"]))
    print("Predicting...")  # a line TotalSegmentator prints, for the progress notes
    return result


def hang(*args, **kwargs):
    REAL_SIGNATURE.bind(*args, **kwargs)
    print("Predicting...")
    while True:
        time.sleep(1)


def _on_grid(labels: sitk.Image, grid: sitk.Image) -> np.ndarray:
    resampled = sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(resampled)


def _recognise(image: sitk.Image) -> str:
    """Which sdist scan the input is: same voxel values at the same physical places."""
    values = sitk.GetArrayViewFromImage(image)
    for name in INPUT_SCANS:
        path = samples.real_scan(name).image_path
        if _size(path) != sorted(image.GetSize()):
            continue
        candidate = samples.load_real_scan(samples.real_scan(name)).to_sitk()
        on_grid = sitk.Resample(candidate, image, sitk.Transform(), sitk.sitkNearestNeighbor, -4096.0)
        if np.array_equal(sitk.GetArrayViewFromImage(on_grid).astype(np.float64), values.astype(np.float64)):
            return name
    raise LookupError("the input is none of the sdist's scans: the double has no real output for it")


def _size(path: Path) -> list:
    """Sorted image size from the headers alone (a DICOM folder: one file's header, slice count)."""
    reader = sitk.ImageFileReader()
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)) if path.is_dir() else [str(path)]
    reader.SetFileName(files[0])
    reader.ReadImageInformation()
    size = list(reader.GetSize())
    return sorted([*size[:2], len(files)] if path.is_dir() else size)
