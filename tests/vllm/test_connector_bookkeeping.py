"""The connector's block arithmetic for a plain full-attention model, in process: both
KVShelfConnector roles, vLLM's own request, scheduler-output and block objects built
step by step as its scheduler builds them, and a CPU KV cache written by a fake forward.
A load is checked by what it writes: each loaded slot must hold the KV its token had
when it was computed (see ``scheduler_harness.Serving``)."""

from __future__ import annotations

import pytest

from kvshelf.vllm.scheduler import MIN_HIT_TOKENS

from .scheduler_harness import CHUNK, Scheduled, Serving, group_ids, kv_blocks, request

PROMPT = list(range(100, 200))  # 100 tokens: three full chunks of 32 and 4 more


@pytest.fixture
def serving():
    serving = Serving()
    yield serving
    serving.close()


def spans(chunks) -> list[tuple[int, int]]:
    return [(c.start, c.end) for c in chunks]


def saved(step) -> list[tuple[int, int]]:
    return [span for spec in step.meta.saves for span in spans(spec.chunks)]


def cold_run(serving: Serving, tokens: list[int], block_ids: list[int]) -> None:
    """A request that computes ``tokens`` in one step, then finishes."""
    cold = request(tokens)
    assert serving.admit(cold, block_ids) == 0
    serving.step(Scheduled(cold, len(tokens)))
    serving.finish(cold)


def repeat_reads_back(serving: Serving, block_ids: list[int]) -> None:
    """The whole PROMPT again, into ``block_ids``: it hits all but its last token, and
    every slot then holds the KV that token had when it was first computed."""
    again = request(PROMPT)
    assert serving.admit(again, block_ids) == 99
    serving.step(Scheduled(again, 1))
    assert serving.positions_holding(again, block_ids) == list(range(100))


def test_a_cold_request_saves_every_chunk_its_step_completes(serving):
    """A prompt of 100 tokens (chunks of 32) computed in one step: no hit; one SaveSpec
    with the three full chunks and, as a cut chunk of its own, the 4-token tail (a
    repeat of this prompt hits right up to its end), from the request's blocks."""
    cold = request(PROMPT)
    blocks = list(range(1, 8))  # 7 blocks of 16 for 100 tokens
    assert serving.admit(cold, blocks) == 0
    step = serving.step(Scheduled(cold, 100))
    assert step.meta.loads == []
    (save,) = step.meta.saves
    assert save.req_id == cold.request_id
    assert spans(save.chunks) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert save.block_ids == (blocks,)
    # Each is in the engine now, under its chunk's key.
    assert serving.engine.missing(save.chunks) == []
    # Decoding the next token saves nothing more.
    assert serving.step(Scheduled(cold, 1)).meta.saves == []


def test_a_prompt_of_whole_chunks_saves_no_tail(serving):
    """A 64-token prompt: exactly its two chunks, nothing else."""
    cold = request(PROMPT[:64])
    serving.admit(cold, [1, 2, 3, 4])
    assert saved(serving.step(Scheduled(cold, 64))) == [(0, 32), (32, 64)]


def test_a_repeat_loads_all_but_its_last_token_into_its_own_blocks(serving):
    """The same prompt again, in other blocks: the hit is the whole prompt but one token
    (vLLM computes the last itself); one LoadSpec of every chunk, the tail's cut
    included, into the new request's blocks; nothing saved again; and every loaded slot
    holds the KV the first request computed for that token."""
    cold_run(serving, PROMPT, list(range(1, 8)))
    serving.wipe(list(range(1, 8)))  # the first request's blocks are gone
    again = request(PROMPT)
    blocks = list(range(11, 18))
    assert serving.admit(again, blocks) == 99
    step = serving.step(Scheduled(again, 1))
    (load,) = step.meta.loads
    assert (load.req_id, load.start, load.end) == (again.request_id, 0, 99)
    assert spans(load.chunks) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert load.block_ids == (blocks,)
    assert step.meta.saves == [] and step.load_errors == set()
    # 0..98 loaded, 99 computed by the step's forward: all of them right.
    assert serving.positions_holding(again, blocks) == list(range(100))


def test_a_repeat_of_whole_chunks_loads_the_last_one_short(serving):
    """A 64-token prompt again: the hit is 63 tokens, both chunks loaded, the last one
    up to token 63 only (vLLM computes token 63)."""
    cold_run(serving, PROMPT[:64], [1, 2, 3, 4])
    again = request(PROMPT[:64])
    assert serving.admit(again, [5, 6, 7, 8]) == 63
    step = serving.step(Scheduled(again, 1))
    (load,) = step.meta.loads
    assert spans(load.chunks) == [(0, 32), (32, 64)] and (load.start, load.end) == (0, 63)
    assert serving.positions_holding(again, [5, 6, 7, 8]) == list(range(64))


@pytest.mark.parametrize("shared", [64, 70, 95])
def test_a_prompt_sharing_a_prefix_hits_its_whole_chunks_only(serving, shared):
    """A new prompt sharing ``shared`` tokens with a stored one: the hit is the shared
    whole chunks (64 tokens: a cut of the stored prompt ends at its own end only), they
    load, and the step saves the new prompt's own chunks from there."""
    cold_run(serving, PROMPT, list(range(1, 8)))
    other = PROMPT[:shared] + list(range(500, 500 + 100 - shared))
    new = request(other)
    blocks = list(range(21, 28))
    assert serving.admit(new, blocks) == 64
    step = serving.step(Scheduled(new, 36))
    (load,) = step.meta.loads
    assert spans(load.chunks) == [(0, 32), (32, 64)] and (load.start, load.end) == (0, 64)
    assert saved(step) == [(64, 96), (96, 100)]
    assert serving.positions_holding(new, blocks) == list(range(100))


def test_a_hit_shorter_than_the_minimum_is_no_hit(serving):
    """Sharing fewer tokens than one chunk: nothing stored matches; and a chunk below
    MIN_HIT_TOKENS would not be worth a load anyway."""
    assert CHUNK >= MIN_HIT_TOKENS
    cold_run(serving, PROMPT, list(range(1, 8)))
    new = request(PROMPT[:20] + list(range(500, 580)))
    assert serving.admit(new, list(range(21, 28))) == 0
    assert serving.step(Scheduled(new, 100)).meta.loads == []


def test_chunked_prefill_saves_each_chunk_in_the_step_that_completes_it(serving):
    """Prefill in steps of 24, 24, 24 and 28 tokens, blocks allocated as they are needed:
    each chunk is saved in the step that completes it, once, from the blocks the request
    has then; a repeat loads what they saved."""
    chunked = request(PROMPT)
    serving.admit(chunked, [1, 2])
    steps = [
        serving.step(Scheduled(chunked, 24)),  # tokens 0..23: no chunk complete
        serving.step(Scheduled(chunked, 24, [3])),  # ..47: chunk 0-32
        serving.step(Scheduled(chunked, 24, [4, 5])),  # ..71: chunk 32-64
        serving.step(Scheduled(chunked, 28, [6, 7])),  # ..99: 64-96 and the tail
    ]
    assert [saved(s) for s in steps] == [[], [(0, 32)], [(32, 64)], [(64, 96), (96, 100)]]
    assert [group_ids(spec.block_ids) for s in steps for spec in s.meta.saves] == [
        [1, 2, 3],
        [1, 2, 3, 4, 5],
        [1, 2, 3, 4, 5, 6, 7],
    ]
    assert serving.step(Scheduled(chunked, 1)).meta.saves == []  # decoding
    serving.finish(chunked)

    repeat_reads_back(serving, list(range(31, 38)))


def test_a_chunked_repeat_loads_in_its_first_step_only(serving):
    """A hit's load comes with the request's first step; later steps of its prefill
    load nothing and save only what lies past the hit."""
    cold_run(serving, PROMPT[:64], [1, 2, 3, 4])
    longer = request(PROMPT)
    assert serving.admit(longer, [11, 12, 13, 14, 15]) == 64
    first = serving.step(Scheduled(longer, 16))
    (load,) = first.meta.loads
    assert (load.start, load.end) == (0, 64) and saved(first) == []
    second = serving.step(Scheduled(longer, 20, [16, 17]))
    assert second.meta.loads == [] and saved(second) == [(64, 96), (96, 100)]
    assert serving.positions_holding(longer, list(range(11, 18))) == list(range(100))


@pytest.mark.parametrize("resumed_as_new", [False, True], ids=["cached", "v2-runner"])
def test_a_request_preempted_mid_prefill_resumes_into_its_new_blocks(resumed_as_new):
    """Preempted after its first step (40 tokens, chunk 0-32 saved), its blocks freed and
    computed into by another request, then resumed with new blocks (in CachedRequestData's
    resumed_req_ids, or as a new request as vLLM's V2 model runner sends it): its load
    (the chunk saved before) and every later save use the new blocks, no chunk is saved
    twice, and nothing is read from the freed ones (a repeat afterwards loads the right
    KV). Regression: the workers answered a lookup once per request and a miss was never
    released, so the resumed request got its first lookup's miss and recomputed all."""
    serving = Serving(resumed_as_new=resumed_as_new)
    try:
        _preempted_mid_prefill(serving)
    finally:
        serving.close()


def _preempted_mid_prefill(serving: Serving) -> None:
    victim = request(PROMPT)
    serving.admit(victim, [1, 2, 3])
    first = serving.step(Scheduled(victim, 40))
    assert saved(first) == [(0, 32)]
    serving.preempt(victim)
    # Another request takes the freed blocks; the preempted one is not scheduled.
    other = request(list(range(600, 640)))
    serving.admit(other, [1, 2, 3])
    between = serving.step(Scheduled(other, 40))
    assert [spec.req_id for spec in between.meta.saves] == [other.request_id]

    resumed_blocks = list(range(41, 48))
    hit = serving.admit(victim, resumed_blocks)
    assert hit == 32  # the chunk it saved before its preemption
    # Resumed: vLLM sends all its blocks, new ones, in place of the freed ones.
    steps = [
        serving.step(Scheduled(victim, 40, resumed_blocks, resumed=True)),  # 32..71
        serving.step(Scheduled(victim, 28)),  # ..99
    ]
    (load,) = steps[0].meta.loads
    assert load.block_ids == (resumed_blocks,) and (load.start, load.end) == (0, 32)
    assert spans(load.chunks) == [(0, 32)]
    assert [saved(s) for s in steps] == [[(32, 64)], [(64, 96), (96, 100)]]
    assert all(spec.block_ids == (resumed_blocks,) for s in steps for spec in s.meta.saves)
    assert serving.positions_holding(victim, resumed_blocks) == list(range(100))
    serving.finish(victim)
    serving.finish(other)

    repeat_reads_back(serving, list(range(51, 58)))


def test_a_request_preempted_while_decoding_loads_its_whole_prompt(serving):
    """Preempted after its prompt and 2 output tokens: resumed, it loads the whole
    prompt (its last token is no longer the last of the request) into its new blocks
    and recomputes only its outputs; nothing is saved again."""
    victim = request(PROMPT, max_tokens=8)
    serving.admit(victim, list(range(1, 8)))
    serving.step(Scheduled(victim, 100))  # samples a token
    serving.step(Scheduled(victim, 1))  # computes it, samples another
    serving.preempt(victim)
    serving.wipe(list(range(1, 8)))

    blocks = list(range(41, 48))
    assert serving.admit(victim, blocks) == 100
    step = serving.step(Scheduled(victim, 2, blocks, resumed=True))
    (load,) = step.meta.loads
    assert (load.start, load.end) == (0, 100) and load.block_ids == (blocks,)
    assert step.meta.saves == []
    assert serving.positions_holding(victim, blocks) == list(range(102))


def test_finished_requests_hold_nothing_and_free_their_blocks_at_once(serving):
    """request_finished and request_finished_all_groups: no asynchronous save is pending
    (saves are copied out within their step), so vLLM may free the blocks now, and
    no KV transfer parameters. A hit's hold is pinned from the lookup until its load's
    copies are done, and nothing stays held after the request finishes."""
    cold = request(PROMPT)
    serving.admit(cold, list(range(1, 8)))
    serving.step(Scheduled(cold, 100))
    assert serving.finish(cold) == (False, None)

    again = request(PROMPT)
    serving.admit(again, list(range(11, 18)))
    held = serving.engine.hold(again.request_id)
    assert held is not None and held.num_tokens == 100  # read and pinned at lookup
    step = serving.step(Scheduled(again, 1))
    assert step.meta.loads and serving.engine.hold(again.request_id) is None
    assert serving.finish(again) == (False, None)
    step = serving.step()
    assert again.request_id in step.meta.released
    assert serving.engine.hold(again.request_id) is None
    assert serving.engine.hold(cold.request_id) is None


def test_a_request_aborted_before_its_load_releases_its_hold(serving):
    """A request whose lookup hit (and pinned the hit), aborted while still waiting (no
    blocks yet, so no load was emitted): the next step's metadata releases its hold and
    the engine holds nothing for it."""
    cold_run(serving, PROMPT, list(range(1, 8)))
    waiting = request(PROMPT)
    external = None
    while external is None:
        external, _ = serving.scheduler.get_num_new_matched_tokens(waiting, 0)
    assert external == 99
    assert serving.engine.hold(waiting.request_id) is not None
    assert serving.finish(waiting) == (False, None)
    step = serving.step()
    assert step.meta.loads == [] and waiting.request_id in step.meta.released
    assert serving.engine.hold(waiting.request_id) is None


def test_a_hit_vllm_declines_is_released_with_the_next_step(serving):
    """vLLM asks with 96 tokens of its own prefix cache, kvshelf offers 3 more, and vLLM
    allocates none of them externally (update_state_after_alloc with 0): nothing loads,
    and the hold goes with the request's first step."""
    cold_run(serving, PROMPT, list(range(1, 8)))
    declined = request(PROMPT)
    external = None
    while external is None:
        external, _ = serving.scheduler.get_num_new_matched_tokens(declined, 96)
    assert external == 3
    serving.block_ids[declined.request_id] = list(range(21, 28))
    serving.scheduler.update_state_after_alloc(declined, kv_blocks(list(range(21, 28))), 0)
    declined.num_computed_tokens = 96
    step = serving.step(Scheduled(declined, 4))
    assert declined.request_id in step.meta.released and step.meta.loads == []
    assert serving.engine.hold(declined.request_id) is None
