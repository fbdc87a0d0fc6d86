"""Make the server exit when the program that started it is gone (`medmllm serve --exit-with PID`).

In Slicer the server's parent is not Slicer but `PythonSlicer`, a CTKAppLauncher that starts the real
Python as its child and forwards no signals, so a Slicer that crashes or is killed leaves the server
holding its port, token and GPU memory. A daemon thread checks once a second whether that process
still exists; when it is gone the server is asked to stop as on Ctrl+C (SIGTERM: uvicorn shuts down
gracefully), and ended outright if it is still running `grace_s` later. Stdlib only.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

_SYNCHRONIZE = 0x00100000  # Windows access right needed to wait on a process handle
_WAIT_TIMEOUT = 0x102


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (any user's; a zombie counts as gone on POSIX)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _windows_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A dead child its parent has not reaped yet (Linux /proc; elsewhere assume not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return False


def _windows_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(_SYNCHRONIZE, False, pid)
    if not handle:
        return False
    try:
        return kernel32.WaitForSingleObject(handle, 0) == _WAIT_TIMEOUT
    finally:
        kernel32.CloseHandle(handle)


def exit_with(pid: int, interval_s: float = 1.0, grace_s: float = 10.0) -> threading.Thread:
    """Start the watch on `pid` (a daemon thread); returns the thread."""
    if not process_alive(pid):
        raise ValueError(f"--exit-with: no process {pid}")
    thread = threading.Thread(
        target=_watch, args=(pid, interval_s, grace_s), daemon=True, name="medmllm-exit-with"
    )
    thread.start()
    return thread


def _watch(pid: int, interval_s: float, grace_s: float) -> None:
    while process_alive(pid):
        time.sleep(interval_s)
    log.warning("process %d that started this server is gone: shutting down", pid)
    if sys.platform != "win32":
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's handler: graceful shutdown
        time.sleep(grace_s)
    os._exit(1)
