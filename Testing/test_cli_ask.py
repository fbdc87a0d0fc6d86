"""`medmllm ask` and `medmllm serve` from the command line: files written, bad input -> exit 2."""

from __future__ import annotations

import json

import medmllm.engines.registry as registry
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import BONE_VOXELS, ScriptedEngine, free_port, phantom_ct
from medmllm.cli import main
from medmllm.geometry.volume import Volume
from medmllm.io.segnrrd import read_seg_nrrd


@pytest.fixture
def ct_file(tmp_path):
    voxels, matrix = phantom_ct()
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(Volume.from_array(voxels, matrix).to_sitk(), str(path))
    return path


@pytest.fixture
def scripted(monkeypatch):
    """Make `--engine scripted` resolve to the test engine (the registry only sees engines/ modules)."""
    real = registry.create_engine
    monkeypatch.setattr(
        registry, "create_engine", lambda n, o: ScriptedEngine(o) if n == "scripted" else real(n, o)
    )


EXPECTED = {"answer.md", "chat.json", "bone block.mrk.json", "segmentation.seg.nrrd", "preview.png"}


def test_ask_in_process_writes_slicer_files(ct_file, tmp_path, scripted, capsys):
    out = tmp_path / "out"
    code = main(["ask", str(ct_file), "box and mask the bone", "--engine", "scripted", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Echo: box and mask the bone") and "[box] bone block" in printed
    assert {p.name for p in out.iterdir()} == EXPECTED
    segments, matrix = read_seg_nrrd(out / "segmentation.seg.nrrd")
    volume = Volume.from_file(ct_file)
    assert np.array_equal(segments[0].mask, volume.voxels > 300) and np.allclose(matrix, volume.ijk_to_ras)


def test_ask_through_a_server_downloads_the_same_files(ct_file, tmp_path, serve, capsys):
    server = serve(token="tok")
    out = tmp_path / "remote"
    args = ["ask", str(ct_file), "box and mask the bone", "--server", server.url, "--token", "tok"]
    assert main([*args, "--out", str(out), "--slice", "axial:3", "--roi", "0,0,0,-5,-5,-5"]) == 0
    assert {p.name for p in out.iterdir()} == EXPECTED
    assert json.loads((out / "chat.json").read_text())["events"][-1]["type"] == "done"
    ctx = server.engine.calls[-1]
    assert ctx.view.index == 3 and ctx.roi is not None


def test_engine_error_exits_1(ct_file, tmp_path, scripted, capsys):
    assert main(["ask", str(ct_file), "fail", "--engine", "scripted", "--out", str(tmp_path / "o")]) == 1
    assert "failed on purpose" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--engine", "nope"], "unknown engine 'nope'"),
        (["--slice", "oblique:3"], "--slice axis must be one of"),
        (["--slice", "axial:999"], "out of range"),
        (["--slice", "axial:-1"], "whole number"),
        (["--roi", "1,2,3"], "6 numbers"),
        (["--roi", "1,2,3,4,5,x"], "--roi"),
        (["--roi", "900,900,900,950,950,950"], "outside the volume"),
        (["--max-new-tokens", "0"], "at least 1"),
        (["--temperature", "9"], "between 0 and 2"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(ct_file, tmp_path, scripted, capsys, extra, words):
    base = ["ask", str(ct_file), "hi", "--engine", "scripted", "--out", str(tmp_path / "o")]
    assert main(base + extra) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") == 1


def test_bad_volume_files_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.nrrd"
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"NRRD0004\nthis is not a header\n")
    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(rgb))
    for path, words in ((missing, "no such file"), (garbage, "cannot be read"), (rgb, "components")):
        assert main(["ask", str(path), "hi", "--out", str(tmp_path / "o")]) == 2
        assert words in capsys.readouterr().err


def test_server_down_and_wrong_token_exit_2(ct_file, tmp_path, serve, capsys):
    down = f"http://127.0.0.1:{free_port()}"
    assert main(["ask", str(ct_file), "hi", "--server", down, "--out", str(tmp_path / "o")]) == 2
    assert "is it running?" in capsys.readouterr().err
    server = serve(token="right")
    assert (
        main(
            [
                "ask",
                str(ct_file),
                "hi",
                "--server",
                server.url,
                "--token",
                "wrong",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "rejected the token" in capsys.readouterr().err


def test_serve_refuses_a_public_bind_without_token_and_unknown_engines(capsys, monkeypatch):
    monkeypatch.delenv("MEDMLLM_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "refusing to listen on 0.0.0.0 without a token" in capsys.readouterr().err
    assert main(["serve", "--engine", "nope", "--port", str(free_port())]) == 2
    assert "unknown engine 'nope'" in capsys.readouterr().err


def test_labels_with_url_characters_download_and_hostile_file_names_are_refused(
    ct_file, tmp_path, serve, capsys, monkeypatch
):
    from medmllm.client import MedMLLMClient
    from medmllm.engines.base import BoxOut
    from medmllm.geometry.boxes import IJKBox

    class HashLabel(ScriptedEngine):
        def chat(self, ctx, cancel):
            yield BoxOut("lesion #1 50%?", IJKBox.from_voxels(*BONE_VOXELS))

    server = serve(engine=HashLabel())
    out = tmp_path / "hash"
    assert main(["ask", str(ct_file), "where", "--server", server.url, "--out", str(out)]) == 0
    assert [p.name for p in out.glob("*.mrk.json")] == ["lesion #1 50%_.mrk.json"]

    monkeypatch.setattr(MedMLLMClient, "result_files", lambda self, rid: ["../escaped.txt"])
    assert main(["ask", str(ct_file), "where", "--server", server.url, "--out", str(tmp_path / "o")]) == 2
    assert "not a plain file name" in capsys.readouterr().err
    assert not (tmp_path / "escaped.txt").exists()
