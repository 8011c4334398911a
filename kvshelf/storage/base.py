"""The storage abstractions: a :class:`Store` (one tier), its counters, and host memory.

A tier failure is a miss, never an exception: ``get`` answers ``None`` for a key that
is absent, corrupt, unverifiable or unreachable, and counts why in :class:`StoreStats`.
Exceptions are for bugs and bad configuration.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Protocol

import numpy as np

from kvshelf.codec import Entry
from kvshelf.keys import StoreKey


@dataclass
class StoreStats:
    """Counters of one tier since it was opened. Plain numbers, safe to copy."""

    tier: str
    lookups: int = 0  # keys asked about by contains()
    lookup_hits: int = 0  # ... of which present
    hits: int = 0  # keys returned by get()
    misses: int = 0  # keys get() could not return (absent or failed)
    bytes_read: int = 0
    bytes_written: int = 0
    writes: int = 0  # entries stored
    write_skips: int = 0  # entries already present, not stored again
    write_failures: int = 0  # full, unreachable or I/O error: the entry was dropped
    evictions: int = 0
    corrupt: int = 0  # failed header/checksum/key checks; the entry was removed
    errors: int = 0  # I/O or connection errors
    timeouts: int = 0
    used_bytes: int = 0
    capacity_bytes: int = 0
    entries: int = 0

    def as_dict(self) -> dict[str, int | str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Counters:
    """Thread-safe increments into a :class:`StoreStats`."""

    def __init__(self, tier: str, capacity_bytes: int = 0):
        self._stats = StoreStats(tier, capacity_bytes=capacity_bytes)
        self._lock = threading.Lock()

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def snapshot(self, **current: int) -> StoreStats:
        """A copy, with gauges (``used_bytes``, ``entries``) set from ``current``."""
        with self._lock:
            stats = replace(self._stats)
        for name, value in current.items():
            setattr(stats, name, value)
        return stats


class Store(ABC):
    """One cache tier. Every method is thread-safe.

    ``get`` may return entries whose payload the tier owns; callers copy out of them
    and do not keep them past the copy (the memory tier offers pins for that).
    """

    name: str = "store"

    @abstractmethod
    def contains(self, keys: Sequence[StoreKey]) -> list[bool]:
        """Whether each key is present. Never raises for a tier failure (-> False)."""

    @abstractmethod
    def get(self, keys: Sequence[StoreKey]) -> list[Entry | None]:
        """The checked entry for each key, or ``None`` (absent, corrupt or unreachable)."""

    @abstractmethod
    def put(self, entries: Sequence[Entry]) -> int:
        """Store entries not already present; returns how many are now present."""

    @abstractmethod
    def delete(self, keys: Sequence[StoreKey]) -> int:
        """Remove keys; returns how many were removed."""

    @abstractmethod
    def stats(self) -> StoreStats:
        """A snapshot of this tier's counters and gauges."""

    def close(self) -> None:  # noqa: B027 - optional to override, so not abstract
        """Release resources. The default does nothing."""


@dataclass(slots=True, eq=False)
class HostBlock:
    """A writable host buffer from a :class:`HostMemory`."""

    view: memoryview  # exactly the bytes asked for
    memory: HostMemory
    handle: object = None  # the allocator's own bookkeeping


class HostMemory(ABC):
    """Where payload buffers come from: plain heap here, pinned memory under CUDA."""

    @abstractmethod
    def alloc(self, nbytes: int) -> HostBlock | None:
        """A buffer of ``nbytes``, or ``None`` when the allocator is exhausted."""

    @abstractmethod
    def free(self, block: HostBlock) -> None:
        """Give a block back. It must not be used afterwards."""

    def charge(self, nbytes: int) -> int:
        """Bytes of memory a block of ``nbytes`` really takes (a slot allocator rounds up)."""
        return nbytes

    def fits(self, nbytes: int) -> bool:
        """Whether a block of ``nbytes`` can ever come from here (a slot allocator's
        slots have one size)."""
        return True


class HeapMemory(HostMemory):
    """Ordinary process memory; freeing is left to the garbage collector."""

    def alloc(self, nbytes: int) -> HostBlock:
        # np.empty skips the zero-fill bytearray() would do.
        return HostBlock(np.empty(nbytes, dtype=np.uint8).data.cast("B"), self)

    def free(self, block: HostBlock) -> None:
        block.view = memoryview(b"")


class BufferSource(Protocol):
    """Where payloads read by a lower tier land (the memory tier: a read is then also a
    promotion, with no copy)."""

    def allocate(self, nbytes: int, key: StoreKey | None = None) -> HostBlock | None:
        """A buffer for ``nbytes`` (of the entry of ``key``, if known), or ``None``."""

    def discard(self, block: HostBlock) -> None: ...
