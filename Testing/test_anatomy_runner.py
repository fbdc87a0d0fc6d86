"""The TotalSegmentator runner: one run per volume, cache reuse, roi_subset, Stop, failures.

The entry point is `totalseg_double` (the installed function's signature, the sdist's real
outputs) or, for Stop, its `hang`; the child process, the cache and the grid mapping are real.
"""

from __future__ import annotations

import subprocess
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
from medmllm import samples
from medmllm.anatomy import runner as runner_module
from medmllm.anatomy.runner import (
    AnatomyUnavailable,
    RunCancelled,
    RunFailed,
    Runner,
    Settings,
    finish,
    plan_for,
)

DOUBLE = "totalseg_double:totalsegmentator"
REF = samples.TOTALSEG_SDIST.folder / "tests" / "reference_files"


@pytest.fixture(scope="module")
def crop():
    return samples.load_real_scan(samples.real_scan("abdomen-ct-crop"))


def _reference(name: str, volume) -> np.ndarray:
    image = sitk.ReadImage(str(REF / name))
    return sitk.GetArrayFromImage(
        sitk.Resample(image, volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    )


def _number(name: str, task: str = "total") -> int:
    return next(n for n, c in samples.label_map(task).items() if c == name)


def test_full_resolution_asks_a_roi_subset_and_the_cache_knows_what_it_holds(crop, tmp_path):
    settings = Settings(device="cpu", fast=False, entry=DOUBLE)
    plan = plan_for("total", ["liver"], settings)
    assert plan.roi_subset == ("liver",) and not plan.fast
    runner = Runner(tmp_path, settings)
    labels = finish(runner.labels(crop, "c" * 64, "total", ["liver"], threading.Event()))
    truth = _reference("example_seg_roi_subset.nii.gz", crop)  # the sdist's real roi_subset output
    liver = _number("liver")
    assert set(np.unique(labels)) == {0, liver}
    assert np.array_equal(labels == liver, truth == liver)
    with pytest.raises(RunFailed, match="covers"):  # the spleen is not in it: a new run, which the
        finish(runner.labels(crop, "c" * 64, "total", ["spleen"], threading.Event()))  # sdist lacks


def test_one_run_per_volume_then_the_store_answers(crop, tmp_path):
    first = Runner(tmp_path, Settings(device="cpu", entry=DOUBLE))
    labels = finish(first.labels(crop, "d" * 64, "total", ["liver"], threading.Event()))
    assert np.array_equal(labels, _reference("example_seg_fast.nii.gz", crop))  # fast: all classes at once
    again = Runner(tmp_path, Settings(device="cpu", entry="no_such_module:nothing"))  # would fail to run
    for classes in (["spleen"], ["kidney_left", "aorta"], []):
        assert np.array_equal(
            finish(again.labels(crop, "d" * 64, "total", classes, threading.Event())), labels
        )


def test_a_volume_removed_while_its_run_goes_on_leaves_no_labels_behind(crop, tmp_path):
    """The server evicts a volume (cache.forget) while TotalSegmentator runs for it: the answer
    still gets its labels, but they are not stored for a volume the server no longer holds."""
    runner = Runner(tmp_path, Settings(device="cpu", entry=DOUBLE))
    run = runner.labels(crop, "e" * 64, "total", ["liver"], threading.Event())
    assert "Running TotalSegmentator" in next(run)  # under way
    runner.cache.forget("e" * 64)
    assert finish(run).shape == crop.shape
    assert not (tmp_path / ("e" * 64)).exists()
    labels = finish(runner.labels(crop, "e" * 64, "total", ["liver"], threading.Event()))  # asked again
    assert (tmp_path / ("e" * 64)).is_dir() and np.array_equal(
        runner.cache.find("e" * 64, "total", ["liver"]), labels
    )


def test_stop_ends_the_child_process_at_once(crop, tmp_path, monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(runner_module.subprocess, "Popen", popen)
    cancel = threading.Event()
    run = Runner(tmp_path, Settings(device="cpu", entry="totalseg_double:hang")).labels(
        crop, "e" * 64, "total", ["liver"], cancel
    )
    notes = [next(run)]
    while not notes[-1].startswith("[Predicting"):  # the child is running TotalSegmentator's code
        notes.append(next(run))
    cancel.set()
    stopped = time.monotonic()
    with pytest.raises(RunCancelled):
        next(run)
    assert time.monotonic() - stopped < 6 and started[0].poll() is not None
    assert not list((tmp_path / ("e" * 64)).glob("*.npz"))


def test_a_scan_without_a_real_output_fails_with_the_reason(tmp_path):
    chest = samples.load_real_scan(samples.real_scan("chest-ct"))
    with pytest.raises(RunFailed, match="no real output"):
        finish(
            Runner(tmp_path, Settings(device="cpu", entry=DOUBLE)).labels(
                chest, "f" * 64, "total", [], threading.Event()
            )
        )


def test_missing_weights_refuse_before_any_process_starts(crop, tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(runner_module.subprocess, "Popen", lambda *a, **k: pytest.fail("started a run"))
    runner = Runner(tmp_path, Settings(device="cpu"))
    with pytest.raises(AnatomyUnavailable, match=r"total weights \(fast\).*Dataset297"):
        finish(runner.labels(crop, "g" * 64, "total", ["liver"], threading.Event()))
    full = Runner(tmp_path, Settings(device="cpu", fast=False))
    with pytest.raises(AnatomyUnavailable, match="Dataset291"):
        finish(full.labels(crop, "g" * 64, "total", ["liver"], threading.Event()))


def test_a_damaged_cache_file_runs_again(crop, tmp_path):
    folder = tmp_path / ("h" * 64)
    folder.mkdir()
    (folder / "total-fast.npz").write_bytes(b"not a numpy file")
    (folder / "total-fast.json").write_text("null")
    runner = Runner(tmp_path, Settings(device="cpu", entry=DOUBLE))
    labels = finish(runner.labels(crop, "h" * 64, "total", [], threading.Event()))
    assert np.array_equal(labels, _reference("example_seg_fast.nii.gz", crop))
    assert np.array_equal(np.load(folder / "total-fast.npz")["labels"], labels)
