"""The remote tier against a real Redis Cluster of 3 masters with a replica each: entries
spread over the masters, and a master killed while gets and puts go on.

Time bounds are generous behaviour checks (a call must not hang), not benchmarks.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import pytest
from redis import exceptions as rx

from kvshelf.codec import Entry
from kvshelf.storage.redis import RedisStore
from kvshelf.storage.redis_connect import server_error
from kvshelf.storage.redis_layout import head_key
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


def master_of(server: RedisServer, store: RedisStore, entry: Entry) -> RedisServer:
    """The master node holding ``entry``'s slot, by the store's slot map."""
    node = store.client().get_node_from_key(head_key(entry.key))
    return next(n for n in server.nodes if n.port == node.port)


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


def test_a_dead_master_costs_only_the_keys_in_its_slots():
    """Issue 16: a dead master used to mark the whole tier down until the failover was
    over, so entries on the surviving masters missed too. Now only its own keys miss,
    and they hit again once its replica is promoted."""
    # The survivors serve their slots throughout: cluster-require-full-coverage no.
    with RedisServer(
        cluster=True,
        masters=3,
        replicas=1,
        cluster_node_timeout_ms=1000,
        cluster_full_coverage=False,
    ) as server:
        # A generous timeout: a survivor slowed by a busy machine must not look dead.
        store = open_store(server.url, remote_part_bytes=PART_BYTES, remote_timeout_s=2.0)
        entries = [make_entry(2 * PART_BYTES + 100 * i, seed=i) for i in range(30)]
        assert store.put(entries) == len(entries)
        server.wait_replicated()
        victim = master_of(server, store, entries[0])
        lost = [e for e in entries if master_of(server, store, e) is victim]
        assert 0 < len(lost) < len(entries)

        # 1. Load everything in a loop; SIGKILL the victim mid-loop, as a crash would.
        #    Every load until its replica is promoted: the survivors' entries hit, byte
        #    for byte; the victim's miss. Saves to a survivor land, to the victim's slots
        #    they are dropped.
        outage = kill_mid_loop(server, store, victim, entries, lost)

        # 2. The outage was seen, counted, and confined to the victim's slots.
        stats = store.stats()
        assert outage.missed_loads > 0 and stats.errors > 0, stats
        assert stats.misses >= len(lost) * outage.missed_loads, stats
        assert outage.dropped > 0 and stats.write_failures >= outage.dropped, stats
        assert victim not in server.master_nodes()

        # 3. The promoted replica serves the victim's entries; the new ones read back.
        got = store.get([e.key for e in lost + outage.saved])
        assert all(g is not None and same_entry(g, e) for g, e in zip(got, lost + outage.saved))
        print(
            f"\nvictim's {len(lost)} entries missed for {outage.back_at - outage.killed_at:.2f}"
            f" s ({outage.missed_loads} loads); the {len(entries) - len(lost)} others hit in"
            " every load"
        )
        store.close()


@dataclass
class Outage:
    killed_at: float = 0.0
    back_at: float = 0.0  # when a load first found all the victim's entries again
    missed_loads: int = 0  # loads that missed some of the victim's entries
    dropped: int = 0  # saves to the victim's slots that did not land
    saved: list[Entry] = field(default_factory=list)  # saves that landed on survivors


def kill_mid_loop(
    server: RedisServer, store: RedisStore, victim: RedisServer, entries: list, lost: list
) -> Outage:
    """Load ``entries`` until the victim, killed on the fourth load, is replaced and its
    entries (``lost``) load again; while they miss, save one entry on a survivor and one
    on the victim per load. Checks every load: nothing but the stored bytes comes back,
    and the survivors' entries always do."""
    fresh = [make_entry(PART_BYTES, seed=2000 + i) for i in range(40)]
    to_victim = [e for e in fresh if master_of(server, store, e) is victim]
    to_survivors = [e for e in fresh if e not in to_victim]
    outage = Outage()
    deadline = time.monotonic() + FAILOVER_S
    for n in itertools.count():
        assert time.monotonic() < deadline, (store.stats(), server.log_tail(5))
        if n == 3:
            victim.kill()
            outage.killed_at = time.monotonic()
        began = time.monotonic()
        got = store.get([e.key for e in entries])
        assert time.monotonic() - began < 2 * BOUND_S
        for g, e in zip(got, entries):
            assert same_entry(g, e) if g is not None else e in lost and outage.killed_at
        if not outage.killed_at:
            continue
        if all(g is not None for g in got):
            outage.back_at = time.monotonic()
            break
        outage.missed_loads += 1
        if to_victim and to_survivors:
            outage.saved.append(to_survivors.pop())
            assert store.put(outage.saved[-1:]) == 1
            outage.dropped += 1 - store.put([to_victim.pop()])
        time.sleep(0.02)
    return outage


def test_error_replies_read_into_place_keep_their_cluster_kind():
    """A part read into place answers MOVED or CLUSTERDOWN as redis-py's parser would,
    so that the store refreshes its slot map, and never takes either for a refusal."""
    moved = server_error("MOVED 3999 127.0.0.1:7001")
    assert isinstance(moved, rx.MovedError) and (moved.slot_id, moved.port) == (3999, 7001)
    assert isinstance(server_error("CLUSTERDOWN The cluster is down"), rx.ClusterDownError)
    assert type(server_error("OOM command not allowed")) is rx.ResponseError
    assert type(server_error("MOVED garbled")) is rx.ResponseError
