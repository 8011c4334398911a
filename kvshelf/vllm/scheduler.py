"""The connector's scheduler side: keys, lookups and the per-step load/save plan.

It computes each request's chunk keys (token ids + media content hashes + cache_salt),
asks every worker what it can load (see :mod:`kvshelf.lookup`), and tells the workers,
step by step, which chunks to load into which blocks and which newly computed chunks to
save. Chunks found in the cache or already saved are never saved again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvshelf.config import KVShelfConfig
from kvshelf.keys import (
    Chunk,
    ChunkKey,
    ChunkPlan,
    MediaSpan,
    UncacheableRequest,
    plan_chunks,
    state_chunk,
)
from kvshelf.lookup import PENDING, LookupClient, socket_path
from kvshelf.pacing import PrefillClock
from kvshelf.vllm import metric_names as m
from kvshelf.vllm.groups import CacheGroups
from kvshelf.vllm.metadata import BlockIds, KVShelfMetadata, LoadSpec, SaveSpec

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("kvshelf.scheduler")
MIN_HIT_TOKENS = 16


@dataclass
class _Request:
    plan: ChunkPlan | None  # None: not cacheable (no token ids, or media without hashes)
    num_prompt_tokens: int
    media: list[tuple[str, int, int]] = field(default_factory=list)  # modality, offset, length
    hit_tokens: int = 0
    looked_up: bool = False  # the workers hold a lookup for it, to release once unused
    done: set[ChunkKey] = field(default_factory=set)  # cached or already saved
    block_ids: BlockIds = ()
    external_tokens: int = 0  # to load in the request's next step
    local_tokens: int = 0  # vLLM's own prefix hit when the lookup ran
    checked: int = 0  # prompt tokens already looked at for saves
    logged: bool = False


class SchedulerSide:
    def __init__(
        self,
        vllm_config: VllmConfig,
        config: KVShelfConfig,
        role: str | None,
        groups: CacheGroups | None = None,
    ):
        self.config = config  # its chunk_size is whole blocks (see connector.fit_chunk_size)
        self.block_size = vllm_config.cache_config.block_size
        self.state_groups = groups.state_groups if groups is not None else ()
        # Several KV cache groups: vLLM takes load failures only as whole requests of
        # an asynchronous load (failed_recving), so such a model's loads are asynchronous.
        self.async_loads = groups is not None and not groups.uniform
        self._async: list[str] = []  # loads to emit in the next step
        self.max_step_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        cacheable = groups is None or groups.unsupported is None
        self.load_enabled = role != "kv_producer" and cacheable
        self.save_enabled = role != "kv_consumer" and cacheable
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None, "a KV connector runs only with a kv_transfer_config"
        engine_id = str(transfer.engine_id)
        parallel = vllm_config.parallel_config
        num_ranks = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
        self._clients = [
            LookupClient(socket_path(engine_id, rank), config.lookup_timeout_s)
            for rank in range(num_ranks)
        ]
        self._requests: dict[str, _Request] = {}
        self._released: list[str] = []
        self._warned: set[str] = set()
        self._media_ids_are_hashes = _media_ids_are_hashes(vllm_config)
        self._clock = PrefillClock(min_tokens=config.chunk_size)
        self._counts = dict.fromkeys((m.LOOKUPS, m.LOOKUP_TOKENS, m.HIT_TOKENS), 0)

    # -- vLLM hooks --------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        state = self._state(request)
        if state.plan is None or not self.load_enabled or _skips_cache(request):
            return 0, False
        hit = self._lookup(request.request_id, state.plan)
        if hit is None:
            return None, False  # a worker is still reading; vLLM asks again next step
        state.looked_up = True
        if hit < MIN_HIT_TOKENS:
            hit = 0  # loading KV to skip a handful of tokens costs more than it saves
        state.hit_tokens = hit
        # Everything the hit covers is stored already, media cuts included: never resave.
        covered = [c for c in state.plan.all_chunks() if c.end <= hit]
        state.done.update(c.key for c in covered)
        state.done.update(state_chunk(c).key for c in covered)
        # vLLM must compute at least the last token itself to produce logits.
        usable = min(hit, request.num_tokens - 1)
        state.local_tokens = num_computed_tokens
        external = max(0, usable - num_computed_tokens)
        return external, self.async_loads and external > 0

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        state = self._requests.get(request.request_id)
        if state is None:
            return
        state.external_tokens = num_external_tokens
        if num_external_tokens == 0 and state.looked_up:
            # Nothing to load: unpin the hit now, and let the workers forget the lookup
            # (it answers once per request), so a request resumed after a preemption
            # looks up afresh and finds what it saved before. A load's hold goes once
            # its copies are done.
            self._released.append(request.request_id)
        elif num_external_tokens and self.async_loads:
            # The request waits for its load, done in the next step's start_load_kv
            # whatever that step computes, and reported by the worker when finished.
            state.block_ids = tuple(list(ids) for ids in blocks.get_block_ids())
            self._async.append(request.request_id)
        state.looked_up = False
        self._log_request(request, state, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVShelfMetadata:
        meta = KVShelfMetadata(released=self._released)
        self._released = []
        scheduled = scheduler_output.num_scheduled_tokens
        self._clock.step(
            time.perf_counter(), scheduler_output.total_num_scheduled_tokens, frozenset(scheduled)
        )
        for req_id in self._async:
            state = self._requests.get(req_id)
            if state is not None and state.external_tokens and state.plan is not None:
                end = state.local_tokens + state.external_tokens
                meta.loads.append(self._load_spec(req_id, state, state.plan, end))
                state.external_tokens = 0
        self._async = []
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is not None:
                state.block_ids = tuple(list(ids) for ids in new.block_ids)
                self._emit(new.req_id, state, new.num_computed_tokens, scheduled[new.req_id], meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = tuple(list(ids) for ids in new_blocks) if new_blocks else ()
            elif new_blocks is not None:
                if not state.block_ids:
                    state.block_ids = tuple([] for _ in new_blocks)
                for ids, more in zip(state.block_ids, new_blocks):
                    ids.extend(more)
            computed = cached.num_computed_tokens[i]
            self._emit(req_id, state, computed, scheduled[req_id], meta)
        return meta

    def request_finished(self, request: Request) -> tuple[bool, Any]:
        if self._requests.pop(request.request_id, None) is not None:
            self._released.append(request.request_id)
        return False, None  # saves are copied out during the step: blocks can go now

    # -- internals ---------------------------------------------------------------
    def _state(self, request: Request) -> _Request:
        state = self._requests.get(request.request_id)
        if state is None:
            media = [
                (f.modality, f.mm_position.offset, f.mm_position.length)
                for f in request.mm_features or ()
            ]
            state = _Request(self._plan(request), request.num_prompt_tokens, media)
            self._requests[request.request_id] = state
        return state

    def _plan(self, request: Request) -> ChunkPlan | None:
        if request.prompt_token_ids is None:
            self._warn_once("embeds", "prompts given as embeddings are not cached")
            return None
        features = request.mm_features or ()
        if features and not self._media_ids_are_hashes:
            self._warn_once(
                "request-scoped",
                "requests with images, audio or video are not cached: with vLLM's "
                "multimodal processor cache (--mm-processor-cache-gb 0) and prefix caching "
                "both off, vLLM names media per request instead of by content. Turn either on.",
            )
            return None
        spans = [
            MediaSpan(f.identifier, f.mm_position.offset, f.mm_position.length) for f in features
        ]
        try:
            return plan_chunks(
                request.prompt_token_ids,
                spans,
                self.config.chunk_size,
                request.cache_salt or "",
                self._state_cuts(request.num_prompt_tokens),
            )
        except UncacheableRequest as exc:
            self._warn_once(
                "uncacheable",
                "request not cached: %s",
                exc,
            )
            return None

    def _lookup(self, req_id: str, plan: ChunkPlan) -> int | None:
        wait, spt = self.config.lookup_wait_s, self._clock.seconds_per_token
        hits = [client.lookup(req_id, plan, wait, spt) for client in self._clients]
        if PENDING in hits:
            return None
        return min(hits)

    def _emit(
        self, req_id: str, state: _Request, computed: int, scheduled: int, meta: KVShelfMetadata
    ) -> None:
        """Add this step's load (tokens computed so far include it) and saves."""
        plan = state.plan
        if state.external_tokens and plan is not None:
            meta.loads.append(self._load_spec(req_id, state, plan, computed))
            state.external_tokens = 0
        if plan is None or not self.save_enabled:
            return
        end = computed + scheduled
        limit = min(end, state.num_prompt_tokens)
        if limit <= state.checked:
            return  # decoding, or recomputing what was looked at: nothing new to save
        first = max(state.checked, computed)  # states before the step are gone or saved
        state.checked = limit
        ready = [c for c in plan.all_chunks() if c.end <= limit and c.key not in state.done]
        state.done.update(c.key for c in ready)
        states = self._states_to_save(state, plan, first, limit, end)
        if ready or states:
            meta.saves.append(SaveSpec(req_id, ready, state.block_ids, states))

    def _load_spec(self, req_id: str, state: _Request, plan: ChunkPlan, computed: int) -> LoadSpec:
        start = computed - state.external_tokens
        chunks = plan.chunks_up_to(state.hit_tokens)
        state.done.update(c.key for c in chunks)
        loads = [c for c in chunks if c.end > start]
        spec = LoadSpec(req_id, loads, state.block_ids, start, computed)
        if self.state_groups and chunks:
            # The hit ends exactly where its state was stored (see CacheEngine.locate_hit).
            spec.state = state_chunk(chunks[-1])
            spec.state_slots = [
                g.state_slot(state.block_ids[g.index], computed) for g in self.state_groups
            ]
        return spec

    def _states_to_save(
        self, state: _Request, plan: ChunkPlan, first: int, limit: int, end: int
    ) -> list[tuple[Chunk, list[int]]]:
        """The state at the step's end, if a chunk or cut ends there: vLLM keeps the
        state after the last computed token only (in "align" mode too, in the slot of
        the block that token is in; earlier slots may hold nothing)."""
        if not self.state_groups or not first < end <= limit:
            return []
        chunk = plan.chunk_ending_at(end)
        if chunk is None or state_chunk(chunk).key in state.done:
            return []
        found = [g.state_slot(state.block_ids[g.index], end) for g in self.state_groups]
        slots = [slot for slot in found if slot is not None]
        if len(slots) < len(found):
            return []
        saved = state_chunk(chunk)
        state.done.add(saved.key)
        return [(saved, slots)]

    def _state_cuts(self, num_prompt_tokens: int) -> tuple[int, ...]:
        """Cut points where a prefill step of a model with recurrent state is likely to
        end, so its state there can be keyed: every multiple of the step's token budget,
        and in "align" mode the last block boundary before the prompt's end (vLLM stops
        a step there to keep the state a repeated prompt needs)."""
        if not self.state_groups:
            return ()
        step = self.max_step_tokens
        cuts = set(range(step, num_prompt_tokens, step)) if step else set()
        aligned = [g for g in self.state_groups if g.align]
        if aligned and num_prompt_tokens > 1:
            size = aligned[0].block_size
            cuts.add((num_prompt_tokens - 1) // size * size)
        return tuple(sorted(c for c in cuts if c > 0))

    def stats(self) -> dict | None:
        """Counter increments since the last call (for vLLM's metrics)."""
        counters = {k: v for k, v in self._counts.items() if v}
        self._counts = dict.fromkeys(self._counts, 0)
        return {"counters": counters} if counters else None

    def _log_request(self, request: Request, state: _Request, num_external: int) -> None:
        if state.logged:
            return
        state.logged = True
        if state.plan is not None:
            self._counts[m.LOOKUPS] += 1
            self._counts[m.LOOKUP_TOKENS] += request.num_tokens
            self._counts[m.HIT_TOKENS] += state.hit_tokens
        if not self.config.log_requests:
            return
        logger.info(
            "Reqid: %s, Total tokens %d, kvshelf hit tokens: %d, need to load: %d",
            request.request_id,
            request.num_tokens,
            state.hit_tokens,
            num_external,
        )
        if state.media:
            logger.debug(
                "Reqid: %s, media (modality, offset, length): %s", request.request_id, state.media
            )

    def _warn_once(self, reason: str, message: str, *args: object) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning(message, *args)


def _media_ids_are_hashes(vllm_config: VllmConfig) -> bool:
    """False when vLLM gives media request-scoped ids (both of its caches off): then
    even 64-hex identifiers are hashes of a per-request name, not of the content."""
    mm_config = vllm_config.model_config.multimodal_config
    return not (
        mm_config is not None
        and getattr(mm_config, "mm_processor_cache_gb", None) == 0
        and not vllm_config.cache_config.enable_prefix_caching
    )


def _skips_cache(request: Request) -> bool:
    return bool(getattr(request, "skip_reading_prefix_cache", False))
