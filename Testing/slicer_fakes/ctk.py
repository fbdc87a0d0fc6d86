"""The one CTK widget the module uses, as a PySide6 stand-in with PythonQt-style properties."""

from __future__ import annotations

from PySide6 import QtWidgets


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    """A titled section that hides its content when collapsed (Slicer's `ctkCollapsibleButton`)."""

    def setText(self, text: str) -> None:
        self.setTitle(text)

    @property
    def collapsed(self) -> bool:
        return not self.isChecked()

    @collapsed.setter
    def collapsed(self, value: bool) -> None:
        self.setCheckable(True)
        self.setChecked(not value)
        for child in self.findChildren(QtWidgets.QWidget):
            if child.parent() is self:
                child.setVisible(not value)
