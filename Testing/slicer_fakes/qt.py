"""`qt` as PythonQt spells it, over PySide6 (offscreen): one flat namespace of QtCore/QtGui/QtWidgets.

Only the spelling differs from Slicer; our code reads properties through
`MedMLLMSlicerLib.qtutil.prop`, which works with PythonQt (attributes) and PySide6 (methods).
"""

from __future__ import annotations

import ctypes
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtWidgets

for _module in (QtCore, QtGui, QtWidgets):
    globals().update({name: getattr(_module, name) for name in dir(_module) if name.startswith("Q")})

Qt = QtCore.Qt


def restore_none_references(baseline: int) -> None:
    """Undo PySide6's leak of None: PySide6 6.12 on CPython 3.11 drops a reference to None on every
    call of a Qt method that returns nothing (`sys.getrefcount(None)` falls by one per `setText`,
    `processEvents`, `setInterval`, ...), and after some ten thousand calls Python frees None and
    aborts ("none_dealloc"). PythonQt (Slicer) does not do this. Extra references are harmless
    (None is immortal from Python 3.12 on)."""
    for _ in range(baseline - sys.getrefcount(None)):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(None))
