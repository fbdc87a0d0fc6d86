"""Start a child with everything it starts in one group, and end the whole group.

In Slicer `sys.executable` is `PythonSlicer`, a CTKAppLauncher that runs the real Python as its own
child and forwards no signals: `Popen.terminate()` would end the launcher and leave the server
running with its port, token and GPU memory. So the child gets a process group of its own (POSIX:
a new session; Windows: a new process group, no console window) and stopping signals the group
(Windows: `taskkill /T`, which walks the process tree).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List

_CREATE_NEW_PROCESS_GROUP = 0x00000200
_CREATE_NO_WINDOW = 0x08000000


def group_options() -> Dict[str, Any]:
    """Popen keyword arguments that put the child (and its children) in a group of its own."""
    if sys.platform == "win32":
        return {"creationflags": _CREATE_NEW_PROCESS_GROUP | _CREATE_NO_WINDOW}
    return {"start_new_session": True}


def popen_group(command: List[str], **kwargs: Any) -> subprocess.Popen:
    return subprocess.Popen(command, **kwargs, **group_options())


def stop_group(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """Ask the whole group to stop, then kill what is left after `timeout` seconds."""
    if sys.platform == "win32":
        _taskkill(process.pid)
        process.wait(timeout)
        return
    group = process.pid  # the session leader's pid is the group id
    _signal_group(group, signal.SIGTERM)
    if not _wait_group(process, group, timeout):
        _signal_group(group, signal.SIGKILL)
        _wait_group(process, group, timeout)


def _signal_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)


def _wait_group(process: subprocess.Popen, group: int, timeout: float) -> bool:
    """Reap our child, then wait until no process of the group is left; False on timeout."""
    deadline = time.monotonic() + timeout
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _taskkill(pid: int) -> None:
    subprocess.run(
        ["taskkill", "/T", "/F", "/PID", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        creationflags=_CREATE_NO_WINDOW,
        check=False,
    )
