"""Content-addressed volume store and per-answer result folders, both on disk under one root.

Volumes are kept as the exact wire bytes (`<sha256>.vol`), so a restart keeps them and the id is
re-verifiable (and is re-verified each time a volume is read back from disk); a bounded in-memory
cache holds the decoded arrays. An upload streams to disk with bounded memory: each block is
inflated (gzip) in pieces, size-checked, then hashed and written by a spool thread of its own while
the body still arrives, at most `MAX_PENDING_BYTES` ahead of the disk, and flushed to the disk
behind it. Only once the hash and the
volume check pass is the file fsynced and renamed into place and the volume cached, before the 201:
a 201 means stored, and a full disk is a clear 507 with nothing half-written left.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import shutil
import stat
import tempfile
import threading
import uuid
import zlib
from collections import OrderedDict, deque
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional, Union

import numpy as np

from medmllm.atomic import replace_durably
from medmllm.protocol import UPLOAD_ENCODING, is_volume_id

log = logging.getLogger("medmllm.server")

#: Bytes of one upload received but not yet on disk; past this the receiver waits for the spool.
MAX_PENDING_BYTES = 8 << 20
#: The spool starts flushing to the disk (in the background) each time this much more is written,
#: so the fsync before the 201 has little left to do (157 MB: 0.05 s left instead of 0.18 s).
FLUSH_BEHIND_BYTES = 16 << 20
#: Inflated gzip output is produced (and bounded) in pieces of this size.
INFLATE_PIECE_BYTES = 1 << 20
#: Uploads received at once; one more gets 503 with Retry-After.
DEFAULT_MAX_UPLOADS = 8
#: Opening a stored file never follows a symbolic link out of the store.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class StoreError(Exception):
    """A request the store refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _decode_volume(data: Union[bytes, bytearray], max_bytes: int):
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
    writes release the GIL). `put` blocks while more than MAX_PENDING_BYTES wait for the disk, so
    memory per upload stays bounded however fast the client sends. Once the last byte is written
    the digest is ready (`sha256`) while the thread fsyncs the file (`finish` waits for that), so
    reading the verified file back overlaps the fsync; and while the body arrives, what is written
    is flushed to the disk behind it (`_flush_behind`), so that fsync has little left. A write
    error (a full disk) surfaces at the next `put`, at `sha256` or at `finish`."""

    def __init__(self, tmp_dir: Path, prefix: str, store: VolumeStore) -> None:
        try:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=tmp_dir)
        except OSError as exc:
            raise _disk_error(exc) from None
        self.path = Path(name)
        self.store = store
        self._file = os.fdopen(fd, "wb")
        self._chunks: Deque[Optional[bytes]] = deque()
        self._pending = 0
        self._ready = threading.Condition()
        self._error: Optional[OSError] = None
        self._hash = hashlib.sha256()
        self._written = threading.Event()
        self._abandoned = False  # discarded: no point in fsyncing
        self._unflushed = 0
        self._flusher: Optional[threading.Thread] = None
        self._thread = threading.Thread(target=self._run, name="upload-spool", daemon=True)
        self._thread.start()

    def put(self, chunk: bytes) -> None:
        self._check()
        with self._ready:
            while self._pending > MAX_PENDING_BYTES and self._thread.is_alive():
                self._ready.wait(1.0)
            self._chunks.append(chunk)
            self._pending += len(chunk)
            self.store.in_flight(len(chunk))
            self._ready.notify_all()

    def sha256(self) -> str:
        """Hex digest of everything put, once the last bytes are written (readable, not yet fsynced)."""
        with self._ready:
            self._chunks.append(None)
            self._ready.notify_all()
        self._written.wait()
        self._check()
        return self._hash.hexdigest()

    def finish(self) -> None:
        """Wait until the file is fsynced and closed."""
        self._stop()
        self._check()

    def discard(self) -> None:
        self._abandoned = True
        self._stop()
        self.path.unlink(missing_ok=True)

    def _check(self) -> None:
        if self._error is not None:
            raise _disk_error(self._error)

    def _stop(self) -> None:
        if self._thread.is_alive():
            with self._ready:
                self._chunks.append(None)
                self._ready.notify_all()
            self._thread.join()

    def _next(self) -> Optional[bytes]:
        with self._ready:
            while not self._chunks:
                self._ready.wait()
            return self._chunks[0]

    def _done(self, chunk: bytes) -> None:
        with self._ready:
            self._chunks.popleft()
            self._pending -= len(chunk)
            self.store.in_flight(-len(chunk))
            self._ready.notify_all()

    def _run(self) -> None:
        chunk = self._next()
        while chunk is not None:
            self._hash.update(chunk)
            if self._error is None:
                try:
                    self._file.write(chunk)
                    self._unflushed += len(chunk)
                    if self._unflushed >= FLUSH_BEHIND_BYTES:
                        self._flush_behind()
                except OSError as exc:
                    self._error = exc
            self._done(chunk)
            chunk = self._next()
        try:
            if self._error is None:
                self._file.flush()
        except OSError as exc:
            self._error = exc
        self._written.set()
        if self._flusher is not None:
            self._flusher.join()
        try:
            if self._error is None and not self._abandoned:
                os.fsync(self._file.fileno())
            self._file.close()
        except OSError as exc:
            self._error = self._error or exc

    def _flush_behind(self) -> None:
        """Start writing what is written so far to the disk in the background (one flush at a time)."""
        if self._flusher is not None and self._flusher.is_alive():
            return
        self._file.flush()
        self._unflushed = 0
        self._flusher = threading.Thread(target=self._sync_data, name="upload-flush", daemon=True)
        self._flusher.start()

    def _sync_data(self) -> None:
        try:
            _fdatasync(self._file.fileno())
        except OSError as exc:
            self._error = self._error or exc


#: fdatasync skips metadata a later fsync writes anyway; macOS has only fsync.
_fdatasync = getattr(os, "fdatasync", os.fsync)


class Upload:
    """One PUT in progress: inflate, bound and spool (hash + disk) the body block by block.

    `write` may block (for the disk, or inflating): call it off the event loop. The caller must
    `discard()` an upload that fails (or is abandoned) before `commit()`; either frees its slot.
    """

    def __init__(
        self, store: VolumeStore, volume_id: str, encoding: Optional[str], length: Optional[int]
    ) -> None:
        self.store = store
        self.volume_id = volume_id
        self.size = 0  # bytes of the volume (after inflation)
        self.received = 0  # bytes off the wire
        self._inflate = None
        self._open = True
        if encoding and encoding.lower() not in ("identity", UPLOAD_ENCODING):
            raise StoreError(415, f"unsupported Content-Encoding {encoding!r}; use {UPLOAD_ENCODING} or none")
        if encoding and encoding.lower() == UPLOAD_ENCODING:
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        # The announced length is checked, never preallocated: headers alone cost nothing.
        self._announced = length
        if length is not None and length > self._max_received():
            self._too_large()
        self._spool = _Spool(store.tmp_dir, f"{volume_id[:12]}-", store)

    def _max_received(self) -> int:
        """Wire bytes allowed: the volume limit, plus gzip's worst-case growth of stored blocks."""
        limit = self.store.max_volume_bytes
        return limit if self._inflate is None else limit + limit // 1000 + 1024

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self._max_received():
            self._too_large()
        if self._announced is not None and self.received > self._announced:
            raise StoreError(400, f"the upload is longer than its Content-Length of {self._announced} bytes")
        if self._inflate is None:
            self._take(chunk)
            return
        inflate = self._inflate
        if inflate.eof:
            self._trailing()
        try:
            data = inflate.decompress(chunk, INFLATE_PIECE_BYTES)
            self._take(data)
            while inflate.unconsumed_tail and not inflate.eof:
                data = inflate.decompress(inflate.unconsumed_tail, INFLATE_PIECE_BYTES)
                self._take(data)
        except zlib.error as exc:
            raise StoreError(400, f"the upload is not valid {UPLOAD_ENCODING} data ({exc})") from None
        if inflate.eof and (inflate.unused_data or inflate.unconsumed_tail):
            self._trailing()

    def _trailing(self) -> None:
        raise StoreError(400, f"the upload has data after the end of its {UPLOAD_ENCODING} stream")

    def _take(self, data: bytes) -> None:
        end = self.size + len(data)
        if end > self.store.max_volume_bytes:
            self._too_large()
        self._spool.put(data)
        self.size = end

    def _too_large(self) -> None:
        limit = self.store.max_volume_bytes
        raise StoreError(413, f"volume larger than this server's limit of {limit} bytes")

    def commit(self):
        """Verify the hash and the volume, persist it and cache it; returns the Volume."""
        try:
            if self._inflate is not None and not self._inflate.eof:
                raise StoreError(400, f"the {UPLOAD_ENCODING} upload is truncated")
            if self._announced is not None and self.received != self._announced:
                raise StoreError(
                    400, f"upload truncated: {self.received} of {self._announced} announced bytes arrived"
                )
            digest = self._spool.sha256()
            if digest != self.volume_id:
                raise StoreError(
                    400, f"upload corrupted: its sha256 is {digest}, not the volume id in the URL"
                )
            data = _read_regular(self._spool.path)
            if data is None:
                raise _disk_error(OSError(errno.ENOENT, "the spooled upload vanished"))
            volume = _decode_stored(data, self.store.max_volume_bytes)
            self._spool.finish()
            self.store.keep(self._spool.path, self.volume_id, volume)
            return volume
        finally:
            self._close()

    def discard(self) -> None:
        """Remove what was spooled to disk (a failed or abandoned upload leaves nothing behind)."""
        self._spool.discard()
        self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            self.store.release_upload()


def _decode_stored(data: Union[bytes, np.ndarray], max_bytes: int):
    try:
        return _decode_volume(data, max_bytes)
    except ValueError as exc:
        raise StoreError(422, f"not a usable volume: {exc}") from None
    except (TypeError, RecursionError) as exc:  # hostile JSON the header checks did not foresee
        raise StoreError(422, f"not a usable volume: malformed upload header ({exc})") from None


class VolumeStore:
    """Volumes by sha256 on disk (LRU bound in bytes) with a bounded memory cache.

    Eviction and reads tolerate each other: a file may vanish between listing and use (another
    upload's eviction), which is never an error; one lock orders renames into place and evictions.
    """

    def __init__(
        self,
        root: Path,
        max_volume_bytes: int,
        max_disk_bytes: int,
        max_memory_bytes: int,
        max_uploads: int = DEFAULT_MAX_UPLOADS,
    ) -> None:
        self.dir = Path(root) / "volumes"
        self.tmp_dir = Path(root) / "tmp"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp_dir.glob("*.part"):
            stale.unlink(missing_ok=True)
        self.max_volume_bytes = max_volume_bytes
        self.max_disk_bytes = max_disk_bytes
        self.max_memory_bytes = max_memory_bytes
        self.max_uploads = max_uploads
        self.pending_bytes = 0  # upload bytes in memory, waiting for the disk
        self._uploads = 0
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._disk_lock = threading.Lock()
        #: Told the id of each volume removed (evicted or damaged), so what was kept for it goes too.
        self.on_remove: Callable[[str], None] = lambda volume_id: None

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
        """Start an upload; 503 (retry shortly) when `max_uploads` are already being received."""
        self.path(volume_id)
        with self._lock:
            if self._uploads >= self.max_uploads:
                raise StoreError(
                    503,
                    f"{self.max_uploads} uploads are in progress, this server's limit; retry shortly",
                    {"retry-after": "2"},
                )
            self._uploads += 1
        try:
            return Upload(self, volume_id, encoding, length)
        except BaseException:
            self.release_upload()
            raise

    def release_upload(self) -> None:
        """An upload ended (stored or not): its slot is free again."""
        with self._lock:
            self._uploads -= 1

    def in_flight(self, delta: int) -> None:
        with self._lock:
            self.pending_bytes += delta

    def get(self, volume_id: str):
        """The decoded Volume, from memory or disk; StoreError(404) if unknown, or if the stored
        bytes no longer match their sha256 (then the file is removed: upload it again)."""
        path = self.path(volume_id)
        with self._lock:
            cached = self._cache.get(volume_id)
            if cached is not None:
                self._cache.move_to_end(volume_id)
        if cached is not None:
            _touch(path)
            return cached
        data = _read_regular(path)
        if data is None:
            raise StoreError(404, "unknown volume: upload it first (PUT /v1/volumes/{sha256})")
        _touch(path)
        if hashlib.sha256(data).hexdigest() != volume_id:
            log.error("store: volume %s failed its checksum on disk; removed", volume_id[:12])
            self._remove(path)
            raise StoreError(
                404, "the stored volume was damaged on disk and has been removed; upload it again"
            )
        try:
            volume = _decode_volume(data, self.max_volume_bytes)
        except ValueError as exc:
            self._remove(path)
            raise StoreError(404, f"stored volume was unreadable and has been removed ({exc})") from None
        self.remember(volume_id, volume)
        return volume

    def keep(self, spooled: Path, volume_id: str, volume) -> None:
        """Rename a verified, fsynced upload into place, then evict to the disk bound and cache it."""
        with self._disk_lock:
            try:
                replace_durably(spooled, self.path(volume_id))
            except OSError as exc:
                raise _disk_error(exc) from None
            self._enforce_disk_bound(keep=volume_id)
        self.remember(volume_id, volume)

    def remember(self, volume_id: str, volume) -> None:
        """Cache a decoded volume; upload bytes still waiting for the disk count against the bound."""
        with self._lock:
            self._cache[volume_id] = volume
            self._cache.move_to_end(volume_id)
            while len(self._cache) > 1 and self.memory_bytes() + self.pending_bytes > self.max_memory_bytes:
                self._cache.popitem(last=False)

    def memory_bytes(self) -> int:
        return sum(v.voxels.nbytes for v in self._cache.values())

    def _enforce_disk_bound(self, keep: str) -> None:
        """Delete least recently used volumes until the folder fits (`keep`, just stored, stays)."""
        files = sorted(_stat_all(self.dir.glob("*.vol")), key=lambda f: f[1].st_mtime)
        total = sum(s.st_size for _, s in files)
        for old, info in files:
            if total <= self.max_disk_bytes:
                break
            if old.stem == keep:
                continue
            total -= info.st_size
            self._remove(old)
            with self._lock:
                self._cache.pop(old.stem, None)
            log.info("store: evicted volume %s (disk bound)", old.stem[:12])

    def _remove(self, path: Path) -> None:
        """Delete a stored volume and let `on_remove` drop what was kept for it."""
        path.unlink(missing_ok=True)
        self.on_remove(path.stem)


def _stat_all(paths) -> List[tuple]:
    """(path, stat) of each path still there: a file evicted meanwhile is simply left out."""
    found = []
    for path in paths:
        try:
            found.append((path, path.stat()))
        except FileNotFoundError:
            continue
    return found


def _read_regular(path: Path) -> Optional[Union[bytes, np.ndarray]]:
    """The bytes of a regular file (uint8 array), never through a symbolic link; None if it is not there."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP):
            return None
        raise
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None
        return _copy_out(handle.fileno(), info.st_size)


def _copy_out(fd: int, size: int) -> Union[bytes, np.ndarray]:
    """A file's bytes copied into memory through a short-lived read-only map: 4x faster than read()
    for a large file in the page cache (157 MB: 0.025 s vs 0.1 s; numpy's copy lands on huge pages).
    The copy is kept, never the map, so a volume in the cache cannot change with the file on disk."""
    if size == 0:
        return b""
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mapped:
        view = np.frombuffer(mapped, np.uint8)
        data = view.copy()
        del view  # the map can only close once no array looks into it
    data.setflags(write=False)  # as immutable as the bytes it stands for
    return data


def _is_real(path: Path, kind) -> bool:
    """True for a real file or folder of `kind` (stat.S_ISREG / S_ISDIR), never a symbolic link."""
    try:
        return kind(path.lstat().st_mode)
    except OSError:
        return False


def _touch(path: Path) -> bool:
    """Mark a stored volume as just used (the disk bound evicts by modification time); False if it
    is absent or not a regular file (a planted link is never touched through)."""
    if not _is_real(path, stat.S_ISREG):
        return False
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


class ResultStore:
    """One folder per answer (`results/<id>/`), keeping the newest `max_results`.

    An answer is protected from pruning from `new()` until `finish()`: a folder being written is
    newer by mtime than an empty one just made, so without the reservation a concurrent answer's
    pruning could delete a folder between its creation and its writer being attached."""

    def __init__(self, root: Path, max_results: int = 64) -> None:
        self.dir = Path(root) / "results"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_results = max_results
        self.writers: Dict[str, Optional[object]] = {}  # answers in progress (None: no writer yet)
        self._lock = threading.Lock()

    def new(self) -> str:
        """A new answer's folder, reserved until `finish()`."""
        result_id = uuid.uuid4().hex
        with self._lock:
            self.writers[result_id] = None
        try:
            (self.dir / result_id).mkdir()
        except BaseException:
            self.finish(result_id)  # no folder, no reservation
            raise
        self._prune()
        return result_id

    def attach(self, result_id: str, writer: object) -> None:
        with self._lock:
            self.writers[result_id] = writer

    def finish(self, result_id: str) -> None:
        """The answer's files are written (or it failed): from now on it may be pruned."""
        with self._lock:
            self.writers.pop(result_id, None)

    def folder(self, result_id: str) -> Path:
        folder = self.dir / result_id
        if not (len(result_id) == 32 and all(c in "0123456789abcdef" for c in result_id)) or not _is_real(
            folder, stat.S_ISDIR
        ):
            raise StoreError(404, "unknown result id")
        return folder

    def files(self, result_id: str) -> List[str]:
        """The regular files of an answer; a symbolic link planted there is neither listed nor served."""
        folder = self.folder(result_id)
        return sorted(
            p.name for p in folder.iterdir() if not p.name.startswith(".") and _is_real(p, stat.S_ISREG)
        )

    def file(self, result_id: str, name: str) -> Path:
        folder = self.folder(result_id)
        if name not in self.files(result_id):
            raise StoreError(404, f"no file {name!r} in this result")
        return folder / name

    def _prune(self) -> None:
        """Delete the oldest finished answers past `max_results`; answers still streaming stay."""
        folders = sorted((p for p in self.dir.iterdir() if p.is_dir()), key=_mtime)
        with self._lock:
            busy = set(self.writers)
        for old in folders[: max(0, len(folders) - self.max_results)]:
            if old.name not in busy:
                shutil.rmtree(old, ignore_errors=True)


def _mtime(path: Path) -> float:
    """Modification time, or 0 for a folder another answer's pruning removed meanwhile."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
