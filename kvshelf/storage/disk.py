"""The disk tier: one file per entry under a directory, with a byte budget and LRU.

Layout: ``ROOT/<namespace id hex>/<first key byte hex>/<key hex>.kv``, each file a
:mod:`kvshelf.codec` entry. Writes go to a temporary file in the same directory and are
published with ``os.replace``, so readers see a whole entry or none, and several
processes may share one directory. On start the index is rebuilt from the directory
(oldest modification time first), so the cache survives a restart. A truncated or
corrupt file is a miss and is removed.

A read runs in three phases over a few threads: open each file and check its header,
read the payloads in pieces (a large entry is read by several threads at once, and the
last piece in checks the payload while other entries are still on their way), then
settle what was found. Payloads of ``DIRECT_MIN_BYTES`` or more are read with
``O_DIRECT``: straight from the disk into the destination buffer where its address
allows (an aligned bounce buffer and a copy where it does not), so a hit runs at the
disk's sequential rate and fills no page cache with bytes the memory tier now holds.
Where the filesystem refuses ``O_DIRECT``, reads go through the page cache.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvshelf.codec import (
    HEADER_BYTES,
    CorruptEntry,
    Entry,
    Header,
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
from kvshelf.storage.disk_io import O_DIRECT, publish, read_all, read_upto, stop_direct

logger = logging.getLogger(__name__)

SUFFIX = ".kv"
NAMESPACE_FILE = "NAMESPACE.json"
STALE_TEMP_S = 3600.0  # a temp file this old belongs to a writer that died
READ_THREADS = 8  # pieces read at once by one get(): a few streams leave a fast disk idle
PIECE_BYTES = 8 << 20  # one read request; a larger entry is read by several threads at once
DIRECT_MIN_BYTES = 1 << 20  # smaller payloads are read through the page cache
DIRECT_ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of every common sector size


@dataclass(slots=True, eq=False)
class _Read:
    """One entry on its way from its file into a buffer (see :meth:`DiskStore.get`)."""

    key: StoreKey
    path: str
    fd: int
    direct: bool  # ``fd`` bypasses the page cache: offsets, lengths, memory aligned
    header: Header
    block: HostBlock
    start: int  # file offset of the first payload byte not read yet
    pieces_left: int = 0
    failure: CorruptEntry | OSError | None = None
    checked: bool = False  # every payload byte read and its checksum matched


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
        self._warned: set[int | None] = set()  # errnos already logged
        self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="kvshelf-disk-read")
        self._fill_lock = threading.Lock()
        self._bounce = threading.local()  # per reader thread: an aligned buffer for O_DIRECT
        self.direct = O_DIRECT != 0  # False once the filesystem refuses O_DIRECT
        # Lower bound of the memory alignment O_DIRECT needs here, learned from refusals
        # (NVMe takes 4-byte aligned buffers, virtio and SCSI disks 512-byte ones).
        self.direct_memory_align = 1
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
        reads = self._each(self._open, keys)
        try:
            self._each(self._fill, [piece for r in reads if r is not None for piece in _pieces(r)])
        finally:  # after a bug in a reader thread too: every file closed, every buffer back
            out = [None if r is None else self._settle(r) for r in reads]
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
            publish(path, [description.encode()], self.fsync)
        except OSError as exc:
            self._warn_once(exc, "cannot describe namespace in %s: %s", path, exc)

    # -- reading -----------------------------------------------------------------
    def _each(self, work: Callable, items: Sequence) -> list:
        if len(items) <= 1:
            return [work(item) for item in items]
        # Several files or pieces in flight: one stream leaves the disk idle.
        futures = [self._readers.submit(work, item) for item in items]
        wait(futures)  # all of them, even after one failed: get() then closes their files
        return [future.result() for future in futures]

    def _open(self, key: StoreKey) -> _Read | None:
        """Open an entry's file, check its header and size, and take its buffer."""
        path = self._file(key)
        try:
            fd, direct = self._open_file(path)
        except FileNotFoundError:
            with self._lock:
                self._forget(key)
            return None
        except OSError as exc:
            self._io_error(exc, "open", path)
            return None
        block = None
        try:
            first, direct = self._read_first(fd, direct)
            header = decode_header(first)
            if header.key != key:
                raise CorruptEntry("entry is filed under another key")
            if os.fstat(fd).st_size != HEADER_BYTES + header.payload_bytes:
                raise CorruptEntry("file size does not match its header")
            block = self._buffer(header.payload_bytes, key)
            head = memoryview(first)[HEADER_BYTES:]  # payload bytes read with the header
            block.view[: head.nbytes] = head
            return _Read(key, path, fd, direct, header, block, len(first))
        except (CorruptEntry, OSError) as exc:
            os.close(fd)
            if block is not None:
                self._give_back(block)
            if isinstance(exc, CorruptEntry):
                self._corrupt(key, path, exc)
            else:
                self._io_error(exc, "read", path)
            return None

    def _open_file(self, path: str) -> tuple[int, bool]:
        """A file descriptor, and whether it bypasses the page cache."""
        if self.direct and os.stat(path).st_size >= HEADER_BYTES + DIRECT_MIN_BYTES:
            try:
                return os.open(path, os.O_RDONLY | O_DIRECT), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_off(exc)
        fd = os.open(path, os.O_RDONLY)
        with contextlib.suppress(OSError):  # a hint for a larger readahead; never fatal
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd, False

    def _read_first(self, fd: int, direct: bool) -> tuple[bytes, bool]:
        """The header (through O_DIRECT, the whole first block), and whether ``fd`` still
        bypasses the page cache."""
        if direct:
            bounce = self._bounce_buffer()[:DIRECT_ALIGN]
            try:
                return bytes(bounce[: read_upto(fd, bounce, 0)]), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_off(exc)
                stop_direct(fd)
        return os.pread(fd, HEADER_BYTES, 0), False

    def _fill(self, piece: tuple[_Read, int, int]) -> None:
        """Read one piece (a file range) of an entry; the last piece checks the payload."""
        read, start, stop = piece
        if read.failure is None:
            try:
                self._read_range(read, start, stop)
            except (CorruptEntry, OSError) as exc:
                read.failure = exc
        with self._fill_lock:
            read.pieces_left -= 1
            last = read.pieces_left == 0
        if last:
            _check(read)

    def _read_range(self, read: _Read, start: int, stop: int) -> None:
        view = read.block.view[start - HEADER_BYTES : stop - HEADER_BYTES]
        if not read.direct:
            read_all(read.fd, view, start)
            return
        aligned = stop - stop % DIRECT_ALIGN  # ``start`` is aligned: _pieces saw to it
        try:
            if aligned > start:
                self._read_direct(read.fd, view[: aligned - start], start)
            if aligned < stop:  # the file's last, partial block
                self._read_bounced(read.fd, view[aligned - start :], aligned)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # Aligned memory, offset and length refused: the filesystem wants more.
            self._direct_off(exc)
            stop_direct(read.fd)
            read.direct = False
            read_all(read.fd, view, start)

    def _read_direct(self, fd: int, view: memoryview, offset: int) -> None:
        """An aligned range, straight into ``view`` where the device takes its address."""
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        if address % self.direct_memory_align == 0:
            try:
                read_all(fd, view, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                lowest_bit = address & -address
                self.direct_memory_align = max(self.direct_memory_align, 2 * lowest_bit)
        self._read_bounced(fd, view, offset)

    def _read_bounced(self, fd: int, view: memoryview, offset: int) -> None:
        """Direct reads into this thread's aligned buffer, copied into ``view``."""
        bounce = self._bounce_buffer()
        target = np.frombuffer(view, dtype=np.uint8)
        done = 0
        while done < view.nbytes:
            want = min(view.nbytes - done, bounce.nbytes)
            span = -(-want // DIRECT_ALIGN) * DIRECT_ALIGN  # past the end of file: fine
            if read_upto(fd, bounce[:span], offset + done, want) < want:
                raise CorruptEntry("short read")
            # numpy copies without the GIL; a memoryview slice assignment would hold it
            np.copyto(target[done : done + want], np.frombuffer(bounce[:want], dtype=np.uint8))
            done += want

    def _bounce_buffer(self) -> memoryview:
        buffer = getattr(self._bounce, "buffer", None)
        if buffer is None:  # anonymous mmap: page-aligned, and untouched pages cost nothing
            buffer = self._bounce.buffer = memoryview(mmap.mmap(-1, PIECE_BYTES))
        return buffer

    def _direct_off(self, exc: OSError) -> None:
        if self.direct:
            self.direct = False
            logger.info(
                "disk tier: %s refuses O_DIRECT (%s); reading through the page cache",
                self.root,
                exc,
            )

    def _settle(self, read: _Read) -> Entry | None:
        """Close the file; the checked entry, or a miss counted by its cause."""
        os.close(read.fd)
        if read.pieces_left == 0 and not read.checked:  # no piece ran: nothing after the header
            _check(read)
        if not read.checked:
            self._give_back(read.block)
            if isinstance(read.failure, CorruptEntry):
                self._corrupt(read.key, read.path, read.failure)
            elif read.failure is not None:
                self._io_error(read.failure, "read", read.path)
            return None
        entry = entry_from(read.header, read.block.view, read.block)
        self._touch(read.key, read.path, HEADER_BYTES + entry.nbytes)
        return entry

    def _buffer(self, nbytes: int, key: StoreKey) -> HostBlock:
        block = self.buffers.allocate(nbytes, key) if self.buffers is not None else None
        return block if block is not None else self._heap.alloc(nbytes)

    def _give_back(self, block: HostBlock) -> None:
        if block.memory is self._heap:
            self._heap.free(block)
        elif self.buffers is not None:
            self.buffers.discard(block)

    def _touch(self, key: StoreKey, path: str, size: int) -> None:
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
            publish(path, [encode_header(entry), entry.payload], self.fsync)
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
    def _corrupt(self, key: StoreKey, path: str | Path, exc: CorruptEntry) -> None:
        self._counters.add(corrupt=1)
        logger.warning("disk tier: removing corrupt entry %s: %s", path, exc)
        self._unlink(key)

    def _io_error(self, exc: OSError, what: str, path: str | Path) -> None:
        self._counters.add(errors=1)
        if exc.errno == errno.ENOSPC:
            self._warn_once(exc, "disk tier: disk full writing %s; saves dropped", path)
        else:
            self._warn_once(exc, "disk tier: %s %s failed: %s", what, path, exc)

    def _warn_once(self, exc: OSError, message: str, *args) -> None:
        if exc.errno not in self._warned:
            self._warned.add(exc.errno)
            logger.warning(message, *args)


def _pieces(read: _Read) -> list[tuple[_Read, int, int]]:
    """The file ranges left to read, split at multiples of ``PIECE_BYTES`` (so every piece
    but the first starts aligned; the first does too when O_DIRECT read the first block)."""
    stop = HEADER_BYTES + read.header.payload_bytes
    bounds = [
        read.start,
        *range(read.start // PIECE_BYTES * PIECE_BYTES + PIECE_BYTES, stop, PIECE_BYTES),
    ]
    pieces = [(read, a, b) for a, b in zip(bounds, [*bounds[1:], stop]) if a < b]
    read.pieces_left = len(pieces)
    return pieces


def _check(read: _Read) -> None:
    if read.failure is None:
        try:
            check_payload(read.header, read.block.view)
            read.checked = True
        except CorruptEntry as exc:
            read.failure = exc


def _subdirs(path: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
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
