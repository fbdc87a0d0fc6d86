"""Content-addressed volume store and per-answer result folders, both on disk under one root.

Volumes are kept as the exact wire bytes (`<sha256>.vol`), so a restart keeps them and the id is
re-verifiable; a bounded in-memory cache holds the decoded arrays, which are views on the
received bytes (no copies). An upload is hashed and buffered as it arrives, and written to a
temporary file by a spool thread at the same time; only once the hash and the volume check pass is
the file renamed into place and the volume cached, before the 201: a 201 means stored, and a full
disk is a clear 507 with nothing half-written left.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
import uuid
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

from medmllm.protocol import UPLOAD_ENCODING, is_volume_id

log = logging.getLogger("medmllm.server")


class StoreError(Exception):
    """A request the store refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _decode_volume(data: bytes, max_bytes: int):
    """Wire bytes -> validated Volume (geometry imported lazily: this module loads before it)."""
    from medmllm.geometry.volume import Volume
    from medmllm.geometry.wire import decode_volume

    voxels, ijk_to_ras = decode_volume(data, max_bytes)
    voxels.setflags(write=False)  # shared by every question about this volume: engines must not edit it
    return Volume.from_array(voxels, ijk_to_ras)


def _disk_error(exc: OSError) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(507, "the server's disk is full: the volume was not stored")
    log.error("store: could not write a volume: %s", exc)
    return StoreError(500, f"the server could not store the volume ({exc.strerror})")


class _Spool:
    """An upload's bytes hashed and written to a temporary file by a thread of its own while the
    body still arrives, so hashing and the disk work in parallel with the network (hashlib and file
    writes release the GIL) and the 201 waits only for the tail. A write error (a full disk)
    surfaces at the next chunk or at `sha256`/`finish`."""

    def __init__(self, tmp_dir: Path, prefix: str) -> None:
        try:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=tmp_dir)
        except OSError as exc:
            raise _disk_error(exc) from None
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._error: Optional[OSError] = None
        self._hash = hashlib.sha256()
        self._thread = threading.Thread(target=self._run, name="upload-spool", daemon=True)
        self._thread.start()

    def put(self, chunk: bytes) -> None:
        self._check()
        self._chunks.put(chunk)

    def sha256(self) -> str:
        """Hex digest of everything put, once the last bytes are written."""
        self._stop()
        self._check()
        return self._hash.hexdigest()

    def finish(self, target: Path) -> None:
        """Wait for the last bytes, then rename the file into place."""
        self._stop()
        self._check()
        try:
            os.replace(self.path, target)
        except OSError as exc:
            raise _disk_error(exc) from None

    def discard(self) -> None:
        self._stop()
        self.path.unlink(missing_ok=True)

    def _check(self) -> None:
        if self._error is not None:
            raise _disk_error(self._error)

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._chunks.put(None)
            self._thread.join()

    def _run(self) -> None:
        chunk = self._chunks.get()
        while chunk is not None:
            self._hash.update(chunk)
            if self._error is None:
                try:
                    self._file.write(chunk)
                except OSError as exc:
                    self._error = exc
            chunk = self._chunks.get()
        try:
            self._file.close()
        except OSError as exc:
            self._error = self._error or exc


class Upload:
    """One PUT in progress: decompress, bound, buffer and spool (hash + disk) the body chunk by chunk.

    The caller must `discard()` an upload that fails (or is abandoned) before `commit()`.
    """

    def __init__(
        self, store: VolumeStore, volume_id: str, encoding: Optional[str], length: Optional[int]
    ) -> None:
        self.store = store
        self.volume_id = volume_id
        self.size = 0
        self._inflate = None
        if encoding and encoding.lower() not in ("identity", UPLOAD_ENCODING):
            raise StoreError(415, f"unsupported Content-Encoding {encoding!r}; use {UPLOAD_ENCODING} or none")
        if encoding and encoding.lower() == UPLOAD_ENCODING:
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        # The announced length is checked, never preallocated: memory follows the bytes that
        # actually arrive, so headers alone (a 2 GiB Content-Length, no body) cost nothing.
        self._announced = length if self._inflate is None else None
        if self._announced is not None and self._announced > store.max_volume_bytes:
            self._too_large()
        self._buffer = bytearray()
        self._spool = _Spool(store.tmp_dir, prefix=f"{volume_id[:12]}-")

    def write(self, chunk: bytes) -> None:
        if self._inflate is None:
            self._take(chunk)
            return
        try:
            room = self.store.max_volume_bytes - self.size + 1
            data = self._inflate.decompress(chunk, room)
        except zlib.error as exc:
            raise StoreError(400, f"the upload is not valid {UPLOAD_ENCODING} data ({exc})") from None
        self._take(data)
        if self._inflate.unconsumed_tail:
            self._too_large()

    def _take(self, data: bytes) -> None:
        end = self.size + len(data)
        if end > self.store.max_volume_bytes:
            self._too_large()
        if self._announced is not None and end > self._announced:
            raise StoreError(400, f"the upload is longer than its Content-Length of {self._announced} bytes")
        self._buffer += data
        self._spool.put(data)
        self.size = end

    def _too_large(self) -> None:
        limit = self.store.max_volume_bytes
        raise StoreError(413, f"volume larger than this server's limit of {limit} bytes")

    def commit(self):
        """Verify the hash and the volume, cache it and persist it; returns the Volume."""
        if self._inflate is not None and not self._inflate.eof:
            raise StoreError(400, f"the {UPLOAD_ENCODING} upload is truncated")
        if self._announced is not None and self.size != self._announced:
            raise StoreError(
                400, f"upload truncated: {self.size} of {self._announced} announced bytes arrived"
            )
        digest = self._spool.sha256()
        if digest != self.volume_id:
            raise StoreError(400, f"upload corrupted: its sha256 is {digest}, not the volume id in the URL")
        try:
            volume = _decode_volume(self._buffer, self.store.max_volume_bytes)
        except ValueError as exc:
            raise StoreError(422, f"not a usable volume: {exc}") from None
        except (TypeError, RecursionError) as exc:  # hostile JSON the header checks did not foresee
            raise StoreError(422, f"not a usable volume: malformed upload header ({exc})") from None
        self._spool.finish(self.store.path(self.volume_id))
        self.store.enforce_disk_bound()
        self.store.remember(self.volume_id, volume)
        return volume

    def discard(self) -> None:
        """Remove what was spooled to disk (a failed or abandoned upload leaves nothing behind)."""
        self._spool.discard()


class VolumeStore:
    """Volumes by sha256 on disk (LRU bound in bytes) with a bounded memory cache."""

    def __init__(self, root: Path, max_volume_bytes: int, max_disk_bytes: int, max_memory_bytes: int) -> None:
        self.dir = Path(root) / "volumes"
        self.tmp_dir = Path(root) / "tmp"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp_dir.glob("*.part"):
            stale.unlink(missing_ok=True)
        self.max_volume_bytes = max_volume_bytes
        self.max_disk_bytes = max_disk_bytes
        self.max_memory_bytes = max_memory_bytes
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def path(self, volume_id: str) -> Path:
        if not is_volume_id(volume_id):
            raise StoreError(400, "a volume id is the sha256 of the upload: 64 lowercase hex digits")
        return self.dir / f"{volume_id}.vol"

    def has(self, volume_id: str) -> bool:
        """Asked before each question about a volume, so it counts as a use for the LRU order."""
        path = self.path(volume_id)
        with self._lock:
            cached = volume_id in self._cache
            if cached:
                self._cache.move_to_end(volume_id)
        return _touch(path) or cached

    def begin(self, volume_id: str, encoding: Optional[str], length: Optional[int] = None) -> Upload:
        self.path(volume_id)
        return Upload(self, volume_id, encoding, length)

    def get(self, volume_id: str):
        """The decoded Volume, from memory or disk; StoreError(404) if unknown."""
        path = self.path(volume_id)
        with self._lock:
            cached = self._cache.get(volume_id)
            if cached is not None:
                self._cache.move_to_end(volume_id)
        on_disk = _touch(path)
        if cached is not None:
            return cached
        if not on_disk:
            raise StoreError(404, "unknown volume: upload it first (PUT /v1/volumes/{sha256})")
        try:
            volume = _decode_volume(path.read_bytes(), self.max_volume_bytes)
        except ValueError as exc:
            path.unlink(missing_ok=True)
            raise StoreError(404, f"stored volume was unreadable and has been removed ({exc})") from None
        self.remember(volume_id, volume)
        return volume

    def remember(self, volume_id: str, volume) -> None:
        with self._lock:
            self._cache[volume_id] = volume
            self._cache.move_to_end(volume_id)
            while len(self._cache) > 1 and self.memory_bytes() > self.max_memory_bytes:
                self._cache.popitem(last=False)

    def memory_bytes(self) -> int:
        return sum(v.voxels.nbytes for v in self._cache.values())

    def enforce_disk_bound(self) -> None:
        """Delete least recently used volumes until the folder fits (the newest always stays)."""
        files = sorted(self.dir.glob("*.vol"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for old in files[:-1]:
            if total <= self.max_disk_bytes:
                break
            total -= old.stat().st_size
            old.unlink(missing_ok=True)
            with self._lock:
                self._cache.pop(old.stem, None)
            log.info("store: evicted volume %s (disk bound)", old.stem[:12])


def _touch(path: Path) -> bool:
    """Mark a stored volume as just used (the disk bound evicts by modification time); False if absent."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


class ResultStore:
    """One folder per answer (`results/<id>/`), keeping the newest `max_results`."""

    def __init__(self, root: Path, max_results: int = 64) -> None:
        self.dir = Path(root) / "results"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_results = max_results
        self.writers: Dict[str, object] = {}
        self._lock = threading.Lock()

    def new(self) -> str:
        result_id = uuid.uuid4().hex
        (self.dir / result_id).mkdir()
        self._prune()
        return result_id

    def folder(self, result_id: str) -> Path:
        folder = self.dir / result_id
        if (
            not (len(result_id) == 32 and all(c in "0123456789abcdef" for c in result_id))
            or not folder.is_dir()
        ):
            raise StoreError(404, "unknown result id")
        return folder

    def files(self, result_id: str) -> List[str]:
        folder = self.folder(result_id)
        return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))

    def file(self, result_id: str, name: str) -> Path:
        folder = self.folder(result_id)
        if name not in self.files(result_id):
            raise StoreError(404, f"no file {name!r} in this result")
        return folder / name

    def _prune(self) -> None:
        """Delete the oldest finished answers past `max_results`; answers still streaming stay."""
        folders = sorted((p for p in self.dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for old in folders[: max(0, len(folders) - self.max_results)]:
            if old.name not in self.writers:
                shutil.rmtree(old, ignore_errors=True)
