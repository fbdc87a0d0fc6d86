"""Files that are either the old version or the new one, never half-written, even across a crash.

A reader (a download, a Slicer import, a restarted server) must never see a truncated
`answer.md`, `chat.json`, session or volume: the bytes go to a temporary file in the same folder,
are fsynced, then renamed over the target with `os.replace` (atomic on POSIX and Windows), and the
folder is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(source: Path, target: Path) -> None:
    """Rename an already fsynced file over `target`, then fsync the folder."""
    os.replace(source, target)
    fsync_dir(Path(target).parent)


def write_atomic(path: Path, data: Union[bytes, str]) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically and durably; raises OSError, leaving the
    previous file (if any) untouched and no temporary file behind."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        replace_durably(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
