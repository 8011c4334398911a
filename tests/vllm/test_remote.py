"""Several vLLM servers sharing one Redis, and Redis failing under a running server."""

from __future__ import annotations

import threading
import time

import pytest

from kvshelf.testing import VllmServer, free_port
from kvshelf.testing.redis_server import RedisServer, find_server_binary
from tests.vllm.support import CHUNK_SIZE, Client, scrape, server_args, wait_for_metric

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(find_server_binary() is None, reason="needs redis-server"),
]
FILLER = 400


def remote_server(model, url: str, **kv) -> VllmServer:
    settings = {"remote_url": url, "remote_timeout_s": 0.5, **kv}
    return VllmServer(
        model,
        port=free_port(),
        args=server_args("idefics3", settings, "--no-enable-prefix-caching"),
    )


def settle_keys(redis: RedisServer, quiet_s: float = 1.0, timeout_s: float = 30) -> int:
    """Redis' key count once background saves stop adding keys."""
    with redis.client() as client:
        deadline, last, since = time.monotonic() + timeout_s, -1, time.monotonic()
        while time.monotonic() < deadline:
            count = client.dbsize()
            if count != last:
                last, since = count, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                break
            time.sleep(0.2)
        return last


def test_a_prompt_computed_on_one_server_hits_on_another(idefics3, media, tmp_path):
    with RedisServer() as redis:
        a = remote_server(idefics3, redis.url, local_disk=str(tmp_path / "a"))
        b = remote_server(idefics3, redis.url, local_disk=str(tmp_path / "b"))
        with a, b:
            on_a = Client(a).ask("multi-image", media, filler_tokens=FILLER)
            assert on_a.status == 200 and on_a.hit_tokens == 0
            assert settle_keys(redis) > 0

            on_b = Client(b).ask("multi-image", media, filler_tokens=FILLER)
            assert on_b.hit_tokens >= on_b.prompt_tokens - CHUNK_SIZE
            assert on_b.same_answer(on_a)
            metrics = wait_for_metric(b, "kvshelf_loaded_tokens_total", "remote", CHUNK_SIZE)
            assert metrics[("kvshelf_loaded_tokens_total", "remote")] >= CHUNK_SIZE
            assert metrics[("kvshelf_read_bytes_total", "remote")] > 0


def test_redis_faults_cost_hits_never_requests(idefics3, media):
    # Remote tier only: every hit must come from Redis.
    with RedisServer() as redis:
        server = remote_server(idefics3, redis.url, local_cpu=False)
        with server:
            client = Client(server)

            def ask(seed: int):
                reply = client.ask("single-image", media, filler_tokens=FILLER, filler_seed=seed)
                assert reply.status == 200, reply.error
                return reply

            # Healthy: the second request hits from Redis.
            cold = ask(1)
            settle_keys(redis)
            assert ask(1).hit_tokens >= cold.prompt_tokens - CHUNK_SIZE

            # Redis killed in the middle of a run of requests: every request succeeds.
            redis.kill()
            for seed in (1, 2, 3, 1):
                assert ask(seed).hit_tokens < cold.prompt_tokens - CHUNK_SIZE
            down = scrape(server)
            failures = [("kvshelf_errors_total", "remote"), ("kvshelf_timeouts_total", "remote")]
            assert sum(down.get(name, 0) for name in failures) > 0

            # Back (empty: no persistence): saves resume once the backoff allows, then hits.
            redis.start()

            def hits_again() -> bool:
                ask(4)
                settle_keys(redis, quiet_s=0.5)
                return ask(4).hit_tokens >= cold.prompt_tokens - CHUNK_SIZE

            assert _eventually(hits_again), "hits never resumed after Redis came back"

            # Slow Redis: a lookup gives up after the timeout; the request completes.
            before = scrape(server).get(("kvshelf_timeouts_total", "remote"), 0)
            sleeper = threading.Thread(target=_debug_sleep, args=(redis, 3.0))
            sleeper.start()
            time.sleep(0.2)
            ask(5)
            sleeper.join()
            after = wait_for_metric(server, "kvshelf_timeouts_total", "remote", before + 1)
            assert after[("kvshelf_timeouts_total", "remote")] > before

            # Redis full (maxmemory, noeviction): once the tier is writing again after the
            # slow spell, saves fail and are counted, and serving goes on.
            seeds = iter(range(100, 200))
            written = scrape(server).get(("kvshelf_written_bytes_total", "remote"), 0)
            assert _eventually(lambda: _written(ask, server, next(seeds)) > written)
            with redis.client() as raw:
                raw.config_set("maxmemory-policy", "noeviction")
                raw.config_set("maxmemory", max(1, int(raw.info("memory")["used_memory"])))
            failures = scrape(server).get(("kvshelf_write_failures_total", "remote"), 0)
            for seed in (7, 8, 9):
                ask(seed)
            full = wait_for_metric(server, "kvshelf_write_failures_total", "remote", failures + 1)
            assert full[("kvshelf_write_failures_total", "remote")] > failures


def _written(ask, server, seed: int) -> float:
    ask(seed)
    return scrape(server).get(("kvshelf_written_bytes_total", "remote"), 0)


def _eventually(predicate, timeout_s: float = 90, pause_s: float = 1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(pause_s)
    return False


def _debug_sleep(redis: RedisServer, seconds: float) -> None:
    with redis.client(socket_timeout=seconds + 5) as client:
        client.execute_command("DEBUG", "SLEEP", seconds)
