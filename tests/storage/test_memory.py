"""The memory tier: byte budget, LRU order, pins, and buffer adoption."""

from __future__ import annotations

from collections import Counter, OrderedDict

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvshelf.codec import Entry
from kvshelf.keys import StoreKey
from kvshelf.storage.base import HostBlock, HostMemory
from kvshelf.storage.memory import MemoryStore

NAMESPACE = bytes(16)


def key(index: int) -> StoreKey:
    return StoreKey(NAMESPACE + index.to_bytes(32, "big"))


def entry(index: int, nbytes: int = 100, fill: int | None = None) -> Entry:
    payload = bytes([index % 256 if fill is None else fill]) * nbytes
    return Entry(key(index), bytes(32), 1, "uint8", (nbytes,), memoryview(payload))


def adopted(store: MemoryStore, index: int, nbytes: int = 100) -> Entry:
    """An entry written straight into a buffer from ``store.allocate``."""
    block = store.allocate(nbytes)
    assert block is not None
    block.view[:] = bytes([index % 256]) * nbytes
    return Entry(key(index), bytes(32), 1, "uint8", (nbytes,), block.view, block)


def resident_keys(store: MemoryStore, indices) -> list[int]:
    return [i for i, present in zip(indices, store.contains([key(i) for i in indices])) if present]


# -- budget and LRU ---------------------------------------------------------------------


def test_lru_evicts_the_least_recently_used():
    store = MemoryStore(300)
    store.put([entry(1), entry(2), entry(3)])
    store.get([key(1)])  # 1 is now the most recent; 2 the least
    store.put([entry(4)])
    assert resident_keys(store, range(1, 5)) == [1, 3, 4]
    store.pin([key(3)])  # pinning also counts as use
    store.unpin([key(3)])
    store.put([entry(5)])
    assert resident_keys(store, range(1, 6)) == [3, 4, 5]
    stats = store.stats()
    assert stats.evictions == 2
    assert stats.used_bytes == 300 and stats.entries == 3


def test_eviction_frees_only_what_is_needed():
    store = MemoryStore(400)
    store.put([entry(i) for i in range(4)])
    store.put([entry(9, nbytes=150)])  # needs two 100-byte victims, not all four
    assert resident_keys(store, [0, 1, 2, 3, 9]) == [2, 3, 9]
    assert store.stats().used_bytes == 350


def test_an_entry_larger_than_the_budget_is_refused():
    store = MemoryStore(300)
    store.put([entry(1)])
    assert store.put([entry(2, nbytes=301)]) == 0
    assert store.stats().write_failures == 1
    assert resident_keys(store, [1, 2]) == [1]  # nothing was evicted for it
    assert store.allocate(301) is None


def test_budget_counts_allocated_buffers():
    store = MemoryStore(300)
    block = store.allocate(250)
    assert block is not None and store.stats().used_bytes == 250
    assert store.put([entry(1)]) == 0  # 250 + 100 > 300 and nothing to evict
    store.discard(block)
    assert store.stats().used_bytes == 0
    assert store.put([entry(1)]) == 1


# -- pins -------------------------------------------------------------------------------


def test_pinned_entries_are_never_evicted():
    store = MemoryStore(300)
    store.put([entry(1), entry(2), entry(3)])
    store.pin([key(1), key(2)])
    for i in range(4, 10):
        store.put([entry(i)])
    assert resident_keys(store, range(1, 10)) == [1, 2, 9]
    store.unpin([key(1)])
    store.put([entry(10)])
    assert resident_keys(store, range(1, 11)) == [2, 9, 10]  # 1 was the oldest


def test_allocate_fails_when_everything_is_pinned():
    store = MemoryStore(300)
    store.put([entry(1), entry(2), entry(3)])
    pinned = store.pin([key(1), key(2), key(3)])
    assert all(e is not None for e in pinned)
    assert store.allocate(1) is None
    assert store.put([entry(4)]) == 0
    store.unpin([key(2)])
    assert store.allocate(100) is not None  # 2 was the one to go
    assert resident_keys(store, [1, 2, 3]) == [1, 3]


def test_deleted_pinned_entry_is_freed_only_when_unpinned():
    store = MemoryStore(300)
    store.put([entry(1)])
    (held,) = store.pin([key(1)])
    block = held.owner
    assert store.delete([key(1)]) == 1
    assert store.contains([key(1)]) == [False]
    # still counted, still intact: a copy out of it may be in flight
    assert store.stats().used_bytes == 100
    assert block.view.nbytes == 100 and held.payload.tobytes() == bytes([1]) * 100
    store.unpin([key(1)])
    assert store.stats().used_bytes == 0
    assert block.view.nbytes == 0  # given back to the allocator


def test_pins_nest():
    store = MemoryStore(100)
    store.put([entry(1)])
    store.pin([key(1)])
    store.pin([key(1)])
    store.unpin([key(1)])
    assert store.allocate(1) is None  # still pinned once
    store.unpin([key(1)])
    store.unpin([key(1)])  # one too many: harmless
    assert store.allocate(100) is not None


def test_pin_of_absent_key_pins_nothing():
    store = MemoryStore(100)
    assert store.pin([key(1)]) == [None]
    store.put([entry(2)])
    assert store.allocate(100) is not None  # 2 was evictable


def test_pinned_context_manager_unpins():
    store = MemoryStore(100)
    store.put([entry(1)])
    with store.pinned([key(1), key(2)]) as (one, two):
        assert one.payload.tobytes() == bytes([1]) * 100 and two is None
        assert store.allocate(1) is None
    assert store.allocate(100) is not None


def test_delete_of_a_reinserted_key_while_pinned_frees_both():
    """Regression: an entry deleted while pinned, re-inserted, and deleted again while
    still pinned leaked the first entry's bytes from the budget forever."""
    store = MemoryStore(300)
    store.put([entry(1)])
    store.pin([key(1)])
    store.delete([key(1)])
    store.put([entry(1, fill=7)])
    store.delete([key(1)])
    assert store.stats().used_bytes == 200
    store.unpin([key(1)])
    assert store.stats().used_bytes == 0


# -- buffers ------------------------------------------------------------------------------


def test_insert_adopts_an_allocated_buffer():
    store = MemoryStore(300)
    made = adopted(store, 1)
    resident = store.insert(made)
    assert resident is made and resident.owner is made.owner  # no copy
    assert store.stats().used_bytes == 100
    assert store.get([key(1)])[0].payload.tobytes() == bytes([1]) * 100


def test_insert_copies_a_foreign_buffer():
    store = MemoryStore(300)
    source = bytearray(b"\x05" * 100)
    foreign = Entry(key(1), bytes(32), 1, "uint8", (100,), memoryview(source))
    resident = store.insert(foreign)
    assert store.owns(resident) and not store.owns(foreign)
    source[:] = b"\x06" * 100  # the caller reuses its buffer
    assert store.get([key(1)])[0].payload.tobytes() == b"\x05" * 100


def test_insert_of_a_present_key_gives_the_new_buffer_back():
    store = MemoryStore(300)
    first = store.insert(adopted(store, 1))
    again = adopted(store, 1)
    assert store.stats().used_bytes == 200
    resident = store.insert(again, pin=True)
    assert resident is first
    assert store.stats().used_bytes == 100 and store.stats().write_skips == 1
    assert again.owner.view.nbytes == 0  # freed
    assert store.allocate(300) is None  # and the resident one is pinned


class CountingHost(HostMemory):
    """A bounded allocator, like pinned memory: alloc can fail on its own."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.live_bytes = 0

    def alloc(self, nbytes: int) -> HostBlock | None:
        if self.live_bytes + nbytes > self.limit_bytes:
            return None
        self.live_bytes += nbytes
        return HostBlock(memoryview(bytearray(nbytes)), self)

    def free(self, block: HostBlock) -> None:
        self.live_bytes -= block.view.nbytes
        block.view = memoryview(b"")


def test_an_exhausted_allocator_evicts_or_fails():
    host = CountingHost(150)
    store = MemoryStore(1000, host)
    assert store.put([entry(1)]) == 1
    # The allocator runs dry before the budget does: the unpinned LRU entry makes room.
    block = store.allocate(100)
    assert block is not None and store.contains([key(1)]) == [False]
    store.discard(block)
    # With everything pinned there is nothing to evict: the allocation fails.
    assert store.put([entry(2)]) == 1
    with store.pinned([key(2)]):
        assert store.allocate(100) is None
        assert store.stats().used_bytes == 100
    store.delete([key(2)])
    assert host.live_bytes == 0


# -- a model-based check of budget, LRU and pins ------------------------------------------

CAPACITY = 1000
KEYS = st.integers(0, 4)
SIZES = st.integers(1, 450)


class MemoryModel(RuleBasedStateMachine):
    """Random puts, gets, pins, deletes, allocations against a plain model of the
    intended behaviour: an LRU that evicts the oldest unpinned entries, only as many
    as needed, and nothing when the new bytes cannot fit."""

    @initialize()
    def start(self):
        self.store = MemoryStore(CAPACITY)
        self.entries: OrderedDict[int, int] = OrderedDict()  # index -> bytes, oldest first
        self.pins: Counter[int] = Counter()
        self.doomed: dict[int, list[int]] = {}
        self.blocks: list[HostBlock] = []

    def _used(self) -> int:
        doomed = sum(sum(sizes) for sizes in self.doomed.values())
        return sum(self.entries.values()) + doomed + sum(b.view.nbytes for b in self.blocks)

    def _make_room(self, nbytes: int) -> bool:
        if nbytes > CAPACITY:
            return False
        victims, freed = [], 0
        for index, size in self.entries.items():
            if self._used() - freed + nbytes <= CAPACITY:
                break
            if not self.pins[index]:
                victims.append(index)
                freed += size
        if self._used() - freed + nbytes > CAPACITY:
            return False
        for index in victims:
            del self.entries[index]
        return True

    def _free_doomed(self, index: int) -> None:
        if not self.pins[index]:
            self.doomed.pop(index, None)

    @rule(index=KEYS, nbytes=SIZES)
    def put(self, index, nbytes):
        stored = self.store.put([entry(index, nbytes)])
        if index in self.entries:
            self.entries.move_to_end(index)
            assert stored == 1
        elif self._make_room(nbytes):
            self.entries[index] = nbytes
            assert stored == 1
        else:
            assert stored == 0

    @rule(index=KEYS)
    def get(self, index):
        (got,) = self.store.get([key(index)])
        assert (got is not None) == (index in self.entries)
        if got is not None:
            self.entries.move_to_end(index)
            assert got.nbytes == self.entries[index]

    @rule(index=KEYS)
    def pin(self, index):
        (got,) = self.store.pin([key(index)])
        assert (got is not None) == (index in self.entries)
        if got is not None:
            self.entries.move_to_end(index)
            self.pins[index] += 1

    @rule(index=KEYS)
    def unpin(self, index):
        self.store.unpin([key(index)])
        if self.pins[index]:
            self.pins[index] -= 1
            self._free_doomed(index)

    @rule(index=KEYS)
    def delete(self, index):
        removed = self.store.delete([key(index)])
        assert removed == (index in self.entries)
        if index in self.entries:
            size = self.entries.pop(index)
            if self.pins[index]:
                self.doomed.setdefault(index, []).append(size)

    @rule(nbytes=SIZES)
    def allocate(self, nbytes):
        block = self.store.allocate(nbytes)
        assert (block is not None) == self._make_room(nbytes)
        if block is not None:
            self.blocks.append(block)

    @precondition(lambda self: self.blocks)
    @rule(index=KEYS, data=st.data())
    def adopt_or_discard(self, index, data):
        block = self.blocks.pop(data.draw(st.integers(0, len(self.blocks) - 1)))
        if data.draw(st.booleans()):
            self.store.discard(block)
            return
        nbytes = block.view.nbytes
        made = Entry(key(index), bytes(32), 1, "uint8", (nbytes,), block.view, block)
        assert self.store.insert(made) is not None
        if index in self.entries:
            self.entries.move_to_end(index)
        else:
            self.entries[index] = nbytes

    @invariant()
    def within_budget_and_like_the_model(self):
        stats = self.store.stats()
        assert stats.used_bytes <= CAPACITY
        assert stats.used_bytes == self._used()
        assert resident_keys(self.store, range(5)) == sorted(self.entries)
        for index, count in self.pins.items():
            if count and index not in self.doomed:
                assert index in self.entries  # a pinned entry is never evicted


MemoryModel.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_memory_model = MemoryModel.TestCase


@pytest.mark.parametrize("capacity", [0, 99])
def test_tiny_budgets_store_nothing(capacity):
    store = MemoryStore(capacity)
    assert store.put([entry(1)]) == 0
    assert store.stats().used_bytes == 0


def test_allocate_reuses_an_evicted_buffer_of_the_same_size():
    store = MemoryStore(300)
    store.put([entry(1), entry(2), entry(3)])
    (first,) = store.get([key(1)])  # 2 is now the least recent
    victim_block = store.pin([key(2)])[0].owner
    store.unpin([key(2)])
    store.get([key(3), key(1)])
    block = store.allocate(100)
    assert block is victim_block  # no fresh memory: the evicted buffer, handed out again
    assert store.contains([key(1), key(2), key(3)]) == [True, False, True]
    stats = store.stats()
    assert stats.used_bytes == 300 and stats.evictions == 1
    store.discard(block)
    assert store.stats().used_bytes == 200
    assert first.owner.view.nbytes == 100  # the others are untouched


def test_allocate_frees_evicted_buffers_of_other_sizes():
    store = MemoryStore(300)
    store.put([entry(1, nbytes=120), entry(2, nbytes=120)])
    block = store.allocate(200)  # evicts both, reuses neither
    assert block is not None and block.view.nbytes == 200
    assert store.stats().used_bytes == 200


class SlotMemory(HostMemory):
    """Fixed-size slots, like the pinned allocator: every block takes a whole slot."""

    def __init__(self, slot_bytes: int, slots: int):
        self.slot_bytes = slot_bytes
        self.free_slots = slots

    def alloc(self, nbytes: int) -> HostBlock | None:
        if nbytes > self.slot_bytes or self.free_slots == 0:
            return None
        self.free_slots -= 1
        return HostBlock(memoryview(bytearray(nbytes)), self)

    def free(self, block: HostBlock) -> None:
        self.free_slots += 1

    def charge(self, nbytes: int) -> int:
        return self.slot_bytes


def test_a_slot_allocator_is_charged_whole_slots_and_never_runs_dry():
    """Regression: partial entries counted at their own size let the budget think there
    was room while the slot allocator had none, so every later save was dropped."""
    memory = MemoryStore(capacity_bytes=1000, host=SlotMemory(slot_bytes=100, slots=9))
    for i in range(30):  # small entries: each still takes a 100-byte slot
        block = memory.allocate(10 if i % 2 else 100)
        assert block is not None, f"allocation {i} failed"
        size = block.view.nbytes
        memory.insert(Entry(key(i), bytes(32), 1, "uint8", (size,), block.view, block))
    stats = memory.stats()
    assert stats.used_bytes <= 900 and stats.entries <= 9 and stats.evictions > 0
