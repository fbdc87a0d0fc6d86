"""The demo's core on the real chest CT, through a real loopback server and in process.

No download: the scan comes from the sample cache that set-up filled (medmllm.samples); the files
the demo promises (volume, ROI markups, segmentation, answer, preview) are read back and checked
against the scan.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from medmllm.cli.demo import DemoCase, print_slicer_help, real_ct_case, run_demo
from medmllm.geometry.volume import Volume
from medmllm.io.segnrrd import read_seg_nrrd
from PIL import Image


@pytest.fixture(scope="module")
def case() -> DemoCase:
    questions = ("where is the left lung?", "显示肺", "where is the liver?")
    console, _ = _console()
    found = real_ct_case("chest-ct", "ct-chest", "Chest CT (real)", questions, console, download=False)
    assert found is not None, "the real chest CT is not in the sample cache: run python -m medmllm.samples"
    return found


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

    segments, matrix = read_seg_nrrd(folders[1] / "segmentation.seg.nrrd")
    assert sorted(s.name for s in segments) == ["Left lung", "Right lung"]
    assert np.allclose(matrix, case.volume.ijk_to_ras)
    aerated = case.volume.voxels < -400
    for s in segments:
        assert s.mask.shape == case.volume.shape
        assert aerated[s.mask].mean() > 0.9  # lung tissue, vessels inside it filled in
    left = next(s.mask for s in segments if s.name == "Left lung")
    roi = json.loads((folders[0] / "Left lung.mrk.json").read_text(encoding="utf-8"))
    centre_ras_x = -roi["markups"][0]["center"][0]  # RAS x = -LPS x
    i = np.nonzero(left.any(axis=(0, 1)))[0]
    x_edges = sorted(float(case.volume.ijk_to_ras[0] @ [c, 0, 0, 1]) for c in (i.min() - 0.5, i.max() + 0.5))
    assert centre_ras_x == pytest.approx(sum(x_edges) / 2, abs=1.0)  # the box is the mask's bounds
    assert centre_ras_x < float(case.volume.ijk_to_ras[0] @ [*np.array(left.shape[::-1]) / 2, 1])
    with Image.open(folders[1] / "preview.png") as image:
        assert image.width > image.height >= 300

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


def test_demo_order_and_attribution_from_the_cache():
    from medmllm.cli.demo import demo_cases

    console, _buffer = _console()
    cases = demo_cases(console, download=False)
    assert [c.name for c in cases] == ["ct-chest", "ct-abdomen", "mri-mni152"]
    assert cases[0].questions[0] == "report"
    assert "Wasserthal" in cases[0].source and "Radiology: Artificial Intelligence 2023" in cases[0].source
    assert "Apache-2.0" in cases[1].source and "MNI ICBM152" in cases[2].source


def test_demo_without_a_sample_cache_says_what_is_missing(monkeypatch, tmp_path):
    from medmllm.cli.demo import demo_cases

    monkeypatch.setenv("MEDMLLM_CACHE", str(tmp_path / "empty-cache"))
    console, buffer = _console()
    assert demo_cases(console, download=False) == []
    printed = " ".join(buffer.getvalue().split())
    assert "Chest CT (real, contrast) skipped" in printed and "python -m medmllm.samples" in printed
    assert "MNI152 MRI skipped" in printed and "classical" in printed
