"""The disk tier: one file per entry under a directory, with a byte budget and LRU.

Layout: ``ROOT/<namespace id hex>/<first key byte hex>/<key hex>.kv``, each file a
:mod:`kvshelf.codec` entry. Writes go to a temporary file in the same directory and are
published with ``os.replace``, so readers see a whole entry or none, and several
processes may share one directory. On start the index is rebuilt from the directory
(oldest modification time first), so the cache survives a restart. A truncated or
corrupt file is a miss and is removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvshelf.codec import (
    HEADER_BYTES,
    CorruptEntry,
    Entry,
    check_payload,
    decode_header,
    encode_header,
    entry_from,
)
from kvshelf.keys import NAMESPACE_ID_BYTES, STORE_KEY_BYTES, StoreKey
from kvshelf.storage.base import (
    BufferSource,
    Counters,
    HeapMemory,
    HostBlock,
    Store,
    StoreStats,
)

logger = logging.getLogger(__name__)

SUFFIX = ".kv"
NAMESPACE_FILE = "NAMESPACE.json"
STALE_TEMP_S = 3600.0  # a temp file this old belongs to a writer that died
READ_THREADS = 4  # files read at once by one get()


class DiskStore(Store):
    name = "disk"

    def __init__(
        self,
        root: str | os.PathLike,
        capacity_bytes: int,
        fsync: bool = False,
        buffers: BufferSource | None = None,
    ):
        self.root = Path(root)
        self._root = str(self.root)
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        self.buffers = buffers
        self._heap = HeapMemory()
        self._index: OrderedDict[StoreKey, int] = OrderedDict()  # key -> file bytes, LRU
        self._used = 0
        self._lock = threading.Lock()
        self._counters = Counters(self.name, capacity_bytes)
        self._warned: set[int] = set()
        self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="kvshelf-disk-read")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"disk tier: cannot create {self.root}: {exc}") from exc
        self._rebuild_index()

    # -- Store -------------------------------------------------------------------
    def contains(self, keys: Sequence[StoreKey]) -> list[bool]:
        # The directory is the truth: another process may have written or evicted.
        found = [os.path.exists(self._file(key)) for key in keys]
        with self._lock:
            for key, present in zip(keys, found):
                if not present:
                    self._forget(key)
        self._counters.add(lookups=len(found), lookup_hits=sum(found))
        return found

    def get(self, keys: Sequence[StoreKey]) -> list[Entry | None]:
        if len(keys) > 1:  # several files in flight: one stream leaves the disk idle
            out = list(self._readers.map(self._read, keys))
        else:
            out = [self._read(key) for key in keys]
        hits = [e for e in out if e is not None]
        self._counters.add(
            hits=len(hits), misses=len(out) - len(hits), bytes_read=sum(e.nbytes for e in hits)
        )
        return out

    def put(self, entries: Sequence[Entry]) -> int:
        return sum(self._write(entry) for entry in entries)

    def delete(self, keys: Sequence[StoreKey]) -> int:
        removed = 0
        for key in keys:
            removed += self._unlink(key)
        return removed

    def stats(self) -> StoreStats:
        with self._lock:
            used, count = self._used, len(self._index)
        return self._counters.snapshot(used_bytes=used, entries=count)

    def close(self) -> None:
        self._readers.shutdown(wait=True)

    def describe_namespace(self, namespace_id: bytes, description: str) -> None:
        """Write ``NAMESPACE.json`` beside a namespace's entries (for ``kvshelf stats``)."""
        path = self.root / namespace_id.hex() / NAMESPACE_FILE
        if path.exists():
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._publish(path, [description.encode()])
        except OSError as exc:
            self._warn_once(exc, "cannot describe namespace in %s: %s", path, exc)

    # -- reading -----------------------------------------------------------------
    def _read(self, key: StoreKey) -> Entry | None:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            with self._lock:
                self._forget(key)
            return None
        except OSError as exc:
            self._io_error(exc, "open", path)
            return None
        with contextlib.suppress(OSError):  # a hint for a larger readahead; never fatal
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        block = None
        try:
            header = decode_header(os.pread(fd, HEADER_BYTES, 0))
            if header.key != key:
                raise CorruptEntry("entry is filed under another key")
            if os.fstat(fd).st_size != HEADER_BYTES + header.payload_bytes:
                raise CorruptEntry("file size does not match its header")
            block = self._buffer(header.payload_bytes)
            _read_all(fd, block.view, HEADER_BYTES)
            check_payload(header, block.view)
            entry = entry_from(header, block.view, block)
            block = None
        except CorruptEntry as exc:
            self._corrupt(key, path, exc)
            return None
        except OSError as exc:
            self._io_error(exc, "read", path)
            return None
        finally:
            os.close(fd)
            if block is not None:
                self._give_back(block)
        self._touch(key, path, HEADER_BYTES + entry.nbytes)
        return entry

    def _buffer(self, nbytes: int) -> HostBlock:
        block = self.buffers.allocate(nbytes) if self.buffers is not None else None
        return block if block is not None else self._heap.alloc(nbytes)

    def _give_back(self, block: HostBlock) -> None:
        if block.memory is self._heap:
            self._heap.free(block)
        elif self.buffers is not None:
            self.buffers.discard(block)

    def _touch(self, key: StoreKey, path: Path, size: int) -> None:
        with self._lock:
            if key not in self._index:
                self._index[key] = size
                self._used += size
            self._index.move_to_end(key)
        try:  # keep the LRU order across restarts (the index is rebuilt from mtimes)
            os.utime(path)
        except OSError:
            pass

    # -- writing -----------------------------------------------------------------
    def _write(self, entry: Entry) -> int:
        path = self._path(entry.key)
        size = HEADER_BYTES + entry.nbytes
        if path.exists():
            self._counters.add(write_skips=1)
            return 1
        if size > self.capacity_bytes:
            self._counters.add(write_failures=1)
            return 0
        if not self._make_room(size):  # reserves ``size`` so concurrent writers stay in budget
            self._counters.add(write_failures=1)
            return 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._publish(path, [encode_header(entry), entry.payload])
        except OSError as exc:
            with self._lock:
                self._used -= size
            self._counters.add(write_failures=1)
            self._io_error(exc, "write", path)
            return 0
        with self._lock:
            if entry.key in self._index:  # another thread indexed it meanwhile
                self._used -= size
            else:
                self._index[entry.key] = size
        self._counters.add(writes=1, bytes_written=entry.nbytes)
        return 1

    def _publish(self, path: Path, parts: list) -> None:
        """Write ``parts`` to a temp file beside ``path``, then rename it into place."""
        temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, parts)
            if self.fsync:
                os.fsync(fd)
                with contextlib.suppress(OSError):  # on disk now: the page cache need not keep it
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            os.replace(temp, path)
        except OSError:
            temp.unlink(missing_ok=True)
            raise

    def _make_room(self, nbytes: int) -> bool:
        """Evict LRU entries until ``nbytes`` fit and reserve them in ``_used``; ``False``
        (nothing reserved) when writes in flight hold the rest of the budget."""
        victims = []
        with self._lock:
            while self._index and self._used + nbytes > self.capacity_bytes:
                key, size = self._index.popitem(last=False)
                self._used -= size
                victims.append(key)
            fits = self._used + nbytes <= self.capacity_bytes
            if fits:
                self._used += nbytes
        for key in victims:
            self._path(key).unlink(missing_ok=True)
        if victims:
            self._counters.add(evictions=len(victims))
        return fits

    # -- index -------------------------------------------------------------------
    def _rebuild_index(self) -> None:
        found = []
        now = time.time()
        for namespace_dir in _subdirs(self.root):
            for fan_dir in _subdirs(namespace_dir):
                for item in os.scandir(fan_dir):
                    found.extend(self._scan_item(namespace_dir.name, item, now))
        found.sort()
        with self._lock:
            for _, key, size in found:
                self._index[key] = size
                self._used += size

    def _scan_item(self, namespace_hex: str, item: os.DirEntry, now: float) -> list:
        try:
            info = item.stat()
        except OSError:
            return []
        if item.name.endswith(".tmp"):
            if now - info.st_mtime > STALE_TEMP_S:
                Path(item.path).unlink(missing_ok=True)
            return []
        key = key_from_name(namespace_hex, item.name)
        return [] if key is None else [(info.st_mtime, key, info.st_size)]

    def _forget(self, key: StoreKey) -> None:  # holds lock
        size = self._index.pop(key, None)
        if size is not None:
            self._used -= size

    def _unlink(self, key: StoreKey) -> int:
        with self._lock:
            self._forget(key)
        try:
            self._path(key).unlink()
            return 1
        except FileNotFoundError:
            return 0

    def _path(self, key: StoreKey) -> Path:
        return Path(self._file(key))

    def _file(self, key: StoreKey) -> str:
        # A string, not a Path: lookups stat every key and pathlib joins cost more.
        namespace, chunk = key[:NAMESPACE_ID_BYTES].hex(), key[NAMESPACE_ID_BYTES:].hex()
        return f"{self._root}/{namespace}/{chunk[:2]}/{chunk}{SUFFIX}"

    # -- failures ----------------------------------------------------------------
    def _corrupt(self, key: StoreKey, path: Path, exc: CorruptEntry) -> None:
        self._counters.add(corrupt=1)
        logger.warning("disk tier: removing corrupt entry %s: %s", path, exc)
        self._unlink(key)

    def _io_error(self, exc: OSError, what: str, path: Path) -> None:
        self._counters.add(errors=1)
        if exc.errno == errno.ENOSPC:
            self._warn_once(exc, "disk tier: disk full writing %s; saves dropped", path)
        else:
            self._warn_once(exc, "disk tier: %s %s failed: %s", what, path, exc)

    def _warn_once(self, exc: OSError, message: str, *args) -> None:
        if exc.errno not in self._warned:
            self._warned.add(exc.errno)
            logger.warning(message, *args)


def _write_all(fd: int, parts: list) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        written = os.writev(fd, views)
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _read_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < view.nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CorruptEntry("short read")
        done += got


def _subdirs(path: Path) -> list[os.DirEntry]:
    try:
        return [d for d in os.scandir(path) if d.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def key_from_name(namespace_hex: str, name: str) -> StoreKey | None:
    """The store key an entry file's name stands for, or ``None`` for other files."""
    if not name.endswith(SUFFIX):
        return None
    try:
        key = bytes.fromhex(namespace_hex) + bytes.fromhex(name[: -len(SUFFIX)])
    except ValueError:
        return None
    return StoreKey(key) if len(key) == STORE_KEY_BYTES else None
