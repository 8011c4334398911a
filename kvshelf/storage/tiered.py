"""Memory, then disk, then remote: lookup order, promotion and write-behind.

Reads come from the fastest tier that holds a key and are promoted into memory. Writes
go into memory at once and to the lower tiers in the background, through a queue
bounded in bytes: when it is full the save is dropped and counted, so the caller never
blocks and memory never grows past the budgets.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvshelf.codec import Entry
from kvshelf.keys import StoreKey
from kvshelf.storage.base import Store, StoreStats
from kvshelf.storage.memory import MemoryStore

logger = logging.getLogger(__name__)


@dataclass
class SaveQueueStats:
    queued_bytes: int = 0
    capacity_bytes: int = 0
    dropped_saves: int = 0  # entries not written to lower tiers: the queue was full
    dropped_bytes: int = 0
    failed_saves: int = 0  # a lower tier raised (a bug); logged with its traceback


class TieredStore:
    """Thread-safe. ``memory`` may be ``None`` (memory tier disabled)."""

    def __init__(
        self,
        memory: MemoryStore | None,
        lower: Sequence[Store] = (),
        queue_bytes: int = 2 * 10**9,
        threads: int = 2,
        write_lower: bool = True,
    ):
        self.memory = memory
        self.lower = list(lower)
        # False: this process only reads the lower tiers (another one writes the same
        # entries there, e.g. rank 0 of a TP group whose ranks all hold the same MLA latent).
        self.write_lower = write_lower
        self.tiers: list[Store] = ([memory] if memory is not None else []) + self.lower
        self._queue: queue.Queue[list[tuple[Entry, bool]] | None] = queue.Queue()
        self._queue_stats = SaveQueueStats(capacity_bytes=queue_bytes)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._threads = [
            threading.Thread(target=self._drain, name=f"kvshelf-save-{i}", daemon=True)
            for i in range(threads if self.lower else 0)
        ]
        for thread in self._threads:
            thread.start()

    # -- reads -------------------------------------------------------------------
    def locate(self, keys: Sequence[StoreKey]) -> list[int | None]:
        """Index (into ``tiers``) of the fastest tier holding each key, or ``None``."""
        where: list[int | None] = [None] * len(keys)
        for t, tier in enumerate(self.tiers):
            todo = [i for i, w in enumerate(where) if w is None]
            if not todo:
                break
            for i, present in zip(todo, tier.contains([keys[i] for i in todo])):
                if present:
                    where[i] = t
        return where

    def get(
        self, keys: Sequence[StoreKey], pin: bool = False, origins: list[str] | None = None
    ) -> list[Entry | None]:
        """Entries from the fastest tier holding them, promoted into memory.

        With ``pin``, every returned entry that is resident in memory is pinned; the
        caller unpins it (``memory.unpin``) when done. ``origins``, if given, receives
        the name of the tier each entry came from ("" for a miss).
        """
        found = [""] * len(keys)
        if self.memory is not None:
            out = self.memory.pin(keys) if pin else self.memory.get(keys)
            found = [self.memory.name if e is not None else "" for e in out]
        else:
            out = [None] * len(keys)
        for tier in self.lower:
            todo = [i for i, e in enumerate(out) if e is None]
            if not todo:
                break
            for i, entry in zip(todo, tier.get([keys[i] for i in todo])):
                if entry is not None:
                    out[i] = self._promote(entry, pin)
                    found[i] = tier.name
        if origins is not None:
            origins.extend(found)
        return out

    def _promote(self, entry: Entry, pin: bool) -> Entry:
        if self.memory is None:
            return entry
        resident = self.memory.insert(entry, pin=pin)
        return entry if resident is None else resident

    # -- writes ------------------------------------------------------------------
    def put(self, entries: Sequence[Entry]) -> None:
        """Store in memory now and queue for the lower tiers; never blocks."""
        if not entries:
            return
        keep = bool(self.lower) and self.write_lower
        resident = []
        for entry in entries:
            held = self.memory.insert(entry, pin=keep) if self.memory is not None else None
            resident.append((held or entry, held is not None))
        if keep:
            self._enqueue(resident)

    def _enqueue(self, job: list[tuple[Entry, bool]]) -> None:
        nbytes = sum(entry.nbytes for entry, _ in job)
        with self._lock:
            stats = self._queue_stats
            if stats.queued_bytes + nbytes > stats.capacity_bytes:
                stats.dropped_saves += len(job)
                stats.dropped_bytes += nbytes
                drop = True
            else:
                stats.queued_bytes += nbytes
                drop = False
        if drop:
            self._unpin(job)
        else:
            self._queue.put(job)

    def _drain(self) -> None:
        while (job := self._queue.get()) is not None:
            entries = [entry for entry, _ in job]
            for tier in self.lower:
                try:
                    tier.put(entries)
                except Exception:  # a tier bug must not kill the saver thread
                    logger.exception("%s tier failed to store entries", tier.name)
                    with self._lock:
                        self._queue_stats.failed_saves += len(entries)
            self._unpin(job)
            with self._lock:
                self._queue_stats.queued_bytes -= sum(e.nbytes for e in entries)
                self._idle.notify_all()

    def _unpin(self, job: list[tuple[Entry, bool]]) -> None:
        if self.memory is not None:
            self.memory.unpin([entry.key for entry, pinned in job if pinned])

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until queued saves are written; ``False`` on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._queue_stats.queued_bytes > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    # -- the rest ----------------------------------------------------------------
    def delete(self, keys: Sequence[StoreKey]) -> int:
        return sum(tier.delete(keys) for tier in self.tiers)

    def stats(self) -> list[StoreStats]:
        return [tier.stats() for tier in self.tiers]

    def queue_stats(self) -> SaveQueueStats:
        with self._lock:
            return SaveQueueStats(**vars(self._queue_stats))

    def close(self, timeout_s: float = 10.0) -> None:
        self.flush(timeout_s)
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout_s)
        for tier in self.tiers:
            tier.close()
