"""What a worker does each step once its KV caches are registered: loads the chunks
the scheduler planned (from entries the lookup already read, verified and pinned),
copies newly computed chunks out to the engine, and reports metrics.

A chunk that cannot be loaded is reported through ``take_load_errors`` (one layout) or
as a failed asynchronous load (several groups) so vLLM recomputes it: a cache miss,
never a wrong answer and never a crash.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch

from kvshelf.codec import Entry
from kvshelf.engine import CacheEngine, Held, Hold
from kvshelf.keys import Chunk
from kvshelf.lookup import LookupServer, WorkerLookup
from kvshelf.vllm import metric_names as m
from kvshelf.vllm.fp8 import Fp8Copier
from kvshelf.vllm.groups import CacheGroups
from kvshelf.vllm.hybrid import PAYLOAD_DTYPE, ChunkCopy, HybridCache, HybridMover, StateCopy
from kvshelf.vllm.layout import BlockCopier
from kvshelf.vllm.metadata import KVShelfMetadata, LoadSpec
from kvshelf.vllm.metric_names import series
from kvshelf.vllm.movers import Completer, CudaMover, LoadItem, SaveItem, StepCopies, StepMover

logger = logging.getLogger("kvshelf.worker")


@dataclass(frozen=True)
class OneLayout:
    """Every layer in one layout: the copier and mover tuned for it."""

    copier: BlockCopier | Fp8Copier
    mover: StepMover | CudaMover  # StepMover: SyncMover or Fp8Mover
    layer_index: dict[str, int]  # layer name -> index of its distinct tensor


@dataclass(frozen=True)
class SeveralGroups:
    """Several KV cache groups: per-group chunk copies and recurrent states."""

    cache: HybridCache
    mover: HybridMover
    groups: CacheGroups


CacheAccess = OneLayout | SeveralGroups


class Transfers:
    """The worker's per-step work over one engine. Built by ``register_kv_caches``."""

    def __init__(
        self,
        engine: CacheEngine,
        lookup: WorkerLookup,
        server: LookupServer,
        access: CacheAccess,
        block_size: int,
        rank: int,
    ):
        self.engine = engine
        self.access = access
        self.block_size = block_size
        self.rank = rank
        self._lookup = lookup
        self._server = server
        # A GPU copy into unpinned memory would stall the step: on GPUs a save without
        # a memory-tier buffer is dropped instead.
        device = access.cache.device if isinstance(access, SeveralGroups) else access.copier.device
        self._on_cpu = device.type == "cpu"
        self._load_errors: set[int] = set()
        self._finished_loads: set[str] = set()  # asynchronous loads (several groups)
        self._failed_loads: set[str] = set()
        self._saving: tuple[KVShelfMetadata, list[Entry]] | None = None
        self._loaded: list[str] = []  # requests whose holds go once their copies are done
        self._loaded_tokens: Counter[str] = Counter()  # by the tier the chunks came from
        self._failed_blocks = 0
        self._load_bytes = 0
        self._seconds: dict[str, list[float]] = {m.LOAD_SECONDS: [], m.SAVE_SECONDS: []}
        self._seconds_lock = threading.Lock()
        self._reported: dict[str, int | float] = {}
        self._completer = Completer()

    # -- loads -------------------------------------------------------------------
    def start_load_kv(self, meta: KVShelfMetadata, forward_context: object = None) -> None:
        if meta.released:  # after the copies in flight that may read what they hold
            released = list(meta.released)
            self._completer.after(None, lambda ok: self._release(released))
        if not meta.loads:
            return
        if isinstance(self.access, SeveralGroups):
            self._load_hybrid(meta, self.access)
        else:
            self._load_uniform(meta, self.access, forward_context)

    def _load_uniform(self, meta: KVShelfMetadata, one: OneLayout, forward_context: object):
        items: list[LoadItem] = []
        for spec in meta.loads:
            try:
                items.extend(self._load_items(spec, one.copier))
            except (RuntimeError, ValueError):  # never crash the engine: recompute
                logger.exception("load of request %s failed", spec.req_id)
                self._fail(spec, spec.start // self.block_size)
        try:
            one.mover.load(items, forward_context)
        except RuntimeError:
            logger.exception("KV copy into the cache failed")
            for spec in meta.loads:
                self._fail(spec, spec.start // self.block_size)
        # The copies are enqueued (CUDA) or done (CPU); the holds go when the step ends.
        self._loaded.extend(spec.req_id for spec in meta.loads)
        self._load_bytes += sum(len(item.block_ids) for item in items) * one.copier.block_bytes

    def _hold(self, spec: LoadSpec, chunks: list[Chunk]) -> Hold:
        """What is held for ``spec``'s request, reading those of ``chunks`` it lacks now."""
        hold = self.engine.hold(spec.req_id) or Hold(spec.req_id)
        missing = [c for c in chunks if hold.get(c) is None]
        if missing:  # prefetch off, or the hold expired: read now
            hold = self.engine.fetch(missing, spec.req_id)
        return hold

    def _load_items(self, spec: LoadSpec, copier: BlockCopier | Fp8Copier) -> list[LoadItem]:
        hold = self._hold(spec, spec.chunks)
        items = []
        for chunk in spec.chunks:
            first, last = self._block_span(chunk, spec)
            held = hold.get(chunk)
            if held is None:
                self._fail(spec, first)
                break
            payload = copier.payload_view(_buffer(held.entry), chunk.num_tokens)
            first_in_chunk = first - chunk.start // self.block_size
            items.append(LoadItem(payload, first_in_chunk, spec.block_ids[0][first:last]))
            self._count_loaded(chunk, spec, held.tier)
        return items

    def _block_span(self, chunk: Chunk, spec: LoadSpec) -> tuple[int, int]:
        """The request's blocks ``[first, last)`` that ``chunk`` writes for ``spec``."""
        first = max(chunk.start, spec.start) // self.block_size
        return first, math.ceil(min(chunk.end, spec.end) / self.block_size)

    def _count_loaded(self, chunk: Chunk, spec: LoadSpec, tier: str) -> None:
        """Tokens of ``chunk`` that ``spec`` loads, by the tier they were read from."""
        loaded = min(chunk.end, spec.end) - max(chunk.start, spec.start)
        self._loaded_tokens[tier] += loaded

    def _load_hybrid(self, meta: KVShelfMetadata, several: SeveralGroups) -> None:
        """Every group's blocks, and the recurrent state where the hit ends. These loads
        are asynchronous (the request waits for them outside the step's forward) and end
        in :meth:`take_finished_loads`. A hybrid model's hits were read and verified at
        lookup (prefetch), so a missing entry means its hold expired: it is read again;
        if that fails the request is reported failed and vLLM recomputes all of it."""
        chunks: list[ChunkCopy] = []
        states: list[StateCopy] = []
        for spec in meta.loads:
            found = self._held_for_hybrid(spec)
            if found is None:
                continue
            self._finished_loads.add(spec.req_id)
            copies, state = self._hybrid_copies(spec, found, several.groups)
            chunks += copies
            states += state
        try:
            several.mover.load((chunks, states))
        except RuntimeError:
            logger.exception("KV copy into the cache failed; vLLM recomputes those requests")
            self._failed_loads |= self._finished_loads
            self._finished_loads = set()
        self._loaded.extend(spec.req_id for spec in meta.loads)
        self._load_bytes += sum(c.num_blocks for c in chunks) * several.cache.block_bytes()

    def _held_for_hybrid(self, spec: LoadSpec) -> list[Held] | None:
        """Every chunk of ``spec`` (and its state) held, in order; ``None`` (the load
        counted as failed) when one cannot be read or no block holds the state."""
        wanted = spec.chunks + ([spec.state] if spec.state is not None else [])
        hold = self._hold(spec, wanted)
        found = [held for c in wanted if (held := hold.get(c)) is not None]
        if len(found) == len(wanted) and None not in spec.state_slots:
            return found
        self._failed_blocks += math.ceil((spec.end - spec.start) / self.block_size)
        self._failed_loads.add(spec.req_id)
        logger.warning("request %s: cannot load its cached prefix; vLLM recomputes it", spec.req_id)
        return None

    def _hybrid_copies(
        self, spec: LoadSpec, found: list[Held], groups: CacheGroups
    ) -> tuple[list[ChunkCopy], list[StateCopy]]:
        token_groups = [g.index for g in groups.token_groups]
        chunks = []
        for chunk, held in zip(spec.chunks, found):
            first, last = self._block_span(chunk, spec)
            ids = [spec.block_ids[g][first:last] for g in token_groups]
            offset = first - chunk.start // self.block_size
            chunks.append(ChunkCopy(_buffer(held.entry), chunk.num_tokens, offset, ids))
            self._count_loaded(chunk, spec, held.tier)
        if spec.state is None:
            return chunks, []
        slots = [slot for slot in spec.state_slots if slot is not None]
        return chunks, [StateCopy(_buffer(found[-1].entry), slots)]

    def _release(self, req_ids: list[str]) -> None:
        for req_id in req_ids:
            self._lookup.release(req_id)

    def _fail(self, spec: LoadSpec, first_block: int) -> None:
        """Report every block from ``first_block`` to the end of the load as failed."""
        last = math.ceil(spec.end / self.block_size)
        failed = spec.block_ids[0][first_block:last]
        self._load_errors.update(failed)
        self._failed_blocks += len(failed)
        logger.warning(
            "request %s: cannot load tokens from %d on; vLLM recomputes %d blocks",
            spec.req_id,
            first_block * self.block_size,
            len(failed),
        )

    def wait_for_layer_load(self, layer_name: str) -> None:
        index = self._layer(layer_name)
        if index is not None:
            self.access.mover.wait_layer(index)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_finished_loads(self) -> tuple[set[str], set[str]]:
        """Asynchronous loads done since the last call: (all of them, the failed ones)."""
        done, failed = self._finished_loads | self._failed_loads, self._failed_loads
        self._finished_loads, self._failed_loads = set(), set()
        return done, failed

    def _layer(self, layer_name: str) -> int | None:
        """The layer's tensor index for the mover's per-layer hooks (one layout only)."""
        if isinstance(self.access, OneLayout):
            return self.access.layer_index.get(layer_name)
        return None

    # -- saves -------------------------------------------------------------------
    def save_kv_layer(self, meta: KVShelfMetadata, layer_name: str) -> None:
        if not meta.saves:
            return
        self._begin_saves(meta)
        index = self._layer(layer_name)
        if index is not None:
            self.access.mover.save_layer(index)

    def wait_for_save(self, meta: KVShelfMetadata) -> None:
        """End of the step: the copies stay in flight; what must follow them (saved
        entries to the engine, holds on loaded ones dropped) runs once they are done."""
        started = time.perf_counter()
        try:
            if meta.saves:
                self._begin_saves(meta)
            done = self.access.mover.finish_step()
        except RuntimeError:  # a dropped save is only a future miss
            logger.exception("saving KV failed")
            self._drop_saves()
            done = StepCopies()
        saving, self._saving = self._saving, None
        if saving is not None:
            entries = saving[1]
            self._completer.after(
                done.wait_saved if done.saved is not None else None,
                lambda ok: self._saved(entries, started, ok),
            )
        if self._loaded:
            loaded, nbytes = self._loaded, self._load_bytes
            self._loaded, self._load_bytes = [], 0
            self._completer.after(
                done.wait_loaded if done.load_span is not None else None,
                lambda ok: self._loads_done(loaded, nbytes, done, ok),
            )

    def _saved(self, entries: list[Entry], started: float, ok: bool) -> None:
        if not ok:
            for entry in entries:
                self.engine.discard(entry)
            return
        self.engine.save(entries)
        self._observe(m.SAVE_SECONDS, time.perf_counter() - started)

    def _loads_done(self, req_ids: list[str], nbytes: int, done: StepCopies, ok: bool) -> None:
        self._release(req_ids)  # the host buffers had to outlive the copies
        if not ok:
            return
        seconds = done.wait_loaded()
        self._observe(m.LOAD_SECONDS, seconds)
        if seconds > 0:
            logger.debug(
                "loaded %d bytes in %.2f ms (%.2f GB/s)",
                nbytes,
                seconds * 1e3,
                nbytes / seconds / 1e9,
            )

    def _observe(self, name: str, seconds: float) -> None:
        with self._seconds_lock:
            self._seconds[name].append(seconds)

    def _begin_saves(self, meta: KVShelfMetadata) -> None:
        if self._saving is not None and self._saving[0] is meta:
            return
        if isinstance(self.access, SeveralGroups):
            self._begin_hybrid_saves(meta, self.access)
        else:
            self._begin_uniform_saves(meta, self.access)

    def _begin_uniform_saves(self, meta: KVShelfMetadata, one: OneLayout) -> None:
        entries: list[Entry] = []
        items: list[SaveItem] = []
        copier = one.copier
        for spec in meta.saves:
            for chunk in spec.chunks:
                blocks = _block_range(chunk, self.block_size)
                if blocks.stop > len(spec.block_ids[0]):
                    logger.warning("request %s lost blocks before its save", spec.req_id)
                    break
                shape = copier.entry_shape(chunk.num_tokens)
                entry = self.engine.new_entry(
                    chunk, copier.entry_dtype, shape, fallback=self._on_cpu
                )
                if entry is None:
                    continue
                entries.append(entry)
                payload = copier.payload_view(_buffer(entry), chunk.num_tokens)
                items.append(SaveItem(payload, spec.block_ids[0][blocks.start : blocks.stop]))
        self._saving = (meta, entries)
        one.mover.begin_saves(items)

    def _begin_hybrid_saves(self, meta: KVShelfMetadata, several: SeveralGroups) -> None:
        entries: list[Entry] = []
        chunks: list[ChunkCopy] = []
        states: list[StateCopy] = []
        token_groups = [g.index for g in several.groups.token_groups]
        for spec in meta.saves:
            for chunk in spec.chunks:
                blocks = _block_range(chunk, self.block_size)
                if any(blocks.stop > len(spec.block_ids[g]) for g in token_groups):
                    logger.warning("request %s lost blocks before its save", spec.req_id)
                    break
                entry = self._new_hybrid_entry(chunk, several.cache)
                if entry is not None:
                    entries.append(entry)
                    ids = [spec.block_ids[g][blocks.start : blocks.stop] for g in token_groups]
                    chunks.append(ChunkCopy(_buffer(entry), chunk.num_tokens, 0, ids))
            for state, slots in spec.states:
                entry = self._new_hybrid_entry(state, several.cache)
                if entry is not None:
                    entries.append(entry)
                    states.append(StateCopy(_buffer(entry), slots))
        self._saving = (meta, entries)
        several.mover.begin_saves((chunks, states))

    def _new_hybrid_entry(self, chunk: Chunk, cache: HybridCache) -> Entry | None:
        shape = cache.payload_shape(chunk.num_tokens)
        return self.engine.new_entry(chunk, PAYLOAD_DTYPE, shape, fallback=self._on_cpu)

    def _drop_saves(self) -> None:
        if self._saving is not None:
            for entry in self._saving[1]:
                self.engine.discard(entry)
            self._saving = None

    # -- metrics -----------------------------------------------------------------
    def stats(self) -> dict | None:
        """Counter increments since the last call, changed gauges, new observations."""
        engine, tiers, queue = self.engine.stats()
        totals: dict[str, int | float] = {
            m.VERIFICATION_FAILURES: engine.verify_failures,
            m.SAVED_CHUNKS: engine.saved_chunks,
            m.DROPPED_SAVES: queue.dropped_saves + engine.dropped_saves,
            m.UNPAID_TOKENS: engine.unpaid_tokens,
            m.LOAD_FAILURES: self._failed_blocks,
        }
        for tier, tokens in self._loaded_tokens.items():
            totals[series(m.LOADED_TOKENS, tier)] = tokens
        gauges = {}
        for t in tiers:
            for name, value in m.TIER_COUNTERS.items():
                totals[series(name, t.tier)] = int(getattr(t, value))
            for name, value in m.TIER_GAUGES.items():
                gauges[f"{series(name, t.tier)}@{self.rank}"] = int(getattr(t, value))
        counters = {k: v - self._reported.get(k, 0) for k, v in totals.items()}
        counters = {k: v for k, v in counters.items() if v}
        changed = {k: v for k, v in gauges.items() if self._reported.get(k) != v}
        self._reported = {**totals, **gauges}
        with self._seconds_lock:
            observations = {k: v for k, v in self._seconds.items() if v}
            self._seconds = {k: [] for k in self._seconds}
        if not (counters or changed or observations):
            return None
        return {"counters": counters, "gauges": changed, "observations": observations}

    # -- the rest ----------------------------------------------------------------
    def shutdown(self) -> None:
        self._completer.close()
        self._server.close()
        self._lookup.close()
        self.engine.close()


def _buffer(entry: Entry) -> torch.Tensor | memoryview:
    """The pinned tensor behind an entry when there is one, else its memoryview."""
    handle = entry.owner.handle if entry.owner is not None else None
    return handle if isinstance(handle, torch.Tensor) else entry.payload


def _block_range(chunk: Chunk, block_size: int) -> range:
    return range(chunk.start // block_size, math.ceil(chunk.end / block_size))
