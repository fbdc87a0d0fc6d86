"""`qt` as PythonQt spells it, over PySide6 (offscreen): one flat namespace of QtCore/QtGui/QtWidgets.

Only the spelling differs from Slicer; our code reads properties through
`MedMLLMSlicerLib.qtutil.prop`, which works with PythonQt (attributes) and PySide6 (methods).
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtWidgets

for _module in (QtCore, QtGui, QtWidgets):
    globals().update({name: getattr(_module, name) for name in dir(_module) if name.startswith("Q")})

Qt = QtCore.Qt
