"""The remote tier against a real Redis Cluster of 3 masters with a replica each: entries
spread over the masters, and a master killed while gets and puts go on.

Time bounds are generous behaviour checks (a call must not hang), not benchmarks.
"""

from __future__ import annotations

import time

import pytest

from kvshelf.codec import Entry
from kvshelf.testing.redis_server import RedisServer
from tests.storage.test_redis import BOUND_S, make_entry, needs_server, open_store

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60), needs_server]

PART_BYTES = 2**16  # the smallest part size: several parts per entry
FAILOVER_S = 20.0  # node timeout 1 s, election, and the tier's backoff: far above all


def tags_by_master(server: RedisServer) -> dict[int, dict[bytes, int]]:
    """Per master's port: each entry's hash tag and how many of its keys (head and parts)
    that master holds, read with a plain client."""
    found: dict[int, dict[bytes, int]] = {}
    for master in server.master_nodes():
        with master.client() as client:
            keys = client.keys("kvshelf:*")
        tags = found.setdefault(master.port, {})
        for key in keys:
            tag = key[key.index(b"{") : key.index(b"}") + 1]
            tags[tag] = tags.get(tag, 0) + 1
    return found


def tag_of(entry: Entry) -> bytes:
    return b"{%s:%s}" % (entry.key[:16].hex().encode(), entry.key[16:].hex().encode())


def same_entry(got: Entry, want: Entry) -> bool:
    return (got.key, got.check, got.shape, got.payload.tobytes()) == (
        want.key,
        want.check,
        want.shape,
        want.payload.tobytes(),
    )


def test_entries_spread_over_masters_and_survive_a_failover():
    with RedisServer(cluster=True, masters=3, replicas=1, cluster_node_timeout_ms=1000) as server:
        store = open_store(server.url, remote_part_bytes=PART_BYTES, remote_timeout_s=0.5)

        # 1. Many entries, several parts each: every master holds some, and each entry's
        #    head and parts sit together on one master (one hash tag, one slot).
        entries = [make_entry(3 * PART_BYTES + 100 * i, seed=i) for i in range(60)]
        assert store.put(entries) == len(entries)
        placed = tags_by_master(server)
        assert len(placed) == 3 and all(placed.values()), placed
        parts = {tag_of(e): 1 + -(-e.nbytes // PART_BYTES) for e in entries}
        for tags in placed.values():
            assert all(parts[tag] == count for tag, count in tags.items())
        assert sum(len(tags) for tags in placed.values()) == len(entries)
        server.wait_replicated()  # the failover must not lose acknowledged writes

        # 2. SIGKILL the master of the first entry, as a crash would.
        victim = next(m for m in server.master_nodes() if tag_of(entries[0]) in placed[m.port])
        lost = [e for e in entries if tag_of(e) in placed[victim.port]]
        victim.kill()

        # 3. Keep loading everything and saving new entries. No call raises or hangs, and
        #    nothing but the stored bytes ever comes back. Stop once the promoted replica
        #    serves the victim's entries and a new save lands.
        keys = [e.key for e in entries]
        fresh: list[Entry] = []
        served_all = saved = False
        deadline = time.monotonic() + FAILOVER_S
        while not (served_all and saved):
            assert time.monotonic() < deadline, (store.stats(), server.log_tail(5))
            began = time.monotonic()
            got = store.get(keys)
            entry = make_entry(3 * PART_BYTES, seed=1000 + len(fresh))
            saved = store.put([entry]) == 1
            assert time.monotonic() - began < 2 * BOUND_S
            assert all(g is None or same_entry(g, e) for g, e in zip(got, entries))
            served_all = all(g is not None for g in got)
            if saved:
                fresh.append(entry)
            time.sleep(0.05)

        # The outage was seen, as misses and errors, not as exceptions.
        stats = store.stats()
        assert stats.misses > 0 and stats.errors > 0, stats
        # The victim's slots moved to its replica, which now serves its entries.
        masters = server.master_nodes()
        assert len(masters) == 3 and victim not in masters
        with masters[0].client() as client:
            assert client.cluster("INFO")["cluster_state"] == "ok"
        promoted = [m for m in masters if tag_of(lost[0]) in tags_by_master(server)[m.port]]
        assert len(promoted) == 1 and promoted[0].port not in placed
        got = store.get([e.key for e in lost + fresh])
        assert all(g is not None and same_entry(g, e) for g, e in zip(got, lost + fresh))
        store.close()
