"""`medmllm ask ... --engine openai` end to end: a volume file in, Slicer ROI files out, on the lesion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from fake_openai_server import FakeOpenAIServer, grounded_answer
from medmllm.cli import main
from medmllm.io.markups import read_roi_json
from medmllm.io.segnrrd import read_seg_nrrd
from test_openai_engine import LESION_CENTRE, SHAPE, lesion_mask, phantom
from test_openai_errors import free_port


@pytest.fixture()
def volume_file(tmp_path: Path) -> Path:
    path = tmp_path / "phantom.nrrd"
    sitk.WriteImage(phantom().to_sitk(), str(path))
    return path


def ask(volume_file: Path, out: Path, server: FakeOpenAIServer, dialect: str, *extra: str) -> int:
    return main(
        [
            "ask",
            str(volume_file),
            "Where is the lesion?",
            "--engine",
            "openai",
            "--base-url",
            server.base_url,
            "--model",
            server.model,
            "--api-key",
            "k",
            "--dialect",
            dialect,
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.mark.parametrize("dialect", ["internvl", "medgemma"])
def test_ask_writes_the_roi_on_the_lesion(volume_file: Path, tmp_path: Path, dialect: str) -> None:
    out = tmp_path / "out"
    answer = lambda body, images: grounded_answer(dialect, images[0], "lesion")  # noqa: E731
    with FakeOpenAIServer(answer, api_key="k") as server:
        status = ask(volume_file, out, server, dialect, "--slice", "axial:20")
    assert status == 0
    roi = read_roi_json(out / "lesion.mrk.json")
    volume = phantom()
    lesion_ras = (volume.ijk_to_ras @ np.append(LESION_CENTRE, 1.0))[:3]
    offset_voxels = np.linalg.solve(volume.ijk_to_ras[:3, :3], roi["center_ras"] - lesion_ras)
    assert np.all(np.abs(offset_voxels) <= 0.5), offset_voxels
    assert (out / "answer.md").exists()


def test_ask_with_an_out_of_range_slice_is_a_usage_error(
    volume_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with FakeOpenAIServer(lambda body, images: "ok") as server:
        status = ask(volume_file, tmp_path / "out", server, "internvl", "--slice", f"axial:{SHAPE[0] + 5}")
    assert status == 2
    assert "out of range" in capsys.readouterr().err
    assert server.requests == []


def test_ask_without_a_server_is_a_usage_error_with_one_line(
    volume_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    server = FakeOpenAIServer(lambda body, images: "ok")
    server.port = free_port()  # nothing listens there
    status = ask(volume_file, tmp_path / "out", server, "internvl")
    err = capsys.readouterr().err
    assert status == 2 and "no model server at" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_ask_with_a_wrong_model_name_is_a_usage_error(
    volume_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with FakeOpenAIServer(lambda body, images: "ok", model="medrega") as server:
        server.model = "medrgea"  # what the user typed
        status = ask(volume_file, tmp_path / "out", server, "internvl")
    assert status == 2 and "serves medrega, not 'medrgea'" in capsys.readouterr().err
    assert server.requests == []


def test_ask_keeps_the_partial_answer_of_a_cut_stream(
    volume_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    answer = "The lesion lies in the right lobe, next to the portal vein."
    with FakeOpenAIServer(lambda body, images: answer, chunk_size=5, cut_after=3) as server:
        status = ask(volume_file, tmp_path / "out", server, "plain")
    captured = capsys.readouterr()
    assert status == 1 and "broke off the answer after 15 characters" in captured.err
    assert answer[:15] in captured.out and answer[:15] in (tmp_path / "out" / "answer.md").read_text()


def test_ask_segment_writes_the_lesion_mask(volume_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    answer = lambda body, images: grounded_answer("qwen25vl", images[0], "lesion")  # noqa: E731
    with FakeOpenAIServer(answer) as server:
        status = main(
            [
                "ask",
                str(volume_file),
                "Segment the lesion",
                "--engine",
                "openai",
                "--base-url",
                server.base_url,
                "--dialect",
                "qwen25vl",
                "--slice",
                "axial:20",
                "--out",
                str(out),
            ]
        )
    assert status == 0
    segments, ijk_to_ras = read_seg_nrrd(out / "segmentation.seg.nrrd")
    (segment,) = segments
    truth = lesion_mask()
    dice = 2 * (segment.mask & truth).sum() / (segment.mask.sum() + truth.sum())
    assert segment.name == "lesion" and dice >= 0.9
    assert np.allclose(ijk_to_ras, phantom().ijk_to_ras)
