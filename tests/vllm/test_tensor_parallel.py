"""KVShelfConnector with tensor parallelism (two ranks of the CPU build).

Each rank holds its own shard of every layer's KV, so each stores and loads its shard
under its own namespace; a chunk is a hit only when every rank holds it.
"""

from __future__ import annotations

import re
import shutil

import pytest

from kvshelf.codec import decode
from kvshelf.testing import VllmServer, free_port
from tests.vllm.support import CHUNK_SIZE, Client, server_args, settled_files

pytestmark = pytest.mark.vllm
FILLER = 500
RANKS = 2
_NAMESPACE = re.compile(
    r"rank (?P<rank>\d+)/(?P<world>\d+) caching \S+ under namespace (?P<ns>[0-9a-f]+)"
)


def test_two_ranks_save_and_load_their_own_shards(idefics3, media, tmp_path):
    disk = tmp_path / "cache"
    kv = {"local_disk": str(disk), "local_cpu": False}
    args = server_args(
        "idefics3", kv, "--no-enable-prefix-caching", "--tensor-parallel-size", str(RANKS)
    )
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank
    with VllmServer(idefics3, port=free_port(), args=args, env=env) as server:
        client = Client(server)
        namespaces = {int(m["rank"]): m["ns"] for m in _NAMESPACE.finditer(client.log())}
        assert sorted(namespaces) == list(range(RANKS))
        assert len(set(namespaces.values())) == RANKS

        cold = client.ask("single-image", media, filler_tokens=FILLER)
        assert cold.status == 200 and cold.hit_tokens == 0
        files = settled_files(disk)
        shards = [
            {p.name: decode(p.read_bytes()) for p in files if p.is_relative_to(disk / ns)}
            for _, ns in sorted(namespaces.items())
        ]
        assert shards[0] and shards[0].keys() == shards[1].keys()  # every chunk on each rank
        for name, entry in shards[0].items():  # each rank's own half of the heads
            assert entry.payload_digest() != shards[1][name].payload_digest()

        # After a restart both ranks load their shards from disk: the same answer.
        client.restart()
        warm = client.ask("single-image", media, filler_tokens=FILLER)
        assert warm.hit_tokens >= warm.prompt_tokens - CHUNK_SIZE
        assert warm.same_answer(cold), (warm, cold)

        # Rank 1 loses its shards: no chunk is held by both ranks, so nothing is loaded
        # and the prompt is computed again, with the same answer.
        server.stop()
        shutil.rmtree(disk / namespaces[1])
        client.restart()
        missing = client.ask("single-image", media, filler_tokens=FILLER)
        assert missing.status == 200 and missing.hit_tokens == 0
        assert missing.same_answer(cold)
