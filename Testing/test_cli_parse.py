"""`medmllm parse`: model text on stdin, one JSON object on stdout, usage errors as exit status 2."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from medmllm.cli import main

# xmed-lab/MedRegA@162163a67f91578fa1a3320b966b9a97e25cdbff:demo_data/data_file.jsonl id 10
MEDREGA_ZH = "<ref>胰腺癌</ref><box>[[661, 528, 743, 599]]</box>：胰尾部见一稍低密度肿块"


def _run(monkeypatch, capsys, argv, stdin):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["parse", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prints_boxes_seg_tokens_and_warnings_as_one_json_object(monkeypatch, capsys):
    text = "The target is liver and the coordinates is [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]. It is [SEG]. [0.1, 2"
    code, out, err = _run(monkeypatch, capsys, ["--dialect", "m3d"], text)
    assert code == 0 and err == ""
    assert json.loads(out) == {
        "boxes": [{"label": "liver", "values": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}],
        "seg_tokens": 1,
        "warnings": ["truncated M3D box dropped: '[0.1, 2'"],
    }
    assert out.count("\n") == 1


def test_values_are_printed_as_written_and_chinese_is_kept(monkeypatch, capsys):
    code, out, _ = _run(monkeypatch, capsys, ["--dialect", "internvl"], MEDREGA_ZH)
    assert code == 0
    assert '"values": [661, 528, 743, 599]' in out and "胰腺癌" in out


def test_qwen_prints_values_as_written_and_maps_them_only_with_a_size(monkeypatch, capsys):
    text = '```json\n[{"bbox_2d": [10, 20, 500, 40], "label": "liver"}]\n```'
    code, out, err = _run(monkeypatch, capsys, ["--dialect", "qwen25vl"], text)
    assert (
        code == 0
        and err == ""
        and json.loads(out)
        == {
            "boxes": [{"label": "liver", "values": [10, 20, 500, 40]}],
            "seg_tokens": 0,
            "warnings": [],
        }
    )
    code, out, _ = _run(monkeypatch, capsys, ["--dialect", "qwen25vl", "--image-size", "448x448"], text)
    assert code == 0
    result = json.loads(out)
    (box,) = result["boxes"]
    assert box["values"] == [10, 20, 500, 40] and box["pixels"] == [10, 20, 448, 40]
    assert box["fractions"] == [round(10 / 448, 6), round(20 / 448, 6), 1.0, round(40 / 448, 6)]
    assert "clamped" in result["warnings"][0]


# MedRegA's chat() decodes with skip_special_tokens=True (xmed-lab/MedRegA@e90730c:
# src/internvl/model/internvl_chat/modeling_internvl_chat.py), which turns demo answer id 9 into this.
MEDREGA_STRIPPED = "right lung[[102, 106, 481, 910]], left lung[[535, 128, 923, 889]]: No focal consolidation"


def test_the_bare_form_is_read_and_noted_and_keep_special_reads_tags_only(monkeypatch, capsys):
    code, out, _ = _run(monkeypatch, capsys, ["--dialect", "internvl"], MEDREGA_STRIPPED)
    result = json.loads(out)
    assert code == 0 and [b["label"] for b in result["boxes"]] == ["right lung", "left lung"]
    assert len(result["warnings"]) == 1 and "without <ref>/<box> tags" in result["warnings"][0]
    code, out, _ = _run(monkeypatch, capsys, ["--dialect", "internvl", "--keep-special"], MEDREGA_STRIPPED)
    assert code == 0 and json.loads(out) == {"boxes": [], "seg_tokens": 0, "warnings": []}
    code, out, _ = _run(monkeypatch, capsys, ["--dialect", "internvl", "--keep-special"], MEDREGA_ZH)
    assert [b["label"] for b in json.loads(out)["boxes"]] == ["胰腺癌"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dialect", "llava"], "unknown dialect 'llava'; available: internvl, qwen25vl"),
        (["--dialect", "qwen25vl", "--image-size", "448"], "--image-size must be WIDTHxHEIGHT"),
        (["--dialect", "qwen25vl", "--image-size", "0x448"], "--image-size must be WIDTHxHEIGHT"),
    ],
)
def test_bad_flags_exit_2_with_one_line(monkeypatch, capsys, argv, message):
    code, out, err = _run(monkeypatch, capsys, argv, "text")
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1


def test_empty_stdin_gives_an_empty_result(monkeypatch, capsys):
    code, out, _ = _run(monkeypatch, capsys, ["--dialect", "plain"], "")
    assert code == 0 and json.loads(out) == {"boxes": [], "seg_tokens": 0, "warnings": []}


def test_as_a_separate_process():
    # MedGemma notebook output (shahriar2203041/MedGemma@8bc9758295a53f3ff22f5d824a0f77cbb2dac7ab copy)
    text = 'Final Answer: ```json[{"box_2d": [140, 110, 340, 470], "label": "right clavicle"}]```'
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from medmllm.cli import main; sys.exit(main())",
            "parse",
            "--dialect",
            "medgemma",
        ],
        input=text.encode("utf-8"),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "boxes": [{"label": "right clavicle", "values": [140, 110, 340, 470]}],
        "seg_tokens": 0,
        "warnings": [],
    }
