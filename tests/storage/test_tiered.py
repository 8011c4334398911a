"""Tier order, promotion into memory, and the bounded write-behind queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from kvshelf.codec import Entry
from kvshelf.keys import StoreKey
from kvshelf.storage.base import Store, StoreStats
from kvshelf.storage.disk import DiskStore
from kvshelf.storage.memory import MemoryStore
from kvshelf.storage.tiered import TieredStore

NBYTES = 1000


def key(index: int) -> StoreKey:
    return StoreKey(bytes(16) + index.to_bytes(32, "big"))


def entry(index: int) -> Entry:
    payload = memoryview(bytes([index % 256]) * NBYTES)
    return Entry(key(index), bytes(32), 1, "uint8", (NBYTES,), payload)


class SlowStore(Store):
    """A real disk tier behind a gate: puts wait until the test opens it, like a
    stalled remote server."""

    name = "slow"

    def __init__(self, inner: Store):
        self.inner = inner
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def contains(self, keys: Sequence[StoreKey]) -> list[bool]:
        return self.inner.contains(keys)

    def get(self, keys: Sequence[StoreKey]) -> list[Entry | None]:
        return self.inner.get(keys)

    def put(self, entries: Sequence[Entry]) -> int:
        self.waiting.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner.put(entries)

    def delete(self, keys: Sequence[StoreKey]) -> int:
        return self.inner.delete(keys)

    def stats(self) -> StoreStats:
        return self.inner.stats()


class BrokenStore(DiskStore):
    """A disk tier with a bug in put: the saver thread must survive it."""

    name = "broken"

    def __init__(self, root, fail_times: int):
        super().__init__(root, 10**6)
        self.fail_times = fail_times

    def put(self, entries: Sequence[Entry]) -> int:
        if self.fail_times > 0:
            self.fail_times -= 1
            raise RuntimeError("bug in a tier")
        return super().put(entries)


@pytest.fixture
def tiers(tmp_path):
    memory = MemoryStore(10 * NBYTES)
    disk = DiskStore(tmp_path / "disk", 10**6, buffers=memory)
    store = TieredStore(memory, [disk], queue_bytes=10**6, threads=2)
    yield store, memory, disk
    store.close()


def test_locate_names_the_fastest_tier(tiers):
    store, memory, disk = tiers
    disk.put([entry(1), entry(2)])
    memory.put([entry(2), entry(3)])
    assert store.locate([key(1), key(2), key(3), key(4)]) == [1, 0, 0, None]


def test_reads_come_from_the_fastest_tier_and_are_promoted(tiers):
    store, memory, disk = tiers
    disk.put([entry(1), entry(2)])
    memory.put([entry(2)])
    got = store.get([key(1), key(2), key(3)])
    assert [g.payload.tobytes() if g else None for g in got] == [
        entry(1).payload.tobytes(),
        entry(2).payload.tobytes(),
        None,
    ]
    # key 2 came from memory; only keys 1 and 3 were asked of the disk
    assert (disk.stats().hits, disk.stats().misses) == (1, 1)
    assert memory.contains([key(1)]) == [True]  # promoted
    assert memory.owns(got[0])  # read straight into a memory buffer, no extra copy
    store.get([key(1)])
    assert disk.stats().hits == 1  # the second read never reached the disk


def test_get_with_pin_pins_memory_hits_and_promotions(tiers):
    store, memory, disk = tiers
    disk.put([entry(1)])
    memory.put([entry(2)])
    store.get([key(1), key(2)], pin=True)
    for i in range(10, 30):  # churn far past the budget
        memory.put([entry(i)])
    assert memory.contains([key(1), key(2)]) == [True, True]
    memory.unpin([key(1), key(2)])
    memory.put([entry(i) for i in range(30, 40)])
    assert memory.contains([key(1), key(2)]) == [False, False]


def test_put_is_in_memory_at_once_and_on_disk_after_flush(tiers):
    store, memory, disk = tiers
    store.put([entry(1), entry(2)])
    assert memory.contains([key(1), key(2)]) == [True, True]
    assert store.flush(10)
    assert disk.contains([key(1), key(2)]) == [True, True]
    assert store.queue_stats().queued_bytes == 0
    assert memory.allocate(10 * NBYTES) is not None  # unpinned once written


def test_a_reader_only_store_keeps_saves_in_memory_and_reads_lower_tiers(tmp_path):
    # As a TP rank > 0 of an MLA model: rank 0 writes the shared latent to disk.
    memory = MemoryStore(10 * NBYTES)
    disk = DiskStore(tmp_path / "disk", 10**6, buffers=memory)
    reader = TieredStore(memory, [disk], queue_bytes=10**6, threads=1, write_lower=False)
    try:
        reader.put([entry(1)])
        assert reader.flush(10)
        assert memory.contains([key(1)]) == [True] and disk.contains([key(1)]) == [False]
        assert memory.allocate(10 * NBYTES) is not None  # nothing stays pinned for a write
        disk.put([entry(2)])
        assert reader.get([key(2)])[0] is not None
    finally:
        reader.close()


def test_saves_being_written_are_pinned(tmp_path):
    memory = MemoryStore(4 * NBYTES)
    slow = SlowStore(DiskStore(tmp_path, 10**6))
    store = TieredStore(memory, [slow], queue_bytes=10**6, threads=1)
    store.put([entry(1), entry(2)])
    assert slow.waiting.wait(10)
    assert memory.allocate(3 * NBYTES) is None  # 1 and 2 cannot be evicted yet
    slow.gate.set()
    assert store.flush(10)
    assert slow.contains([key(1), key(2)]) == [True, True]
    assert memory.allocate(3 * NBYTES) is not None
    store.close()


def test_a_stalled_writer_loses_only_what_memory_must_evict(tmp_path, caplog):
    memory = MemoryStore(6 * NBYTES)
    slow = SlowStore(DiskStore(tmp_path, 10**6))
    store = TieredStore(memory, [slow], queue_bytes=NBYTES, threads=1)
    store.put([entry(0)])
    assert slow.waiting.wait(10)

    def save_many() -> None:
        for i in range(1, 20):
            store.put([entry(i)])
            assert memory.stats().used_bytes <= memory.capacity_bytes

    saver = threading.Thread(target=save_many)
    saver.start()
    saver.join(30)
    assert not saver.is_alive(), "put blocked on a stalled lower tier"
    # Entry 0 is in the writer's hands; of the rest, memory keeps the newest 5 waiting
    # and had to evict 14 before they were written: only those are lost.
    queue = store.queue_stats()
    assert queue.dropped_saves == queue.evicted_unwritten == 14
    assert queue.queued_bytes == 0  # everything waiting waits inside the memory tier
    assert caplog.text.count("evicted from memory before reaching the slow tier") == 1
    slow.gate.set()
    assert store.flush(10)
    written = slow.contains([key(i) for i in range(20)])
    assert written == [True] + [False] * 14 + [True] * 5
    assert store.queue_stats().written_saves == 6
    assert memory.allocate(6 * NBYTES) is not None  # nothing left pinned
    store.close()


def test_eviction_takes_written_entries_before_unwritten_ones(tmp_path):
    memory = MemoryStore(4 * NBYTES)
    slow = SlowStore(DiskStore(tmp_path, 10**6))
    store = TieredStore(memory, [slow], threads=1)
    slow.gate.set()
    store.put([entry(1), entry(2)])
    assert store.flush(10)  # 1 and 2 are written: clean
    slow.gate.clear()
    slow.waiting.clear()
    store.put([entry(3)])  # the writer takes 3 and stalls
    assert slow.waiting.wait(10)
    store.put([entry(4)])  # waits, dirty
    store.put([entry(5)])  # memory is full: 1 goes (clean, oldest), not 4
    assert memory.contains([key(i) for i in range(1, 6)]) == [False, True, True, True, True]
    store.put([entry(6)])  # then 2; only a dirty entry is left to evict next
    store.put([entry(7)])
    assert memory.contains([key(4)]) == [False]
    assert store.queue_stats().evicted_unwritten == 1
    slow.gate.set()
    assert store.flush(10)
    assert slow.contains([key(i) for i in (3, 4, 5, 6, 7)]) == [True, False, True, True, True]
    store.close()


def test_without_memory_the_queue_bound_drops_saves(tmp_path, caplog):
    slow = SlowStore(DiskStore(tmp_path, 10**6))
    store = TieredStore(None, [slow], queue_bytes=3 * NBYTES, threads=1)
    store.put([entry(0)])
    assert slow.waiting.wait(10)
    for i in range(1, 10):
        store.put([entry(i)])
    # Their own buffers, the one being written included, stay within the bound.
    queue = store.queue_stats()
    assert queue.dropped_saves == 7 and queue.dropped_bytes == 7 * NBYTES
    assert queue.queued_bytes == 3 * NBYTES
    assert "raise save_queue_bytes" in caplog.text
    slow.gate.set()
    assert store.flush(10)
    assert slow.contains([key(i) for i in range(10)]) == [True] * 3 + [False] * 7
    store.close()


def test_close_writes_what_is_queued_and_says_so(tmp_path, caplog):
    caplog.set_level("INFO")
    store = TieredStore(MemoryStore(10 * NBYTES), [DiskStore(tmp_path, 10**6)], threads=1)
    store.put([entry(1), entry(2)])
    store.close(timeout_s=10)
    assert DiskStore(tmp_path, 10**6).contains([key(1), key(2)]) == [True, True]
    if "queued saves" in caplog.text:  # unless the writer was done before close began
        assert "wrote 2 queued saves to the disk tier" in caplog.text
        assert "abandoned 0" in caplog.text


def test_close_waits_a_bounded_time_and_says_what_it_abandoned(tmp_path, caplog):
    slow = SlowStore(DiskStore(tmp_path, 10**6))
    store = TieredStore(MemoryStore(10 * NBYTES), [slow], threads=1)
    store.put([entry(1)])
    store.put([entry(2)])
    assert slow.waiting.wait(10)
    began = time.monotonic()
    store.close(timeout_s=0.3)
    assert time.monotonic() - began < 3
    assert "wrote 0 queued saves to the slow tier" in caplog.text
    assert "abandoned 2 (raise flush_on_stop_s" in caplog.text
    slow.gate.set()


def test_reads_measure_each_lower_tier(tmp_path):
    big = 4 * 2**20
    memory = MemoryStore(10 * big)
    disk = DiskStore(tmp_path, 10**9, buffers=memory)
    store = TieredStore(memory, [disk], threads=1)
    assert store.read_rate("disk") is None and store.read_rate("memory") == float("inf")
    disk.put([entry(1)])
    store.get([key(1)])
    assert store.read_rate("disk") is None  # a small read measures latency, not a rate
    payload = memoryview(bytes(big))
    disk.put([Entry(key(i), bytes(32), 1, "uint8", (big,), payload) for i in (2, 3)])
    store.get([key(2), key(3)])
    assert store.read_rate("disk") > 0
    assert store.tier_names([key(1), key(4)]) == ["memory", None]
    store.close()


def test_a_lower_tier_bug_is_counted_and_the_saver_survives(tmp_path, caplog):
    memory = MemoryStore(10 * NBYTES)
    broken = BrokenStore(tmp_path, fail_times=1)
    store = TieredStore(memory, [broken], queue_bytes=10**6, threads=1)
    store.put([entry(1)])
    assert store.flush(10)
    store.put([entry(2)])
    assert store.flush(10)
    assert store.queue_stats().failed_saves == 1
    assert broken.contains([key(1), key(2)]) == [False, True]
    assert "bug in a tier" in caplog.text
    assert memory.allocate(10 * NBYTES) is not None  # the failed job was unpinned too
    store.close()


def test_without_a_memory_tier(tmp_path):
    disk = DiskStore(tmp_path, 10**6)
    store = TieredStore(None, [disk], queue_bytes=10**6, threads=1)
    store.put([entry(1)])
    assert store.flush(10)
    assert store.locate([key(1), key(2)]) == [0, None]
    (got,) = store.get([key(1)], pin=True)
    assert got.payload.tobytes() == entry(1).payload.tobytes()
    store.close()


def test_memory_only(tmp_path):
    memory = MemoryStore(10 * NBYTES)
    store = TieredStore(memory, [], threads=2)
    store.put([entry(1)])
    assert store.flush(1)
    assert store.locate([key(1)]) == [0]
    assert memory.allocate(10 * NBYTES) is not None  # no lower tier to wait for: not pinned
    store.close()


def test_delete_reaches_every_tier(tiers):
    store, _, _ = tiers
    store.put([entry(1)])
    assert store.flush(10)
    assert store.delete([key(1)]) == 2
    assert store.locate([key(1)]) == [None]


def test_close_flushes(tmp_path):
    memory = MemoryStore(10 * NBYTES)
    disk = DiskStore(tmp_path, 10**6)
    store = TieredStore(memory, [disk], threads=2)
    store.put([entry(i) for i in range(5)])
    store.close()
    assert DiskStore(tmp_path, 10**6).contains([key(i) for i in range(5)]) == [True] * 5


def test_stats_list_every_tier(tiers):
    store, _, _ = tiers
    assert [s.tier for s in store.stats()] == ["memory", "disk"]
