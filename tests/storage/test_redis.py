"""The remote tier against a real redis-server: layout, checks, and every way it fails.

Failure scenarios use their own server (killed, full, password-protected, sleeping);
the rest share the session's server, flushed per test. Time bounds are generous
behaviour checks (a call must not hang), not benchmarks.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import kvshelf.storage.redis
from kvshelf.codec import Entry
from kvshelf.config import KVShelfConfig
from kvshelf.keys import StoreKey
from kvshelf.storage.memory import MemoryStore
from kvshelf.storage.redis import RedisStore
from kvshelf.storage.redis_connect import open_remote
from kvshelf.storage.redis_layout import HEAD_BYTES, decode_head, encode_head, head_key
from kvshelf.testing.redis_server import RedisServer, find_server_binary

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

MiB = 2**20
NS_A = bytes.fromhex("aa" * 16)
NS_B = bytes.fromhex("bb" * 16)
BOUND_S = 5.0  # "returns promptly": far above the timeouts used here, far below a hang
PASSWORD = "s3cret-Pa55word"
# For tests that start their own server (the shared one skips through its fixture).
needs_server = pytest.mark.skipif(
    find_server_binary() is None,
    reason="no redis-server or valkey-server on PATH (apt-get install redis-server)",
)


def make_entry(nbytes: int, seed: int = 0, namespace: bytes = NS_A) -> Entry:
    payload = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    chunk = hashlib.sha256(f"chunk {seed}".encode()).digest()
    check = hashlib.sha256(f"check {seed}".encode()).digest()
    key = StoreKey(namespace + chunk)
    return Entry(key, check, 256, "uint8", (nbytes,), memoryview(payload).cast("B"))


def open_store(url: str, buffers=None, **settings) -> RedisStore:
    settings.setdefault("remote_part_bytes", MiB)
    return open_remote(KVShelfConfig(remote_url=url, **settings), buffers)


def remote_keys(client: redis.Redis) -> list[bytes]:
    return sorted(client.keys("kvshelf:*"))


def part_keys(client: redis.Redis) -> list[bytes]:
    return [k for k in remote_keys(client) if not k.endswith(b":h")]


def wait_until(predicate, timeout_s: float = BOUND_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def store(redis_url):
    made = open_store(redis_url)
    yield made
    made.close()


@pytest.fixture
def client(redis_server):
    with redis_server.client() as made:
        yield made


# -- layout and round trips ----------------------------------------------------------
@pytest.mark.parametrize("nbytes", [1000, 5 * MiB, 5 * MiB + 7], ids=["small", "5MiB", "5MiB+7"])
def test_round_trip_lands_in_the_buffer_source(redis_url, client, nbytes):
    memory = MemoryStore(64 * MiB)
    store = open_store(redis_url, buffers=memory)
    entry = make_entry(nbytes)

    assert store.put([entry]) == 1
    # One head and ceil(nbytes / 1 MiB) parts, all under the entry's hash tag.
    keys = remote_keys(client)
    assert len(keys) == 1 + -(-nbytes // MiB)
    tag = f"{{{NS_A.hex()}:{entry.key[16:].hex()}}}".encode()
    assert all(tag in k for k in keys)

    (got,) = store.get([entry.key])
    assert got is not None and got.payload.tobytes() == entry.payload.tobytes()
    assert (got.key, got.check, got.num_tokens, got.shape) == (
        entry.key,
        entry.check,
        entry.num_tokens,
        entry.shape,
    )
    assert memory.owns(got)  # the read landed straight in a memory-tier buffer
    stats = store.stats()
    assert (stats.writes, stats.hits, stats.bytes_read) == (1, 1, nbytes)
    store.close()


def test_present_entries_are_not_stored_again(store, client):
    first = make_entry(3 * MiB, seed=1)
    assert store.put([first]) == 1
    before = remote_keys(client)

    # Same key, other bytes (another writer): skipped, the stored entry stays.
    again = make_entry(3 * MiB, seed=2)
    again.key, again.check = first.key, first.check
    assert store.put([again]) == 1
    assert remote_keys(client) == before
    assert store.get([first.key])[0].payload.tobytes() == first.payload.tobytes()
    stats = store.stats()
    assert (stats.writes, stats.write_skips) == (1, 1)


def test_ttl_is_set_on_every_key(redis_url, client):
    with_ttl = open_store(redis_url, remote_ttl_s=100)
    with_ttl.put([make_entry(2 * MiB, seed=1)])
    head, *parts = sorted(remote_keys(client), key=lambda k: not k.endswith(b":h"))
    assert 0 < client.ttl(head) <= 100
    assert all(client.ttl(p) > 100 for p in parts)  # parts outlive their head

    client.flushall()
    without = open_store(redis_url)
    without.put([make_entry(2 * MiB, seed=1)])
    assert all(client.ttl(k) == -1 for k in remote_keys(client))


def record_round_trips(monkeypatch) -> list[tuple[str, str]]:
    """(kind, thread name) of every round trip: pipelines and values read into place."""
    trips: list[tuple[str, str]] = []
    execute, get_into = redis.client.Pipeline.execute, kvshelf.storage.redis.get_into

    def pipeline(self, **kwargs):
        trips.append(("pipeline", threading.current_thread().name))
        return execute(self, **kwargs)

    def values(*args):
        trips.append(("get_into", threading.current_thread().name))
        return get_into(*args)

    monkeypatch.setattr(redis.client.Pipeline, "execute", pipeline)
    monkeypatch.setattr(kvshelf.storage.redis, "get_into", values)
    return trips


def test_batches_round_trips(store, monkeypatch):
    trips = record_round_trips(monkeypatch)
    entries = [make_entry(1000, seed=i) for i in range(20)]

    store.put(entries)  # EXISTS, then all parts, then all heads
    assert [kind for kind, _ in trips] == ["pipeline"] * 3
    store.contains([e.key for e in entries])
    assert len(trips) == 4
    store.get([e.key for e in entries])  # heads, then parts
    assert [kind for kind, _ in trips[4:]] == ["pipeline", "get_into"]
    # Small calls stay in the calling thread.
    assert {name for _, name in trips} == {threading.current_thread().name}


def test_large_calls_spread_over_connections(redis_url, client, monkeypatch):
    trips = record_round_trips(monkeypatch)
    store = open_store(redis_url, remote_connections=4)
    # 36 MiB in 1 MiB parts: several 8 MiB tasks (32 MiB in flight / 4 connections).
    entries = [make_entry(6 * MiB + i, seed=i) for i in range(6)]

    assert store.put(entries) == 6
    got = store.get([e.key for e in entries])
    assert [g.payload.tobytes() for g in got] == [e.payload.tobytes() for e in entries]
    # Parts went out and came back on the store's threads, over several connections.
    for kind in ("pipeline", "get_into"):
        names = {name for k, name in trips if k == kind and name.startswith("kvshelf-remote")}
        assert len(names) > 1, trips
    assert sum(c.get("name") == "kvshelf" for c in client.client_list()) > 1
    store.close()


def test_one_connection_keeps_to_the_calling_thread(redis_url, monkeypatch):
    trips = record_round_trips(monkeypatch)
    store = open_store(redis_url, remote_connections=1)
    entries = [make_entry(6 * MiB + i, seed=i) for i in range(4)]
    assert store.put(entries) == 4
    assert all(g is not None for g in store.get([e.key for e in entries]))
    assert {name for _, name in trips} == {threading.current_thread().name}
    store.close()


def test_delete_removes_head_and_parts(store, client):
    entries = [make_entry(2 * MiB, seed=i) for i in range(3)]
    store.put(entries)
    assert store.delete([entries[0].key, entries[1].key, make_entry(10, seed=9).key]) == 2
    assert len(remote_keys(client)) == 1 + 2  # only entry 2's head and parts remain
    assert store.contains([e.key for e in entries]) == [False, False, True]


def test_head_format_golden_bytes():
    """Head format v1: changing these bytes breaks every remote cache in the field."""
    payload = memoryview(bytes(range(256)) * 4)
    key = StoreKey(NS_A + bytes(range(32)))
    entry = Entry(key, bytes(32), 17, "bfloat16", (2, 256), payload)
    head = encode_head(entry, MiB, bytes(range(8)))
    assert len(head) == HEAD_BYTES == 288
    assert hashlib.sha256(head).hexdigest() == (
        "b6b4015fe8295a024bbe445e98782daf4c6652c20ada54ec81418f100fe25dd0"
    )
    decoded = decode_head(head)
    assert (decoded.part_bytes, decoded.nonce) == (MiB, bytes(range(8)))
    assert decoded.header.key == entry.key


# -- verification --------------------------------------------------------------------
def test_corrupt_part_is_a_miss_removed_and_counted(store, client):
    entry = make_entry(5 * MiB, seed=3)
    store.put([entry])
    # Flip one byte in the third part, as a bad disk or a buggy writer would.
    victim = sorted(part_keys(client), key=lambda k: int(k.rsplit(b":", 1)[1]))[2]
    client.setrange(
        victim, 12345, b"\xff" if client.getrange(victim, 12345, 12345) != b"\xff" else b"\x00"
    )

    assert store.get([entry.key]) == [None]
    assert store.stats().corrupt == 1
    assert remote_keys(client) == []


def test_corrupt_head_is_removed_with_its_parts(store, client):
    entry = make_entry(3 * MiB, seed=4)
    store.put([entry])
    client.setrange(head_key(entry.key), 40, b"\x00\x01\x02")

    assert store.get([entry.key]) == [None]
    assert store.stats().corrupt == 1
    assert remote_keys(client) == []  # the parts were found by SCAN


def test_short_part_is_corrupt_and_the_others_still_read(store, client):
    """A value of the wrong length is skipped on the wire: the next replies stay aligned."""
    entries = [make_entry(3 * MiB, seed=s) for s in (7, 8, 9)]
    store.put(entries)
    middle = entries[1].key.hex()[32:]
    victim = next(k for k in part_keys(client) if middle.encode() in k)
    client.set(victim, client.get(victim)[:-100])

    got = store.get([e.key for e in entries])
    assert got[1] is None and store.stats().corrupt == 1
    for entry, read in zip(entries[::2], got[::2]):
        assert read.payload.tobytes() == entry.payload.tobytes()
    assert store.contains([e.key for e in entries]) == [True, False, True]


def test_missing_part_is_a_miss_and_remnants_go(store, client):
    entry = make_entry(3 * MiB, seed=5)
    store.put([entry])
    client.delete(part_keys(client)[0])  # as maxmemory eviction would

    assert store.get([entry.key]) == [None]
    stats = store.stats()
    assert (stats.misses, stats.evictions, stats.corrupt) == (1, 1, 0)
    assert remote_keys(client) == []


def test_other_namespace_is_never_returned(store, client):
    entry = make_entry(2 * MiB, seed=6, namespace=NS_A)
    store.put([entry])
    other = StoreKey(NS_B + entry.key[16:])  # same chunk, another model/layout/rank
    assert store.contains([other]) == [False]
    assert store.get([other]) == [None]

    # Even bytes filed under the other namespace's name are refused: the header says A.
    client.copy(head_key(entry.key), head_key(other))
    assert store.get([other]) == [None]
    assert store.stats().corrupt == 1
    assert store.get([entry.key])[0] is not None  # the real entry is untouched


# -- configuration -------------------------------------------------------------------
@needs_server
def test_password_from_env_overrides_url_and_stays_secret(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="kvshelf")
    monkeypatch.setenv("KVSHELF_TEST_REDIS_PASSWORD", PASSWORD)
    with RedisServer(requirepass=PASSWORD) as server:
        url = server.url.replace("redis://", "redis://:wrong-url-pw@")
        config = KVShelfConfig(remote_url=url, remote_password_env="KVSHELF_TEST_REDIS_PASSWORD")
        store = open_remote(config)
        entry = make_entry(1000)
        assert store.put([entry]) == 1
        assert store.get([entry.key])[0] is not None

        server.kill()  # provoke the log lines
        assert store.contains([entry.key]) == [False]
        server.start()
        assert wait_until(lambda: store.put([entry]) == 1)
        text = repr(store) + repr(config) + caplog.text
        assert "unreachable" in caplog.text and "is back after" in caplog.text
        assert PASSWORD not in text and "wrong-url-pw" not in text
        store.close()


@needs_server
def test_wrong_password_is_a_miss_not_an_error():
    with RedisServer(requirepass=PASSWORD) as server:
        store = open_store(server.url, remote_password="not-it")
        assert store.contains([make_entry(10).key]) == [False]
        assert store.put([make_entry(10)]) == 0
        assert store.stats().errors >= 1


@needs_server
def test_password_in_url_is_used_and_redacted(caplog):
    with RedisServer(requirepass=PASSWORD) as server:
        store = open_store(server.url.replace("redis://", f"redis://:{PASSWORD}@"))
        assert store.put([make_entry(1000)]) == 1
        assert PASSWORD not in repr(store) and "***" in repr(store)
        server.kill()
        assert store.contains([make_entry(1000).key]) == [False]
        assert "unreachable" in caplog.text and PASSWORD not in caplog.text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@needs_server
def test_tls_url_with_ca_and_client_certificate():
    with RedisServer(tls=True) as server:
        files = server.tls_files
        assert server.url.startswith("rediss://")
        store = open_store(
            server.url,
            remote_ca_certs=files["ca"],
            remote_certfile=files["cert"],
            remote_keyfile=files["key"],
        )
        entry = make_entry(3 * MiB)
        assert store.put([entry]) == 1
        assert store.get([entry.key])[0].payload.tobytes() == entry.payload.tobytes()

        # Without the client certificate the server refuses the handshake: a miss.
        anonymous = open_store(server.url, remote_ca_certs=files["ca"])
        assert anonymous.contains([entry.key]) == [False]
        assert anonymous.stats().errors == 1


@needs_server
def test_unix_socket_url():
    with RedisServer(unix_socket=True) as server:
        store = open_store(server.unix_url)
        entry = make_entry(3 * MiB)
        assert store.put([entry]) == 1
        assert store.get([entry.key])[0].payload.tobytes() == entry.payload.tobytes()


@needs_server
def test_cluster_url():
    with RedisServer(cluster=True) as server:
        assert server.url.startswith("redis+cluster://")
        store = open_store(server.url)
        entries = [make_entry(2 * MiB + i, seed=i) for i in range(3)]
        assert store.put(entries) == 3
        got = store.get([e.key for e in entries])
        assert [g.payload.tobytes() for g in got] == [e.payload.tobytes() for e in entries]
        assert store.delete([entries[0].key]) == 1
        store.close()


@pytest.mark.parametrize("url", ["redis://{host}:{port}/0", "redis+cluster://{host}:{port}"])
def test_nothing_listening_is_a_miss(url):
    from kvshelf.testing.server import free_port

    store = open_store(url.format(host="127.0.0.1", port=free_port()))
    began = time.monotonic()
    assert store.contains([make_entry(10).key]) == [False]
    assert store.get([make_entry(10).key]) == [None]
    assert store.put([make_entry(10)]) == 0
    assert time.monotonic() - began < BOUND_S
    assert store.stats().errors >= 1


def test_bad_config_is_an_error(monkeypatch):
    monkeypatch.delenv("KVSHELF_UNSET_PW", raising=False)
    with pytest.raises(ValueError, match="scheme"):
        open_store("memcached://127.0.0.1:11211")
    with pytest.raises(ValueError, match="KVSHELF_UNSET_PW"):
        open_store("redis://127.0.0.1:1/0", remote_password_env="KVSHELF_UNSET_PW")
    with pytest.raises(ValueError, match="remote_part_bytes"):  # refused by the config itself
        open_store("redis://127.0.0.1:1/0", remote_part_bytes=2**30)


# -- failures ------------------------------------------------------------------------
@needs_server
def test_server_killed_then_back(caplog):
    caplog.set_level(logging.INFO, logger="kvshelf")
    with RedisServer() as server:
        store = open_store(server.url, remote_timeout_s=0.5)
        entry = make_entry(2 * MiB)
        assert store.put([entry]) == 1

        # Killed: every call answers a miss or a dropped save, promptly, no exception.
        server.kill()
        for call, want in [
            (lambda: store.contains([entry.key]), [False]),
            (lambda: store.get([entry.key]), [None]),
            (lambda: store.put([make_entry(1000, seed=1)]), 0),
        ]:
            began = time.monotonic()
            assert call() == want
            assert time.monotonic() - began < BOUND_S
        stats = store.stats()
        assert stats.errors >= 1 and stats.write_failures == 1 and stats.misses == 1
        downs = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(downs) == 1 and downs[0].levelno == logging.WARNING

        # Back (empty: no persistence): after the backoff, saves and reads work again.
        server.start()
        assert wait_until(lambda: store.put([entry]) == 1)
        assert store.get([entry.key])[0] is not None
        backs = [r for r in caplog.records if "is back after" in r.getMessage()]
        assert len(backs) == 1 and backs[0].levelno == logging.INFO
        store.close()


@needs_server
def test_server_dying_mid_load_is_one_failure(monkeypatch, caplog):
    """Regression: parallel tasks that all lose the server each told the link, and each
    report doubled the backoff. Now the call reports once: the first retry comes after
    the first backoff step (0.5 s)."""
    with RedisServer() as server:
        store = open_store(server.url, remote_timeout_s=0.5, remote_connections=4)
        entries = [make_entry(6 * MiB + i, seed=i) for i in range(6)]
        assert store.put(entries) == 6

        # The server dies after the heads are read, while the parts are on their way.
        lock, get_into = threading.Lock(), kvshelf.storage.redis.get_into

        def dying(*args):
            with lock:
                if server.is_running():
                    server.kill()
            return get_into(*args)

        monkeypatch.setattr(kvshelf.storage.redis, "get_into", dying)
        assert store.get([e.key for e in entries]) == [None] * 6
        downs = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(downs) == 1
        errors = store.stats().errors
        assert errors >= 1

        # Down: answered at once, no probe. After the first backoff step: one probe.
        assert store.contains([entries[0].key]) == [False]
        assert store.stats().errors == errors
        time.sleep(0.75)
        assert store.contains([entries[0].key]) == [False]
        assert store.stats().errors == errors + 1
        store.close()


@needs_server
def test_full_server_drops_writes_and_keeps_serving(caplog):
    with RedisServer(maxmemory="12mb", maxmemory_policy="noeviction") as server:
        store = open_store(server.url)
        stored = []
        for seed in range(40):  # 40 MiB into 12 MB: it fills up well before the end
            entry = make_entry(MiB + 1, seed=seed)
            if store.put([entry]) == 0:
                break
            stored.append(entry)
        else:
            pytest.fail("the server never refused a write")

        stats = store.stats()
        assert stats.write_failures == 1 and stats.writes == len(stored) > 0
        assert "refuses writes" in caplog.text
        # The refused entry left nothing behind; what was stored still reads.
        with server.client() as client:
            assert len(remote_keys(client)) == 3 * len(stored)  # head + 2 parts each
        got = store.get([e.key for e in stored])
        assert all(g is not None for g in got)
        assert store.contains([stored[0].key]) == [True]
        store.close()


@needs_server
def test_slow_server_calls_return_within_timeout():
    with RedisServer() as server:
        store = open_store(server.url, remote_timeout_s=0.2)
        entry = make_entry(1000)
        assert store.put([entry]) == 1

        # DEBUG SLEEP blocks the server; wait until a quick PING proves it is asleep.
        sleeper = threading.Thread(
            target=lambda: server.client().execute_command("DEBUG", "SLEEP", 2)
        )
        sleeper.start()
        probe = server.client(socket_timeout=0.05, retry=Retry(NoBackoff(), 0))
        assert wait_until(lambda: not _answers(probe))

        for call, want in [
            (lambda: store.contains([entry.key]), [False]),
            (lambda: store.get([entry.key]), [None]),
            (lambda: store.put([make_entry(1000, seed=1)]), 0),
        ]:
            began = time.monotonic()
            assert call() == want
            assert time.monotonic() - began < BOUND_S
        assert store.stats().timeouts >= 1

        sleeper.join()
        assert wait_until(lambda: store.contains([entry.key]) == [True])
        store.close()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.TimeoutError:
        return False
