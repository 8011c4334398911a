"""KVShelfConnector: vLLM's KV connector interface, delegating to kvshelf.

Each hook checks its role and delegates to the scheduler side
(:mod:`kvshelf.vllm.scheduler`) or the worker side (:mod:`kvshelf.vllm.worker`). The
per-step hooks are named ranges in vLLM's torch profiler traces.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import record_function
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

try:  # vLLM 0.27+: failed asynchronous loads are reported apart
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
except ImportError:  # earlier: get_finished alone
    KVConnectorTransferResults = None  # type: ignore[assignment,misc]

from kvshelf.config import ConfigError, KVShelfConfig, load_config
from kvshelf.vllm.groups import describe_groups
from kvshelf.vllm.logs import configure_logging
from kvshelf.vllm.metadata import KVShelfMetadata
from kvshelf.vllm.metrics import KVShelfPromMetrics, KVShelfStats
from kvshelf.vllm.scheduler import SchedulerSide
from kvshelf.vllm.worker import WorkerSide

logger = logging.getLogger("kvshelf.connector")

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


class KVShelfConnector(KVConnectorBase_V1, SupportsHMA):
    """Declares ``SupportsHMA``: vLLM keeps its hybrid KV cache manager on, so hybrid
    models (sliding window, Mamba / linear attention) start and are cached per group."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ):
        super().__init__(
            vllm_config=vllm_config,
            role=role,
            # vLLM 0.32's base types it as required; kvshelf's hooks accept None as
            # older vLLMs' signatures did, and the base stores it as given.
            kv_cache_config=kv_cache_config,  # type: ignore[arg-type]
        )
        config = load_config(self._kv_transfer_config.kv_connector_extra_config)
        configure_logging(config.log_level)
        groups = describe_groups(kv_cache_config)
        config = fit_chunk_size(config, vllm_config.cache_config.block_size, role)
        if groups.unsupported and role == KVConnectorRole.SCHEDULER:
            logger.warning(
                "kvshelf cannot cache this model's KV cache yet (%s); serving goes on uncached",
                groups.unsupported,
            )
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._stats_broken = False
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(
                vllm_config, config, self._kv_transfer_config.kv_role, groups
            )
        else:
            num_blocks = getattr(kv_cache_config, "num_blocks", None)
            self._worker = WorkerSide(vllm_config, config, num_blocks, groups)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is only a future miss

    # -- worker side -------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker_side().register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        with record_function("kvshelf.start_load_kv"):
            self._worker_side().start_load_kv(self._metadata(), forward_context)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker_side().wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs):
        if self.has_connector_metadata():
            self._worker_side().save_kv_layer(self._metadata(), layer_name)

    def wait_for_save(self) -> None:
        with record_function("kvshelf.wait_for_save"):
            self._worker_side().wait_for_save(self._metadata())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker_side().take_load_errors()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done, failed = self._worker_side().take_finished_loads()
        for req_id in failed:  # a vLLM without get_transfer_results cannot be told
            logger.error("request %s: its KV load failed", req_id)
        return None, done or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Asynchronous loads (models with several KV cache groups): finished ones, and
        the failed ones among them, which vLLM recomputes from the start."""
        done, failed = self._worker_side().take_finished_loads()
        return KVConnectorTransferResults(finished_recving=done, failed_recving=failed)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # -- scheduler side ----------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        with record_function("kvshelf.lookup"):
            return self._scheduler_side().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._scheduler_side().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        with record_function("kvshelf.build_connector_meta"):
            return self._scheduler_side().build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Any]:
        return self._scheduler_side().request_finished(request)

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, Any]:
        return self._scheduler_side().request_finished(request)

    # -- metrics (both sides) ----------------------------------------------------
    def get_kv_connector_stats(self) -> KVShelfStats | None:
        if self._stats_broken:
            return None
        side = self._worker if self._worker is not None else self._scheduler
        if side is None:
            return None
        try:
            data = side.stats()
        except (TypeError, ValueError, KeyError, AttributeError):  # must not stop serving
            logger.exception("kvshelf metrics failed; reporting none from now on")
            self._stats_broken = True
            return None
        return KVShelfStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVShelfStats:
        return KVShelfStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls, vllm_config, metric_types, labelnames, per_engine_labelvalues
    ) -> KVShelfPromMetrics:
        return KVShelfPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- role checks -------------------------------------------------------------
    def _worker_side(self) -> WorkerSide:
        assert self._worker is not None, "worker hook called on the scheduler connector"
        return self._worker

    def _scheduler_side(self) -> SchedulerSide:
        assert self._scheduler is not None, "scheduler hook called on the worker connector"
        return self._scheduler

    def _metadata(self) -> KVShelfMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVShelfMetadata)
        return meta


def fit_chunk_size(config: KVShelfConfig, block_size: int, role: KVConnectorRole) -> KVShelfConfig:
    """A chunk must be whole blocks. Hybrid models get blocks of vLLM's choosing (page
    sizes matched to the recurrent state, e.g. 384 or 528 tokens), so the default chunk
    size follows them; a chunk_size the user set is an error to fix instead."""
    if not block_size or config.chunk_size % block_size == 0:
        return config
    fitted = max(1, round(config.chunk_size / block_size)) * block_size
    if "chunk_size" in config.model_fields_set:
        raise ConfigError(
            f"chunk_size {config.chunk_size} must be a multiple of vLLM's block size "
            f"{block_size}; use {fitted} instead"
        )
    if role == KVConnectorRole.SCHEDULER:
        logger.info(
            "chunk_size %d -> %d: whole blocks of %d tokens", config.chunk_size, fitted, block_size
        )
    return config.model_copy(update={"chunk_size": fitted})
