"""The Windows branches of process-group handling and the `--exit-with` watchdog, run on Linux with
`sys.platform` set to "win32" and doubles of the Win32 calls they make.

The doubles follow Microsoft's documentation of the real calls: `OpenProcess` returns a handle, or
NULL (0) when there is no such process; `WaitForSingleObject(handle, 0)` returns WAIT_TIMEOUT
(0x102) while the process runs and WAIT_OBJECT_0 (0) once it has exited; every handle opened is
closed with `CloseHandle`. The flag values are the documented ones (Process Creation Flags:
CREATE_NEW_PROCESS_GROUP 0x00000200, CREATE_NO_WINDOW 0x08000000; Process Security and Access
Rights: SYNCHRONIZE 0x00100000) and `taskkill /T /F /PID n` ends a process and its tree.
What this cannot show is Windows itself: the calls are checked, not made.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from types import SimpleNamespace

import pytest
from medmllm.server import watchdog
from MedMLLMSlicerLib import process_group

WAIT_OBJECT_0, WAIT_TIMEOUT, SYNCHRONIZE = 0x0, 0x102, 0x00100000


class Kernel32:
    """`ctypes.windll.kernel32` for a table {pid: running?}; records what was opened and closed."""

    def __init__(self, processes):
        self.processes, self.opened, self.closed = processes, [], []

    def OpenProcess(self, access, inherit, pid):
        assert access == SYNCHRONIZE and inherit is False
        if pid not in self.processes:
            return 0
        handle = 1000 + pid
        self.opened.append(handle)
        return handle

    def WaitForSingleObject(self, handle, milliseconds):
        assert handle in self.opened and milliseconds == 0
        return WAIT_TIMEOUT if self.processes[handle - 1000] else WAIT_OBJECT_0

    def CloseHandle(self, handle):
        self.closed.append(handle)
        return 1


@pytest.fixture
def windows(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    kernel32 = Kernel32({41: True, 42: False})
    monkeypatch.setattr(ctypes, "windll", SimpleNamespace(kernel32=kernel32), raising=False)
    return kernel32


def test_a_child_gets_its_own_process_group_and_no_console_window(windows):
    assert process_group.group_options() == {"creationflags": 0x00000200 | 0x08000000}


def test_stop_ends_the_whole_tree_with_taskkill(windows, monkeypatch):
    runs, waits = [], []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: runs.append((command, kwargs)))
    process = SimpleNamespace(pid=4321, wait=waits.append)
    process_group.stop_group(process, timeout=3.0)
    ((command, kwargs),) = runs
    assert command == ["taskkill", "/T", "/F", "/PID", "4321"]
    assert kwargs["creationflags"] == 0x08000000 and kwargs["check"] is False
    assert waits == [3.0]


def test_a_process_is_alive_while_running_and_every_handle_is_closed(windows):
    assert watchdog.process_alive(41) is True
    assert watchdog.process_alive(42) is False  # exited: its handle is signalled
    assert watchdog.process_alive(43) is False  # no such process: OpenProcess gives NULL
    assert watchdog.process_alive(0) is False
    assert sorted(windows.closed) == sorted(windows.opened) == [1041, 1042]


def test_the_watchdog_exits_at_once_on_windows_when_its_process_is_gone(windows, monkeypatch):
    """No SIGTERM to itself on Windows (os.kill there would end the process without cleanup)."""
    exits, kills = [], []
    monkeypatch.setattr(watchdog.os, "_exit", exits.append)
    monkeypatch.setattr(watchdog.os, "kill", lambda *args: kills.append(args))
    watchdog._watch(42, interval_s=0.0, grace_s=5.0)
    assert exits == [1] and kills == []
