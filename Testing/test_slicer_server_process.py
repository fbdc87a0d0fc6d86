"""The local server behind Slicer's launcher: Stop ends it, and it ends when Slicer does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from slicer_fakes.fixtures import fake_slicer  # noqa: F401

LAUNCHER = str(Path(__file__).parent / "slicer_fakes" / "launcher.py")


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=0.5).status_code == 200
    except requests.exceptions.RequestException:
        return False


def _gone_within(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _answers(url):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def backends(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib import backends

    return backends


def test_stop_ends_the_server_behind_the_launcher(backends, tmp_path):
    """`terminate()` reaches only the launcher; the whole group must go, port and all."""
    server = backends.LocalServer(
        "builtin", ["--store", str(tmp_path / "store")], python=[sys.executable, LAUNCHER]
    )
    server.start()
    try:
        url = server.wait_ready(60)
        assert _answers(url)
    finally:
        server.stop()
    assert _gone_within(url, 3), "the server outlived Stop"


SLICER = """
import sys, time
from MedMLLMSlicerLib.backends import LocalServer
server = LocalServer("builtin", ["--store", sys.argv[1]], python=[sys.executable, sys.argv[2]])
server.start()
print(server.wait_ready(60), flush=True)
time.sleep(600)
"""


def test_server_exits_when_slicer_dies_without_stopping_it(tmp_path):
    """Slicer crashing (or killed) runs no cleanup: the server watches Slicer's pid (`--exit-with`).
    The stand-in Slicer runs in a process group of its own, so the test can clean up after it."""
    from MedMLLMSlicerLib.process_group import popen_group, stop_group

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [
                str(Path(__file__).parents[1] / "MedMLLMSlicer"),
                str(Path(__file__).parent),
                os.environ.get("PYTHONPATH", ""),
            ]
        ),
    }
    script = "import slicer_fakes; slicer_fakes.install()\n" + SLICER
    slicer = popen_group(
        [sys.executable, "-c", script, str(tmp_path / "store"), LAUNCHER],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = slicer.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and _answers(url)
        slicer.kill()  # a crash: no cleanup runs in Slicer
        slicer.wait(10)
        assert _gone_within(url, 10), "the server outlived Slicer"
    finally:
        stop_group(slicer)  # whatever is left of the stand-in's group


def test_exit_with_refuses_a_process_that_does_not_exist(tmp_path):
    from medmllm.server.watchdog import process_alive

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not process_alive(dead.pid) and process_alive(os.getpid())
    assert not process_alive(0) and not process_alive(-5)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "MedMLLMSlicer")}
    command = [sys.executable, "-m", "medmllm.cli", "serve", "--store", str(tmp_path), "--port", "0"]
    result = subprocess.run([*command, "--exit-with", str(dead.pid)], capture_output=True, text=True, env=env)
    assert result.returncode != 0 and f"no process {dead.pid}" in result.stderr
