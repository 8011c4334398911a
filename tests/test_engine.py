"""CacheEngine scenarios: prompts in, verified prefixes out, across memory and disk."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
from blake3 import blake3

from kvshelf.codec import FORMAT_VERSION, Entry, payload_bytes
from kvshelf.config import load_config
from kvshelf.engine import CacheEngine
from kvshelf.keys import Chunk, ChunkPlan, MediaSpan, Namespace, plan_chunks, state_chunk
from kvshelf.storage.disk import DiskStore
from tests.storage.test_tiered import SlowStore

CHUNK = 16
IMAGE_TOKEN = 32000
CAT = hashlib.sha256(b"a photo of a cat").hexdigest()
DOG = hashlib.sha256(b"a photo of a dog").hexdigest()
BIRD = hashlib.sha256(b"a photo of a bird").hexdigest()


def spec(num_tokens: int) -> tuple[str, tuple[int, ...]]:
    """KV payload of a chunk: (K/V, tokens, 4 values) of float16 = 16 bytes a token; a
    recurrent state (0 tokens): 64 bytes."""
    if num_tokens == 0:
        return "uint8", (64,)
    return "float16", (2, num_tokens, 4)


CHUNK_BYTES = 16 * CHUNK


def make_engine(tmp_path, remote=None, **settings) -> CacheEngine:
    config = {
        "chunk_size": CHUNK,
        "cpu_bytes": 64 * CHUNK_BYTES,
        "disk_path": str(tmp_path / "disk"),
        "disk_bytes": 10**7,
        "save_threads": 1,
    } | settings
    namespace = Namespace("test-model", "L1xH1xD4:float16", 0, 1, CHUNK, FORMAT_VERSION)
    return CacheEngine(load_config(config, environ={}), namespace, spec, remote=remote)


@pytest.fixture
def engine(tmp_path):
    made = make_engine(tmp_path)
    yield made
    made.close()


def prompt(*parts) -> tuple[list[int], list[MediaSpan]]:
    """Tokens and media spans from parts: a list of token ids, or (identifier, length)
    for an image of that many placeholder tokens."""
    tokens: list[int] = []
    spans: list[MediaSpan] = []
    for part in parts:
        if isinstance(part, tuple):
            identifier, length = part
            spans.append(MediaSpan(identifier, len(tokens), length))
            tokens += [IMAGE_TOKEN] * length
        else:
            tokens += part
    return tokens, spans


def text(seed: int, length: int) -> list[int]:
    return [(seed * 1000 + i) % 30000 for i in range(length)]


def kv_bytes(chunk: Chunk, nbytes: int) -> bytes:
    """The KV 'computed' for a chunk: a function of its key, so a wrong load shows."""
    return (blake3(chunk.key).digest() * (nbytes // 32 + 1))[:nbytes]


def save(engine: CacheEngine, plan: ChunkPlan, chunks=None) -> None:
    """What the worker does after a prefill: fill and save every chunk not yet stored."""
    for chunk in engine.missing(plan.all_chunks() if chunks is None else chunks):
        entry = engine.new_entry(chunk, *spec(chunk.num_tokens))
        entry.payload[:] = kv_bytes(chunk, entry.nbytes)
        engine.save([entry])
    assert engine.flush(10)


def held_tokens(engine: CacheEngine, owner: str) -> int:
    """Check every held entry carries its chunk's bytes; the tokens they cover."""
    covered = 0
    hold = engine.hold(owner)
    for held in hold.items if hold is not None else ():
        assert held.chunk.start == covered
        assert held.entry.payload.tobytes() == kv_bytes(held.chunk, held.entry.nbytes)
        covered = held.chunk.end
    return covered


def lookup(engine: CacheEngine, tokens, spans=(), owner="req", salt="") -> int:
    hit = engine.fetch_plan(engine.plan(tokens, spans, salt), owner).num_tokens
    assert held_tokens(engine, owner) == hit
    return hit


def tiers(engine: CacheEngine):
    return engine.store.memory, engine.store.lower[0]


def wrong_check_entry(engine: CacheEngine, chunk: Chunk, shape=None) -> Entry:
    """A valid entry filed under ``chunk``'s key but made from another prompt (or, with
    ``shape``, the right check but a payload of another shape)."""
    dtype, right_shape = spec(chunk.num_tokens)
    check = chunk.check if shape else hashlib.sha256(b"some other prompt").digest()
    shape = shape or right_shape
    payload = memoryview(kv_bytes(chunk, payload_bytes(dtype, shape)))
    return Entry(engine.key(chunk), check, chunk.num_tokens, dtype, shape, payload)


# -- text ---------------------------------------------------------------------------------


def test_text_only_prompt_hits(engine):
    tokens = text(1, 40)
    assert lookup(engine, tokens) == 0
    save(engine, engine.plan(tokens))
    assert lookup(engine, tokens) == 40  # full chunks, then the cut at the prompt end
    assert lookup(engine, tokens + text(2, 10)) == 32  # a longer prompt: whole chunks
    assert lookup(engine, tokens[:35]) == 32
    assert lookup(engine, text(3, 40)) == 0


def test_salt_separates_users(engine):
    tokens = text(1, 40)
    save(engine, engine.plan(tokens, salt="alice"))
    assert lookup(engine, tokens, salt="alice") == 40
    assert lookup(engine, tokens, salt="bob") == 0
    assert lookup(engine, tokens) == 0


def test_namespaces_sharing_a_disk_do_not_mix(tmp_path):
    first = make_engine(tmp_path)
    tokens = text(1, 48)
    save(first, first.plan(tokens))
    first.close()
    other_layout = make_engine(tmp_path)
    other_layout.namespace_id = Namespace("test-model", "L1xH1xD4:float16", 1, 2, CHUNK, 1).id()
    assert lookup(other_layout, tokens) == 0
    other_layout.close()


def test_a_restarted_engine_hits_from_disk(tmp_path):
    first = make_engine(tmp_path)
    tokens, spans = prompt(text(1, 20), (CAT, 30), text(2, 10))
    save(first, first.plan(tokens, spans))
    first.close()
    second = make_engine(tmp_path)
    assert lookup(second, tokens, spans) == 60
    assert tiers(second)[1].stats().hits == len(second.hold("req").items)
    assert {held.tier for held in second.hold("req").items} == {"disk"}  # where it was read
    second.close()


# -- multimodal -------------------------------------------------------------------------------


def test_different_question_after_the_same_image_hits_through_the_image(engine):
    system = text(1, 30)
    first, spans = prompt(system, (CAT, 24), text(2, 10))  # image at [30, 54)
    save(engine, engine.plan(first, spans))
    second, spans2 = prompt(system, (CAT, 24), text(3, 12))
    # chunk [48, 64) holds the other question; the cut chunk [48, 54) ends with the image
    assert lookup(engine, second, spans2) == 54
    assert engine.hold("req").items[-1].chunk.num_tokens == 6


def test_different_image_no_hit_past_the_item_start(engine):
    system = text(1, 30)
    first, spans = prompt(system, (CAT, 24), text(2, 10))
    save(engine, engine.plan(first, spans))
    second, spans2 = prompt(system, (DOG, 24), text(2, 10))
    assert second == first  # the same tokens: only the image differs
    assert lookup(engine, second, spans2) == 30


def test_swapped_images_no_hit_past_the_first_differing_item(engine):
    system = text(1, 30)
    first, spans = prompt(system, (CAT, 24), text(2, 12), (DOG, 24), text(3, 12), (BIRD, 8))
    save(engine, engine.plan(first, spans))
    swapped, swapped_spans = prompt(
        system, (DOG, 24), text(2, 12), (CAT, 24), text(3, 12), (BIRD, 8)
    )
    assert lookup(engine, swapped, swapped_spans) == 30
    # the first image kept, the next two swapped: a hit up to the second item's start
    later, later_spans = prompt(system, (CAT, 24), text(2, 12), (BIRD, 8), text(3, 12), (DOG, 24))
    assert later_spans[1].offset == 66
    assert lookup(engine, later, later_spans) == 66


def test_text_only_prompt_does_not_hit_an_image_prompt(engine):
    tokens, spans = prompt(text(1, 30), (CAT, 24), text(2, 10))
    save(engine, engine.plan(tokens, spans))
    assert lookup(engine, tokens) == 16  # same tokens, no image: only text chunk 0


# -- tiers ---------------------------------------------------------------------------------------


def test_longest_prefix_across_tiers(engine):
    memory, disk = tiers(engine)
    tokens = text(1, 80)
    plan = engine.plan(tokens)
    save(engine, plan)
    keys = [engine.key(c) for c in plan.full]
    disk.delete(keys[:2])  # chunks 0, 1: memory only
    memory.delete(keys[2:])  # chunks 2, 3: disk only
    disk.delete(keys[4:])  # chunk 4: nowhere
    assert [c.end for c in engine.locate(plan)] == [16, 32, 48, 64]
    disk_hits = disk.stats().hits
    assert lookup(engine, tokens) == 64
    assert disk.stats().hits - disk_hits == 2
    assert memory.contains(keys) == [True, True, True, True, False]  # promoted


def test_reads_come_from_memory_when_it_has_them(engine):
    _, disk = tiers(engine)
    tokens = text(1, 64)
    save(engine, engine.plan(tokens))
    assert disk.contains([engine.key(c) for c in engine.plan(tokens).full]) == [True] * 4
    assert lookup(engine, tokens) == 64
    assert disk.stats().hits == 0


def test_memory_tier_disabled(tmp_path):
    engine = make_engine(tmp_path, cpu_bytes=0)
    assert engine.store.memory is None
    tokens = text(1, 40)
    save(engine, engine.plan(tokens))
    assert lookup(engine, tokens) == 40
    engine.close()


def test_disk_tier_disabled(tmp_path):
    engine = make_engine(tmp_path, disk_path=None)
    assert engine.store.lower == []
    tokens = text(1, 40)
    save(engine, engine.plan(tokens))
    assert lookup(engine, tokens) == 40
    engine.close()


# -- verification -------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["memory", "disk"])
def test_entry_with_the_wrong_check_is_a_miss_and_removed(engine, tier):
    tokens = text(1, 64)
    plan = engine.plan(tokens)
    save(engine, plan, plan.full[:2])
    bad = wrong_check_entry(engine, plan.full[2])
    store = dict(zip(["memory", "disk"], tiers(engine)))[tier]
    assert store.put([bad]) == 1
    assert [c.end for c in engine.locate(plan)] == [16, 32, 48]  # exists...
    assert lookup(engine, tokens) == 32  # ...but does not verify
    assert engine.stats()[0].verify_failures == 1
    assert engine.store.locate([engine.key(plan.full[2])]) == [None]  # removed everywhere


def test_entry_with_the_wrong_shape_is_a_miss(engine):
    tokens = text(1, 32)
    plan = engine.plan(tokens)
    save(engine, plan, plan.full[:1])
    bad = wrong_check_entry(engine, plan.full[1], shape=(2, CHUNK, 2, 2))
    engine.save([bad])
    assert engine.flush(10)
    assert lookup(engine, tokens) == 16
    assert engine.stats()[0].verify_failures == 1


def test_a_failed_full_chunk_falls_back_to_a_cut_inside_it(engine):
    tokens, spans = prompt(text(1, 20), (CAT, 8), text(2, 20))  # image at [20, 28)
    plan = engine.plan(tokens, spans)
    save(engine, plan)
    engine.store.delete([engine.key(plan.full[1])])
    tiers(engine)[1].put([wrong_check_entry(engine, plan.full[1])])
    assert lookup(engine, tokens, spans) == 28  # cut (16, 28) ends with the image


def test_a_failed_cut_falls_back_to_a_shorter_cut(engine):
    """Regression: when the longest cut after the last full chunk failed verification,
    shorter cuts (here: the image's end) were not tried and the hit stopped at 16."""
    tokens, spans = prompt(text(1, 18), (CAT, 8), text(2, 4))  # 30 tokens, image [18, 26)
    plan = engine.plan(tokens, spans)
    save(engine, plan)
    prompt_end = plan.cuts_from(1)[0]
    assert (prompt_end.start, prompt_end.end) == (16, 30)
    engine.store.delete([engine.key(prompt_end)])
    tiers(engine)[1].put([wrong_check_entry(engine, prompt_end)])
    assert lookup(engine, tokens, spans) == 26


# -- holds --------------------------------------------------------------------------------------------


def test_fetch_plan_pins_what_it_holds_until_release(tmp_path):
    engine = make_engine(tmp_path, cpu_bytes=8 * CHUNK_BYTES)
    memory = engine.store.memory
    tokens = text(1, 64)
    save(engine, engine.plan(tokens))
    assert lookup(engine, tokens, owner="a") == 64
    assert memory.allocate(5 * CHUNK_BYTES) is None  # would need a held chunk
    assert lookup(engine, tokens, owner="a") == 64  # a new lookup replaces the hold
    engine.release("a")
    assert engine.hold("a") is None
    block = memory.allocate(8 * CHUNK_BYTES)
    assert block is not None
    memory.discard(block)
    engine.close()


def test_a_hold_releases_itself(engine):
    tokens = text(1, 64)
    save(engine, engine.plan(tokens))
    hold = engine.fetch_plan(engine.plan(tokens), "a")
    assert hold.num_tokens == 64 and engine.hold("a") is hold
    assert {held.tier for held in hold.items} == {"memory"}
    hold.release()
    assert engine.hold("a") is None
    assert engine.store.memory.allocate(64 * CHUNK_BYTES) is not None  # nothing pinned


def test_holds_of_two_requests_are_independent(engine):
    memory = engine.store.memory
    tokens = text(1, 64)
    save(engine, engine.plan(tokens))
    lookup(engine, tokens, owner="a")
    lookup(engine, tokens, owner="b")
    engine.release("a")
    assert len(engine.hold("b").items) == 4
    assert memory.allocate(64 * CHUNK_BYTES) is None  # b still pins its chunks
    engine.release("b")
    assert memory.allocate(64 * CHUNK_BYTES) is not None


def test_fetch_adds_to_a_hold(engine):
    plan = engine.plan(text(1, 48))
    save(engine, plan)
    assert engine.fetch(plan.full[:2], "w").chunks == list(plan.full[:2])
    assert engine.fetch(plan.full[2:], "w").chunks == list(plan.full)
    assert held_tokens(engine, "w") == 48


def test_stale_holds_are_released(tmp_path):
    engine = make_engine(tmp_path, hold_timeout_s=0.05)
    tokens = text(1, 64)
    save(engine, engine.plan(tokens))
    lookup(engine, tokens, owner="forgotten")
    time.sleep(0.1)
    lookup(engine, text(2, 16), owner="next")  # any lookup sweeps expired holds
    assert engine.hold("forgotten") is None
    assert engine.store.memory.allocate(64 * CHUNK_BYTES) is not None
    engine.close()


# -- saves ---------------------------------------------------------------------------------------


def test_missing_lists_what_is_not_stored(engine):
    plan = engine.plan(text(1, 40))
    assert engine.missing(plan.all_chunks()) == list(plan.all_chunks())
    save(engine, plan, plan.full[:1])
    assert engine.missing(plan.all_chunks()) == [plan.full[1], plan.cuts[0]]


def test_a_stalled_tier_loses_only_saves_memory_evicts_and_never_blocks(tmp_path):
    slow = SlowStore(DiskStore(tmp_path / "remote", 10**7))
    engine = make_engine(
        tmp_path,
        remote=slow,
        cpu_bytes=4 * CHUNK_BYTES,
        save_queue_bytes=2 * CHUNK_BYTES,
    )
    memory = engine.store.memory
    plan = engine.plan(text(1, 10 * CHUNK))

    def prefill() -> None:
        for chunk in plan.full:
            entry = engine.new_entry(chunk, *spec(CHUNK))
            entry.payload[:] = kv_bytes(chunk, entry.nbytes)
            engine.save([entry])
            assert memory.stats().used_bytes <= memory.capacity_bytes

    worker = threading.Thread(target=prefill)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "save blocked on a stalled tier"
    queue = engine.stats()[2]
    assert queue.dropped_saves == queue.evicted_unwritten == 10 - 4  # memory holds 4 chunks
    slow.gate.set()
    assert engine.flush(10)
    saved = slow.contains([engine.key(c) for c in plan.full])
    assert sum(saved) == 4 and saved[-3:] == [True] * 3
    assert memory.stats().used_bytes <= memory.capacity_bytes
    engine.close()


def test_saved_chunks_are_counted_and_discard_returns_the_buffer(engine):
    memory = engine.store.memory
    plan = engine.plan(text(1, 32))
    unused = engine.new_entry(plan.full[0], *spec(CHUNK))
    assert memory.stats().used_bytes == CHUNK_BYTES
    engine.discard(unused)
    assert memory.stats().used_bytes == 0
    save(engine, plan)
    assert engine.stats()[0].saved_chunks == 2


def test_new_entry_falls_back_to_the_heap_when_memory_is_full(tmp_path):
    engine = make_engine(tmp_path, cpu_bytes=CHUNK_BYTES)
    plan = engine.plan(text(1, 32))
    first = engine.new_entry(plan.full[0], *spec(CHUNK))
    second = engine.new_entry(plan.full[1], *spec(CHUNK))
    assert engine.store.memory.owns(first) and not engine.store.memory.owns(second)
    engine.discard(first)
    engine.discard(second)  # harmless for a heap buffer
    assert engine.store.memory.stats().used_bytes == 0
    engine.close()


def test_chunk_size_must_match_the_namespace(tmp_path):
    config = load_config({"chunk_size": 32}, environ={})
    with pytest.raises(ValueError, match="chunk_size"):
        CacheEngine(config, Namespace("m", "l", 0, 1, 16, FORMAT_VERSION))


# -- locate -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stored", [0, 1, 7, 8, 9, 23, 24, 25, 40])
def test_locate_finds_the_longest_prefix_across_batches(engine, stored):
    tokens = text(1, 40 * CHUNK + 5)
    plan = engine.plan(tokens)
    save(engine, plan, plan.full[:stored])
    assert len(engine.locate(plan)) == stored
    if stored == 40:
        save(engine, plan, plan.cuts)
        assert engine.locate(plan)[-1].end == 40 * CHUNK + 5


def test_locate_stops_at_a_hole(engine):
    plan = engine.plan(text(1, 40 * CHUNK))
    save(engine, plan)
    engine.store.delete([engine.key(plan.full[12])])
    assert len(engine.locate(plan)) == 12


def test_a_new_prompt_asks_about_few_keys(engine):
    """A miss must stay cheap: a 40-chunk prompt seen for the first time is not looked
    up chunk by chunk in every tier."""
    _, disk = tiers(engine)
    tokens, spans = prompt(text(1, 100), (CAT, 30), text(2, 40 * CHUNK))
    assert engine.locate(engine.plan(tokens, spans)) == []
    assert disk.stats().lookups <= 8 + 2  # one batch of full chunks, the cuts in chunk 0


# -- recurrent state (Mamba / linear attention) ------------------------------------------


def state_lookup(engine: CacheEngine, plan: ChunkPlan, owner: str = "req") -> int:
    hit = engine.fetch_plan(plan, owner, needs_state=True).num_tokens
    hold = engine.hold(owner)
    if hit:  # the prefix's chunks, then the state where it ends
        last = hold.items[-1]
        assert last.chunk == state_chunk(plan.chunks_up_to(hit)[-1])
        assert last.entry.payload.tobytes() == kv_bytes(last.chunk, 64)
    else:
        assert hold is None or not hold.items
    return hit


def test_a_state_hit_ends_where_a_state_was_stored(engine):
    tokens = text(1, 5 * CHUNK + 3)
    plan = plan_chunks(tokens, (), CHUNK, extra_cuts=(3 * CHUNK + 8,))
    save(engine, plan)
    assert state_lookup(engine, plan) == 0  # chunks alone: no state, no hit
    ends = (2 * CHUNK, 3 * CHUNK + 8)
    save(engine, plan, [state_chunk(plan.chunk_ending_at(end)) for end in ends])
    assert state_lookup(engine, plan) == 3 * CHUNK + 8  # the cut's state
    # Without the cut's state, the next one down.
    engine.store.delete([engine.key(state_chunk(plan.chunk_ending_at(ends[1])))])
    assert state_lookup(engine, plan) == 2 * CHUNK


def test_the_state_at_the_prompt_end_serves_a_longer_prompt_only(engine):
    tokens = text(2, 3 * CHUNK + 5)
    plan = plan_chunks(tokens, (), CHUNK)
    save(engine, plan)
    save(engine, plan, [state_chunk(plan.chunk_ending_at(len(tokens)))])
    # vLLM computes the last token itself: a state after it is of no use to this prompt.
    assert state_lookup(engine, plan) == 0
    longer = plan_chunks(tokens + text(3, 40), (), CHUNK, extra_cuts=(len(tokens),))
    assert state_lookup(engine, longer) == len(tokens)


def test_a_state_that_fails_to_verify_is_no_hit(engine):
    tokens = text(4, 4 * CHUNK + 1)
    plan = plan_chunks(tokens, (), CHUNK)
    save(engine, plan)
    state = state_chunk(plan.chunk_ending_at(4 * CHUNK))
    engine.store.put([wrong_check_entry(engine, state)])
    assert engine.flush(10)
    assert state_lookup(engine, plan) == 0
    assert engine.stats()[0].verify_failures == 1
