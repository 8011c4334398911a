"""KVShelfECConnector: vLLM's encoder-cache connector interface, delegating to kvshelf.

vLLM runs a multimodal model's vision / audio encoder for every item its own (in-memory)
encoder cache does not hold. This connector keeps encoder outputs in kvshelf's tiers under
the item's content hash (:mod:`kvshelf.encoder_cache`), so the same image after another
prompt, after a restart or on another instance skips the encoder.

Scheduler side: :class:`~kvshelf.encoder_cache.EncoderBook` looks items up on every worker
before vLLM schedules the request (``ensure_cache_available``), answers
``has_cache_item`` from what the workers hold, and sends each step's loads, saves and
releases as metadata. Worker side: a :class:`~kvshelf.engine.CacheEngine` under an
encoder namespace, serving lookups; each step it copies held entries into vLLM's encoder
cache and new encoder outputs out of it.

Settings: ``ec_connector_extra_config`` over, when ``KVShelfConnector`` runs too, its
``kv_connector_extra_config`` (one config). In a worker process the two engines then
share the tiers themselves (:func:`kvshelf.storage.build.open_tiers`): one memory tier
and budget, one disk index, one Redis client, each under its own namespace. vLLM's
``/metrics`` shows those tiers' figures once, from ``KVShelfConnector``; this connector
exports only its ``kvshelf_encoder_*`` counters, where vLLM has EC connector metrics.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
    ECConnectorWorkerMetadata,
)

from kvshelf.config import KVShelfConfig, load_config
from kvshelf.encoder_cache import (
    ENCODER_CHUNK_SIZE,
    EncoderBook,
    EncoderItem,
    EncoderLookup,
    EncoderStep,
    encoder_namespace,
)
from kvshelf.engine import CacheEngine
from kvshelf.keys import UncacheableRequest
from kvshelf.lookup import LookupClient, LookupServer, socket_path
from kvshelf.vllm import metric_names as m
from kvshelf.vllm.logs import configure_logging
from kvshelf.vllm.metric_names import series

try:
    from kvshelf.vllm.ec_metrics import KVShelfECPromMetrics, KVShelfECStats
except ImportError:  # vLLM without EC connector metrics (0.26): the counters go unexported
    KVShelfECPromMetrics = KVShelfECStats = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from vllm.config import ECTransferConfig, VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import ECConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("kvshelf.encoder")

KV_CONNECTOR_NAME = "KVShelfConnector"


def encoder_config(vllm_config: VllmConfig) -> KVShelfConfig:
    """``ec_connector_extra_config`` over KVShelfConnector's extra config, if it runs."""
    merged: dict[str, Any] = {}
    kv = vllm_config.kv_transfer_config
    if kv is not None and kv.kv_connector == KV_CONNECTOR_NAME:
        merged.update(kv.kv_connector_extra_config or {})
    merged.update(_ec_transfer(vllm_config).ec_connector_extra_config or {})
    config = load_config(merged)
    return config.model_copy(update={"chunk_size": ENCODER_CHUNK_SIZE})


@dataclass
class KVShelfECMetadata(ECConnectorMetadata):
    step: EncoderStep = field(default_factory=EncoderStep)


@dataclass
class KVShelfECWorkerMetadata(ECConnectorWorkerMetadata):
    counts: dict[str, int] = field(default_factory=dict)  # "counter|modality" -> increment

    def aggregate(self, other: ECConnectorWorkerMetadata) -> KVShelfECWorkerMetadata:
        counts = Counter(self.counts)
        counts.update(getattr(other, "counts", {}))
        return KVShelfECWorkerMetadata(dict(counts))


class KVShelfECConnector(ECConnectorBase):
    """Use with ``"ec_role": "ec_both"`` (store and load); ``ec_consumer`` only loads."""

    def __init__(self, vllm_config: VllmConfig, role: ECConnectorRole):
        super().__init__(vllm_config=vllm_config, role=role)
        config = encoder_config(vllm_config)
        configure_logging(config.log_level)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == ECConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(vllm_config, config, self.is_consumer, self.is_producer)
        else:
            self._worker = WorkerSide(vllm_config, config)

    # -- worker side -------------------------------------------------------------
    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        self._worker_side().load(self._metadata().step, encoder_cache)

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs) -> None:
        meta = self._connector_metadata
        if self.is_producer and isinstance(meta, KVShelfECMetadata):
            self._worker_side().save(meta.step, encoder_cache, mm_hash)

    def build_connector_worker_meta(self) -> KVShelfECWorkerMetadata | None:
        counts = self._worker_side().take_counts()
        return KVShelfECWorkerMetadata(counts) if counts else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    # -- scheduler side ----------------------------------------------------------
    def ensure_cache_available(self, request: Request, num_computed_tokens: int) -> bool:
        return self._scheduler_side().prepare(request, num_computed_tokens)

    def has_cache_item(self, identifier: str) -> bool:
        return self._scheduler_side().book.has(identifier)

    def update_state_after_alloc(self, request: Request, index: int) -> None:
        self._scheduler_side().allocated(request, index)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVShelfECMetadata:
        freed = scheduler_output.free_encoder_mm_hashes or ()
        return KVShelfECMetadata(self._scheduler_side().book.step(freed))

    def update_connector_output(self, connector_output: ECConnectorOutput) -> None:
        meta = connector_output.ec_connector_worker_meta
        if isinstance(meta, KVShelfECWorkerMetadata):
            self._scheduler_side().add_counts(meta.counts)

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        self._scheduler_side().book.finished(request.request_id)
        return False, None

    # -- metrics -----------------------------------------------------------------
    def get_ec_connector_stats(self) -> KVShelfECStats | None:
        if self._scheduler is None or KVShelfECStats is None:
            return None  # workers report through their metadata (every runner sends it)
        counts = self._scheduler.take_counts()
        return KVShelfECStats(data={"counters": counts}) if counts else None

    # Called only by a vLLM that has EC connector metrics, hence KVShelfECStats.
    @classmethod
    def build_ec_connector_stats(cls, data: dict[str, Any] | None = None) -> KVShelfECStats:
        return KVShelfECStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls, vllm_config, metric_types, labelnames, per_engine_labelvalues
    ) -> KVShelfECPromMetrics:
        return KVShelfECPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- role checks -------------------------------------------------------------
    def _worker_side(self) -> WorkerSide:
        assert self._worker is not None, "worker hook called on the scheduler connector"
        return self._worker

    def _scheduler_side(self) -> SchedulerSide:
        assert self._scheduler is not None, "scheduler hook called on the worker connector"
        return self._scheduler

    def _metadata(self) -> KVShelfECMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVShelfECMetadata)
        return meta


class SchedulerSide:
    """Turns vLLM's requests into :class:`EncoderItem`s for the :class:`EncoderBook`."""

    def __init__(self, vllm_config: VllmConfig, config: KVShelfConfig, load: bool, save: bool):
        self.config = config
        model = vllm_config.model_config
        self.dtype = codec_dtype(model.dtype)
        self.widths = dict(_ec_transfer(vllm_config).mm_encoder_output_widths)
        self.default_width = model.get_inputs_embeds_size()
        self.cacheable = not model.is_encoder_decoder and _media_ids_are_hashes(vllm_config)
        tp = vllm_config.parallel_config.tensor_parallel_size
        self._clients = [
            LookupClient(encoder_socket(vllm_config, rank), config.lookup_timeout_s)
            for rank in range(tp)  # the first pipeline stage: the ranks that run the encoder
        ]
        self.book = EncoderBook(
            self._clients, config.lookup_wait_s, config.hold_timeout_s / 2, load, save
        )
        self._counts: Counter[str] = Counter()
        self._warned: set[str] = set()

    def prepare(self, request: Request, num_computed_tokens: int) -> bool:
        features = request.mm_features or []
        needed = [  # items not covered by the prefix already computed (or loaded as KV)
            i
            for i, f in enumerate(features)
            if f.mm_position.offset + f.mm_position.length > num_computed_tokens
        ]
        items = {} if self.book.knows(request.request_id) else self._items(request)
        return self.book.prepare(request.request_id, items, needed)

    def allocated(self, request: Request, index: int) -> None:
        feature = request.mm_features[index]
        outcome = self.book.allocated(request.request_id, index, feature.identifier)
        if not self.config.log_requests or outcome == "uncacheable":
            return
        num_embeds = feature.mm_position.get_num_embeds()
        if outcome == "hit":
            what = "kvshelf encoder hit, loading"
        elif outcome == "unreadable":
            what = "kvshelf encoder entry unreadable (corrupt or unverifiable), encoding"
        else:
            what = f"kvshelf encoder {outcome}, encoding"
        logger.info(
            "Reqid: %s, %s %d (%s): %s %d embeddings",
            request.request_id,
            feature.modality,
            index,
            feature.identifier[:16],
            what,
            num_embeds,
        )

    def add_counts(self, counts: dict[str, int]) -> None:
        self._counts.update(counts)

    def take_counts(self) -> dict[str, int]:
        for (name, modality), n in self.book.counts.items():
            self._counts[series(m.ENCODER_EVENTS[name], modality)] += n
        self.book.counts.clear()
        counts, self._counts = {k: v for k, v in self._counts.items() if v}, Counter()
        return counts

    def shutdown(self) -> None:
        for client in self._clients:
            client.close()

    def _items(self, request: Request) -> dict[int, EncoderItem | None]:
        items: dict[int, EncoderItem | None] = {}
        for index, feature in enumerate(request.mm_features or []):
            items[index] = None
            if not self.cacheable:
                self._warn_once(
                    "request-scoped",
                    "encoder outputs are not cached: with vLLM's multimodal processor cache "
                    "(--mm-processor-cache-gb 0) and prefix caching both off, vLLM names media "
                    "per request instead of by content. Turn either on.",
                )
                self._counts[series(m.ENCODER_UNCACHEABLE, feature.modality)] += 1
                continue
            width = self.widths.get(feature.modality, self.default_width)
            try:
                items[index] = EncoderItem(
                    feature.identifier,
                    feature.modality,
                    int(feature.mm_position.get_num_embeds()),
                    int(width),
                    self.dtype,
                    request.cache_salt or "",
                )
            except UncacheableRequest as exc:
                self._warn_once(feature.modality, "%s items not cached: %s", feature.modality, exc)
                self._counts[series(m.ENCODER_UNCACHEABLE, feature.modality)] += 1
        return items

    def _warn_once(self, reason: str, message: str, *args: object) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning(message, *args)


class WorkerSide:
    """Holds the engine; copies entries into vLLM's encoder cache and outputs out of it."""

    def __init__(self, vllm_config: VllmConfig, config: KVShelfConfig):
        tp_rank, pp_rank = _ranks()
        tp = vllm_config.parallel_config.tensor_parallel_size
        self.rank = pp_rank * tp + tp_rank
        self.engine = CacheEngine(
            config,
            encoder_namespace(_model_id(vllm_config), _encoder_settings(vllm_config), tp),
            write_lower=tp_rank == 0,  # every rank holds the same output: stored once
        )
        self.lookup = EncoderLookup(self.engine)
        self._server: LookupServer | None = None
        if pp_rank == 0:  # only the first pipeline stage runs the encoder
            self._server = LookupServer(self.lookup, encoder_socket(vllm_config, self.rank))
        self._report = tp_rank == 0
        self.device = _device()
        self._counts: Counter[str] = Counter()
        self._warned: set[str] = set()
        logger.info(
            "rank %d caching encoder outputs under namespace %s",
            self.rank,
            self.engine.namespace_id.hex(),
        )

    def load(self, step: EncoderStep, encoder_cache: dict[str, torch.Tensor]) -> None:
        """Copy this step's held entries into vLLM's encoder cache, then let them go."""
        for owner in step.loads:
            item = EncoderItem.from_owner(owner)
            entry = self.lookup.take(owner)
            if entry is None:  # vLLM will stop with "Encoder cache miss": say why first
                logger.error(
                    "encoder output of %s %s was verified at lookup but cannot be read now",
                    item.modality,
                    item.identifier,
                )
                continue
            if item.identifier not in encoder_cache:
                raw = torch.frombuffer(entry.payload, dtype=torch.uint8)
                tensor = raw.view(getattr(torch, entry.dtype)).view(entry.shape)
                with _syncs_allowed():  # the copy must end before the hold goes
                    encoder_cache[item.identifier] = tensor.to(self.device, copy=True)
            self.lookup.release(owner)
        for owner in step.releases:
            self.lookup.release(owner)

    def save(self, step: EncoderStep, encoder_cache: dict[str, torch.Tensor], mm_hash: str) -> None:
        """Store an output the encoder just computed, if the scheduler asked for it."""
        owner = step.saves.get(mm_hash)
        output = encoder_cache.get(mm_hash)
        if owner is None or not isinstance(output, torch.Tensor):
            return
        item = EncoderItem.from_owner(owner)
        got = (codec_dtype(output.dtype), tuple(output.shape))
        if got != (item.dtype, item.shape):
            self._warn_once(
                item.modality,
                "%s encoder outputs are %s%s, expected %s%s: not cached",
                item.modality,
                got[0],
                list(got[1]),
                item.dtype,
                list(item.shape),
            )
            self._count("uncacheable", item.modality)
            return
        entry = self.engine.new_entry(item.chunk(), item.dtype, item.shape)
        assert entry is not None  # new_entry falls back to ordinary memory
        raw = torch.frombuffer(entry.payload, dtype=torch.uint8)
        with _syncs_allowed():  # waits for the copy out of GPU memory
            raw.view(output.dtype).view(output.shape).copy_(output.detach())
        self.engine.save([entry])
        self._count("stored", item.modality)

    def take_counts(self) -> dict[str, int]:
        counts, self._counts = dict(self._counts), Counter()
        return counts if self._report else {}

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self.lookup.close()
        self.engine.close()

    def _count(self, name: str, modality: str) -> None:
        self._counts[series(m.ENCODER_EVENTS[name], modality)] += 1

    def _warn_once(self, reason: str, message: str, *args: object) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning(message, *args)


def encoder_socket(vllm_config: VllmConfig, rank: int) -> str:
    """Where a worker answers encoder lookups, apart from the KV connector's socket. vLLM
    gives every data-parallel engine the same EC engine id: the DP rank tells them apart."""
    engine_id = _ec_transfer(vllm_config).engine_id
    dp_rank = vllm_config.parallel_config.data_parallel_rank
    return socket_path(f"ec-{engine_id}-dp{dp_rank}", rank)


def _ec_transfer(vllm_config: VllmConfig) -> ECTransferConfig:
    transfer = vllm_config.ec_transfer_config
    assert transfer is not None, "an EC connector runs only with an ec_transfer_config"
    return transfer


def codec_dtype(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _device() -> torch.device:
    """Where vLLM keeps encoder outputs in this worker."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike():
        return torch.device(current_platform.device_type, current_platform.current_device())
    return torch.device(current_platform.device_type or "cpu")


def _syncs_allowed():
    """vLLM's GPU-sync debugger must not flag the copies a load or save waits for."""
    try:
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed
    except ImportError:  # vLLM without the debugger
        return contextlib.nullcontext()
    return gpu_sync_allowed()


def _encoder_settings(vllm_config: VllmConfig) -> dict[str, Any]:
    """What changes an item's encoder output besides the model and the item's content."""
    model = vllm_config.model_config
    mm = model.multimodal_config
    hf_overrides = model.hf_overrides if isinstance(model.hf_overrides, dict) else {}
    settings: dict[str, Any] = {"dtype": codec_dtype(model.dtype), "hf_overrides": hf_overrides}
    if mm is not None:
        for name in (
            "mm_processor_kwargs",
            "media_io_kwargs",
            "mm_device_do_normalize",
            "mm_encoder_tp_mode",
            "mm_encoder_attn_backend",
            "mm_encoder_attn_dtype",
        ):
            settings[name] = getattr(mm, name, None)
    return settings


def _model_id(vllm_config: VllmConfig) -> str:
    model = vllm_config.model_config
    return "|".join([model.model, model.revision or "", str(model.quantization or "")])


def _ranks() -> tuple[int, int]:
    """This worker's tensor- and pipeline-parallel ranks."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group

    try:
        return get_tp_group().rank_in_group, get_pp_group().rank_in_group
    except AssertionError:  # groups not initialised (single process)
        return 0, 0


def _media_ids_are_hashes(vllm_config: VllmConfig) -> bool:
    """False when vLLM names media per request (its processor cache and prefix caching
    both off): then even 64-hex identifiers hash a per-request name, not the content."""
    mm = vllm_config.model_config.multimodal_config
    return not (
        mm is not None
        and getattr(mm, "mm_processor_cache_gb", None) == 0
        and not vllm_config.cache_config.enable_prefix_caching
    )
