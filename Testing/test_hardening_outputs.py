"""What the software writes, hardened (issue 13): model text reaches a terminal without escape
sequences but reaches the files unchanged; result files, sessions and volumes are written
atomically and durably; a public bind refuses a guessable token."""

from __future__ import annotations

import json
import os
import secrets

import medmllm.engines.registry as registry
import pytest
import SimpleITK as sitk
from conftest import BONE_VOXELS, ScriptedEngine, phantom_ct
from medmllm.cli import main
from medmllm.engines.base import BoxOut, ChatTurn, TokenOut, WarningOut
from medmllm.geometry.volume import Volume
from medmllm.results import ResultWriter
from medmllm.server.auth import check_bind

#: Clear screen, retitle the window, write the clipboard (OSC 52), reverse the text direction,
#: return to the line start, an 8-bit CSI and a bell: what a model's answer might carry.
HOSTILE = (
    "Normal \x1b[2J\x1b]0;pwned\x07 text \x1b]52;c;ZXZpbA==\x07\u202eevil\u202c done\r\nnext \x9b31m line\x07"
)
CONTROLS = ("\x1b", "\x07", "\x9b", "\u202e", "\u202c", "\r")


class HostileEngine(ScriptedEngine):
    """Answers with HOSTILE as text, as a box label and as a warning."""

    def chat(self, ctx, cancel):
        from medmllm.geometry.boxes import IJKBox

        yield TokenOut(HOSTILE)
        yield BoxOut(f"\x1b[31m{HOSTILE}", IJKBox.from_voxels(*BONE_VOXELS))
        yield WarningOut(HOSTILE)


def test_ask_prints_model_text_without_terminal_controls_but_writes_it_unchanged(
    tmp_path, monkeypatch, capsys
):
    voxels, matrix = phantom_ct()
    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(Volume.from_array(voxels, matrix).to_sitk(), str(ct))
    real = registry.create_engine
    monkeypatch.setattr(
        registry, "create_engine", lambda n, o: HostileEngine(o) if n == "hostile" else real(n, o)
    )
    out = tmp_path / "out"
    assert main(["ask", str(ct), "what is this?", "--engine", "hostile", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    for stream in (printed.out, printed.err):
        assert not [c for c in CONTROLS if c in stream], repr(stream)
    assert "Normal  text evil done\nnext  line" in printed.out
    assert "[box] Normal" in printed.out and "warning: Normal" in printed.err
    assert HOSTILE in (out / "answer.md").read_bytes().decode("utf-8"), "files keep the model's text as is"
    chat = json.loads((out / "chat.json").read_text(encoding="utf-8"))
    assert chat["messages"][-1]["content"] == HOSTILE


@pytest.fixture
def durable_log(monkeypatch):
    """Every fsync (by inode) and rename, in order, as the real calls run."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(source, target, **kwargs):
        calls.append(("replace", os.stat(source).st_ino, os.fspath(target)))
        return real_replace(source, target, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def _written_durably(calls, target) -> bool:
    """`target` was renamed into place from a file fsynced before, and its folder fsynced after."""
    for n, call in enumerate(calls):
        if call[0] == "replace" and call[2] == os.fspath(target):
            synced_before = ("fsync", call[1]) in calls[:n]
            folder = ("fsync", os.stat(os.path.dirname(call[2])).st_ino)
            return synced_before and folder in calls[n:]
    return False


def test_answer_and_chat_files_are_replaced_atomically_after_an_fsync(tmp_path, durable_log):
    voxels, matrix = phantom_ct()
    writer = ResultWriter(tmp_path, Volume.from_array(voxels, matrix), "0" * 64, [ChatTurn("user", "q")])
    writer.add(TokenOut("an answer"))
    writer.write_files(preview=False)
    for name in ("answer.md", "chat.json"):
        assert _written_durably(durable_log, tmp_path / name), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.md", "chat.json"], "no temporary file left"


def test_a_stored_volume_is_fsynced_before_it_is_renamed_into_place(serve, durable_log):
    server = serve()
    volume_id = server.client().ensure_volume(*phantom_ct())
    assert _written_durably(durable_log, server.store / "volumes" / f"{volume_id}.vol")


@pytest.mark.parametrize("token", ["tok-9f8e7d6c5b4a", "a" * 64, "abababababababababababab1234"])
def test_a_public_bind_refuses_a_guessable_token(token):
    with pytest.raises(ValueError, match="guessable token"):
        check_bind("0.0.0.0", token)


def test_a_public_bind_takes_a_generated_token_and_loopback_takes_any():
    check_bind("0.0.0.0", secrets.token_urlsafe(32))
    check_bind("127.0.0.1", "tok")
