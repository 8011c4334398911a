"""The memory tier: a byte-budgeted LRU of entries in host memory.

Buffers come from a :class:`~kvshelf.storage.base.HostMemory` (plain heap, or pinned
memory when CUDA is present). Engines of several namespaces may share one tier (one
budget): each names the host memory its own buffers come from (:meth:`MemoryStore.use`),
so the KV cache's entries sit in pinned slots and encoder outputs, of other sizes, on
the heap; every buffer is charged to the one budget. Entries can be pinned: a pinned entry is never evicted
nor freed, so a copy out of it (to the GPU, to disk, to Redis) is safe while pinned.

An entry can also be *dirty*: saved here and not yet written to the lower tiers. Eviction
takes clean entries first (least recently used first) and a dirty one only when nothing
clean is left to evict; each dirty eviction is a write-back lost, and counted.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

from kvshelf.codec import Entry
from kvshelf.keys import NAMESPACE_ID_BYTES, StoreKey
from kvshelf.storage.base import Counters, HeapMemory, HostBlock, HostMemory, Store, StoreStats


class MemoryStore(Store):
    """Byte-budgeted LRU. ``capacity_bytes`` bounds resident entries plus buffers
    handed out by :meth:`allocate` and not yet stored or discarded. ``host``: where
    buffers come from unless :meth:`use` names another for their namespace (plain heap
    without it)."""

    name = "memory"

    def __init__(self, capacity_bytes: int, host: HostMemory | None = None):
        self.capacity_bytes = capacity_bytes
        self._heap = HeapMemory()
        self.host: HostMemory = host or self._heap
        self._hosts: set[HostMemory] = {self._heap, self.host}  # buffers of these are ours
        self._host_of: dict[bytes, HostMemory] = {}  # namespace id -> where its buffers come from
        self._entries: OrderedDict[StoreKey, Entry] = OrderedDict()  # oldest first
        self._pins: Counter[StoreKey] = Counter()
        self._doomed: dict[StoreKey, list[Entry]] = {}  # deleted while pinned: freed on unpin
        self._dirty: set[StoreKey] = set()  # not yet written to the lower tiers
        self._lost_writes = 0  # dirty entries evicted before they were written
        self._used = 0
        self._lock = threading.Lock()
        self._counters = Counters(self.name, capacity_bytes)

    # -- buffers ---------------------------------------------------------------
    def use(self, namespace_id: bytes, host: HostMemory | None) -> None:
        """Buffers for keys of ``namespace_id`` come from ``host`` (``None``: the heap).
        The first ``host`` given also serves keys of namespaces that named none (a
        lower tier's read of them) when it can hold the buffer. Thread-safe."""
        with self._lock:
            if host is not None and self.host is self._heap:
                self.host = host
            host = host or self._heap
            self._hosts.add(host)
            self._host_of[namespace_id] = host

    def allocate(self, nbytes: int, key: StoreKey | None = None) -> HostBlock | None:
        """A buffer counted against the budget, for the entry of ``key`` if known,
        evicting unpinned LRU entries to make room. ``None`` when the budget cannot fit
        it (too big, or everything pinned)."""
        with self._lock:
            host = self._host_for(nbytes, key)
            victims = self._make_room(host.charge(nbytes))
            if victims is None:
                return None
            # Hand out an evicted buffer of the same size rather than fresh memory: new
            # pages cost a fault each (and a pinned allocator is slow to grow).
            reused = next(
                (b for b in victims if b.view.nbytes == nbytes and b.memory is host), None
            )
            for victim in victims:
                if victim is not reused:
                    self._release(victim)
            if reused is not None:
                return reused  # its bytes stay counted in _used, now as a buffer
            block = host.alloc(nbytes)
            while block is None and self._evict_one():  # the allocator ran dry first
                block = host.alloc(nbytes)
            if block is not None:
                self._used += host.charge(nbytes)
            return block

    def discard(self, block: HostBlock) -> None:
        """Return a buffer from :meth:`allocate` that was never stored."""
        with self._lock:
            self._release(block)

    def owns(self, entry: Entry) -> bool:
        return self.block_of(entry) is not None

    def block_of(self, entry: Entry) -> HostBlock | None:
        """The buffer behind ``entry`` when it is one of ours (else ``None``)."""
        owner = entry.owner
        return owner if isinstance(owner, HostBlock) and owner.memory in self._hosts else None

    # -- Store -------------------------------------------------------------------
    def contains(self, keys: Sequence[StoreKey]) -> list[bool]:
        with self._lock:
            found = [key in self._entries for key in keys]
        self._counters.add(lookups=len(found), lookup_hits=sum(found))
        return found

    def get(self, keys: Sequence[StoreKey]) -> list[Entry | None]:
        with self._lock:
            out = [self._touch(key) for key in keys]
        hits = [e for e in out if e is not None]
        self._counters.add(
            hits=len(hits), misses=len(out) - len(hits), bytes_read=sum(e.nbytes for e in hits)
        )
        return out

    def put(self, entries: Sequence[Entry]) -> int:
        return sum(self.insert(entry) is not None for entry in entries)

    def insert(self, entry: Entry, pin: bool = False) -> Entry | None:
        """Store one entry (adopting its buffer when it came from :meth:`allocate`,
        copying otherwise) and return the resident entry, pinned if ``pin``.
        ``None`` when it does not fit."""
        resident = self._adopt(entry, pin)
        if resident is None:  # not our buffer: copy it into one
            copied = self._copy_in(entry)
            if copied is None:
                self._counters.add(write_failures=1)
                return None
            resident = self._adopt(copied, pin)
        return resident

    def delete(self, keys: Sequence[StoreKey]) -> int:
        removed = 0
        with self._lock:
            for key in keys:
                entry = self._entries.pop(key, None)
                if entry is None:
                    continue
                removed += 1
                self._dirty.discard(key)
                if self._pins[key]:
                    self._doomed.setdefault(key, []).append(entry)
                else:
                    self._release(self.block_of(entry))
        return removed

    def stats(self) -> StoreStats:
        with self._lock:
            used, count = self._used, len(self._entries)
        return self._counters.snapshot(used_bytes=used, entries=count)

    # -- pins --------------------------------------------------------------------
    def pin(self, keys: Sequence[StoreKey]) -> list[Entry | None]:
        """Pin and return the entries present; ``None`` for absent keys (not pinned)."""
        with self._lock:
            out = []
            for key in keys:
                entry = self._touch(key)
                if entry is not None:
                    self._pins[key] += 1
                out.append(entry)
        hits = [e for e in out if e is not None]
        self._counters.add(
            hits=len(hits), misses=len(out) - len(hits), bytes_read=sum(e.nbytes for e in hits)
        )
        return out

    def unpin(self, keys: Sequence[StoreKey]) -> None:
        """Undo one :meth:`pin` of each key that was pinned."""
        with self._lock:
            for key in keys:
                if self._pins[key] <= 0:
                    continue
                self._pins[key] -= 1
                if self._pins[key] == 0:
                    del self._pins[key]
                    for doomed in self._doomed.pop(key, ()):
                        self._release(self.block_of(doomed))

    @contextmanager
    def pinned(self, keys: Sequence[StoreKey]) -> Iterator[list[Entry | None]]:
        entries = self.pin(keys)
        try:
            yield entries
        finally:
            self.unpin([e.key for e in entries if e is not None])

    # -- write-back --------------------------------------------------------------
    def mark_dirty(self, keys: Sequence[StoreKey]) -> None:
        """The resident ones among ``keys`` still have to reach the lower tiers."""
        with self._lock:
            self._dirty.update(key for key in keys if key in self._entries)

    def claim_dirty(self, keys: Sequence[StoreKey]) -> list[Entry | None]:
        """Pin and return the entries still dirty (``None``: evicted or written already)
        for a writer; neither a hit nor a use for the LRU. Give them back with
        :meth:`written`."""
        with self._lock:
            out = [self._entries.get(key) if key in self._dirty else None for key in keys]
            for entry in out:
                if entry is not None:
                    self._pins[entry.key] += 1
        return out

    def written(self, keys: Sequence[StoreKey]) -> None:
        """Claimed entries are written (or given up): clean and unpinned."""
        with self._lock:
            self._dirty.difference_update(keys)
        self.unpin(keys)

    def lost_writes(self) -> int:
        """Dirty entries evicted before they were written, since the start."""
        with self._lock:
            return self._lost_writes

    # -- internals (callers hold self._lock where noted) --------------------------------
    def _adopt(self, entry: Entry, pin: bool) -> Entry | None:
        """Insert ``entry`` if it owns one of our buffers, or find the key already
        resident; ``None`` when neither (the caller copies the payload in)."""
        with self._lock:
            resident = self._entries.get(entry.key)
            if resident is not None:
                self._entries.move_to_end(entry.key)
                block = self.block_of(entry)
                if block is not None and block is not resident.owner:
                    self._release(block)
                self._counters.add(write_skips=1)
            elif self.owns(entry):
                resident = self._entries[entry.key] = entry
                self._counters.add(writes=1, bytes_written=entry.nbytes)
            else:
                return None
            if pin:
                self._pins[entry.key] += 1
            return resident

    def _copy_in(self, entry: Entry) -> Entry | None:
        block = self.allocate(entry.nbytes, entry.key)
        if block is None:
            return None
        block.view[:] = entry.payload.cast("B")
        return replace(entry, payload=block.view, owner=block)

    def _touch(self, key: StoreKey) -> Entry | None:  # holds lock
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def _make_room(self, nbytes: int) -> list[HostBlock] | None:  # holds lock
        """Evict unpinned LRU entries until ``nbytes`` more fit; returns their buffers,
        still counted in ``_used`` (the caller releases or reuses them), or ``None``
        when ``nbytes`` cannot fit (then nothing is evicted)."""
        if nbytes > self.capacity_bytes:
            return None
        if self._used + nbytes <= self.capacity_bytes:
            return []
        victims = []
        freed = 0
        for key in self._eviction_order():
            if self._used - freed + nbytes <= self.capacity_bytes:
                break
            victims.append(key)
            freed += self._charge(self._entries[key])
        if self._used - freed + nbytes > self.capacity_bytes:
            return None
        evicted = [self._evict(key) for key in victims]
        return [block for block in evicted if block is not None]

    def _evict_one(self) -> bool:  # holds lock
        """Evict the next entry in eviction order; False if there is none."""
        key = next(self._eviction_order(), None)
        if key is None:
            return False
        self._release(self._evict(key))
        return True

    def _eviction_order(self) -> Iterator[StoreKey]:  # holds lock
        """Unpinned entries, clean ones first, each kind least recently used first."""
        # Lazy: eviction usually needs the first few. Callers pop only after iterating.
        for dirty in (False, True):
            yield from (
                key
                for key in self._entries
                if not self._pins[key] and (key in self._dirty) is dirty
            )

    def _evict(self, key: StoreKey) -> HostBlock | None:  # holds lock
        """Take one entry out; returns its buffer, still counted in ``_used``."""
        if key in self._dirty:
            self._dirty.discard(key)
            self._lost_writes += 1
        self._counters.add(evictions=1)
        return self.block_of(self._entries.pop(key))

    def _host_for(self, nbytes: int, key: StoreKey | None) -> HostMemory:  # holds lock
        named = self._host_of.get(key[:NAMESPACE_ID_BYTES]) if key is not None else None
        if named is not None:
            return named
        return self.host if self.host.fits(nbytes) else self._heap

    def _charge(self, entry: Entry) -> int:  # holds lock
        block = self.block_of(entry)
        return block.memory.charge(entry.nbytes) if block is not None else 0

    def _release(self, block: HostBlock | None) -> None:  # holds lock
        if block is not None and block.memory in self._hosts:
            self._used -= block.memory.charge(block.view.nbytes)
            block.memory.free(block)
