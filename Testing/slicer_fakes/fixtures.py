"""pytest fixtures for the Slicer-side tests: fake Slicer, isolated Qt settings, phantom volume node."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import numpy as np
import pytest

from . import install
from .qt import restore_none_references


@pytest.fixture
def fake_slicer(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh fake `slicer` (new scene) with Qt settings written under tmp_path."""
    from PySide6 import QtCore

    slicer = install()
    QtCore.QCoreApplication.setOrganizationName("MedMLLMSlicerTests")
    QtCore.QCoreApplication.setApplicationName("tests")
    QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
    QtCore.QSettings.setPath(
        QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope, str(tmp_path / "settings")
    )
    monkeypatch.setattr(slicer.util, "tempDirectory", lambda *a, **k: str(tmp_path))
    none_references = sys.getrefcount(None)
    yield slicer
    restore_none_references(none_references)


def add_phantom(slicer: Any, voxels: np.ndarray, ijk_to_ras: np.ndarray, name: str = "Phantom CT") -> Any:
    return slicer.util.addVolumeFromArray(voxels, ijk_to_ras, name)


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Run the Qt event loop until `condition()` holds (the panel's timers need the loop)."""
    from PySide6 import QtWidgets

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        QtWidgets.QApplication.processEvents()
        if condition():
            return True
        time.sleep(0.005)
    return False
