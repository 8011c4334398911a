"""Load only what pays: the prefix choice, the prefill clock, and the engine using both."""

from __future__ import annotations

import math

import pytest

from kvshelf.codec import FORMAT_VERSION
from kvshelf.config import load_config
from kvshelf.engine import CacheEngine
from kvshelf.keys import Namespace
from kvshelf.lookup import WorkerLookup
from kvshelf.pacing import PROBE_BYTES, ChunkCost, PrefillClock, paying_prefix
from tests.test_engine import CHUNK, make_engine, text

MB = 10**6


def costs(*tiers: float | None, tokens: int = 256, nbytes: int = 100 * MB) -> list[ChunkCost]:
    return [ChunkCost(tokens, nbytes, rate) for rate in tiers]


def test_memory_always_pays_and_a_slow_tier_does_not():
    # 256 tokens recompute in 25.6 ms; 100 MB read in 10 ms at 10 GB/s, 66 ms at 1.5 GB/s.
    spt = 1e-4
    assert paying_prefix(costs(math.inf, math.inf), spt) == 2
    assert paying_prefix(costs(10e9, 10e9), spt) == 2
    assert paying_prefix(costs(math.inf, math.inf, 1.5e9, 1.5e9), spt) == 2
    assert paying_prefix(costs(1.5e9, 1.5e9), spt) == 0


def test_the_prefix_that_saves_the_most_time_wins():
    spt = 1e-4
    # A slow chunk between fast ones pays when the fast ones after it make up for it.
    assert paying_prefix(costs(math.inf, 2e9, math.inf, math.inf), spt) == 4
    # All or nothing (a recurrent state at the end): the sum decides.
    assert paying_prefix(costs(math.inf, math.inf, 1.5e9), spt, whole=True) == 3
    assert paying_prefix(costs(1.5e9, 1.5e9, 1.5e9), spt, whole=True) == 0


def test_an_unmeasured_tier_is_probed_a_little_first():
    spt = 1e-4
    few = costs(math.inf, None, None, None, nbytes=PROBE_BYTES // 2)
    assert paying_prefix(few, spt) == 3  # memory, then a probe of PROBE_BYTES
    assert paying_prefix(costs(None, math.inf), spt) == 1


def test_the_clock_counts_busy_prefill_steps_only():
    clock = PrefillClock(min_tokens=100)
    a, b = frozenset({"a"}), frozenset({"b"})
    clock.step(0.0, 1000, a)
    clock.step(1.0, 1000, a)  # a's step of 1000 tokens took 1 s
    assert clock.seconds_per_token == pytest.approx(1e-3)
    clock.step(2.0, 1, a)  # then 1000 more in 1 s
    clock.step(60.0, 1000, b)  # a decode step, then an idle minute: neither counts
    clock.step(61.0, 1000, a)  # a is not in b's step: the engine may have idled
    assert clock.seconds_per_token == pytest.approx(1e-3)


TOKEN_BYTES = 2**16  # big entries: reads of 8 MiB or more measure a read rate
CHUNK_BYTES = CHUNK * TOKEN_BYTES


def big_spec(num_tokens: int) -> tuple[str, tuple[int, ...]]:
    return "uint8", (num_tokens, TOKEN_BYTES)


@pytest.fixture
def two_tiers(tmp_path):
    """A prompt of 12 chunks of 1 MiB saved to disk and then evicted from memory."""
    settings = {
        "chunk_size": CHUNK,
        "cpu_bytes": 64 * CHUNK_BYTES,
        "save_threads": 1,
        "disk_path": str(tmp_path / "disk"),
        "disk_bytes": 10**9,
    }
    namespace = Namespace("test-model", "L1xH1xD4:uint8", 0, 1, CHUNK, FORMAT_VERSION)
    engine = CacheEngine(load_config(settings, environ={}), namespace, big_spec)
    plan = engine.plan(text(1, 12 * CHUNK))
    for chunk in plan.full:
        entry = engine.new_entry(chunk, *big_spec(chunk.num_tokens))
        entry.payload[:] = bytes(entry.nbytes)
        engine.save([entry])
    assert engine.flush(10)
    engine.store.memory.delete([engine.key(c) for c in plan.full])
    yield engine, plan
    engine.close()


def test_a_slow_tier_is_left_to_recompute_and_counted(two_tiers, caplog):
    caplog.set_level("INFO")
    engine, plan = two_tiers
    assert (
        engine.fetch_plan(plan, "probe", seconds_per_token=1.0).num_tokens == 12 * CHUNK
    )  # learn the rate
    engine.release("probe")
    engine.store.memory.delete([engine.key(c) for c in plan.full])
    rate = engine.store.read_rate("disk")
    slow = CHUNK_BYTES / rate / CHUNK / 10  # recomputing is 10x faster than reading
    assert engine.fetch_plan(plan, "r1", seconds_per_token=slow).num_tokens == 0
    assert engine.stats()[0].unpaid_tokens == 12 * CHUNK
    assert "recomputing 192 cached tokens" in caplog.text
    fast = CHUNK_BYTES / rate / CHUNK * 10
    assert engine.fetch_plan(plan, "r2", seconds_per_token=fast).num_tokens == 12 * CHUNK


def test_memory_chunks_load_and_the_slow_rest_is_recomputed(two_tiers):
    engine, plan = two_tiers
    engine.fetch_plan(plan, "probe", seconds_per_token=1.0)
    engine.release("probe")
    keep = [engine.key(c) for c in plan.full[:3]]
    engine.store.memory.delete([engine.key(c) for c in plan.full[3:]])
    assert engine.store.memory.contains(keep) == [True] * 3
    slow = CHUNK_BYTES / engine.store.read_rate("disk") / CHUNK / 10
    assert engine.fetch_plan(plan, "r", seconds_per_token=slow).num_tokens == 3 * CHUNK


def test_the_prefill_speed_survives_a_restart(tmp_path):
    engine = make_engine(tmp_path)
    plan = engine.plan(text(2, 2 * CHUNK))
    engine.fetch_plan(plan, "r", seconds_per_token=0.004)
    engine.close()
    again = make_engine(tmp_path)
    assert again.seconds_per_token == 0.004
    again.close()


def test_with_prefetch_off_a_lookup_is_paced_without_reading(two_tiers):
    """prefetch: false answers from what exists; the hit offered is still only what loads
    faster than it recomputes, by the rates measured so far (regression: it was unpaced)."""
    engine, plan = two_tiers
    lookup = WorkerLookup(engine, prefetch=False)
    slow_unknown = 1e-9  # no rate measured yet: up to a probe's worth (here all 12 MiB)
    probe_chunks = -(-PROBE_BYTES // CHUNK_BYTES)
    assert lookup.lookup("r0", plan, 1.0, slow_unknown) == min(12, probe_chunks) * CHUNK
    engine.fetch_plan(plan, "probe", seconds_per_token=1.0)  # a load measures the disk
    engine.release("probe")
    engine.store.memory.delete([engine.key(c) for c in plan.full])
    rate = engine.store.read_rate("disk")
    slow = CHUNK_BYTES / rate / CHUNK / 10
    assert lookup.lookup("r1", plan, 1.0, slow) == 0
    assert engine.stats()[0].unpaid_tokens == 12 * CHUNK
    assert engine.hold("r1") is None  # nothing was read or pinned
    fast = CHUNK_BYTES / rate / CHUNK * 10
    assert lookup.lookup("r2", plan, 1.0, fast) == 12 * CHUNK
    lookup.close()
