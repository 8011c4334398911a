"""kvshelf's counters in vLLM's own /metrics move as requests come and go."""

from __future__ import annotations

import pytest

from kvshelf.testing import VllmServer, build_model, free_port, make_media
from tests.vllm.support import Client, scrape, server_args, settled_files, wait_for_metric

pytestmark = pytest.mark.vllm


def test_counters_follow_cold_and_warm_requests(tmp_path):
    model = build_model("qwen2_audio", tmp_path / "model", size="xs", dtype="float32")
    media = make_media(tmp_path / "media")
    disk = tmp_path / "cache"
    kv = {"cpu_bytes": "1GB", "local_disk": str(disk)}
    args = server_args("qwen2_audio", kv, "--no-enable-prefix-caching")
    with VllmServer(model, port=free_port(), args=args) as server:
        client = Client(server)
        # Nothing asked yet: no lookups, no hits.
        assert scrape(server).get(("kvshelf_lookups_total", ""), 0) == 0

        # Cold: one lookup, no hit, chunks saved into memory.
        cold = client.ask("audio", media, filler_tokens=400)
        m = wait_for_metric(server, "kvshelf_lookups_total")
        assert m[("kvshelf_lookups_total", "")] == 1
        assert m[("kvshelf_lookup_tokens_total", "")] == cold.prompt_tokens
        assert m.get(("kvshelf_hit_tokens_total", ""), 0) == 0
        assert m[("kvshelf_saved_chunks_total", "")] >= 2
        assert m[("kvshelf_written_bytes_total", "memory")] > 0
        assert m.get(("kvshelf_loaded_tokens_total", "memory"), 0) == 0

        # Warm: the hit comes from the memory tier, and is loaded.
        warm = client.ask("audio", media, filler_tokens=400)
        m = wait_for_metric(server, "kvshelf_loaded_tokens_total", "memory", warm.hit_tokens - 1)
        assert m[("kvshelf_hit_tokens_total", "")] == warm.hit_tokens == warm.prompt_tokens
        assert m[("kvshelf_loaded_tokens_total", "memory")] == warm.hit_tokens - 1
        assert m[("kvshelf_read_bytes_total", "memory")] > 0
        assert m[("kvshelf_load_seconds_count", "")] >= 1
        assert 0 < m[("kvshelf_used_bytes", "memory")] <= m[("kvshelf_capacity_bytes", "memory")]
        assert m[("kvshelf_capacity_bytes", "memory")] == 1e9

        # The disk tier is written in the background; the next step reports it.
        settled_files(disk)
        client.ask("text-only", media, filler_tokens=10)
        m = wait_for_metric(server, "kvshelf_written_bytes_total", "disk")
        assert m[("kvshelf_written_bytes_total", "disk")] > 0
        assert m[("kvshelf_entries", "disk")] >= 2
        assert m.get(("kvshelf_dropped_saves_total", ""), 0) == 0
