"""The demo's core on a small chest phantom, through a real loopback server and in process.

No download: the sample cases are built here; the files the demo promises (volume, ROI markups,
segmentation, answer) are read back and checked against the phantom.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from medmllm import samples
from medmllm.cli.demo import DemoCase, chest_case, print_slicer_help, run_demo
from medmllm.geometry.volume import Volume
from medmllm.io.segnrrd import read_seg_nrrd


@pytest.fixture(scope="module")
def case() -> DemoCase:
    full = chest_case(shape=(50, 56, 80), spacing=(4.0, 4.0, 6.0))
    questions = ("where is the left lung?", "显示肺", "where is the liver?")
    return DemoCase(full.name, full.title, full.volume, full.source, questions)


def _console():
    from rich.console import Console

    buffer = io.StringIO()
    return Console(file=buffer, width=120), buffer


@pytest.mark.parametrize("via_server", [True, False], ids=["server", "in-process"])
def test_demo_writes_slicer_loadable_results(tmp_path, case, via_server):
    console, buffer = _console()
    folders = run_demo([case], tmp_path, via_server=via_server, console=console)
    assert [f.name for f in folders] == [
        "q1-where-is-the-left-lung",
        folders[1].name,
        "q3-where-is-the-liver",
    ]

    volume = Volume.from_file(tmp_path / case.name / "volume.nrrd")
    assert np.array_equal(volume.voxels, case.volume.voxels)
    assert np.allclose(volume.ijk_to_ras, case.volume.ijk_to_ras)

    roi = json.loads((folders[0] / "Left lung.mrk.json").read_text(encoding="utf-8"))
    centre_lps = roi["markups"][0]["center"]
    assert -centre_lps[0] == pytest.approx(samples.LUNG_CENTRES[1][0], abs=4.0)  # RAS x = -LPS x

    segments, matrix = read_seg_nrrd(folders[1] / "segmentation.seg.nrrd")
    assert sorted(s.name for s in segments) == ["Left lung", "Right lung"]
    assert np.allclose(matrix, case.volume.ijk_to_ras)
    truth = case.volume.voxels < -400
    for s in segments:
        assert s.mask.shape == case.volume.shape
        assert truth[s.mask].mean() > 0.97

    assert "cannot find 'liver'" in (folders[2] / "answer.md").read_text(encoding="utf-8")
    printed = buffer.getvalue()
    assert "not a language model" in printed and "[3/3]" in printed
    assert ("local server" in printed) is via_server


def test_slicer_help_names_the_files(tmp_path, case):
    console, buffer = _console()
    print_slicer_help(console, tmp_path, [case])
    text = buffer.getvalue()
    assert "volume.nrrd" in text and "segmentation.seg.nrrd" in text and ".mrk.json" in text
    assert "drag and drop" in text


def test_demo_cases_without_download_still_has_the_phantom(monkeypatch, tmp_path):
    from medmllm.cli.demo import demo_cases

    monkeypatch.setenv("MEDMLLM_CACHE", str(tmp_path / "empty-cache"))
    console, buffer = _console()
    cases = demo_cases(console, download=False)
    assert [c.name for c in cases] == ["ct-chest-phantom"]
    assert "MNI152 MRI skipped" in buffer.getvalue() and "classical" in buffer.getvalue()
