"""The encoder-output cache without vLLM: item keys, namespaces, worker lookups over a real
engine (memory and disk), and the scheduler's bookkeeping."""

from __future__ import annotations

import hashlib
import struct
import threading
from dataclasses import replace

import numpy as np
import pytest
from blake3 import blake3

from kvshelf.codec import Entry
from kvshelf.config import load_config
from kvshelf.encoder_cache import (
    ENCODER_CHUNK_SIZE,
    UNREADABLE,
    EncoderBook,
    EncoderItem,
    EncoderLookup,
    encoder_namespace,
)
from kvshelf.engine import CacheEngine
from kvshelf.keys import UncacheableRequest
from kvshelf.lookup import PENDING

CAT = hashlib.sha256(b"a photo of a cat").hexdigest()
DOG = hashlib.sha256(b"a photo of a dog").hexdigest()
SETTINGS = {"dtype": "float32", "mm_processor_kwargs": {"num_crops": 4}}


def item(identifier: str = CAT, **changes) -> EncoderItem:
    fields = {"modality": "image", "num_embeds": 6, "width": 4, "dtype": "float32"} | changes
    return EncoderItem(identifier, **fields)


def make_engine(tmp_path, **settings) -> CacheEngine:
    config = {
        "chunk_size": ENCODER_CHUNK_SIZE,
        "cpu_bytes": 1 << 20,
        "disk_path": str(tmp_path / "disk"),
        "save_threads": 1,
    } | settings
    namespace = encoder_namespace("test-model", SETTINGS, tp_size=1)
    return CacheEngine(load_config(config, environ={}), namespace)


def store(engine: CacheEngine, it: EncoderItem, seed: int = 0) -> np.ndarray:
    """Save an output for ``it`` as the worker does; returns its values."""
    values = np.random.default_rng(seed).standard_normal(it.shape).astype(np.float32)
    entry = engine.new_entry(it.chunk(), it.dtype, it.shape)
    np.frombuffer(entry.payload, dtype=np.float32)[:] = values.ravel()
    engine.save([entry])
    assert engine.flush(10)
    return values


def loaded(lookup: EncoderLookup, it: EncoderItem) -> np.ndarray:
    entry = lookup.take(it.owner())
    assert entry is not None
    return np.frombuffer(entry.payload, dtype=np.float32).reshape(entry.shape).copy()


def entry_file(tmp_path, engine: CacheEngine, it: EncoderItem):
    """Where the disk tier keeps ``it``'s entry (whether or not it is there)."""
    key = it.chunk().key.hex()
    return tmp_path / "disk" / engine.namespace_id.hex() / key[:2] / f"{key}.kv"


# -- keys and namespaces ---------------------------------------------------------------
def test_item_keys_are_stable_across_processes():
    """Golden values: an item's key and check digest are part of the on-disk format. Both
    hash one encoding: tag, then lengths and sizes (<IIIIH), then salt, identifier, dtype."""
    it = item(salt="tenant-1")
    body = (
        b"kvshelf/encoder-output/v1\x00"
        + struct.pack("<IIIIH", 8, 64, 6, 4, 7)
        + b"tenant-1"
        + CAT.encode()
        + b"float32"
    )
    chunk = it.chunk()
    assert (chunk.start, chunk.end) == (0, 6)
    assert chunk.key == blake3(body).digest()
    assert chunk.check == hashlib.sha256(body).digest()
    assert chunk.key.hex() == "58db48b6d68fc13e1361598677e07efa5ca6e6c41e0b6a967de2b5063e67c39b"
    assert chunk.check.hex() == "5d8180f82ad8f3f397929fc954b86badc9dc82508d8bc5df1eac1bd4ac4648d0"


@pytest.mark.parametrize(
    "change",
    [
        {"identifier": DOG},
        {"salt": "tenant-2"},
        {"num_embeds": 7},
        {"width": 8},
        {"dtype": "bfloat16"},
    ],
)
def test_every_field_but_the_modality_changes_key_and_digest(change):
    base = item(salt="tenant-1")
    other = replace(base, **change)
    assert other.chunk().key != base.chunk().key
    assert other.chunk().check != base.chunk().check
    assert replace(base, modality="video").chunk() == base.chunk()  # counters only


@pytest.mark.parametrize(
    "bad",
    [
        {"identifier": "renderer0-mm-7-image-0"},  # vLLM's request-scoped name
        {"num_embeds": 0},
        {"dtype": "complex64"},
    ],
)
def test_items_that_cannot_be_keyed_safely_are_refused(bad):
    with pytest.raises(UncacheableRequest):
        item(**bad)


def test_owner_text_round_trips_and_garbage_is_refused():
    it = item(salt="s")
    assert EncoderItem.from_owner(it.owner()) == it
    for text in ["not json", "[1, 2]", '{"identifier": "x"}', it.owner().replace("6", '"6"', 1)]:
        with pytest.raises(ValueError):
            EncoderItem.from_owner(text)


def test_namespace_covers_model_settings_and_tp_size():
    base = encoder_namespace("m", SETTINGS, 1)
    assert encoder_namespace("m", dict(reversed(SETTINGS.items())), 1).id() == base.id()
    others = [
        encoder_namespace("other", SETTINGS, 1),
        encoder_namespace("m", SETTINGS | {"dtype": "bfloat16"}, 1),
        encoder_namespace("m", SETTINGS | {"mm_processor_kwargs": {"num_crops": 8}}, 1),
        encoder_namespace("m", SETTINGS, 2),
    ]
    assert len({base.id(), *(n.id() for n in others)}) == 5
    assert base.layout.startswith("encoder-output/v1 ")


# -- the worker's lookups over a real engine ---------------------------------------------
def test_a_stored_output_hits_from_memory_and_after_a_restart_from_disk(tmp_path):
    engine = make_engine(tmp_path)
    lookup = EncoderLookup(engine)
    it = item()
    assert lookup.lookup(it.owner(), it.plan(), wait_s=5) == 0  # nothing stored yet
    values = store(engine, it)
    # 1. Same process: a hit, held until released.
    assert lookup.lookup(it.owner(), it.plan(), wait_s=5) == it.num_embeds
    assert np.array_equal(loaded(lookup, it), values)
    lookup.release(it.owner())
    assert engine.hold(it.owner()) is None
    lookup.close()
    engine.close()
    # 2. A new engine on the same directory (a restart): read from disk.
    engine = make_engine(tmp_path)
    lookup = EncoderLookup(engine)
    assert lookup.lookup(it.owner(), it.plan(), wait_s=5) == it.num_embeds
    assert np.array_equal(loaded(lookup, it), values)
    # 3. Another salt or another layout of the same media is another entry: a miss.
    for other in (replace(it, salt="x"), replace(it, width=8)):
        assert lookup.lookup(other.owner(), other.plan(), wait_s=5) == 0
    lookup.close()
    engine.close()


def test_a_corrupt_entry_is_unreadable_counted_and_removed(tmp_path):
    engine = make_engine(tmp_path)
    it = item()
    store(engine, it)
    path = entry_file(tmp_path, engine, it)
    assert path.exists()
    engine.close()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the payload's last byte: the header stays valid
    path.write_bytes(bytes(data))

    engine = make_engine(tmp_path, cpu_bytes=0)
    lookup = EncoderLookup(engine)
    assert lookup.lookup(it.owner(), it.plan(), wait_s=5) == UNREADABLE
    disk = next(s for s in engine.stats()[1] if s.tier == "disk")
    assert disk.corrupt == 1
    assert not path.exists()
    assert lookup.lookup(it.owner(), it.plan(), wait_s=5) == 0  # gone: a plain miss now
    assert lookup.take(it.owner()) is None
    lookup.close()
    engine.close()


def test_an_entry_filed_under_another_items_key_is_never_used(tmp_path):
    """A dog's output copied to the cat's key (a bad copy, a collision): the digest, bound
    to the cat, does not match; the entry is removed."""
    engine = make_engine(tmp_path)
    cat, dog = item(CAT), item(DOG)
    store(engine, dog)
    path, cat_path = entry_file(tmp_path, engine, dog), entry_file(tmp_path, engine, cat)
    cat_path.parent.mkdir(parents=True, exist_ok=True)
    engine.close()
    _refile(path, cat_path, engine.key(cat.chunk()))

    engine = make_engine(tmp_path, cpu_bytes=0)
    lookup = EncoderLookup(engine)
    assert lookup.lookup(cat.owner(), cat.plan(), wait_s=5) == UNREADABLE
    assert engine.stats()[0].verify_failures == 1
    assert not cat_path.exists()
    assert lookup.lookup(dog.owner(), dog.plan(), wait_s=5) == dog.num_embeds  # untouched
    lookup.close()
    engine.close()


def test_an_entry_of_another_layout_under_the_right_digest_is_refused(tmp_path):
    """Only a writer that lies about the shape makes one; the dtype and shape are checked
    against the item anyway."""
    engine = make_engine(tmp_path, disk_path=None)
    it = item()
    wrong = Entry(
        engine.key(it.chunk()),
        it.chunk().check,
        it.num_embeds,
        "float16",
        (it.num_embeds, 8),
        memoryview(bytearray(it.num_embeds * 8 * 2)),
    )
    engine.save([wrong])
    lookup = EncoderLookup(engine)
    assert lookup.lookup(it.owner(), it.plan(), wait_s=5) == UNREADABLE
    assert lookup.lookup(it.owner(), it.plan(), wait_s=5) == 0
    lookup.close()
    engine.close()


def test_a_lookup_answers_pending_while_the_read_runs(tmp_path):
    engine = make_engine(tmp_path)
    it = item()
    store(engine, it)
    lookup = EncoderLookup(engine)
    gate = threading.Event()
    real_fetch = engine.fetch_plan

    def slow_fetch(*args, **kwargs):
        gate.wait(10)
        return real_fetch(*args, **kwargs)

    engine.fetch_plan = slow_fetch
    assert lookup.lookup(it.owner(), it.plan(), wait_s=0) == PENDING
    gate.set()
    assert lookup.lookup(it.owner(), it.plan(), wait_s=5) == it.num_embeds
    lookup.close()
    engine.close()


# -- the scheduler's bookkeeping --------------------------------------------------------
class FakeWorker:
    """Answers lookups from a dict: owner -> answer (absent: a miss)."""

    def __init__(self, answers=None):
        self.answers = dict(answers or {})
        self.asked: list[str] = []

    def lookup(self, req_id, plan, wait_s, seconds_per_token=None):
        self.asked.append(req_id)
        return self.answers.get(req_id, 0)


def book(*workers, **kwargs) -> EncoderBook:
    return EncoderBook(workers or (FakeWorker(),), wait_s=0.1, refresh_s=60, **kwargs)


def test_a_miss_is_encoded_and_saved_a_hit_is_loaded():
    cat, dog = item(CAT), item(DOG)
    worker = FakeWorker({cat.owner(): cat.num_embeds})
    b = book(worker)
    # A request with both: the cat is held by the worker, the dog is not.
    assert b.prepare("r1", {0: cat, 1: dog}, needed=[0, 1])
    assert b.has(CAT) and not b.has(DOG)
    assert b.allocated("r1", 0, CAT) == "hit"
    assert b.allocated("r1", 1, DOG) == "miss"
    step = b.step()
    assert step.loads == [cat.owner()]
    assert step.saves == {DOG: dog.owner()}
    assert dict(b.counts) == {
        ("lookups", "image"): 2,
        ("hits", "image"): 1,
        ("misses", "image"): 1,
    }


def test_items_in_vllms_own_cache_are_not_looked_up_until_freed():
    cat = item(CAT)
    worker = FakeWorker()
    b = book(worker)
    assert b.prepare("r1", {0: cat}, [0])
    b.allocated("r1", 0, CAT)  # encoded: now in vLLM's encoder cache
    b.step()
    b.finished("r1")
    asked = len(worker.asked)
    assert b.prepare("r2", {0: cat}, [0]) and len(worker.asked) == asked
    b.step(freed=[CAT])  # vLLM evicted it
    assert b.prepare("r3", {0: cat}, [0]) and len(worker.asked) == asked + 1


def test_an_item_vllm_dropped_unseen_is_looked_up_when_vllm_asks():
    """vLLM's encoder cache was reset: the book thought the item resident, vLLM asks."""
    cat = item(CAT)
    worker = FakeWorker()
    b = book(worker)
    b.prepare("r1", {0: cat}, [0])
    b.allocated("r1", 0, CAT)
    b.step()
    worker.answers[cat.owner()] = cat.num_embeds  # stored by the worker meanwhile
    assert b.prepare("r2", {0: cat}, [0])  # resident: not asked
    assert b.has(CAT)  # vLLM lacks it after all: asked now
    assert b.allocated("r2", 0, CAT) == "hit"


def test_a_preempted_request_loads_its_item_again():
    """vLLM frees a preempted request's encoder outputs; resumed, it needs them again."""
    cat = item(CAT)
    b = book(FakeWorker({cat.owner(): cat.num_embeds}))
    assert b.prepare("r1", {0: cat}, [0]) and b.has(CAT)
    assert b.allocated("r1", 0, CAT) == "hit"
    b.step()
    b.step(freed=[CAT])  # preempted: vLLM dropped the output
    assert b.prepare("r1", {}, [0]) and b.has(CAT)
    assert b.allocated("r1", 0, CAT) == "hit"
    assert b.step().loads == [cat.owner()]


def test_a_pending_read_defers_the_request():
    cat = item(CAT)
    worker = FakeWorker({cat.owner(): PENDING})
    b = book(worker)
    assert not b.prepare("r1", {0: cat}, [0])
    worker.answers[cat.owner()] = cat.num_embeds
    assert b.prepare("r1", {}, [0]) and b.has(CAT)


def test_a_hit_not_every_worker_holds_is_a_miss_and_released():
    cat = item(CAT)
    b = book(FakeWorker({cat.owner(): cat.num_embeds}), FakeWorker())
    assert b.prepare("r1", {0: cat}, [0]) and not b.has(CAT)
    assert b.allocated("r1", 0, CAT) == "miss"
    assert b.step().releases == [cat.owner()]


def test_an_unreadable_entry_is_counted_as_corrupt_and_encoded():
    cat = item(CAT)
    b = book(FakeWorker({cat.owner(): UNREADABLE}))
    assert b.prepare("r1", {0: cat}, [0]) and not b.has(CAT)
    assert b.allocated("r1", 0, CAT) == "unreadable"
    assert b.step().saves == {CAT: cat.owner()}
    assert b.counts["corrupt", "image"] == 1 and b.counts["misses", "image"] == 1


def test_holds_nobody_loaded_are_released_when_their_requests_finish():
    cat = item(CAT)
    b = book(FakeWorker({cat.owner(): cat.num_embeds}))
    b.prepare("r1", {0: cat}, [0])
    b.prepare("r2", {0: cat}, [0])
    b.finished("r1")
    assert b.step().releases == []  # r2 may still load it
    b.finished("r2")
    assert b.step().releases == [cat.owner()]


def test_a_hold_for_another_salt_is_not_a_hit():
    """Tenants with different cache_salt never share an entry."""
    mine, theirs = item(CAT, salt="a"), item(CAT, salt="b")
    b = book(FakeWorker({mine.owner(): mine.num_embeds}))
    assert b.prepare("r1", {0: mine}, [0]) and b.has(CAT)
    assert b.prepare("r2", {0: theirs}, [0]) and not b.has(CAT)


def test_items_covered_by_computed_tokens_and_uncacheable_items_are_skipped():
    cat = item(CAT)
    worker = FakeWorker()
    b = book(worker)
    assert b.prepare("r1", {0: cat, 1: None}, needed=[1])
    assert worker.asked == []
    assert b.allocated("r1", 1, "renderer0-mm-1-image-1") == "uncacheable"
    assert b.step().saves == {}


def test_a_consumer_only_loads_and_a_producer_only_saves():
    cat = item(CAT)
    consumer = book(FakeWorker(), save=False)
    consumer.prepare("r1", {0: cat}, [0])
    consumer.allocated("r1", 0, CAT)
    assert consumer.step().saves == {}
    worker = FakeWorker({cat.owner(): cat.num_embeds})
    producer = book(worker, load=False)
    assert producer.prepare("r1", {0: cat}, [0]) and not producer.has(CAT)
    assert worker.asked == []


def _refile(source, target, key: bytes) -> None:
    """Write ``source``'s entry under another key (header re-encoded, payload as is)."""
    from kvshelf.codec import decode, encode

    entry = decode(source.read_bytes())
    moved = Entry(key, entry.check, entry.num_tokens, entry.dtype, entry.shape, entry.payload)
    target.write_bytes(encode(moved))
