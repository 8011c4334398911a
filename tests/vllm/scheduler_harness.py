"""In-process drivers of the connector's bookkeeping, in the manner of vLLM's own unit
tests for its offloading connector: vLLM's real request, scheduler-output and block
objects, hand-built step by step as vLLM's scheduler would build them, and no server.

- :class:`Setup`: the scheduler side and, behind its lookup address, a real engine with
  a stand-in worker that stores whatever a step's saves name (any KV cache groups).
- :class:`Serving`: a scheduler-role and a worker-role :class:`KVShelfConnector` over a
  CPU KV cache of one full-attention group, and a fake forward that writes each computed
  token's KV, so what a load writes can be compared with what was computed.
"""

from __future__ import annotations

import itertools
import pickle
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from vllm import SamplingParams
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request

from kvshelf.codec import FORMAT_VERSION
from kvshelf.config import load_config
from kvshelf.engine import CacheEngine
from kvshelf.keys import Namespace
from kvshelf.lookup import LookupServer, WorkerLookup, socket_path
from kvshelf.vllm.connector import KVShelfConnector
from kvshelf.vllm.groups import describe_groups
from kvshelf.vllm.metadata import BlockIds, KVShelfMetadata
from kvshelf.vllm.scheduler import SchedulerSide
from kvshelf.vllm.transfers import Transfers

CHUNK = 32
BLOCK = 16
STEP = 32  # --max-num-batched-tokens
ATTN = {"block_size": BLOCK, "num_kv_heads": 1, "head_size": 4, "dtype": torch.float32}
_ids = itertools.count()


def vllm_config(engine_id: str, extra: dict | None = None, num_blocks: int = 0) -> SimpleNamespace:
    """The fields of VllmConfig the connector reads (scheduler and worker side)."""
    return SimpleNamespace(
        cache_config=SimpleNamespace(
            block_size=BLOCK, enable_prefix_caching=False, num_gpu_blocks=num_blocks
        ),
        kv_transfer_config=SimpleNamespace(
            engine_id=engine_id, kv_role="kv_both", kv_connector_extra_config=extra or {}
        ),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=STEP),
        model_config=SimpleNamespace(
            multimodal_config=None, model="m", revision=None, quantization=None
        ),
        compilation_config=SimpleNamespace(static_forward_context={}),
    )


def request(tokens: list[int], max_tokens: int = 1) -> Request:
    return Request(f"r{next(_ids)}", tokens, SamplingParams(max_tokens=max_tokens), None)


def kv_blocks(*block_ids: list[int]) -> KVCacheBlocks:
    """vLLM's allocation result for one request: per group, its blocks."""
    return KVCacheBlocks(tuple([KVCacheBlock(i) for i in ids] for ids in block_ids))


class Setup:
    """A scheduler side and, behind its lookup socket address, a worker's engine."""

    def __init__(self, tmp_path, *groups, needs_state: bool):
        engine_id = f"steps-{next(_ids)}"
        config = load_config({"chunk_size": CHUNK, "cpu_bytes": 10**7}, environ={})
        self.groups = describe_groups(
            KVCacheConfig(1000, [], [KVCacheGroupSpec(list(n), s) for n, s in groups])
        )
        namespace = Namespace("m", "hybrid", 0, 1, CHUNK, FORMAT_VERSION)
        self.engine = CacheEngine(config, namespace, lambda n: ("uint8", (max(n, 1),)))
        self.lookup = WorkerLookup(self.engine, prefetch=True, needs_state=needs_state)
        self.server = LookupServer(self.lookup, socket_path(engine_id, 0))
        self.side = SchedulerSide(vllm_config(engine_id), config, "kv_both", self.groups)

    def close(self):
        self.server.close()
        self.lookup.close()
        self.engine.close()

    def store(self, meta: KVShelfMetadata) -> None:
        """The worker's part: every chunk and state a step's saves name is stored."""
        for spec in meta.saves:
            chunks = [*spec.chunks, *(state for state, _ in spec.states)]
            for chunk in chunks:
                entry = self.engine.new_entry(chunk, "uint8", (max(chunk.num_tokens, 1),))
                self.engine.save([entry])

    def run(self, request: Request, block_ids, steps: list[int]) -> list[KVShelfMetadata]:
        """Schedule ``request`` for prefill steps of ``steps`` tokens, as vLLM would. A
        hit of a model with several KV cache groups loads asynchronously: in a step of
        its own (the first meta returned), before the request computes anything."""
        external, load_async = self.side.get_num_new_matched_tokens(request, 0)
        assert load_async == (external > 0)
        self.side.update_state_after_alloc(request, kv_blocks(*block_ids), external)
        computed, metas = external, []
        if load_async:
            metas.append(self.side.build_connector_meta(SchedulerOutput.make_empty()))
        for i, tokens in enumerate(steps):
            output = SchedulerOutput.make_empty()
            output.num_scheduled_tokens = {request.request_id: tokens}
            if i == 0:
                request.num_computed_tokens = computed
                output.scheduled_new_reqs = [NewRequestData.from_request(request, block_ids)]
            else:
                cached = CachedRequestData.make_empty()
                cached.req_ids = [request.request_id]
                cached.new_block_ids = [None]
                cached.num_computed_tokens = [computed]
                output.scheduled_cached_reqs = cached
            meta = self.side.build_connector_meta(output)
            self.store(meta)
            metas.append(meta)
            computed += tokens
        self.engine.flush(10)
        return metas


# -- both connectors over a CPU KV cache -------------------------------------------
NUM_LAYERS = 2
NUM_KV_HEADS = 2
HEAD_SIZE = 8
UNWRITTEN = -1.0  # what a cache slot holds before any forward or load writes it
SAMPLED = 7  # the token every step that completes a request's tokens samples


def kv_value(token_id: int, position: int, layer: int, kv: int) -> float:
    """The KV the fake forward computes for one token: a function of the token and its
    position (as a real model's is), distinct per layer and K/V. Exact in float32."""
    return float(((token_id * 1024 + position) * NUM_LAYERS + layer) * 2 + kv)


@dataclass
class Scheduled:
    """One request in one step, as vLLM's scheduler hands it out."""

    request: Request
    num_tokens: int
    new_block_ids: list[int] | None = None  # a new request's blocks, or blocks added
    resumed: bool = False  # back from preemption: ``new_block_ids`` are all its blocks


@dataclass
class Step:
    """What one step did: the connector's metadata, as the worker received it."""

    meta: KVShelfMetadata
    load_errors: set[int] = field(default_factory=set)


class Serving:
    """A scheduler-role and a worker-role KVShelfConnector of one engine id, a CPU KV
    cache of ``num_blocks`` blocks (flash layout, ``NUM_LAYERS`` layers), and the
    scheduler's bookkeeping the tests play by hand (block ids, computed tokens)."""

    def __init__(self, num_blocks: int = 64, resumed_as_new: bool = False, **extra):
        """``resumed_as_new``: as vLLM's V2 model runner, resumed requests come as new
        ones (``scheduled_new_reqs``), not in ``CachedRequestData.resumed_req_ids``."""
        self.resumed_as_new = resumed_as_new
        engine_id = f"serving-{next(_ids)}"
        settings = {"chunk_size": CHUNK, "cpu_bytes": 10**7, "log_requests": False, **extra}
        spec = FullAttentionSpec(
            block_size=BLOCK, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float32
        )
        layers = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]
        kv_cache_config = KVCacheConfig(num_blocks, [], [KVCacheGroupSpec(layers, spec)])
        config = vllm_config(engine_id, settings, num_blocks)
        self.worker = KVShelfConnector(config, KVConnectorRole.WORKER, kv_cache_config)
        shape = (2, num_blocks, BLOCK, NUM_KV_HEADS, HEAD_SIZE)
        self.kv_caches = {name: torch.full(shape, UNWRITTEN) for name in layers}
        self.worker.register_kv_caches(self.kv_caches)
        self.scheduler = KVShelfConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config)
        self.block_ids: dict[str, list[int]] = {}  # what vLLM's block table holds
        self._sent: set[str] = set()  # requests the worker has had as new ones

    @property
    def transfers(self) -> Transfers:
        steps = self.worker._worker.steps if self.worker._worker is not None else None
        assert isinstance(steps, Transfers), "register_kv_caches opened no engine"
        return steps

    @property
    def engine(self) -> CacheEngine:
        return self.transfers.engine

    def close(self) -> None:
        self.worker.shutdown()

    # -- the scheduler's part ----------------------------------------------------
    def admit(self, request: Request, block_ids: list[int], local_tokens: int = 0) -> int:
        """vLLM admitting a waiting (or preempted) request: the lookup, asked again
        while a worker is still reading; the allocation; the connector told of it.
        Returns the tokens to load."""
        for _ in range(1000):
            external, load_async = self.scheduler.get_num_new_matched_tokens(request, local_tokens)
            if external is not None:
                break
        assert external is not None, "the lookup never finished"
        assert not load_async  # one full-attention group: loads are synchronous
        self.block_ids[request.request_id] = list(block_ids)
        self.scheduler.update_state_after_alloc(request, kv_blocks(block_ids), external)
        request.num_computed_tokens = local_tokens + external
        return external

    def preempt(self, request: Request) -> None:
        """vLLM preempting a running request: its blocks freed, its progress reset."""
        del self.block_ids[request.request_id]
        request.num_computed_tokens = 0

    def finish(self, request: Request) -> tuple[bool, object]:
        """vLLM finishing (or aborting) a request: both hooks it may call, same answer."""
        block_ids = self.block_ids.pop(request.request_id, [])
        one = self.scheduler.request_finished(request, block_ids)
        assert self.scheduler.request_finished_all_groups(request, (block_ids,)) == one
        return one

    def step(self, *scheduled: Scheduled) -> Step:
        """One engine step: the scheduler output vLLM would build, the connector's
        metadata (across a pickle, as between processes), and the worker's step."""
        output = SchedulerOutput.make_empty()
        cached = CachedRequestData.make_empty()
        for item in scheduled:
            req_id = item.request.request_id
            output.num_scheduled_tokens[req_id] = item.num_tokens
            if item.resumed and self.resumed_as_new:
                assert item.new_block_ids is not None
                self.block_ids[req_id] = list(item.new_block_ids)
                self._sent.discard(req_id)
            if req_id not in self._sent:  # its first step: all of it, blocks included
                self._sent.add(req_id)
                blocks = (list(self.block_ids[req_id]),)
                output.scheduled_new_reqs.append(NewRequestData.from_request(item.request, blocks))
                continue
            new = item.new_block_ids
            if item.resumed:  # its blocks now: all new ones, given in full
                assert new is not None
                self.block_ids[req_id] = list(new)
                cached.resumed_req_ids.add(req_id)
            elif new is not None:
                self.block_ids[req_id].extend(new)
            cached.req_ids.append(req_id)
            cached.new_block_ids.append((list(new),) if new is not None else None)
            cached.num_computed_tokens.append(item.request.num_computed_tokens)
            cached.num_output_tokens.append(item.request.num_output_tokens)
        output.scheduled_cached_reqs = cached
        output.total_num_scheduled_tokens = sum(output.num_scheduled_tokens.values())
        meta = self.scheduler.build_connector_meta(output)
        sent = pickle.loads(pickle.dumps(meta))
        errors = self._worker_step(sent, scheduled)
        for item in scheduled:
            item.request.num_computed_tokens += item.num_tokens
            if item.request.num_computed_tokens == item.request.num_tokens:
                item.request.append_output_token_ids(SAMPLED)  # the step's sampled token
        return Step(sent, errors)

    # -- the worker's part -------------------------------------------------------
    def _worker_step(self, meta: KVShelfMetadata, scheduled: tuple[Scheduled, ...]) -> set[int]:
        """What vLLM's model runner does around a forward with a KV connector."""
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)  # type: ignore[arg-type]
        for layer, name in enumerate(self.kv_caches):
            self.worker.wait_for_layer_load(name)
            for item in scheduled:
                self._forward(item, layer, self.kv_caches[name])
            self.worker.save_kv_layer(name, self.kv_caches[name], None)
        self.worker.wait_for_save()
        errors = self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        self.transfers._completer.drain()
        self.engine.flush(10)
        return errors

    def _forward(self, item: Scheduled, layer: int, cache: torch.Tensor) -> None:
        """The fake model: the KV of every token the step computes, into its slot."""
        start = item.request.num_computed_tokens
        block_ids = self.block_ids[item.request.request_id]
        for position in range(start, start + item.num_tokens):
            token_id = item.request.all_token_ids[position]
            slot = block_ids[position // BLOCK], position % BLOCK
            for kv in (0, 1):
                cache[kv][slot] = kv_value(token_id, position, layer, kv)

    # -- what the cache holds ----------------------------------------------------
    def positions_holding(self, request: Request, block_ids: list[int]) -> list[int]:
        """The positions of ``request`` computed so far whose slots in ``block_ids`` hold
        exactly that token's KV in every layer (K and V)."""
        found = []
        for position in range(min(request.num_computed_tokens, len(block_ids) * BLOCK)):
            token_id = request.all_token_ids[position]
            slot = block_ids[position // BLOCK], position % BLOCK
            if all(
                cache[kv][slot].eq(kv_value(token_id, position, layer, kv)).all()
                for layer, cache in enumerate(self.kv_caches.values())
                for kv in (0, 1)
            ):
                found.append(position)
        return found

    def wipe(self, block_ids: list[int]) -> None:
        """Blocks handed to another request: their old contents gone."""
        for cache in self.kv_caches.values():
            cache[:, block_ids] = UNWRITTEN


def group_ids(block_ids: BlockIds) -> list[int]:
    """One group's block ids (this model has one group)."""
    (ids,) = block_ids
    return ids
