"""Save and load throughput of the remote tier against raw redis-py, same run, same server.

For 256-token chunks of two model shapes, it times ``RedisStore.put`` / ``get`` (with
everything a real save or load does: skip-if-present lookup, head, checksums, landing
in a reusable memory-tier-like buffer) and a raw pipelined SET / GET of the same bytes
split into the same parts. It prints a table, writes JSON to ``--out`` and a bar chart
beside it. The target is kvshelf >= 80% of the raw client.

    python benchmarks/redis_tier.py                   # starts its own redis-server
    python benchmarks/redis_tier.py --url redis://host:6379/0
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import redis

from kvshelf.codec import Entry
from kvshelf.config import KVShelfConfig
from kvshelf.keys import StoreKey
from kvshelf.storage.base import HostBlock, HostMemory
from kvshelf.storage.redis import PIPELINE_BYTES, RedisStore
from kvshelf.storage.redis_connect import open_remote

MiB = 2**20
TOKENS = 256
TARGET_RATIO = 0.8


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    kv_heads: int
    head_size: int
    chunks: int  # default chunks per run: keeps the data moderate

    @property
    def dims(self) -> tuple[int, ...]:  # (layers, K/V, tokens, heads, head size), bf16
        return (self.layers, 2, TOKENS, self.kv_heads, self.head_size)

    @property
    def chunk_bytes(self) -> int:
        return 2 * int(np.prod(self.dims))


SHAPES = (
    Shape("llava-1.5-7b", layers=32, kv_heads=32, head_size=128, chunks=3),  # 128 MiB
    Shape("gqa-28L-4kv", layers=28, kv_heads=4, head_size=128, chunks=8),  # 14 MiB
)


class Pool(HostMemory):
    """Preallocated, pre-touched buffers handed out again and again, as the memory tier
    does; also the store's BufferSource."""

    def __init__(self, nbytes: int, count: int):
        self._free = [memoryview(np.ones(nbytes, dtype=np.uint8)).cast("B") for _ in range(count)]
        self.nbytes = nbytes

    def alloc(self, nbytes: int) -> HostBlock | None:
        if nbytes != self.nbytes or not self._free:
            return None
        return HostBlock(self._free.pop(), self)

    def free(self, block: HostBlock) -> None:
        self._free.append(block.view)

    allocate, discard = alloc, free  # BufferSource


@dataclass
class Row:
    shape: str
    op: str
    chunk_bytes: int
    chunks: int
    kvshelf_gbps: float  # from the best repetition: a busy machine only ever adds time
    raw_gbps: float
    ratio: float  # kvshelf_gbps / raw_gbps, the headline
    median_ratio: float  # median over repetitions of raw time / kvshelf time (paired)
    cpu_ratio: float  # the same for this process's CPU time
    kvshelf_s: list[float]
    raw_s: list[float]
    kvshelf_cpu_s: list[float]
    raw_cpu_s: list[float]


def main() -> None:
    args = _parse_args()
    server = None
    url = args.url
    if url is None:
        from kvshelf.testing.redis_server import RedisServer

        server = RedisServer().start()
        url = server.url
    try:
        rows, info = run(url, args)
    finally:
        if server is not None:
            server.close()
    _print(rows, info)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"info": info, "target_ratio": TARGET_RATIO, "rows": [asdict(r) for r in rows]}
    out.write_text(json.dumps(report, indent=2) + "\n")
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing server (default: start a redis-server)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions; median kept")
    parser.add_argument("--part-mib", type=int, help="remote_part_bytes in MiB (default: config's)")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=5.0,
        help="socket timeout of both clients: a stall must not abort a throughput run",
    )
    parser.add_argument("--chunks-scale", type=float, default=1.0, help="scale chunk counts")
    parser.add_argument("--out", default="out/redis_tier.json")
    return parser.parse_args()


def run(url: str, args: argparse.Namespace) -> tuple[list[Row], dict]:
    settings = {"remote_url": url, "remote_timeout_s": args.timeout_s}
    if args.part_mib is not None:
        settings["remote_part_bytes"] = args.part_mib * MiB
    config = KVShelfConfig(**settings)
    raw = redis.Redis.from_url(url, socket_timeout=config.remote_timeout_s)
    rows = []
    for shape in SHAPES:
        chunks = max(1, round(shape.chunks * args.chunks_scale))
        pool = Pool(shape.chunk_bytes, chunks)
        store = open_remote(config, pool)
        rows += _bench_shape(shape, chunks, store, raw, pool, args)
        store.close()
    info = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "redis_py": redis.__version__,
        "server": raw.info("server").get("redis_version"),
        "part_bytes": config.remote_part_bytes,
        "timeout_s": config.remote_timeout_s,
        "reps": args.reps,
    }
    raw.close()
    return rows, info


def _bench_shape(shape, chunks, store: RedisStore, raw, pool: Pool, args) -> list[Row]:
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 256, shape.chunk_bytes, dtype=np.uint8) for _ in range(chunks)]
    keys = [StoreKey(bytes(16) + i.to_bytes(32, "big")) for i in range(chunks)]
    part_bytes = store.part_bytes
    total = chunks * shape.chunk_bytes
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def entries() -> list[Entry]:  # fresh ones: no payload digest cached from last time
        views = [memoryview(p).cast("B") for p in payloads]
        return [Entry(k, bytes(32), TOKENS, "bfloat16", shape.dims, v) for k, v in zip(keys, views)]

    def kv_save() -> None:
        assert store.put(entries()) == chunks, store.stats()

    def kv_load() -> None:
        got = store.get(keys)
        assert all(g is not None for g in got), store.stats()
        for entry in got:
            pool.discard(entry.owner)

    # The same parts, grouped into pipelines the way the store groups them, so that the
    # ratio shows what the store adds (heads, checks, landing copies), not a batching choice.
    raw_parts = [
        (b"raw:%d:%d" % (c, i), memoryview(payload).cast("B")[offset : offset + part_bytes])
        for c, payload in enumerate(payloads)
        for i, offset in enumerate(range(0, payload.nbytes, part_bytes))
    ]
    raw_batches = _group(raw_parts, PIPELINE_BYTES)

    def raw_save() -> None:
        for batch in raw_batches:
            pipe = raw.pipeline(transaction=False)
            for key, view in batch:
                pipe.set(key, view)
            assert all(pipe.execute())

    def raw_load() -> None:
        got = 0
        for batch in raw_batches:
            pipe = raw.pipeline(transaction=False)
            for key, _ in batch:
                pipe.get(key)
            got += sum(len(v) for v in pipe.execute())
        assert got == total

    steps: list[tuple[str, Callable[[], None], bool]] = [
        ("raw save", raw_save, True),
        ("raw load", raw_load, False),
        ("kvshelf save", kv_save, True),
        ("kvshelf load", kv_load, False),
    ]
    for rep in range(args.reps + 1):  # the first round warms up and is not kept
        # Alternate who goes first, so neither always meets the other's leftovers.
        for name, step, flush_first in steps if rep % 2 else steps[2:] + steps[:2]:
            if flush_first:
                raw.flushall()
            began, began_cpu = time.perf_counter(), time.process_time()
            step()
            if rep:
                times.setdefault(name, []).append(time.perf_counter() - began)
                cpu.setdefault(name, []).append(time.process_time() - began_cpu)
    raw.flushall()
    rows = []
    for op in ("save", "load"):
        kv, rw = times[f"kvshelf {op}"], times[f"raw {op}"]
        kv_cpu, rw_cpu = cpu[f"kvshelf {op}"], cpu[f"raw {op}"]
        gbps = [total / min(t) / 1e9 for t in (kv, rw)]
        ratios = [gbps[0] / gbps[1], _paired(kv, rw), _paired(kv_cpu, rw_cpu)]
        rows.append(
            Row(shape.name, op, shape.chunk_bytes, chunks, *gbps, *ratios, kv, rw, kv_cpu, rw_cpu)
        )
    return rows


def _paired(kvshelf: list[float], raw: list[float]) -> float:
    """Median of raw / kvshelf over repetitions: each ran both back to back, so drift
    (other work on the machine) mostly cancels."""
    return statistics.median(r / k for k, r in zip(kvshelf, raw))


def _group(parts: list, limit: int) -> list[list]:
    """Consecutive runs of (key, view) of at most ``limit`` bytes (at least one each)."""
    batches: list[list] = [[]]
    size = 0
    for part in parts:
        if batches[-1] and size + part[1].nbytes > limit:
            batches.append([])
            size = 0
        batches[-1].append(part)
        size += part[1].nbytes
    return batches


def _print(rows: list[Row], info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"remote tier vs raw redis-py: 256-token chunks, {info['part_bytes'] // MiB} MiB"
        f" parts, redis {info['server']}"
    )
    caption = (
        f"GB/s and ratio: best of {info['reps']} runs; median, cpu: median of paired"
        f" ratios (wall, process CPU); * below {TARGET_RATIO:.0%}"
    )
    table = Table(title=title, caption=caption)
    columns = (
        "shape",
        "chunk",
        "chunks",
        "op",
        "kvshelf GB/s",
        "raw GB/s",
        "ratio",
        "median",
        "cpu",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("shape", "op") else "right")
    for r in rows:
        mark = "" if r.ratio >= TARGET_RATIO else " *"
        table.add_row(
            r.shape,
            f"{r.chunk_bytes / MiB:.0f} MiB",
            str(r.chunks),
            r.op,
            f"{r.kvshelf_gbps:.2f}",
            f"{r.raw_gbps:.2f}",
            f"{r.ratio:.0%}{mark}",
            f"{r.median_ratio:.0%}",
            f"{r.cpu_ratio:.0%}",
        )
    Console(width=120).print(table)


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.shape}\n{r.op}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x - 0.2, [r.kvshelf_gbps for r in rows], 0.4, label="kvshelf RedisStore")
    ax.bar(x + 0.2, [r.raw_gbps for r in rows], 0.4, label="raw redis-py")
    for i, r in enumerate(rows):
        ax.annotate(f"{r.ratio:.0%}", (i - 0.2, r.kvshelf_gbps), ha="center", va="bottom")
    ax.set_xticks(x, labels)
    ax.set_ylabel("GB/s, best run (256-token chunks)")
    ax.set_title("remote tier throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
