"""Explicit registries: a name -> `module:attribute` entry list, plus installed packages' entry points.

Engines, dialects and segmenters are all found the same way, and nothing is found by scanning
folders (a helper module next to the dialects is just a helper). The name is stated once, as the
entry's key: the registry gives it to what it loads, so a dialect or engine never repeats it.

Built-in entries are listed in code because the Slicer module runs from its folder without pip,
so no entry-point metadata exists there; other packages add theirs the standard way::

    [project.entry-points."medmllm.dialects"]
    lingshu2 = "my_package.grammar:DIALECT"
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Callable, Dict, Iterator, List, Mapping, Tuple


class PluginError(Exception):
    """An unknown name, or an entry that does not load or is not the right kind of object."""


def _entry_points(group: str) -> Dict[str, str]:
    found = importlib.metadata.entry_points()
    # Python 3.9 returns a dict of groups; 3.10+ has select()
    entries = found.select(group=group) if hasattr(found, "select") else found.get(group, [])
    return {ep.name: ep.value for ep in entries}


def _import(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


class Registry:
    """`kind` objects by name: the built-in `entries` first, then entry points in `group`.

    `check(obj)` says whether a loaded object is a `kind`; a loaded object whose own `name` is
    missing or empty gets the entry's name, one that states another name is refused.
    """

    def __init__(
        self, kind: str, group: str, entries: Mapping[str, str], check: Callable[[Any], bool]
    ) -> None:
        self.kind = kind
        self.group = group
        self.entries = dict(entries)
        self._check = check

    def targets(self) -> Dict[str, str]:
        """name -> `module:attribute`; a built-in name cannot be taken over by a plug-in."""
        return {**_entry_points(self.group), **self.entries}

    def names(self) -> List[str]:
        """Built-ins in their listed order, then installed plug-ins sorted by name."""
        return self._ordered(self.targets())

    def _ordered(self, targets: Mapping[str, str]) -> List[str]:
        return [*self.entries, *sorted(set(targets) - set(self.entries))]

    def load(self, name: str) -> Any:
        return self._load(name, self.targets())

    def each(self) -> Iterator[Tuple[str, Any]]:
        """(name, object) in `names()` order, each loaded as the loop reaches it; the installed
        packages are scanned once for the whole loop, not once per name (~10 ms a scan)."""
        targets = self.targets()
        for name in self._ordered(targets):
            yield name, self._load(name, targets)

    def _load(self, name: str, targets: Mapping[str, str]) -> Any:
        if name not in targets:
            raise PluginError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        try:
            obj = _import(targets[name])
        except Exception as exc:
            raise PluginError(f"{self.kind} {name!r} ({targets[name]}) failed to load: {exc}") from exc
        if not self._check(obj):
            raise PluginError(f"{self.kind} {name!r} ({targets[name]}) is not a {self.kind}")
        own = getattr(obj, "name", "")
        if own and own != name:
            raise PluginError(f"{self.kind} {name!r} ({targets[name]}) calls itself {own!r}")
        if not own:
            obj.name = name
        return obj
