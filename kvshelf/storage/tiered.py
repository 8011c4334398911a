"""Memory, then disk, then remote: lookup order, promotion and write-back.

Reads come from the fastest tier that holds a key and are promoted into memory. Writes
go into memory at once and reach the lower tiers in the background (write-back): an
entry held in memory waits there, dirty, until a writer thread copies it down, so the
backlog is bounded by the memory tier itself. Only if memory has to evict an entry
before it is written is that write lost; it is counted, with a rate-limited WARNING.
Entries memory could not take (no memory tier, or all of it pinned) wait in their own
buffers, bounded by ``queue_bytes``; past that a save is dropped and counted. The
caller never blocks. :meth:`TieredStore.close` writes what is queued for at most a
bounded time and logs what it wrote and what it abandoned.

Each lower tier's read rate is measured (a moving estimate over its reads): the engine
uses it to load only what loads faster than it recomputes. Reads under
:data:`RATE_MIN_BYTES` are not counted: they measure latency.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvshelf.codec import Entry
from kvshelf.keys import StoreKey
from kvshelf.storage.base import Store, StoreStats
from kvshelf.storage.memory import MemoryStore

logger = logging.getLogger(__name__)

WARN_EVERY_S = 60.0  # at most one WARNING per kind of lost write in this long
RATE_WEIGHT = 0.3  # weight of the newest read in a tier's moving read-rate estimate
RATE_MIN_BYTES = 8 * 2**20  # smaller reads measure latency, not a rate: not counted


@dataclass
class SaveQueueStats:
    queued_entries: int = 0  # saves not yet written to the lower tiers
    queued_bytes: int = 0  # of those, bytes held outside the memory tier
    capacity_bytes: int = 0  # the bound on queued_bytes
    written_saves: int = 0
    dropped_saves: int = 0  # never written to lower tiers: queue full or evicted first
    dropped_bytes: int = 0
    evicted_unwritten: int = 0  # of dropped_saves: memory evicted them before the write
    failed_saves: int = 0  # a lower tier raised (a bug); logged with its traceback


@dataclass(frozen=True)
class Found:
    entry: Entry
    tier: str  # the tier it was read from


@dataclass
class _Job:
    resident: list[StoreKey]  # dirty in the memory tier
    own: list[Entry] = field(default_factory=list)  # held in their own buffers

    @property
    def own_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.own)

    def __len__(self) -> int:
        return len(self.resident) + len(self.own)


class TieredStore:
    """Thread-safe. ``memory`` may be ``None`` (memory tier disabled). The tiers may be
    shared with other TieredStores (:func:`kvshelf.storage.build.open_tiers`): then
    ``release`` is how :meth:`close` lets go of them, instead of closing them."""

    def __init__(
        self,
        memory: MemoryStore | None,
        lower: Sequence[Store] = (),
        queue_bytes: int = 2 * 10**9,
        threads: int = 2,
        write_lower: bool = True,
        release: Callable[[], None] | None = None,
    ):
        self.memory = memory
        self._release = release
        self.lower = list(lower)
        # False: this process only reads the lower tiers (another one writes the same
        # entries there, e.g. rank 0 of a TP group whose ranks all hold the same MLA latent).
        self.write_lower = write_lower
        self.tiers: list[Store] = ([memory] if memory is not None else []) + self.lower
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._queue_stats = SaveQueueStats(capacity_bytes=queue_bytes)
        self._read_rates: dict[str, float] = {}  # lower tier name -> bytes/s
        self._closing = False  # writers skip what is left
        self._closed = False
        self._warned_at: dict[str, float] = {}
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

    def find(self, keys: Sequence[StoreKey], pin: bool = False) -> list[Found | None]:
        """Entries from the fastest tier holding them, promoted into memory, each with
        the name of the tier it came from.

        With ``pin``, every returned entry that is resident in memory is pinned; the
        caller unpins it (``memory.unpin``) when done.
        """
        out: list[Found | None] = [None] * len(keys)
        if self.memory is not None:
            resident = self.memory.pin(keys) if pin else self.memory.get(keys)
            out = [Found(e, self.memory.name) if e is not None else None for e in resident]
        for tier in self.lower:
            todo = [i for i, e in enumerate(out) if e is None]
            if not todo:
                break
            began = time.perf_counter()
            got = tier.get([keys[i] for i in todo])
            self._note_read(tier.name, got, time.perf_counter() - began)
            for i, entry in zip(todo, got):
                if entry is not None:
                    out[i] = Found(self._promote(entry, pin), tier.name)
        return out

    def get(self, keys: Sequence[StoreKey], pin: bool = False) -> list[Entry | None]:
        """:meth:`find` without the tiers."""
        return [found.entry if found is not None else None for found in self.find(keys, pin)]

    def read_rate(self, tier: str) -> float | None:
        """Measured bytes/s of reads from a lower tier; ``math.inf`` for memory;
        ``None`` before the first read."""
        if self.memory is not None and tier == self.memory.name:
            return math.inf
        with self._lock:
            return self._read_rates.get(tier)

    def tier_names(self, keys: Sequence[StoreKey]) -> list[str | None]:
        """Name of the fastest tier holding each key, or ``None``."""
        return [None if t is None else self.tiers[t].name for t in self.locate(keys)]

    def _note_read(self, tier: str, got: Sequence[Entry | None], seconds: float) -> None:
        nbytes = sum(entry.nbytes for entry in got if entry is not None)
        if nbytes < RATE_MIN_BYTES or seconds <= 0:
            return
        rate = nbytes / seconds
        with self._lock:
            old = self._read_rates.get(tier)
            self._read_rates[tier] = rate if old is None else old + RATE_WEIGHT * (rate - old)

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
        if not (self.lower and self.write_lower):
            if self.memory is not None:
                self.memory.put(entries)
            return
        job = _Job([])
        lost_before = self._lost_writes()
        for entry in entries:
            held = self.memory.insert(entry) if self.memory is not None else None
            if held is not None:
                job.resident.append(held.key)
            else:
                job.own.append(entry)
        if self.memory is not None:
            self.memory.mark_dirty(job.resident)
        self._enqueue(job)
        if self._lost_writes() > lost_before:
            self._warn(
                "evicted",
                "saves were evicted from memory before reaching the %s tier (%d so far): "
                "saves come faster than it writes; raise cpu_bytes to keep more waiting",
                "/".join(t.name for t in self.lower),
                self._lost_writes(),
            )

    def _enqueue(self, job: _Job) -> None:
        own_bytes = job.own_bytes
        with self._lock:
            stats = self._queue_stats
            drop = stats.queued_bytes + own_bytes > stats.capacity_bytes
            if drop:  # the entries outside memory do not fit: they go, the rest stays
                stats.dropped_saves += len(job.own)
                stats.dropped_bytes += own_bytes
                job.own = []
            else:
                stats.queued_bytes += own_bytes
            stats.queued_entries += len(job)
        if drop:
            self._warn(
                "queue",
                "save queue full (%d bytes waiting outside memory): saves dropped; "
                "raise save_queue_bytes",
                self._queue_stats.capacity_bytes,
            )
        if len(job):
            self._queue.put(job)

    def _drain(self) -> None:
        while (job := self._queue.get()) is not None:
            claimed = self.memory.claim_dirty(job.resident) if self.memory is not None else []
            entries = [e for e in claimed if e is not None] + job.own
            written = 0
            if not self._closing:
                written = self._write_down(entries)
            if self.memory is not None:
                self.memory.written([e.key for e in claimed if e is not None])
            with self._lock:
                stats = self._queue_stats
                stats.queued_entries -= len(job)
                stats.queued_bytes -= job.own_bytes
                stats.written_saves += written
                self._idle.notify_all()

    def _write_down(self, entries: list[Entry]) -> int:
        """Write to every lower tier; the number of entries written."""
        if not entries:
            return 0
        for tier in self.lower:
            try:
                tier.put(entries)
            except Exception:  # a tier bug must not kill the saver thread
                logger.exception("%s tier failed to store entries", tier.name)
                with self._lock:
                    self._queue_stats.failed_saves += len(entries)
        return len(entries)

    def _lost_writes(self) -> int:
        return self.memory.lost_writes() if self.memory is not None else 0

    def _warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._warned_at.get(kind, -math.inf) < WARN_EVERY_S:
                return
            self._warned_at[kind] = now
        logger.warning(message, *args)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until queued saves are written; ``False`` on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._queue_stats.queued_entries > 0:
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
        lost = self._lost_writes()
        with self._lock:
            stats = SaveQueueStats(**vars(self._queue_stats))
        stats.evicted_unwritten = lost
        stats.dropped_saves += lost
        return stats

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued for at most ``timeout_s``, abandon the rest, log both;
        then close the tiers, or let go of them where they are shared. Once only."""
        if self._closed:
            return
        self._closed = True
        before = self.queue_stats()
        began = time.monotonic()
        flushed = self.flush(timeout_s)
        self._closing = True  # writers now skip what is left
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(max(1.0, timeout_s - (time.monotonic() - began)))
        after = self.queue_stats()
        if before.queued_entries:
            written = after.written_saves - before.written_saves
            logger.log(
                logging.INFO if flushed else logging.WARNING,
                "stop: wrote %d queued saves to the %s tier in %.1f s; abandoned %d%s",
                written,
                "/".join(t.name for t in self.lower),
                time.monotonic() - began,
                before.queued_entries - written,
                "" if flushed else " (raise flush_on_stop_s to wait longer)",
            )
        if self._release is not None:
            self._release()
        else:
            for tier in self.tiers:
                tier.close()
