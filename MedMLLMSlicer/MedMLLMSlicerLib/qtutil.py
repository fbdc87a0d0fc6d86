"""Reading Qt properties the same way under PythonQt (Slicer) and PySide6 (tests).

PythonQt exposes a Q_PROPERTY as a plain attribute (`edit.text` is a str) while PySide6 exposes
the getter method (`edit.text()`), so property reads go through `prop`.
"""

from __future__ import annotations

from typing import Any


def prop(widget: Any, name: str) -> Any:
    """Value of Qt property `name` of `widget` under either binding."""
    value = getattr(widget, name)
    return value() if callable(value) else value
