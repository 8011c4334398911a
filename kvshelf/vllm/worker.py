"""The connector's worker side: vLLM's worker hooks, and what ``register_kv_caches`` sets up.

On ``register_kv_caches`` it discovers the cache layout, opens the engine under a
namespace that includes that layout and this rank, starts answering the scheduler's
lookups, and from then on hands every hook to :class:`~kvshelf.vllm.transfers.Transfers`.
Before that (or for a cache kvshelf cannot copy) every hook does nothing
(:class:`Unregistered`): serving goes on uncached.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

import torch

from kvshelf.codec import FORMAT_VERSION
from kvshelf.config import KVShelfConfig
from kvshelf.engine import CacheEngine, PayloadSpec
from kvshelf.keys import Namespace
from kvshelf.lookup import LookupServer, WorkerLookup, socket_path
from kvshelf.storage.base import HostMemory
from kvshelf.vllm.fp8 import STORAGE_NAME, Fp8Copier, Fp8Mover, scale_group
from kvshelf.vllm.groups import CacheGroups, GroupKind
from kvshelf.vllm.hybrid import PAYLOAD_DTYPE, HybridCache, HybridMover
from kvshelf.vllm.layout import BlockCopier, KVLayout, LayoutError, discover_layout
from kvshelf.vllm.metadata import KVShelfMetadata
from kvshelf.vllm.movers import CudaMover, StepMover, make_mover
from kvshelf.vllm.transfers import CacheAccess, OneLayout, SeveralGroups, Transfers

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("kvshelf.worker")


class _CacheFacts(NamedTuple):
    """What registration found out about vLLM's KV cache."""

    access: CacheAccess
    signature: str  # the layout, for the namespace
    payload_spec: PayloadSpec  # num_tokens -> the payload's dtype and shape
    slot_bytes: int  # bytes of the largest entry (a pinned slot's size)
    device: torch.device


class Unregistered:
    """The worker hooks before ``register_kv_caches`` (or for a cache kvshelf cannot
    copy): nothing to load, save or report."""

    def start_load_kv(self, meta: KVShelfMetadata, forward_context: object = None) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, meta: KVShelfMetadata, layer_name: str) -> None:
        return

    def wait_for_save(self, meta: KVShelfMetadata) -> None:
        return

    def take_load_errors(self) -> set[int]:
        return set()

    def take_finished_loads(self) -> tuple[set[str], set[str]]:
        return set(), set()

    def stats(self) -> dict | None:
        return None

    def shutdown(self) -> None:
        return


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
        self.rank, self.world = _rank_and_world(vllm_config)
        self.steps: Transfers | Unregistered = Unregistered()

    # -- setup -------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.groups is not None and self.groups.unsupported:
            return  # the connector said so at start; serving goes on uncached
        cache_config = self.vllm_config.cache_config
        num_blocks = self.num_blocks or cache_config.num_gpu_blocks
        assert num_blocks is not None, "vLLM registers its KV caches once they are sized"
        backend = _backend_name(self.vllm_config, kv_caches)
        block_size = cache_config.block_size
        _allow_amx(kv_caches)
        found: _CacheFacts | None
        if self.groups is None or self.groups.uniform:
            found = self._uniform_cache(kv_caches, num_blocks, block_size, backend)
        else:
            found = self._hybrid_cache(self.groups, kv_caches, num_blocks, backend)
        if found is None:
            return
        engine = self._open_engine(found)
        several = isinstance(found.access, SeveralGroups)
        needs_state = several and self.groups is not None and self.groups.has_state
        # A hybrid model's blocks cannot be reported as failed loads (vLLM maps them to
        # requests by group 0 alone), so its hits are always read and verified first.
        lookup = WorkerLookup(engine, self.config.prefetch or several, needs_state=needs_state)
        server = LookupServer(lookup, socket_path(_engine_id(self.vllm_config), self.rank))
        self.steps = Transfers(engine, lookup, server, found.access, block_size, self.rank)
        logger.info(
            "rank %d/%d caching %s under namespace %s",
            self.rank,
            self.world,
            found.signature,
            engine.namespace_id.hex(),
        )

    def _open_engine(self, found: _CacheFacts) -> CacheEngine:
        """The engine for this cache's namespace and this rank."""
        # MLA's latent is the same on every tensor-parallel rank: one namespace for all of
        # them, and only the first rank writes to disk and Redis (stored once, not per rank).
        mla = self.groups is not None and self.groups.groups[0].kind is GroupKind.MLA
        tp = self.vllm_config.parallel_config.tensor_parallel_size
        rank, world = (self.rank // tp, self.world // tp) if mla else (self.rank, self.world)
        namespace = Namespace(
            model=_model_id(self.vllm_config),
            layout=found.signature,
            tp_rank=rank,
            tp_size=world,
            chunk_size=self.config.chunk_size,
            format_version=FORMAT_VERSION,
        )
        return CacheEngine(
            self.config,
            namespace,
            found.payload_spec,
            host=self._host_memory(found.device, found.slot_bytes),
            write_lower=not mla or self.rank % tp == 0,
        )

    def _uniform_cache(
        self, kv_caches: dict[str, torch.Tensor], num_blocks: int, block_size: int, backend: str
    ) -> _CacheFacts:
        """One layout for every layer: the copier and mover tuned for it."""
        layout, raws = discover_layout(kv_caches, num_blocks, block_size, backend)
        fp8 = self._fp8_copier(kv_caches, layout, raws)
        copier: BlockCopier | Fp8Copier
        mover: StepMover | CudaMover
        if fp8 is not None:
            copier, mover = fp8, Fp8Mover(fp8)
        else:
            plain = BlockCopier(layout, raws)
            copier, mover = plain, make_mover(plain)
        access = OneLayout(copier, mover, _layer_indices(kv_caches, layout))

        def payload_spec(num_tokens: int) -> tuple[str, tuple[int, ...]]:
            return copier.entry_dtype, copier.entry_shape(num_tokens)

        chunk_bytes = copier.block_bytes * layout.num_blocks_for(self.config.chunk_size)
        return _CacheFacts(access, copier.signature(), payload_spec, chunk_bytes, copier.device)

    def _fp8_copier(
        self, kv_caches: dict[str, torch.Tensor], layout: KVLayout, raws: list[torch.Tensor]
    ) -> Fp8Copier | None:
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

    def _hybrid_cache(
        self,
        groups: CacheGroups,
        kv_caches: dict[str, torch.Tensor],
        num_blocks: int,
        backend: str,
    ) -> _CacheFacts | None:
        """Several groups: one layout each, byte payloads, recurrent states."""
        if self.config.kv_storage_dtype != "auto":
            logger.warning(
                "kv_storage_dtype %s applies to models with one KV cache group; this "
                "hybrid model's entries are stored as its cache holds them",
                self.config.kv_storage_dtype,
            )
        try:
            hybrid = HybridCache(groups, kv_caches, num_blocks, backend)
        except LayoutError as exc:
            logger.warning("kvshelf cannot copy this model's KV cache (%s); not caching", exc)
            return None
        access = SeveralGroups(hybrid, HybridMover(hybrid), groups)

        def payload_spec(num_tokens: int) -> tuple[str, tuple[int, ...]]:
            return PAYLOAD_DTYPE, hybrid.payload_shape(num_tokens)

        slot_bytes = max(
            hybrid.payload_shape(self.config.chunk_size)[0], hybrid.payload_shape(0)[0]
        )
        return _CacheFacts(access, hybrid.signature(), payload_spec, slot_bytes, hybrid.device)

    def _host_memory(self, device: torch.device, slot_bytes: int) -> HostMemory | None:
        if device.type != "cuda" or self.config.cpu_bytes == 0:
            return None  # plain heap memory
        from kvshelf.vllm.pinned import PinnedMemory

        logger.info(
            "pinning up to %.1f GB of host memory for the memory tier", self.config.cpu_bytes / 1e9
        )
        return PinnedMemory(slot_bytes, self.config.cpu_bytes)

    # -- the hooks: Transfers once registered, else Unregistered -----------------
    def start_load_kv(self, meta: KVShelfMetadata, forward_context: object = None) -> None:
        self.steps.start_load_kv(meta, forward_context)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.steps.wait_for_layer_load(layer_name)

    def save_kv_layer(self, meta: KVShelfMetadata, layer_name: str) -> None:
        self.steps.save_kv_layer(meta, layer_name)

    def wait_for_save(self, meta: KVShelfMetadata) -> None:
        self.steps.wait_for_save(meta)

    def take_load_errors(self) -> set[int]:
        return self.steps.take_load_errors()

    def take_finished_loads(self) -> tuple[set[str], set[str]]:
        return self.steps.take_finished_loads()

    def stats(self) -> dict | None:
        return self.steps.stats()

    def shutdown(self) -> None:
        self.steps.shutdown()


def _allow_amx(kv_caches: dict[str, torch.Tensor]) -> None:
    """On a CPU, ask Linux for AMX tile state now. vLLM-CPU's bf16 attention kernel uses
    AMX, and a worker whose first attention reads KV kvshelf loaded (a hit right after a
    restart) otherwise dies with an illegal instruction."""
    first = next(iter(kv_caches.values()), None)
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if isinstance(first, torch.Tensor) and first.device.type == "cpu" and init is not None:
        init()


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


def _engine_id(vllm_config: VllmConfig) -> str:
    transfer = vllm_config.kv_transfer_config
    assert transfer is not None, "a KV connector runs only with a kv_transfer_config"
    return str(transfer.engine_id)


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
