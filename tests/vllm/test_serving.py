"""KVShelfConnector under the vLLM settings users change: load-failure policy, prefix
caching, chunked prefill, request-scoped media ids, the module-path form."""

from __future__ import annotations

import pytest

from kvshelf.testing import VllmServer, free_port
from tests.vllm.support import (
    CHUNK_SIZE,
    Client,
    corrupt,
    server_args,
    settled_files,
    wait_for_metric,
)

pytestmark = pytest.mark.vllm
FILLER = 600


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_load_failures_follow_the_policy_and_never_kill_the_engine(
    policy, idefics3, media, tmp_path
):
    # Prefetch off: lookups only check that entries exist and loads read them, so a
    # corrupt entry is found at load time and reported to vLLM as failed blocks.
    disk = tmp_path / "cache"
    kv = {"local_disk": str(disk), "local_cpu": False, "prefetch": False}
    args = server_args(
        "idefics3",
        kv,
        "--no-enable-prefix-caching",
        module_path=True,
        kv_load_failure_policy=policy,
    )
    with VllmServer(idefics3, port=free_port(), args=args) as server:
        client = Client(server)
        cold = client.ask("text-only", media, filler_tokens=FILLER)
        assert cold.status == 200 and cold.hit_tokens == 0
        for path in settled_files(disk):
            corrupt(path)

        broken = client.ask("text-only", media, filler_tokens=FILLER)
        assert broken.hit_tokens >= broken.prompt_tokens - CHUNK_SIZE  # they exist...
        assert "vLLM recomputes" in client.log()  # ...but fail to load
        assert (
            wait_for_metric(server, "kvshelf_load_failures_total")[
                ("kvshelf_load_failures_total", "")
            ]
            >= 1
        )
        if policy == "recompute":
            assert broken.status == 200 and broken.same_answer(cold)
        else:
            assert broken.status != 200 or broken.text == ""
        # Either way the engine serves the next request, and right.
        assert client.ask("text-only", media, filler_tokens=FILLER).same_answer(cold)
        assert client.ask("single-image", media, filler_tokens=50).status == 200


def test_prefix_caching_on_and_chunked_prefill(idefics3, media, tmp_path):
    # A prompt longer than --max-num-batched-tokens is computed over several steps; it
    # must be saved whole and loaded whole. vLLM's own prefix caching stays on.
    disk = tmp_path / "cache"
    kv = {"local_disk": str(disk)}
    args = server_args("idefics3", kv, "--max-num-batched-tokens", "256")
    with VllmServer(idefics3, port=free_port(), args=args) as server:
        client = Client(server)
        cold = client.ask("single-image", media, filler_tokens=1500)
        assert cold.status == 200 and cold.prompt_tokens > 1500 and cold.hit_tokens == 0
        # Again on the same server: vLLM's own prefix cache answers first.
        again = client.ask("single-image", media, filler_tokens=1500)
        assert again.same_answer(cold)
        settled_files(disk)

        client.restart()
        warm = client.ask("single-image", media, filler_tokens=1500)
        assert warm.hit_tokens >= warm.prompt_tokens - CHUNK_SIZE
        assert warm.same_answer(cold)
        # A chunk already cached is not saved again.
        files = settled_files(disk)
        client.ask("single-image", media, filler_tokens=1500)
        assert settled_files(disk) == files


def test_request_scoped_media_ids_are_never_keys(idefics3, media, tmp_path):
    # With vLLM's processor cache and prefix caching both off, media ids are per
    # request: such requests must not be cached (a warning says why), text still is.
    kv = {"local_disk": str(tmp_path / "cache")}
    args = server_args("idefics3", kv, "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0")
    with VllmServer(idefics3, port=free_port(), args=args) as server:
        client = Client(server)
        first = client.ask("single-image", media, filler_tokens=300)
        second = client.ask("single-image", media, filler_tokens=300)
        assert first.hit_tokens == second.hit_tokens == 0
        assert second.same_answer(first)
        assert client.log().count("requests with images, audio or video are not cached") == 1
        client.ask("text-only", media, filler_tokens=300)
        settled_files(tmp_path / "cache")
        assert client.ask("text-only", media, filler_tokens=300).hit_tokens > 0
