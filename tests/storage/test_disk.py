"""The disk tier: restarts, corruption, concurrent writers, budgets and failing disks."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvshelf import codec
from kvshelf.codec import HEADER_BYTES, Entry
from kvshelf.keys import StoreKey
from kvshelf.storage import disk
from kvshelf.storage.base import HeapMemory, HostBlock
from kvshelf.storage.disk import DIRECT_ALIGN, DIRECT_MIN_BYTES, DiskStore
from kvshelf.storage.memory import MemoryStore

NAMESPACE = bytes.fromhex("00112233445566778899aabbccddeeff")
PAYLOAD_BYTES = 1000
FILE_BYTES = HEADER_BYTES + PAYLOAD_BYTES


def key(index: int, namespace: bytes = NAMESPACE) -> StoreKey:
    return StoreKey(namespace + index.to_bytes(32, "big"))


def entry(index: int, nbytes: int = PAYLOAD_BYTES) -> Entry:
    payload = bytes((index + i) % 256 for i in range(nbytes))
    return Entry(key(index), bytes(32), 4, "uint8", (nbytes,), memoryview(payload))


def entry_path(root: Path, k: bytes) -> Path:
    """Where the documented layout puts a key: ROOT/<ns hex>/<first byte hex>/<key hex>.kv"""
    chunk = k[16:].hex()
    return root / k[:16].hex() / chunk[:2] / f"{chunk}.kv"


def files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_file())


def present(store: DiskStore, indices) -> list[int]:
    return [i for i, hit in zip(indices, store.contains([key(i) for i in indices])) if hit]


# -- layout and restarts -------------------------------------------------------------------


def test_one_file_per_entry_in_the_documented_place(tmp_path):
    store = DiskStore(tmp_path, 10**6)
    store.put([entry(1)])
    path = entry_path(tmp_path, key(1))
    assert files(tmp_path, "*") == [path]
    decoded = codec.decode(path.read_bytes())
    assert decoded.key == key(1) and decoded.payload.tobytes() == entry(1).payload.tobytes()
    assert store.stats().used_bytes == FILE_BYTES


@pytest.mark.parametrize("fsync", [False, True])
def test_entries_survive_a_restart(tmp_path, monkeypatch, fsync):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    store = DiskStore(tmp_path, 10**6, fsync)
    store.put([entry(i) for i in range(5)])
    store.close()
    assert len(synced) == (5 if fsync else 0)  # each entry reaches the disk before it is published
    reopened = DiskStore(tmp_path, 10**6)
    stats = reopened.stats()
    assert (stats.entries, stats.used_bytes) == (5, 5 * FILE_BYTES)
    got = reopened.get([key(i) for i in range(5)])
    assert [g.payload.tobytes() for g in got] == [entry(i).payload.tobytes() for i in range(5)]


def test_lru_order_survives_a_restart(tmp_path):
    store = DiskStore(tmp_path, 3 * FILE_BYTES)
    store.put([entry(1), entry(2), entry(3)])
    now = time.time()
    for age, index in ((30, 1), (20, 2), (10, 3)):  # written in this order, long ago
        os.utime(entry_path(tmp_path, key(index)), (now - age, now - age))
    assert store.get([key(1)])[0] is not None  # a read makes 1 the most recent
    # restart: the order comes back from the files' modification times
    reopened = DiskStore(tmp_path, 3 * FILE_BYTES)
    reopened.put([entry(4)])
    assert present(reopened, [1, 2, 3, 4]) == [1, 3, 4]
    reopened.put([entry(5)])
    assert present(reopened, [1, 2, 3, 4, 5]) == [1, 4, 5]


def test_namespace_description_is_not_an_entry(tmp_path):
    store = DiskStore(tmp_path, 10**6)
    store.describe_namespace(NAMESPACE, '{"model": "m"}')
    store.describe_namespace(NAMESPACE, '{"model": "other"}')  # first one stays
    described = tmp_path / NAMESPACE.hex() / "NAMESPACE.json"
    assert json.loads(described.read_text()) == {"model": "m"}
    assert DiskStore(tmp_path, 10**6).stats().entries == 0


def test_foreign_files_are_ignored(tmp_path):
    fan = tmp_path / NAMESPACE.hex() / "00"
    fan.mkdir(parents=True)
    (fan / "README").write_text("hello")
    (fan / "zz-not-hex.kv").write_text("x")
    (fan / "abcd.kv").write_text("too short for a key")
    (tmp_path / "loose-file").write_text("x")
    store = DiskStore(tmp_path, 10**6)
    assert store.stats().entries == 0
    store.put([entry(1)])
    assert store.get([key(1)])[0] is not None


def test_a_file_removed_by_another_process_is_forgotten(tmp_path):
    store = DiskStore(tmp_path, 10**6)
    store.put([entry(1), entry(2)])
    entry_path(tmp_path, key(1)).unlink()
    assert store.contains([key(1), key(2)]) == [False, True]
    assert store.stats().used_bytes == FILE_BYTES
    assert store.get([key(1)]) == [None]


def test_a_file_written_by_another_process_is_found(tmp_path):
    ours, theirs = DiskStore(tmp_path, 10**6), DiskStore(tmp_path, 10**6)
    theirs.put([entry(7)])
    assert ours.contains([key(7)]) == [True]
    assert ours.get([key(7)])[0].payload.tobytes() == entry(7).payload.tobytes()
    assert ours.stats().used_bytes == FILE_BYTES  # and now counted against our budget


# -- corruption ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "position",
    [0, 5, 30, 70, 110, 183, 200, HEADER_BYTES, HEADER_BYTES + 500, FILE_BYTES - 1],
    ids=lambda p: f"byte{p}",
)
def test_a_flipped_byte_is_a_miss_and_the_file_is_removed(tmp_path, position):
    store = DiskStore(tmp_path, 10**6)
    store.put([entry(1), entry(2)])
    path = entry_path(tmp_path, key(1))
    data = bytearray(path.read_bytes())
    data[position] ^= 0x04
    path.write_bytes(bytes(data))
    assert store.get([key(1), key(2)])[0] is None
    assert not path.exists()
    stats = store.stats()
    assert stats.corrupt == 1 and stats.misses == 1 and stats.hits == 1
    assert (stats.entries, stats.used_bytes) == (1, FILE_BYTES)


@pytest.mark.parametrize("length", [0, 100, HEADER_BYTES, HEADER_BYTES + 1, FILE_BYTES - 1])
def test_a_truncated_file_is_a_miss_and_the_file_is_removed(tmp_path, length):
    store = DiskStore(tmp_path, 10**6)
    store.put([entry(1)])
    path = entry_path(tmp_path, key(1))
    os.truncate(path, length)
    assert store.get([key(1)]) == [None]
    assert not path.exists()
    assert store.stats().corrupt == 1


def test_an_entry_filed_under_another_key_is_corrupt(tmp_path):
    store = DiskStore(tmp_path, 10**6)
    store.put([entry(1)])
    wrong_place = entry_path(tmp_path, key(2))
    wrong_place.parent.mkdir(parents=True, exist_ok=True)
    wrong_place.write_bytes(entry_path(tmp_path, key(1)).read_bytes())
    assert store.get([key(2)]) == [None]
    assert not wrong_place.exists() and store.stats().corrupt == 1
    assert store.get([key(1)])[0] is not None


def test_a_corrupt_read_gives_its_buffer_back(tmp_path):
    memory = MemoryStore(10**6)
    store = DiskStore(tmp_path, 10**6, buffers=memory)
    store.put([entry(1), entry(2)])
    (good,) = store.get([key(1)])
    assert memory.owns(good)  # the read landed in a memory-tier buffer
    assert memory.stats().used_bytes == PAYLOAD_BYTES
    memory.discard(good.owner)
    path = entry_path(tmp_path, key(2))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert store.get([key(2)]) == [None]
    assert memory.stats().used_bytes == 0


# -- large entries: O_DIRECT, pieces, fallbacks ---------------------------------------------

# Payload sizes from DIRECT_MIN_BYTES up: the file ends mid-block, on a block, one byte
# past one; and one spanning several pieces.
LARGE_SIZES = [
    DIRECT_MIN_BYTES,
    DIRECT_MIN_BYTES + 1,
    2 * DIRECT_MIN_BYTES + DIRECT_ALIGN - HEADER_BYTES,  # the file is whole blocks
    3 * DIRECT_MIN_BYTES + 4093,
]


def large_entry(index: int, nbytes: int) -> Entry:
    payload = np.random.default_rng(index).integers(0, 256, nbytes, dtype=np.uint8)
    return Entry(key(index), bytes(32), 4, "uint8", (nbytes,), memoryview(payload))


class OffsetBuffers:
    """Buffers ``shift`` bytes past a page boundary: the O_DIRECT destination address
    (file offset - 256) is then aligned for the device, or not."""

    def __init__(self, shift: int):
        self.shift = shift
        self.heap = HeapMemory()
        self.given: list[HostBlock] = []

    def allocate(self, nbytes: int, key: StoreKey | None = None) -> HostBlock:
        pages = np.frombuffer(mmap.mmap(-1, nbytes + 2 * mmap.PAGESIZE), dtype=np.uint8)
        block = HostBlock(memoryview(pages[self.shift : self.shift + nbytes]), self.heap)
        self.given.append(block)
        return block

    def discard(self, block: HostBlock) -> None:
        self.given.remove(block)


@pytest.fixture
def opens(monkeypatch):
    """The flags of every os.open, to see which reads went around the page cache."""
    flags: list[int] = []
    real_open = os.open

    def spy(path, flag, *args, **kwargs):
        flags.append(flag)
        return real_open(path, flag, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    return flags


def direct_opens(flags: list[int]) -> int:
    return sum(bool(f & getattr(os, "O_DIRECT", 0)) for f in flags)


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(disk, "PIECE_BYTES", DIRECT_MIN_BYTES)  # several pieces per entry


@pytest.mark.parametrize("nbytes", LARGE_SIZES)
@pytest.mark.parametrize("shift", [256, 16, 0], ids=["in-place", "heap-like", "page"])
def test_a_large_entry_is_read_whole_whatever_the_buffer_alignment(
    tmp_path, opens, small_pieces, nbytes, shift
):
    buffers = OffsetBuffers(shift)
    store = DiskStore(tmp_path, 10**9, buffers=buffers)
    entries = [large_entry(1, nbytes), large_entry(2, nbytes + 7)]
    store.put(entries)
    opens.clear()
    got = store.get([e.key for e in entries])
    for g, want in zip(got, entries, strict=True):
        assert g is not None and g.payload.tobytes() == want.payload.tobytes()
        assert g.owner in buffers.given  # read into the buffer it was given
    if store.direct:  # this filesystem takes O_DIRECT: both files were read around the cache
        assert direct_opens(opens) == 2
        if shift == 256:  # every aligned range went straight into the page-aligned buffer
            assert store.direct_memory_align == 1
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.corrupt, stats.errors) == (2, 0, 0, 0)
    assert stats.bytes_read == 2 * nbytes + 7


def test_small_entries_are_read_through_the_page_cache(tmp_path, opens):
    store = DiskStore(tmp_path, 10**6)
    store.put([entry(1)])
    opens.clear()
    assert store.get([key(1)])[0] is not None
    assert direct_opens(opens) == 0


def test_a_filesystem_refusing_o_direct_is_read_through_the_page_cache(
    tmp_path, monkeypatch, caplog
):
    """As tmpfs before Linux 6.6 does: open(O_DIRECT) fails with EINVAL."""
    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    store = DiskStore(tmp_path, 10**9)
    entries = [large_entry(i, DIRECT_MIN_BYTES + 99) for i in range(3)]
    store.put(entries)
    with caplog.at_level(logging.INFO, logger="kvshelf.storage.disk"):
        for _ in range(2):
            got = store.get([e.key for e in entries])
            assert [g.payload.tobytes() for g in got] == [e.payload.tobytes() for e in entries]
    assert not store.direct
    assert sum("refuses O_DIRECT" in r.message for r in caplog.records) == 1
    assert store.stats().errors == 0


@pytest.mark.parametrize("refused_from", [0, DIRECT_ALIGN], ids=["header", "pieces"])
def test_a_filesystem_refusing_aligned_direct_reads_falls_back(
    tmp_path, monkeypatch, small_pieces, refused_from
):
    """O_DIRECT opens, but reads fail with EINVAL even aligned (a larger sector size):
    the file is switched to buffered reads and the entry still comes back whole."""
    real_preadv = os.preadv

    def picky(fd, buffers, offset, *args):
        if offset >= refused_from and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", picky)
    store = DiskStore(tmp_path, 10**9)
    want = large_entry(1, 3 * DIRECT_MIN_BYTES + 5)
    store.put([want])
    (got,) = store.get([want.key])
    assert got is not None and got.payload.tobytes() == want.payload.tobytes()
    assert not store.direct and store.stats().errors == 0


@pytest.mark.parametrize(
    "position",
    [
        HEADER_BYTES + 10,  # payload that came with the header's block
        DIRECT_ALIGN + 10,  # the first piece
        2 * DIRECT_MIN_BYTES + 3,  # a later piece
        -1,  # the file's last, partial block
    ],
    ids=["head", "first-piece", "later-piece", "tail"],
)
def test_a_flipped_byte_in_a_large_entry_is_a_miss(tmp_path, small_pieces, position):
    memory = MemoryStore(10**9)
    store = DiskStore(tmp_path, 10**9, buffers=memory)
    entries = [large_entry(1, 3 * DIRECT_MIN_BYTES + 4093), large_entry(2, DIRECT_MIN_BYTES)]
    store.put(entries)
    path = entry_path(tmp_path, key(1))
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))
    got = store.get([key(1), key(2)])
    assert got[0] is None and got[1] is not None
    assert not path.exists()
    assert store.stats().corrupt == 1
    memory.discard(got[1].owner)
    assert memory.stats().used_bytes == 0  # the failed read gave its buffer back


@pytest.mark.parametrize("cut", [1, DIRECT_ALIGN, DIRECT_MIN_BYTES])
def test_a_truncated_large_entry_is_a_miss(tmp_path, cut):
    store = DiskStore(tmp_path, 10**9)
    store.put([large_entry(1, 2 * DIRECT_MIN_BYTES + 1)])
    path = entry_path(tmp_path, key(1))
    os.truncate(path, path.stat().st_size - cut)
    assert store.get([key(1)]) == [None]
    assert not path.exists() and store.stats().corrupt == 1


def test_a_file_shrinking_during_a_read_is_a_miss(tmp_path, monkeypatch, small_pieces):
    """The size is checked at open; a writer truncating it later gives a short read."""
    store = DiskStore(tmp_path, 10**9)
    store.put([large_entry(1, 3 * DIRECT_MIN_BYTES)])
    path = entry_path(tmp_path, key(1))
    real_fill = DiskStore._fill

    def shrink_first(self, piece):
        os.truncate(path, 2 * DIRECT_MIN_BYTES)
        real_fill(self, piece)

    monkeypatch.setattr(DiskStore, "_fill", shrink_first)
    assert store.get([key(1)]) == [None]
    assert store.stats().corrupt == 1


def test_a_bug_in_a_reader_thread_leaks_no_file_and_no_buffer(tmp_path, monkeypatch, small_pieces):
    memory = MemoryStore(10**9)
    store = DiskStore(tmp_path, 10**9, buffers=memory)
    entries = [large_entry(i, 2 * DIRECT_MIN_BYTES) for i in range(3)]
    store.put(entries)
    real_read_range = DiskStore._read_range

    def broken(self, read, start, stop):
        if start > DIRECT_MIN_BYTES:
            raise RuntimeError("a bug")
        real_read_range(self, read, start, stop)

    monkeypatch.setattr(DiskStore, "_read_range", broken)
    open_fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError, match="a bug"):
        store.get([e.key for e in entries])
    assert len(os.listdir("/proc/self/fd")) == open_fds
    assert memory.stats().used_bytes == 0
    monkeypatch.undo()
    assert all(g is not None for g in store.get([e.key for e in entries]))


def test_large_entries_on_a_tmpfs(tmpfs, opens):
    """tmpfs takes O_DIRECT from Linux 6.6 on and refuses it before: either way a read
    comes back whole."""
    root = tmpfs("big", "size=16m")
    store = DiskStore(root, 10**9)
    want = large_entry(1, DIRECT_MIN_BYTES + 12345)
    store.put([want])
    (got,) = store.get([want.key])
    assert got is not None and got.payload.tobytes() == want.payload.tobytes()
    assert store.stats().errors == 0


# -- budget ---------------------------------------------------------------------------------


def test_full_budget_evicts_lru_and_stays_within_capacity(tmp_path):
    capacity = 3 * FILE_BYTES + 10
    store = DiskStore(tmp_path, capacity)
    for i in range(8):
        assert store.put([entry(i)]) == 1
        if i == 4:
            store.get([key(2)])  # keeps 2 alive through the next eviction
        on_disk = sum(p.stat().st_size for p in files(tmp_path, "*.kv"))
        assert store.stats().used_bytes == on_disk <= capacity
    assert present(store, range(8)) == [5, 6, 7]
    stats = store.stats()
    assert stats.evictions == 5 and stats.entries == 3


def test_an_entry_larger_than_the_budget_is_refused(tmp_path):
    store = DiskStore(tmp_path, FILE_BYTES - 1)
    assert store.put([entry(1)]) == 0
    assert store.stats().write_failures == 1
    assert files(tmp_path, "*") == []


def test_concurrent_writers_stay_within_budget(tmp_path):
    """Regression: two save threads could both make room for one entry and then both
    write, leaving the tier over its budget. A stress test: it caught the race about
    one run in three before the budget was reserved."""
    nbytes = 2**18
    capacity = 4 * (HEADER_BYTES + nbytes)
    store = DiskStore(tmp_path, capacity)
    worst = [0]

    def write(thread: int) -> None:
        for i in range(30):
            store.put([entry(thread * 100 + i, nbytes)])
            worst[0] = max(worst[0], store.stats().used_bytes)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    on_disk = sum(p.stat().st_size for p in files(tmp_path, "*.kv"))
    assert worst[0] <= capacity
    assert store.stats().used_bytes == on_disk <= capacity


# -- several processes ------------------------------------------------------------------------

_HAMMER = """
import json, sys
from kvshelf.codec import Entry
from kvshelf.storage.disk import DiskStore

root, worker, STEPS, SIZE = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = DiskStore(root, 1 << 30)
ns = bytes(16)

def entry(index, fill):
    payload = memoryview(bytes([fill]) * SIZE)
    return Entry(ns + index.to_bytes(32, "big"), bytes(32), 1, "uint8", (SIZE,), payload)

shared = entry(0, 42)  # every process writes this same key with the same bytes
own = [entry(1000 * (worker + 1) + i, worker) for i in range(20)]
wrong = 0
for step in range(STEPS):
    store.delete([shared.key])
    store.put([shared, own[step % 20]])
    probe = own[(step * 7) % 20]
    for want, got in zip((shared, probe), store.get([shared.key, probe.key])):
        wrong += got is not None and got.payload.tobytes() != want.payload.tobytes()
print(json.dumps({"wrong": wrong, "corrupt": store.stats().corrupt}))
"""


@pytest.mark.parametrize(
    ("steps", "nbytes"), [(400, 65536), (40, DIRECT_MIN_BYTES + 4097)], ids=["small", "o_direct"]
)
def test_processes_hammering_the_same_and_different_keys(tmp_path, steps, nbytes):
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER, str(tmp_path), str(w), str(steps), str(nbytes)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    for proc in workers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        report = json.loads(out)
        # a reader never saw a partly written or mixed-up file
        assert report == {"wrong": 0, "corrupt": 0}
    assert files(tmp_path, "*.tmp") == []
    entry_files = files(tmp_path, "*.kv")
    for path in entry_files:
        decoded = codec.decode(path.read_bytes())  # raises if any file is broken
        assert entry_path(tmp_path, decoded.key) == path
    store = DiskStore(tmp_path, 1 << 30)
    own_keys = [key(1000 * (w + 1) + i, bytes(16)) for w in range(4) for i in range(20)]
    assert all(store.contains(own_keys))
    assert store.stats().entries == len(entry_files)


# -- failing disks -----------------------------------------------------------------------------


def test_disk_full_is_a_counted_failure(tmp_path, monkeypatch):
    store = DiskStore(tmp_path, 10**6)

    def full(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    assert store.put([entry(1)]) == 0
    stats = store.stats()
    assert (stats.write_failures, stats.errors, stats.writes, stats.used_bytes) == (1, 1, 0, 0)
    assert files(tmp_path, "*") == []  # no temp file left behind
    monkeypatch.undo()
    assert store.put([entry(1)]) == 1  # and it works again once there is room


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (needs root); yields a function that mounts one."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


def test_a_really_full_disk_is_a_counted_failure(tmpfs, caplog):
    root = tmpfs("tiny", "size=256k")
    store = DiskStore(root, 10**9)  # the budget allows it; the disk does not
    results = [store.put([entry(i, 60_000)]) for i in range(8)]
    assert results[0] == 1 and results[-1] == 0
    stats = store.stats()
    assert stats.write_failures == results.count(0) > 0
    assert files(root, "*.tmp") == []
    assert sum("disk full" in r.message for r in caplog.records) == 1  # logged once
    for i, stored in enumerate(results):
        assert (store.get([key(i)])[0] is not None) == bool(stored)


def test_a_read_only_disk_is_a_counted_failure(tmpfs):
    root = tmpfs("readonly", "ro,size=64k")
    store = DiskStore(root, 10**6)
    assert store.put([entry(1)]) == 0
    assert store.stats().write_failures == 1
    assert store.get([key(1)]) == [None]
    with pytest.raises(ValueError, match="cannot create"):
        DiskStore(root / "sub", 10**6)


def test_a_root_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="disk tier: cannot create"):
        DiskStore(tmp_path / "file", 10**6)
    with pytest.raises(ValueError, match="disk tier: cannot create"):
        DiskStore(tmp_path / "file" / "below", 10**6)


def test_an_unwritable_namespace_directory_is_a_counted_failure(tmp_path):
    (tmp_path / NAMESPACE.hex()).write_text("in the way")
    store = DiskStore(tmp_path, 10**6)
    assert store.put([entry(1)]) == 0
    assert store.get([key(1)]) == [None]
    assert store.contains([key(1)]) == [False]
    stats = store.stats()
    assert stats.write_failures == 1 and stats.errors >= 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_directory_without_write_permission_is_a_counted_failure(tmp_path):
    tmp_path.chmod(0o555)
    try:
        store = DiskStore(tmp_path, 10**6)
        assert store.put([entry(1)]) == 0
        assert store.stats().write_failures == 1
    finally:
        tmp_path.chmod(0o755)


def test_stale_temp_files_are_cleaned_at_start(tmp_path):
    store = DiskStore(tmp_path, 10**6)
    store.put([entry(1)])
    fan = entry_path(tmp_path, key(1)).parent
    stale = fan / f".{entry_path(tmp_path, key(1)).name}.999.deadbeef.tmp"
    live = fan / f".{entry_path(tmp_path, key(2)).name}.{os.getpid()}.cafebabe.tmp"
    stale.write_bytes(b"half an entry")
    live.write_bytes(b"a writer is still busy with this")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    reopened = DiskStore(tmp_path, 10**6)
    assert not stale.exists()
    assert live.exists()  # a temp file this fresh may belong to a live writer
    assert reopened.stats().entries == 1
