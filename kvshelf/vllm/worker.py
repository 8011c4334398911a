"""The connector's worker side: moves KV bytes between vLLM's paged cache and kvshelf.

On ``register_kv_caches`` it discovers the cache layout, opens the engine under a
namespace that includes that layout and this rank, and starts answering the
scheduler's lookups. Each step it loads the chunks the scheduler planned (from entries
the lookup already read, verified and pinned) and copies newly computed chunks out to
the engine. A chunk that cannot be loaded is reported through
``get_block_ids_with_load_errors`` so vLLM recomputes it: a cache miss, never a wrong
answer and never a crash.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvshelf.codec import FORMAT_VERSION, Entry
from kvshelf.config import KVShelfConfig
from kvshelf.engine import CacheEngine, Hold
from kvshelf.keys import Chunk, Namespace
from kvshelf.lookup import LookupServer, WorkerLookup, socket_path
from kvshelf.vllm import metric_names as m
from kvshelf.vllm.fp8 import STORAGE_NAME, Fp8Copier, Fp8Mover, scale_group
from kvshelf.vllm.groups import CacheGroups, GroupKind
from kvshelf.vllm.hybrid import PAYLOAD_DTYPE, ChunkCopy, HybridCache, HybridMover, StateCopy
from kvshelf.vllm.layout import BlockCopier, KVLayout, LayoutError, discover_layout
from kvshelf.vllm.metadata import KVShelfMetadata, LoadSpec
from kvshelf.vllm.metric_names import series
from kvshelf.vllm.movers import Completer, LoadItem, SaveItem, StepCopies, make_mover

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("kvshelf.worker")
# (layout signature, num_tokens -> payload dtype and shape, bytes of the largest entry)
_CacheFacts = tuple[str, Callable[[int], tuple[str, tuple[int, ...]]], int]


class WorkerSide:
    def __init__(
        self,
        vllm_config: VllmConfig,
        config: KVShelfConfig,
        num_blocks: int | None,
        groups: CacheGroups | None = None,
    ):
        self.vllm_config = vllm_config
        self.config = config
        self.num_blocks = num_blocks
        self.groups = groups
        self.hybrid: HybridCache | None = None
        self.rank, self.world = _rank_and_world(vllm_config)
        self.engine: CacheEngine | None = None
        self.copier: BlockCopier | Fp8Copier | None = None
        self._layer_index: dict[str, int] = {}
        self._server: LookupServer | None = None
        self._lookup: WorkerLookup | None = None
        self._load_errors: set[int] = set()
        self._finished_loads: set[str] = set()  # asynchronous loads (hybrid models)
        self._failed_loads: set[str] = set()
        self._saving: tuple[KVShelfMetadata, list[Entry]] | None = None
        self._loaded: list[str] = []  # requests whose holds go once their copies are done
        self._loaded_tokens: Counter[str] = Counter()  # by the tier the chunks came from
        self._failed_blocks = 0
        self._load_bytes = 0
        self._seconds: dict[str, list[float]] = {
            m.LOAD_SECONDS: [],
            m.SAVE_SECONDS: [],
        }
        self._seconds_lock = threading.Lock()
        self._reported: dict[str, int | float] = {}
        self._completer = Completer()

    # -- setup -------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        cache_config = self.vllm_config.cache_config
        num_blocks = self.num_blocks or cache_config.num_gpu_blocks
        backend = _backend_name(self.vllm_config, kv_caches)
        if self.groups is not None and self.groups.unsupported:
            return  # the connector said so at start; serving goes on uncached
        self.block_size = cache_config.block_size
        _allow_amx(kv_caches)
        if self.groups is None or self.groups.uniform:
            found = self._uniform_cache(kv_caches, num_blocks, backend)
        else:
            found = self._hybrid_cache(kv_caches, num_blocks, backend)
        if found is None:
            return
        signature, payload_spec, slot_bytes = found
        # MLA's latent is the same on every tensor-parallel rank: one namespace for all of
        # them, and only the first rank writes to disk and Redis (stored once, not per rank).
        mla = self.groups is not None and self.groups.groups[0].kind is GroupKind.MLA
        tp = self.vllm_config.parallel_config.tensor_parallel_size
        rank, world = (self.rank // tp, self.world // tp) if mla else (self.rank, self.world)
        namespace = Namespace(
            model=_model_id(self.vllm_config),
            layout=signature,
            tp_rank=rank,
            tp_size=world,
            chunk_size=self.config.chunk_size,
            format_version=FORMAT_VERSION,
        )
        self.engine = CacheEngine(
            self.config,
            namespace,
            payload_spec,
            host=self._host_memory(slot_bytes),
            write_lower=not mla or self.rank % tp == 0,
        )
        needs_state = self.hybrid is not None and self.groups.has_state
        # A hybrid model's blocks cannot be reported as failed loads (vLLM maps them to
        # requests by group 0 alone), so its hits are always read and verified first.
        prefetch = self.config.prefetch or self.hybrid is not None
        self._lookup = WorkerLookup(self.engine, prefetch, needs_state=needs_state)
        engine_id = self.vllm_config.kv_transfer_config.engine_id
        self._server = LookupServer(self._lookup, socket_path(engine_id, self.rank))
        logger.info(
            "rank %d/%d caching %s under namespace %s",
            self.rank,
            self.world,
            signature,
            self.engine.namespace_id.hex(),
        )

    def _uniform_cache(self, kv_caches, num_blocks: int, backend: str) -> _CacheFacts:
        """One layout for every layer: the copier and mover tuned for it."""
        layout, raws = discover_layout(kv_caches, num_blocks, self.block_size, backend)
        fp8 = self._fp8_copier(kv_caches, layout, raws)
        self.copier = fp8 or BlockCopier(layout, raws)
        self.mover = Fp8Mover(fp8) if fp8 is not None else make_mover(self.copier)
        self._on_cpu = self.copier.device.type == "cpu"
        self._layer_index = _layer_indices(kv_caches, layout)
        copier = self.copier

        def payload_spec(num_tokens: int) -> tuple[str, tuple[int, ...]]:
            return copier.entry_dtype, copier.entry_shape(num_tokens)

        chunk_bytes = self.copier.block_bytes * layout.num_blocks_for(self.config.chunk_size)
        return self.copier.signature(), payload_spec, chunk_bytes

    def _fp8_copier(self, kv_caches, layout: KVLayout, raws) -> Fp8Copier | None:
        """The fp8 copier when ``kv_storage_dtype`` asks for it and the cache is wider."""
        if self.config.kv_storage_dtype != STORAGE_NAME:
            return None
        if layout.dtype.startswith("float8") or layout.dtype == "uint8":
            logger.info("the KV cache is 8-bit already (%s): stored as it is", layout.dtype)
            return None
        first = next(iter(kv_caches.values()))
        try:
            return Fp8Copier(layout, raws, scale_group(first))
        except LayoutError as exc:
            logger.warning("cannot store this KV cache as fp8 (%s); storing it as it is", exc)
            return None

    def _hybrid_cache(self, kv_caches, num_blocks: int, backend: str) -> _CacheFacts | None:
        """Several groups: one layout each, byte payloads, recurrent states."""
        if self.config.kv_storage_dtype != "auto":
            logger.warning(
                "kv_storage_dtype %s applies to models with one KV cache group; this "
                "hybrid model's entries are stored as its cache holds them",
                self.config.kv_storage_dtype,
            )
        try:
            hybrid = HybridCache(self.groups, kv_caches, num_blocks, backend)
        except LayoutError as exc:
            logger.warning("kvshelf cannot copy this model's KV cache (%s); not caching", exc)
            return None
        self.hybrid = hybrid
        self.mover = HybridMover(hybrid)
        self._on_cpu = hybrid.device.type == "cpu"

        def payload_spec(num_tokens: int) -> tuple[str, tuple[int, ...]]:
            return PAYLOAD_DTYPE, hybrid.payload_shape(num_tokens)

        slot_bytes = max(
            hybrid.payload_shape(self.config.chunk_size)[0], hybrid.payload_shape(0)[0]
        )
        return hybrid.signature(), payload_spec, slot_bytes

    def _host_memory(self, slot_bytes: int):
        device = self.hybrid.device if self.hybrid is not None else self.copier.device
        if device.type != "cuda" or self.config.cpu_bytes == 0:
            return None  # plain heap memory
        from kvshelf.vllm.pinned import PinnedMemory

        logger.info(
            "pinning up to %.1f GB of host memory for the memory tier", self.config.cpu_bytes / 1e9
        )
        return PinnedMemory(slot_bytes, self.config.cpu_bytes)

    # -- loads -------------------------------------------------------------------
    def start_load_kv(self, meta: KVShelfMetadata, forward_context: object = None) -> None:
        if self.engine is None:
            return
        if meta.released:  # after the copies in flight that may read what they hold
            released = list(meta.released)
            self._completer.after(None, lambda ok: self._release(released))
        if not meta.loads:
            return
        if self.hybrid is not None:
            self._load_hybrid(meta)
            return
        items: list[LoadItem] = []
        for spec in meta.loads:
            try:
                items.extend(self._load_items(spec))
            except (RuntimeError, ValueError):  # never crash the engine: recompute
                logger.exception("load of request %s failed", spec.req_id)
                self._fail(spec, spec.start // self.block_size)
        try:
            self.mover.load(items, forward_context)
        except RuntimeError:
            logger.exception("KV copy into the cache failed")
            for spec in meta.loads:
                self._fail(spec, spec.start // self.block_size)
        # The copies are enqueued (CUDA) or done (CPU); the holds go when the step ends.
        self._loaded.extend(spec.req_id for spec in meta.loads)
        self._load_bytes += sum(len(item.block_ids) for item in items) * self.copier.block_bytes

    def _hold(self, spec: LoadSpec, chunks: list[Chunk]) -> Hold:
        """What is held for ``spec``'s request, reading those of ``chunks`` it lacks now."""
        hold = self.engine.hold(spec.req_id) or Hold(spec.req_id)
        missing = [c for c in chunks if hold.get(c) is None]
        if missing:  # prefetch off, or the hold expired: read now
            hold = self.engine.fetch(missing, spec.req_id)
        return hold

    def _load_items(self, spec: LoadSpec) -> list[LoadItem]:
        hold = self._hold(spec, spec.chunks)
        items = []
        for chunk in spec.chunks:
            first, last = self._block_span(chunk, spec)
            held = hold.get(chunk)
            if held is None:
                self._fail(spec, first)
                break
            payload = self.copier.payload_view(_buffer(held.entry), chunk.num_tokens)
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

    def _load_hybrid(self, meta: KVShelfMetadata) -> None:
        """Every group's blocks, and the recurrent state where the hit ends. These loads
        are asynchronous (the request waits for them outside the step's forward) and end
        in :meth:`take_finished_loads`. A hybrid model's hits were read and verified at
        lookup (prefetch), so a missing entry means its hold expired: it is read again;
        if that fails the request is reported failed and vLLM recomputes all of it."""
        chunks: list[ChunkCopy] = []
        states: list[StateCopy] = []
        token_groups = [g.index for g in self.groups.token_groups]
        for spec in meta.loads:
            wanted = spec.chunks + ([spec.state] if spec.state is not None else [])
            hold = self._hold(spec, wanted)
            found = [held for c in wanted if (held := hold.get(c)) is not None]
            slots = [slot for slot in spec.state_slots if slot is not None]
            if len(found) < len(wanted) or len(slots) < len(spec.state_slots):
                self._failed_blocks += math.ceil((spec.end - spec.start) / self.block_size)
                self._failed_loads.add(spec.req_id)
                logger.warning(
                    "request %s: cannot load its cached prefix; vLLM recomputes it", spec.req_id
                )
                continue
            self._finished_loads.add(spec.req_id)
            for chunk, held in zip(spec.chunks, found):
                first, last = self._block_span(chunk, spec)
                ids = [spec.block_ids[g][first:last] for g in token_groups]
                offset = first - chunk.start // self.block_size
                chunks.append(ChunkCopy(_buffer(held.entry), chunk.num_tokens, offset, ids))
                self._count_loaded(chunk, spec, held.tier)
            if spec.state is not None:
                states.append(StateCopy(_buffer(found[-1].entry), slots))
        try:
            self.mover.load((chunks, states))
        except RuntimeError:
            logger.exception("KV copy into the cache failed; vLLM recomputes those requests")
            self._failed_loads |= self._finished_loads
            self._finished_loads = set()
        self._loaded.extend(spec.req_id for spec in meta.loads)
        self._load_bytes += sum(c.num_blocks for c in chunks) * self.hybrid.block_bytes()

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
        index = self._layer_index.get(layer_name)
        if index is not None:
            self.mover.wait_layer(index)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_finished_loads(self) -> tuple[set[str], set[str]]:
        """Asynchronous loads done since the last call: (all of them, the failed ones)."""
        done, failed = self._finished_loads | self._failed_loads, self._failed_loads
        self._finished_loads, self._failed_loads = set(), set()
        return done, failed

    # -- saves -------------------------------------------------------------------
    def save_kv_layer(self, meta: KVShelfMetadata, layer_name: str) -> None:
        if self.engine is None or not meta.saves:
            return
        self._begin_saves(meta)
        index = self._layer_index.get(layer_name)
        if index is not None:
            self.mover.save_layer(index)

    def wait_for_save(self, meta: KVShelfMetadata) -> None:
        """End of the step: the copies stay in flight; what must follow them (saved
        entries to the engine, holds on loaded ones dropped) runs once they are done."""
        if self.engine is None:
            return
        started = time.perf_counter()
        try:
            if meta.saves:
                self._begin_saves(meta)
            done = self.mover.finish_step()
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
        if self.hybrid is not None:
            self._begin_hybrid_saves(meta)
            return
        entries: list[Entry] = []
        items: list[SaveItem] = []
        for spec in meta.saves:
            for chunk in spec.chunks:
                blocks = _block_range(chunk, self.block_size)
                if blocks.stop > len(spec.block_ids[0]):
                    logger.warning("request %s lost blocks before its save", spec.req_id)
                    break
                shape = self.copier.entry_shape(chunk.num_tokens)
                entry = self.engine.new_entry(
                    chunk, self.copier.entry_dtype, shape, fallback=self._on_cpu
                )
                if entry is None:
                    continue
                entries.append(entry)
                payload = self.copier.payload_view(_buffer(entry), chunk.num_tokens)
                items.append(SaveItem(payload, spec.block_ids[0][blocks.start : blocks.stop]))
        self._saving = (meta, entries)
        self.mover.begin_saves(items)

    def _begin_hybrid_saves(self, meta: KVShelfMetadata) -> None:
        entries: list[Entry] = []
        chunks: list[ChunkCopy] = []
        states: list[StateCopy] = []
        token_groups = [g.index for g in self.groups.token_groups]
        for spec in meta.saves:
            for chunk in spec.chunks:
                blocks = _block_range(chunk, self.block_size)
                if any(blocks.stop > len(spec.block_ids[g]) for g in token_groups):
                    logger.warning("request %s lost blocks before its save", spec.req_id)
                    break
                entry = self._new_entry(chunk)
                if entry is not None:
                    entries.append(entry)
                    ids = [spec.block_ids[g][blocks.start : blocks.stop] for g in token_groups]
                    chunks.append(ChunkCopy(_buffer(entry), chunk.num_tokens, 0, ids))
            for state, slots in spec.states:
                entry = self._new_entry(state)
                if entry is not None:
                    entries.append(entry)
                    states.append(StateCopy(_buffer(entry), slots))
        self._saving = (meta, entries)
        self.mover.begin_saves((chunks, states))

    def _new_entry(self, chunk: Chunk) -> Entry | None:
        shape = self.hybrid.payload_shape(chunk.num_tokens)
        return self.engine.new_entry(chunk, PAYLOAD_DTYPE, shape, fallback=self._on_cpu)

    def _drop_saves(self) -> None:
        if self._saving is not None:
            for entry in self._saving[1]:
                self.engine.discard(entry)
            self._saving = None

    # -- metrics -----------------------------------------------------------------
    def stats(self) -> dict | None:
        """Counter increments since the last call, changed gauges, new observations."""
        if self.engine is None:
            return None
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
        if self._server is not None:
            self._server.close()
        if self._lookup is not None:
            self._lookup.close()
        if self.engine is not None:
            self.engine.close()


def _buffer(entry: Entry) -> torch.Tensor | memoryview:
    """The pinned tensor behind an entry when there is one, else its memoryview."""
    handle = entry.owner.handle if entry.owner is not None else None
    return handle if isinstance(handle, torch.Tensor) else entry.payload


def _allow_amx(kv_caches: dict[str, torch.Tensor]) -> None:
    """On a CPU, ask Linux for AMX tile state now. vLLM-CPU's bf16 attention kernel uses
    AMX, and a worker whose first attention reads KV kvshelf loaded (a hit right after a
    restart) otherwise dies with an illegal instruction."""
    first = next(iter(kv_caches.values()), None)
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if isinstance(first, torch.Tensor) and first.device.type == "cpu" and init is not None:
        init()


def _block_range(chunk: Chunk, block_size: int) -> range:
    return range(chunk.start // block_size, math.ceil(chunk.end / block_size))


def _layer_indices(kv_caches: dict[str, torch.Tensor], layout: KVLayout) -> dict[str, int]:
    """Every layer name -> index of its distinct tensor (shared tensors share an index)."""
    by_ptr = {kv_caches[name].data_ptr(): i for i, name in enumerate(layout.layer_names)}
    return {name: by_ptr[t.data_ptr()] for name, t in kv_caches.items() if t.data_ptr() in by_ptr}


def _rank_and_world(vllm_config: VllmConfig) -> tuple[int, int]:
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group

    parallel = vllm_config.parallel_config
    world = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    try:
        tp_rank = get_tp_group().rank_in_group
        pp_rank = get_pp_group().rank_in_group
    except AssertionError:  # groups not initialised (single process)
        return 0, world
    return pp_rank * parallel.tensor_parallel_size + tp_rank, world


def _model_id(vllm_config: VllmConfig) -> str:
    model = vllm_config.model_config
    return "|".join([model.model, model.revision or "", str(model.quantization or "")])


def _backend_name(vllm_config: VllmConfig, kv_caches: dict[str, torch.Tensor]) -> str:
    layers = vllm_config.compilation_config.static_forward_context
    for name in kv_caches:
        backend = getattr(layers.get(name), "attn_backend", None)
        if backend is not None:
            return backend.get_name()
    return "unknown"
