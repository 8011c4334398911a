"""The disk tier's file I/O: a publish (temp file, writes in writeback slices, fsync,
``os.replace``) and reads that retry short transfers, with O_DIRECT where it is on."""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from pathlib import Path

from kvshelf.codec import CorruptEntry

WRITEBACK_BYTES = 4 << 20  # with fsync, the disk starts writing each such slice at once
O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none (macOS)


def publish(path: Path, parts: list, fsync: bool) -> None:
    """Write ``parts`` to a temp file beside ``path``, then rename it into place: readers
    see the whole entry or none. With ``fsync``, on disk before the rename."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        # With fsync, start the disk on each slice as soon as it is written: fsync
        # then waits for the last slice, not for the whole entry.
        write_all(fd, parts, WRITEBACK_BYTES if fsync else 0)
        if fsync:
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


def write_all(fd: int, parts: list, writeback_bytes: int = 0) -> None:
    """Write ``parts`` in order; with ``writeback_bytes``, in slices of that size, each
    handed to the disk once written (``POSIX_FADV_DONTNEED`` starts the writeback of dirty
    pages and drops none of them)."""
    views = [memoryview(p).cast("B") for p in parts]
    if not writeback_bytes:
        _writev_all(fd, views)
        return
    offset, batch = 0, []
    for view in views:
        while view.nbytes:
            batch.append(view[: writeback_bytes - offset % writeback_bytes])
            view = view[batch[-1].nbytes :]
            offset += batch[-1].nbytes
            if offset % writeback_bytes == 0:
                _write_slice(fd, batch, offset)
                batch = []
    if batch:
        _write_slice(fd, batch, offset)


def _write_slice(fd: int, views: list[memoryview], end: int) -> None:
    _writev_all(fd, views)
    nbytes = sum(v.nbytes for v in views)
    with contextlib.suppress(OSError):  # a hint; never fatal
        os.posix_fadvise(fd, end - nbytes, nbytes, os.POSIX_FADV_DONTNEED)


def _writev_all(fd: int, views: list[memoryview]) -> None:
    views = list(views)
    while views:
        written = os.writev(fd, views)
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def read_all(fd: int, view: memoryview, offset: int) -> None:
    if read_upto(fd, view, offset) < view.nbytes:
        raise CorruptEntry("short read")


def read_upto(fd: int, view: memoryview, offset: int, enough: int | None = None) -> int:
    """Read into ``view`` from ``offset`` until ``enough`` bytes (all of ``view`` by
    default) or the end of the file; returns how many bytes came."""
    enough = view.nbytes if enough is None else enough
    done = 0
    while done < enough:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def stop_direct(fd: int) -> None:
    """Let ``fd`` read through the page cache from now on (Linux allows the switch)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
