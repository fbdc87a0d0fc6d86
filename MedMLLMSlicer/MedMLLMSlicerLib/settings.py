"""Machine preferences in Qt settings; the remote token stays in memory unless the user says "remember".

Scene state (which volume, the conversation) lives in the scene instead, so it travels with it.
"""

from __future__ import annotations

from typing import Any, List

import qt
from medmllm.grounding.registry import slice_dialect_names

from MedMLLMSlicerLib.qtutil import prop

PREFIX = "MedMLLMSlicer/"
MODES = ("local", "remote", "openai")
DIALECTS = tuple(slice_dialect_names())  # what an OpenAI-compatible server's model may speak
HISTORY = 10


def _to_bool(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes")


class Settings:
    """Typed access to the module's QSettings keys; `token` is never written unless remembered."""

    def __init__(self) -> None:
        self._qsettings = qt.QSettings()
        self._token = ""
        if self.remember_token:
            self._token = str(self._get("remoteToken", ""))

    def _get(self, key: str, default: Any) -> Any:
        value = self._qsettings.value(PREFIX + key)
        return default if value is None else value

    def _set(self, key: str, value: Any) -> None:
        self._qsettings.setValue(PREFIX + key, value)

    @property
    def mode(self) -> str:
        mode = str(self._get("mode", "local"))
        return mode if mode in MODES else "local"

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"backend mode must be one of {', '.join(MODES)}")
        self._set("mode", value)

    @property
    def remote_url(self) -> str:
        return str(self._get("remoteUrl", ""))

    @remote_url.setter
    def remote_url(self, url: str) -> None:
        self._set("remoteUrl", url)
        history = [u for u in self.url_history if u != url]
        self._set("remoteUrlHistory", "\n".join([url, *history][:HISTORY]))

    @property
    def url_history(self) -> List[str]:
        return [u for u in str(self._get("remoteUrlHistory", "")).split("\n") if u]

    @property
    def remember_token(self) -> bool:
        return _to_bool(self._get("rememberToken", False))

    @property
    def token(self) -> str:
        return self._token

    def set_token(self, token: str, remember: bool) -> None:
        """Keep the token in memory; write it to disk only when `remember` (else erase any stored one)."""
        self._token = token
        self._set("rememberToken", "true" if remember else "false")
        if remember:
            self._set("remoteToken", token)
        else:
            self._qsettings.remove(PREFIX + "remoteToken")

    def text(self, key: str, default: str = "") -> str:
        return str(self._get(key, default))

    def set_text(self, key: str, value: str) -> None:
        self._set(key, value)

    def flag(self, key: str) -> bool:
        return _to_bool(self._get(key, False))

    def set_flag(self, key: str, value: bool) -> None:
        self._set(key, "true" if value else "false")

    def stored_keys(self) -> List[str]:
        """Every key this module stored (tests check that no secret leaked there)."""
        return [k for k in prop(self._qsettings, "allKeys") if k.startswith(PREFIX)]
