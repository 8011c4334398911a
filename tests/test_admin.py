"""`kvshelf stats` / `kvshelf clear` over a disk tier written by the engine and a real Redis."""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pytest

from kvshelf import admin
from kvshelf.cli import main
from kvshelf.codec import FORMAT_VERSION, HEADER_BYTES, Entry
from kvshelf.config import KVShelfConfig, load_config
from kvshelf.engine import CacheEngine
from kvshelf.keys import Namespace, StoreKey
from kvshelf.storage.redis_connect import open_remote
from kvshelf.storage.redis_layout import HEAD_BYTES, head_key

CHUNK = 16
BYTES_PER_TOKEN = 16


def spec(num_tokens: int) -> tuple[str, tuple[int, ...]]:
    return "float16", (2, num_tokens, 4)  # 16 bytes a token


def namespace(model: str) -> Namespace:
    return Namespace(model, "L1xH1xD4:float16", 0, 1, CHUNK, FORMAT_VERSION)


def fill_disk(root, model: str, num_prompts: int) -> CacheEngine:
    """Save ``num_prompts`` distinct 40-token prompts of ``model`` through the engine:
    2 full chunks each, plus a cut chunk at the prompt's end (8 tokens)."""
    config = load_config(
        {"chunk_size": CHUNK, "cpu_bytes": 0, "disk_path": str(root), "save_threads": 1}, environ={}
    )
    engine = CacheEngine(config, namespace(model), spec)
    for seed in range(num_prompts):
        tokens = [(seed * 1000 + model.__hash__() % 7 + i) % 30000 for i in range(40)]
        plan = engine.plan(tokens)
        for chunk in engine.missing(plan.all_chunks()):
            entry = engine.new_entry(chunk, *spec(chunk.num_tokens))
            entry.payload[:] = bytes(entry.nbytes)
            engine.save([entry])
    assert engine.flush(10)
    return engine


def entry_files(root) -> list[str]:
    return sorted(
        os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".kv")
    )


# -- disk ----------------------------------------------------------------------------------
@pytest.fixture
def disk(tmp_path):
    """A disk tier with two namespaces (3 and 2 prompts) and a file that is not kvshelf's."""
    root = tmp_path / "cache"
    for model, prompts in (("model-a", 3), ("model-b", 2)):
        fill_disk(root, model, prompts).close()
    (root / "README.txt").write_text("not a cache entry")
    return root


def test_disk_stats_counts_what_the_engine_wrote(disk):
    result = admin.stats(str(disk))

    files = entry_files(disk)
    assert result.tier == "disk"
    assert result.entries == len(files) == 5 * 3  # 2 full chunks + 1 cut per prompt
    assert result.bytes == sum(os.path.getsize(f) for f in files)
    by_model = {ns.description["model"]: ns for ns in result.namespaces}
    assert sorted(by_model) == ["model-a", "model-b"]
    assert by_model["model-a"].entries == 9 and by_model["model-b"].entries == 6
    assert by_model["model-a"].namespace == namespace("model-a").id().hex()
    # Sizes: a 256-byte header plus 16 bytes per token.
    assert by_model["model-b"].bytes == 2 * (
        2 * (HEADER_BYTES + CHUNK * BYTES_PER_TOKEN) + HEADER_BYTES + 8 * BYTES_PER_TOKEN
    )
    for ns in result.namespaces:
        assert ns.oldest is not None and ns.oldest <= ns.newest <= time.time() + 1


def test_disk_clear_one_namespace_by_prefix_then_all(disk):
    a_id = namespace("model-a").id().hex()

    done = admin.clear(str(disk), [a_id[:6]])

    assert done.namespaces == [a_id] and done.entries == 9
    left = admin.stats(str(disk))
    assert [ns.description["model"] for ns in left.namespaces] == ["model-b"]
    assert not (disk / a_id).exists()  # its directories go too

    done = admin.clear(str(disk))
    assert done.entries == 6
    assert admin.stats(str(disk)).entries == 0
    assert (disk / "README.txt").read_text() == "not a cache entry"  # not ours: kept


def test_disk_errors_name_the_problem(disk, tmp_path):
    with pytest.raises(admin.AdminError, match="not a directory"):
        admin.stats(str(tmp_path / "missing"))
    with pytest.raises(admin.AdminError, match="matches no namespaces"):
        admin.clear(str(disk), ["ffff"])
    with pytest.raises(admin.AdminError, match="not a hex namespace"):
        admin.clear(str(disk), ["model-a"])
    assert admin.stats(str(disk)).entries == 15  # nothing removed by a failed clear
    # A prefix must name one namespace: clearing the wrong one would lose another model's cache.
    with pytest.raises(admin.AdminError, match="matches 2 namespaces"):
        admin.match_namespaces(["ab"], ["ab" * 16, "abc" + "0" * 29], "here")


def test_cli_stats_and_clear_on_disk(disk, capsys):
    assert main(["stats", str(disk)]) == 0
    out = capsys.readouterr().out
    assert "model-a" in out and "model-b" in out and "15" in out

    assert main(["stats", "--json", str(disk)]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 15

    assert main(["clear", str(disk), "--namespace", namespace("model-b").id().hex()]) == 0
    assert "removed 6 entries" in capsys.readouterr().out

    assert main(["stats", str(disk / "nope")]) == 1
    assert "kvshelf stats: error: " in capsys.readouterr().err


# -- Redis ---------------------------------------------------------------------------------
NS_A = bytes.fromhex("aa" * 16)
NS_B = bytes.fromhex("bb" * 16)


def remote_entry(seed: int, namespace_id: bytes, nbytes: int) -> Entry:
    chunk = hashlib.sha256(f"chunk {seed}".encode()).digest()
    check = hashlib.sha256(f"check {seed}".encode()).digest()
    payload = np.zeros(nbytes, dtype=np.uint8)
    return Entry(
        StoreKey(namespace_id + chunk),
        check,
        CHUNK,
        "uint8",
        (nbytes,),
        memoryview(payload).cast("B"),
    )


@pytest.fixture
def redis_filled(redis_url, redis_server):
    """3 entries in NS_A (one in 3 parts), 2 in NS_B, an orphan part and a foreign key."""
    store = open_remote(KVShelfConfig(remote_url=redis_url, remote_part_bytes=2**16))
    entries = [remote_entry(i, NS_A, 1000) for i in range(2)]
    entries += [remote_entry(2, NS_A, 2 * 2**16 + 5)]
    entries += [remote_entry(10 + i, NS_B, 500) for i in range(2)]
    assert store.put(entries) == 5
    store.close()
    with redis_server.client() as client:
        orphan = head_key(remote_entry(99, NS_B, 1).key)[: -len(b"h")] + b"0123456789abcdef:0"
        client.set(orphan, b"x")
        client.set(b"someone-else:key", b"keep me")
    return redis_url, entries


@pytest.mark.redis
def test_redis_stats_counts_heads_per_namespace(redis_filled):
    url, entries = redis_filled

    result = admin.stats(url)

    assert result.tier == "redis" and result.entries == 5
    by_ns = {ns.namespace: ns for ns in result.namespaces}
    assert by_ns[NS_A.hex()].entries == 3 and by_ns[NS_B.hex()].entries == 2
    assert by_ns[NS_B.hex()].bytes == 2 * (HEAD_BYTES + 500)
    assert result.bytes == sum(HEAD_BYTES + e.nbytes for e in entries)
    assert result.stray == 1  # the orphan part
    assert by_ns[NS_A.hex()].newest >= by_ns[NS_A.hex()].oldest


@pytest.mark.redis
def test_redis_clear_namespace_then_all_keeps_foreign_keys(redis_filled, redis_server):
    url, _ = redis_filled

    done = admin.clear(url, ["bb"])

    assert done.namespaces == [NS_B.hex()] and done.entries == 2
    assert done.keys == 2 * 2 + 1  # heads, one part each, and the orphan part
    assert [ns.namespace for ns in admin.stats(url).namespaces] == [NS_A.hex()]

    done = admin.clear(url)
    assert done.entries == 3 and done.keys == 3 + 2 + 3
    assert admin.stats(url).entries == 0
    with redis_server.client() as client:
        assert client.keys("*") == [b"someone-else:key"]


@pytest.mark.redis
def test_cli_on_redis_and_an_unreachable_server(redis_filled, capsys):
    url, _ = redis_filled
    assert main(["stats", url]) == 0
    out = capsys.readouterr().out
    assert "aaaaaaaaaaaa" in out and "redis" in out

    assert main(["stats", "redis://127.0.0.1:1/0"]) == 1
    err = capsys.readouterr().err
    assert "kvshelf stats: error: redis://127.0.0.1:1/0" in err and "refused" in err
