"""CacheEngine: prompt -> chunk keys -> tiers. No vLLM import.

The engine answers three questions for a prompt's :class:`~kvshelf.keys.ChunkPlan`:
which longest prefix exists (:meth:`locate`), which longest prefix can really be read
and verified (:meth:`fetch_plan`, which pins it in memory for a later copy and returns
it as a :class:`Hold`), and where to put new KV (:meth:`new_entry` + :meth:`save`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from kvshelf.codec import Entry, payload_bytes
from kvshelf.config import KVShelfConfig
from kvshelf.keys import (
    Chunk,
    ChunkKey,
    ChunkPlan,
    MediaSpan,
    Namespace,
    StoreKey,
    plan_chunks,
    state_chunk,
    store_key,
)
from kvshelf.pacing import ChunkCost, paying_prefix
from kvshelf.storage.base import HeapMemory, HostMemory, Store, StoreStats
from kvshelf.storage.build import open_tiers
from kvshelf.storage.tiered import SaveQueueStats

logger = logging.getLogger(__name__)

_FIRST_LOCATE_BATCH = 8  # full chunks asked about before the first absent one is known
UNPAID_LOG_EVERY_S = 60.0
PACE_FILE = "PACE.json"  # the model's prefill seconds per token, for the next start

# num_tokens -> (dtype, shape) the payload of a chunk of that many tokens must have.
PayloadSpec = Callable[[int], tuple[str, tuple[int, ...]]]


@dataclass
class EngineStats:
    """Engine-level counters; per-tier ones live in each tier's StoreStats."""

    verify_failures: int = 0  # entries whose check digest, size or shape was wrong
    saved_chunks: int = 0
    dropped_saves: int = 0  # no memory-tier buffer for a save that needs one
    unpaid_tokens: int = 0  # found in a tier, left to recompute: reading was slower


@dataclass(frozen=True, slots=True)
class Held:
    """One chunk of a hold: its verified entry and the tier that entry was read from."""

    chunk: Chunk
    entry: Entry
    tier: str  # a Store's name: "memory", "disk", "redis"


@dataclass(frozen=True)
class Hold:
    """What the engine read, verified and pinned for one owner (a request id): safe to
    copy out of until :meth:`release` or the engine's ``hold_timeout_s``.

    Immutable: a later :meth:`CacheEngine.fetch` for the same owner puts a larger Hold
    in this one's place; the engine keeps the current one (:meth:`CacheEngine.hold`).
    """

    owner: str
    items: tuple[Held, ...] = ()  # in the order they were read
    pinned: tuple[StoreKey, ...] = field(default=(), repr=False)  # in the memory tier
    deadline: float = field(default=0.0, repr=False)  # monotonic; released after it
    engine: CacheEngine | None = field(default=None, repr=False, compare=False)

    @property
    def chunks(self) -> list[Chunk]:
        return [held.chunk for held in self.items]

    @property
    def num_tokens(self) -> int:
        """Where the held prefix ends; 0 when nothing is held."""
        return max((held.chunk.end for held in self.items), default=0)

    def get(self, chunk: Chunk) -> Held | None:
        """``chunk``'s entry and tier, or ``None`` when this hold lacks it."""
        return self._by_key.get(chunk.key)

    def release(self) -> None:
        """Unpin what the engine holds for this owner (this hold, or one that replaced
        it); a no-op once released."""
        if self.engine is not None:
            self.engine.release(self.owner)

    @cached_property
    def _by_key(self) -> dict[ChunkKey, Held]:
        return {held.chunk.key: held for held in self.items}


class CacheEngine:
    """Thread-safe. Its tiers come from :func:`~kvshelf.storage.build.open_tiers`:
    ``host``, ``remote`` and ``write_lower`` are passed there."""

    def __init__(
        self,
        config: KVShelfConfig,
        namespace: Namespace,
        payload_spec: PayloadSpec | None = None,
        host: HostMemory | None = None,
        remote: Store | None = None,
        write_lower: bool = True,
    ):
        if namespace.chunk_size != config.chunk_size:
            raise ValueError("namespace.chunk_size must equal config.chunk_size")
        self.config = config
        self.namespace = namespace
        self.namespace_id = namespace.id()
        self.payload_spec = payload_spec
        self.store = open_tiers(config, namespace, host, remote, write_lower)
        self.counters = EngineStats()
        self._pace_file = (
            config.disk_path / self.namespace_id.hex() / PACE_FILE if config.disk_path else None
        )
        self.seconds_per_token = _read_pace(self._pace_file)  # this model's prefill
        self._unpaid_logged_at = -math.inf
        self._heap = HeapMemory()
        self._holds: dict[str, Hold] = {}  # owner -> what is pinned for it
        self._lock = threading.Lock()

    # -- keys --------------------------------------------------------------------
    def plan(self, token_ids, spans: Sequence[MediaSpan] = (), salt: str = "") -> ChunkPlan:
        return plan_chunks(token_ids, spans, self.config.chunk_size, salt)

    def key(self, chunk: Chunk) -> StoreKey:
        return store_key(self.namespace_id, chunk.key)

    # -- lookups -----------------------------------------------------------------
    def locate(self, plan: ChunkPlan) -> list[Chunk]:
        """The longest prefix whose chunks exist in some tier (existence only)."""
        # Ask in growing batches and stop at the first absent full chunk: a new prompt
        # then costs a few key checks, not one per chunk in every tier.
        found = 0
        batch = _FIRST_LOCATE_BATCH
        while found < len(plan.full):
            chunks = plan.full[found : found + batch]
            where = self.store.locate([self.key(c) for c in chunks])
            present = next((i for i, w in enumerate(where) if w is None), len(chunks))
            found += present
            if present < len(chunks):
                break
            batch *= 2
        prefix = list(plan.full[:found])
        cuts = plan.cuts_from(found)  # longest first
        if cuts:
            where = self.store.locate([self.key(c) for c in cuts])
            prefix += [c for c, w in zip(cuts, where) if w is not None][:1]
        return prefix

    def locate_hit(self, plan: ChunkPlan, needs_state: bool = False) -> list[Chunk]:
        """The chunks of the longest prefix that exists. With ``needs_state`` (models with
        Mamba / linear-attention layers) the prefix must end where a recurrent state was
        stored and at least one token before the prompt's end (vLLM computes the last
        token itself, from exactly that state); the state's chunk comes last."""
        located = self.locate(plan)
        if not needs_state or not located:
            return located
        found = sum(1 for c in located if c.num_tokens == plan.chunk_size)
        ends = {c.end for c in plan.full[:found]}
        ends |= {c.end for c in plan.cuts if c.start // plan.chunk_size <= found}
        lasts = [
            last
            for end in sorted(ends, reverse=True)
            if (last := plan.chunk_ending_at(end)) is not None and last.end < plan.num_tokens
        ]
        # One existence query: every candidate's state, and the cuts not located yet.
        asked = [state_chunk(c) for c in lasts]
        asked += [c for c in lasts if c.num_tokens != plan.chunk_size and c not in located]
        where = dict(zip(asked, self.store.locate([self.key(c) for c in asked])))
        for last in lasts:
            state = state_chunk(last)
            cut_found = last not in where or where[last] is not None  # else located already
            if where[state] is not None and cut_found:
                return [*plan.chunks_up_to(last.end), state]
        return []

    def fetch(self, chunks: Sequence[Chunk], owner: str) -> Hold:
        """Read and verify ``chunks`` in order, stopping at the first that fails, and
        add what was read to ``owner``'s hold (pinned). Returns that hold."""
        self._read(chunks, owner)
        return self.hold(owner) or Hold(owner)

    def _read(self, chunks: Sequence[Chunk], owner: str) -> list[Chunk]:
        """:meth:`fetch`; returns the verified prefix of ``chunks``."""
        found = self.store.find([self.key(c) for c in chunks], pin=True)
        good: list[Held] = []
        for chunk, read in zip(chunks, found):
            if read is None or not self._verified(read.entry, chunk):
                break
            good.append(Held(chunk, read.entry, read.tier))
        self._unpin_resident([f.entry for f in found[len(good) :] if f is not None])
        pinned = tuple(self.key(h.chunk) for h in good if self._resident(h.entry))
        deadline = time.monotonic() + self.config.hold_timeout_s
        with self._lock:
            hold = self._holds.get(owner) or Hold(owner, engine=self)
            self._holds[owner] = replace(
                hold,
                items=hold.items + tuple(good),
                pinned=hold.pinned + pinned,
                deadline=deadline,
            )
        return [h.chunk for h in good]

    def paced_hit(
        self, plan: ChunkPlan, needs_state: bool = False, seconds_per_token: float | None = None
    ) -> list[Chunk]:
        """:meth:`locate_hit` cut to the prefix that loads faster than it recomputes, from
        the tiers' measured read rates, reading nothing (a lookup with prefetch off: the
        load reads later). A tier not measured yet is offered up to a probe's worth."""
        if seconds_per_token is not None:
            self.seconds_per_token = seconds_per_token
        located = self.locate_hit(plan, needs_state)
        spt = self.seconds_per_token
        if spt is None or not located or not self.store.lower or self.payload_spec is None:
            return located
        costs = self._costs(located)
        count = paying_prefix(costs, spt, needs_state)
        if count < len(located) and all(c.rate is not None for c in costs[count:]):
            self._note_unpaid(located[count:], spt)
        return located[:count]

    def fetch_plan(
        self,
        plan: ChunkPlan,
        owner: str,
        needs_state: bool = False,
        seconds_per_token: float | None = None,
    ) -> Hold:
        """Hold (read, verify, pin) the longest loadable prefix of ``plan`` under
        ``owner``, replacing any earlier hold, and return it (its ``num_tokens`` is the
        hit; an empty hold is a miss). With
        ``needs_state`` see :meth:`locate_hit`: a prefix that fails to read is no hit.
        With a prefill speed (``seconds_per_token``, else the last one known) only the
        prefix that loads faster than it recomputes is read (:mod:`kvshelf.pacing`)."""
        self.release(owner)
        self._expire_holds()
        if seconds_per_token is not None:
            self.seconds_per_token = seconds_per_token
        wanted = self.locate_hit(plan, needs_state)
        got, paced = self._fetch_paced(wanted, owner, needs_state)
        if needs_state and len(got) < len(wanted):
            self.release(owner)
            return Hold(owner)
        if len(got) < len(wanted) and not paced:
            # A full chunk or the longest cut failed: a shorter cut may still be readable.
            for cut in plan.cuts_from(len(got)):
                if self._read([cut], owner):
                    break
        return self.hold(owner) or Hold(owner)

    def _fetch_paced(
        self, chunks: Sequence[Chunk], owner: str, whole: bool
    ) -> tuple[list[Chunk], bool]:
        """:meth:`fetch` the prefix of ``chunks`` that pays, in steps where a tier's
        speed is still unknown (without a prefill speed or entry sizes: all of them).
        Also says whether it stopped short by choice (the rest would load slower than it
        recomputes)."""
        spt = self.seconds_per_token
        if spt is None or not self.store.lower or self.payload_spec is None:
            return self._read(chunks, owner), False
        got: list[Chunk] = []
        todo = list(chunks)
        while todo:
            count = paying_prefix(self._costs(todo), spt, whole)
            if count == 0:
                self._note_unpaid(todo, spt)
                return got, True
            read = self._read(todo[:count], owner)
            got += read
            if len(read) < count:
                break
            todo = todo[count:]
        return got, False

    def _costs(self, chunks: Sequence[Chunk]) -> list[ChunkCost]:
        tiers = self.store.tier_names([self.key(c) for c in chunks])
        return [
            ChunkCost(c.num_tokens, self._chunk_bytes(c), self.store.read_rate(t) if t else None)
            for c, t in zip(chunks, tiers)
        ]

    def _chunk_bytes(self, chunk: Chunk) -> int:
        assert self.payload_spec is not None  # pacing needs entry sizes
        return payload_bytes(*self.payload_spec(chunk.num_tokens))

    def _note_unpaid(self, chunks: Sequence[Chunk], spt: float) -> None:
        """Count tokens left to recompute; say why, at most once a minute."""
        tokens = sum(c.num_tokens for c in chunks)
        now = time.monotonic()
        with self._lock:
            self.counters.unpaid_tokens += tokens
            if now - self._unpaid_logged_at < UNPAID_LOG_EVERY_S:
                return
            self._unpaid_logged_at = now
        costs = self._costs(chunks)
        tiers = {t for t in self.store.tier_names([self.key(c) for c in chunks]) if t}
        logger.info(
            "recomputing %d cached tokens: reading them (%.0f MB from %s) would take "
            "longer than recomputing them (~%.2f s); counted in unpaid_tokens",
            tokens,
            sum(c.nbytes for c in costs) / 1e6,
            "/".join(sorted(tiers)),
            tokens * spt,
        )

    def hold(self, owner: str) -> Hold | None:
        """What is held for ``owner`` now (pinned until :meth:`release`); ``None``: nothing."""
        with self._lock:
            return self._holds.get(owner)

    def release(self, owner: str) -> None:
        """Unpin and forget ``owner``'s hold, if it has one."""
        with self._lock:
            hold = self._holds.pop(owner, None)
        if hold is not None and self.store.memory is not None:
            self.store.memory.unpin(hold.pinned)

    # -- saves -------------------------------------------------------------------
    def new_entry(
        self, chunk: Chunk, dtype: str, shape: tuple[int, ...], fallback: bool = True
    ) -> Entry | None:
        """An entry with an uninitialised payload for ``chunk``; fill it, then
        :meth:`save` it. The buffer comes from the memory tier when it has room; else
        from ordinary memory, or, without ``fallback``, none: the save is dropped and
        counted (a GPU copy into unpinned memory would stall the step)."""
        nbytes = payload_bytes(dtype, shape)
        memory = self.store.memory
        key = self.key(chunk)
        block = memory.allocate(nbytes, key) if memory is not None else None
        if block is None and not fallback:
            with self._lock:
                self.counters.dropped_saves += 1
            return None
        if block is None:
            block = self._heap.alloc(nbytes)
        return Entry(key, chunk.check, chunk.num_tokens, dtype, shape, block.view, block)

    def discard(self, entry: Entry) -> None:
        """Give back an entry from :meth:`new_entry` that will not be saved."""
        memory = self.store.memory
        block = memory.block_of(entry) if memory is not None else None
        if memory is not None and block is not None:
            memory.discard(block)

    def missing(self, chunks: Sequence[Chunk]) -> list[Chunk]:
        """The chunks no tier holds yet (what is worth saving)."""
        where = self.store.locate([self.key(c) for c in chunks])
        return [c for c, w in zip(chunks, where) if w is None]

    def save(self, entries: Sequence[Entry]) -> None:
        """Memory now, lower tiers in the background. Never blocks."""
        with self._lock:
            self.counters.saved_chunks += len(entries)
        self.store.put(entries)

    # -- the rest ----------------------------------------------------------------
    def stats(self) -> tuple[EngineStats, list[StoreStats], SaveQueueStats]:
        return (
            EngineStats(**vars(self.counters)),
            self.store.stats(),
            self.store.queue_stats(),
        )

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self.store.flush(timeout_s)

    def close(self) -> None:
        _write_pace(self._pace_file, self.seconds_per_token)
        with self._lock:
            owners = list(self._holds)
        for owner in owners:
            self.release(owner)
        self.store.close(self.config.flush_on_stop_s)

    # -- internals ---------------------------------------------------------------
    def _verified(self, entry: Entry, chunk: Chunk) -> bool:
        ok = entry.check == chunk.check and entry.num_tokens == chunk.num_tokens
        if ok and self.payload_spec is not None:
            ok = (entry.dtype, tuple(entry.shape)) == self.payload_spec(chunk.num_tokens)
        if not ok:
            with self._lock:
                self.counters.verify_failures += 1
            logger.warning(
                "entry %s does not match the chunk it is filed under; removed",
                entry.key.hex(),
            )
            self.store.delete([entry.key])
        return ok

    def _resident(self, entry: Entry) -> bool:
        memory = self.store.memory
        return memory is not None and memory.owns(entry)

    def _unpin_resident(self, entries: Sequence[Entry | None]) -> None:
        if self.store.memory is not None:
            self.store.memory.unpin([e.key for e in entries if e is not None and self._resident(e)])

    def _expire_holds(self) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [owner for owner, hold in self._holds.items() if hold.deadline < now]
        for owner in stale:
            logger.warning("releasing hold of %s after %.0f s", owner, self.config.hold_timeout_s)
            self.release(owner)


def _read_pace(path: Path | None) -> float | None:
    """The prefill speed the last run measured, if it left one."""
    if path is None:
        return None
    try:
        value = json.loads(path.read_text())["seconds_per_token"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _write_pace(path: Path | None, seconds_per_token: float | None) -> None:
    if path is None or seconds_per_token is None:
        return
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"seconds_per_token": seconds_per_token}))
        os.replace(tmp, path)
    except OSError as exc:
        logger.debug("cannot keep the prefill speed in %s: %s", path, exc)
