"""The Store contract, run against every implementation: memory, disk and a real Redis.

Each test gets a fresh store and a fresh random namespace, so tests sharing one
redis-server never see each other's keys.
"""

from __future__ import annotations

import os
import threading

import pytest

from kvshelf.codec import Entry, payload_bytes
from kvshelf.config import load_config
from kvshelf.keys import StoreKey
from kvshelf.storage.base import Store
from kvshelf.storage.disk import DiskStore
from kvshelf.storage.memory import MemoryStore

PART_BYTES = 2**16  # the smallest remote part: the big entry below spans several


@pytest.fixture(params=["memory", "disk", "remote"])
def store(request, tmp_path) -> Store:
    if request.param == "memory":
        made: Store = MemoryStore(64 * 2**20)
    elif request.param == "disk":
        made = DiskStore(tmp_path / "disk", 64 * 2**20)
    else:
        from kvshelf.storage.redis_connect import open_remote

        url = request.getfixturevalue("redis_url")
        config = load_config({"remote_url": url, "remote_part_bytes": PART_BYTES}, environ={})
        made = open_remote(config, None)
    yield made
    made.close()


@pytest.fixture
def namespace() -> bytes:
    return os.urandom(16)


def make_entry(namespace: bytes, index: int, shape=(2, 8), dtype="bfloat16", num_tokens=8) -> Entry:
    """An entry whose payload bytes depend on its index."""
    nbytes = payload_bytes(dtype, shape)
    payload = bytes((index * 7 + i) % 256 for i in range(nbytes))
    key = StoreKey(namespace + index.to_bytes(32, "big"))
    check = (index + 1000).to_bytes(32, "big")
    return Entry(key, check, num_tokens, dtype, shape, memoryview(payload))


def assert_same(got: Entry | None, want: Entry) -> None:
    assert got is not None
    assert got.key == want.key
    assert got.check == want.check
    assert got.num_tokens == want.num_tokens
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    assert got.payload.tobytes() == want.payload.tobytes()


def test_round_trip_preserves_bytes_and_metadata(store, namespace):
    entries = [
        make_entry(namespace, 1),
        make_entry(namespace, 2, shape=(3, 1, 5), dtype="float32", num_tokens=3),
        make_entry(namespace, 3, shape=(5, 3 * PART_BYTES // 10), dtype="uint8", num_tokens=5),
        make_entry(namespace, 4, shape=(1,), dtype="float8_e4m3fn", num_tokens=1),
    ]
    assert store.put(entries) == len(entries)
    got = store.get([e.key for e in entries])
    for g, want in zip(got, entries, strict=True):
        assert_same(g, want)


def test_get_of_absent_key_is_none(store, namespace):
    present = make_entry(namespace, 1)
    store.put([present])
    got = store.get([make_entry(namespace, 0).key, present.key, make_entry(namespace, 2).key])
    assert got[0] is None and got[2] is None
    assert_same(got[1], present)


def test_contains(store, namespace):
    a, b = make_entry(namespace, 1), make_entry(namespace, 2)
    assert store.contains([a.key, b.key]) == [False, False]
    store.put([a])
    assert store.contains([a.key, b.key]) == [True, False]
    assert store.contains([b.key, a.key, a.key]) == [False, True, True]


def test_delete(store, namespace):
    a, b, c = (make_entry(namespace, i) for i in range(3))
    store.put([a, b, c])
    assert store.delete([a.key, make_entry(namespace, 9).key, c.key]) == 2
    assert store.contains([a.key, b.key, c.key]) == [False, True, False]
    assert store.get([a.key]) == [None]
    assert_same(store.get([b.key])[0], b)
    assert store.delete([a.key]) == 0


def test_put_of_an_existing_key_is_skipped(store, namespace):
    first = make_entry(namespace, 1)
    store.put([first])
    before = store.stats()
    # same key, other bytes: keys are content addresses, so the store keeps the first
    second = make_entry(namespace, 2)
    second = Entry(first.key, first.check, 8, "bfloat16", (2, 8), second.payload)
    assert store.put([second]) == 1  # present, so counted as stored
    after = store.stats()
    assert after.write_skips == before.write_skips + 1
    assert after.writes == before.writes
    assert after.bytes_written == before.bytes_written
    assert_same(store.get([first.key])[0], first)


def test_stats_move(store, namespace):
    a, b = make_entry(namespace, 1), make_entry(namespace, 2)
    start = store.stats()
    assert start.tier == store.name
    store.put([a, b])
    store.contains([a.key, make_entry(namespace, 3).key])
    store.get([a.key, make_entry(namespace, 4).key])
    stats = store.stats()
    assert stats.writes - start.writes == 2
    assert stats.bytes_written - start.bytes_written == a.nbytes + b.nbytes
    assert stats.lookups - start.lookups == 2
    assert stats.lookup_hits - start.lookup_hits == 1
    assert stats.hits - start.hits == 1
    assert stats.misses - start.misses == 1
    assert stats.bytes_read - start.bytes_read == a.nbytes
    assert stats.corrupt == stats.write_failures == 0
    assert isinstance(stats.as_dict()["writes"], int)


def test_empty_calls(store):
    assert store.contains([]) == []
    assert store.get([]) == []
    assert store.put([]) == 0
    assert store.delete([]) == 0


def test_threads_share_a_store(store, namespace):
    """Every method is thread-safe: 4 threads put and read back their own keys."""
    failures: list[str] = []

    def work(thread: int) -> None:
        entries = [make_entry(namespace, thread * 100 + i) for i in range(20)]
        for entry in entries:
            store.put([entry])
        for entry, got in zip(entries, store.get([e.key for e in entries])):
            if got is None or got.payload.tobytes() != entry.payload.tobytes():
                failures.append(entry.key.hex())

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert store.stats().writes == 80
