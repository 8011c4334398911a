"""Save and load throughput of the remote tier against raw redis-py, same run, same server.

For 256-token chunks of two model shapes, it times ``RedisStore.put`` / ``get`` (with
everything a real save or load does: skip-if-present lookup, head, checksums, landing
in a reusable memory-tier-like buffer) and a raw pipelined SET / GET of the same bytes
split into the same parts, each over 1 and over N connections (``--connections``: the
store's ``remote_connections``; raw redis-py: N threads sharing one client, each
pipelining its share). It prints a table, writes JSON to ``--out`` and a bar chart
beside it. The targets: kvshelf >= 80% of raw redis-py at the same parallelism, and a
load over N connections >= 3x one connection.

    python benchmarks/redis_tier.py                   # starts its own redis-server
    python benchmarks/redis_tier.py --connections 1,2,4,8 --server-io-threads 4
    python benchmarks/redis_tier.py --url redis://host:6379/0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import redis

from kvshelf.codec import Entry
from kvshelf.config import KVShelfConfig
from kvshelf.keys import StoreKey
from kvshelf.storage.base import HostBlock, HostMemory
from kvshelf.storage.redis import CONNECTIONS, PIPELINE_BYTES, RedisStore
from kvshelf.storage.redis_connect import open_remote

MiB = 2**20
TOKENS = 256
TARGET_RATIO = 0.8
TARGET_SPEEDUP = 3.0  # a load over N connections against one


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

    def allocate(self, nbytes: int, key: StoreKey | None = None) -> HostBlock | None:
        return self.alloc(nbytes)  # BufferSource: every buffer is alike, whatever the key

    discard = free


@dataclass
class Row:
    shape: str
    op: str
    connections: int  # the store's remote_connections; raw: threads
    chunk_bytes: int
    chunks: int
    kvshelf_gbps: float  # from the best repetition: a busy machine only ever adds time
    raw_gbps: float
    speedup: float  # kvshelf_gbps / kvshelf_gbps over one connection
    raw_speedup: float  # the same for raw redis-py
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

        server = RedisServer(io_threads=args.server_io_threads).start()
        url = server.url
    try:
        rows, info = run(url, args)
    finally:
        if server is not None:
            server.close()
    _print(rows, info)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "info": info,
        "target_ratio": TARGET_RATIO,
        "target_speedup": TARGET_SPEEDUP,
        "rows": [asdict(r) for r in rows],
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = out.with_suffix(".png")
    print(f"wrote {out}" + (f" and {png}" if _plot(rows, png) else ""))


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
    parser.add_argument(
        "--connections",
        default=f"1,{CONNECTIONS}",
        help="comma-separated connection counts; the first is the speedup baseline",
    )
    parser.add_argument(
        "--server-io-threads",
        type=int,
        default=1,
        help="io-threads of the redis-server it starts (Redis' own default: 1)",
    )
    parser.add_argument("--out", default="out/redis_tier.json")
    return parser.parse_args()


def run(url: str, args: argparse.Namespace) -> tuple[list[Row], dict]:
    counts = [int(n) for n in args.connections.split(",")]
    settings = {"remote_url": url, "remote_timeout_s": args.timeout_s}
    if args.part_mib is not None:
        settings["remote_part_bytes"] = args.part_mib * MiB
    configs = {n: KVShelfConfig(**settings, remote_connections=n) for n in counts}
    config = configs[counts[0]]
    raw = redis.Redis.from_url(url, socket_timeout=config.remote_timeout_s)
    rows = []
    for shape in SHAPES:
        chunks = max(1, round(shape.chunks * args.chunks_scale))
        pool = Pool(shape.chunk_bytes, chunks)
        stores = {n: open_remote(configs[n], pool) for n in counts}
        rows += _bench_shape(shape, chunks, stores, raw, pool, args)
        for store in stores.values():
            store.close()
    info = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "redis_py": redis.__version__,
        "server": raw.info("server").get("redis_version"),
        "server_io_threads": raw.config_get("io-threads").get("io-threads"),
        "part_bytes": config.remote_part_bytes,
        "pipeline_bytes": PIPELINE_BYTES,
        "timeout_s": config.remote_timeout_s,
        "connections": counts,
        "reps": args.reps,
    }
    raw.close()
    return rows, info


def _bench_shape(shape, chunks, stores: dict[int, RedisStore], raw, pool: Pool, args) -> list[Row]:
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 256, shape.chunk_bytes, dtype=np.uint8) for _ in range(chunks)]
    keys = [StoreKey(bytes(16) + i.to_bytes(32, "big")) for i in range(chunks)]
    part_bytes = next(iter(stores.values())).part_bytes
    total = chunks * shape.chunk_bytes
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def entries() -> list[Entry]:  # fresh ones: no payload digest cached from last time
        views = [memoryview(p).cast("B") for p in payloads]
        return [Entry(k, bytes(32), TOKENS, "bfloat16", shape.dims, v) for k, v in zip(keys, views)]

    def kv_save(store: RedisStore) -> None:
        assert store.put(entries()) == chunks, store.stats()

    def kv_load(store: RedisStore) -> None:
        got = store.get(keys)
        assert all(g is not None for g in got), store.stats()
        for entry in got:
            pool.discard(entry.owner)

    # The same parts, grouped into pipelines the way the store groups them (the same
    # bytes in flight per call), so that the ratio shows what the store adds (heads,
    # checks, landing copies), not a batching choice.
    raw_parts = [
        (b"raw:%d:%d" % (c, i), memoryview(payload).cast("B")[offset : offset + part_bytes])
        for c, payload in enumerate(payloads)
        for i, offset in enumerate(range(0, payload.nbytes, part_bytes))
    ]
    threads = {n: ThreadPoolExecutor(n) for n in stores}

    def raw_save(n: int) -> None:
        def save(batch: list) -> None:
            pipe = raw.pipeline(transaction=False)
            for key, view in batch:
                pipe.set(key, view)
            assert all(pipe.execute())

        list(threads[n].map(save, _group(raw_parts, PIPELINE_BYTES // n)))

    def raw_load(n: int) -> None:
        def load(batch: list) -> int:
            pipe = raw.pipeline(transaction=False)
            for key, _ in batch:
                pipe.get(key)
            return sum(len(v) for v in pipe.execute())

        assert sum(threads[n].map(load, _group(raw_parts, PIPELINE_BYTES // n))) == total

    steps: list[tuple[str, Callable[[], None], bool]] = []
    for n, store in stores.items():
        steps += [
            (f"raw save {n}", lambda n=n: raw_save(n), True),
            (f"raw load {n}", lambda n=n: raw_load(n), False),
            (f"kvshelf save {n}", lambda store=store: kv_save(store), True),
            (f"kvshelf load {n}", lambda store=store: kv_load(store), False),
        ]
    for rep in range(args.reps + 1):  # the first round warms up and is not kept
        # Alternate the order, so that no step always meets another's leftovers.
        for name, step, flush_first in _rotated(steps, rep):
            if flush_first:
                raw.flushall()
            began, began_cpu = time.perf_counter(), time.process_time()
            step()
            if rep:
                times.setdefault(name, []).append(time.perf_counter() - began)
                cpu.setdefault(name, []).append(time.process_time() - began_cpu)
    raw.flushall()
    for executor in threads.values():
        executor.shutdown()
    rows = []
    base = next(iter(stores))
    for op in ("save", "load"):
        for n in stores:
            kv, rw = times[f"kvshelf {op} {n}"], times[f"raw {op} {n}"]
            kv_cpu, rw_cpu = cpu[f"kvshelf {op} {n}"], cpu[f"raw {op} {n}"]
            gbps = [total / min(t) / 1e9 for t in (kv, rw)]
            ratios = [gbps[0] / gbps[1], _paired(kv, rw), _paired(kv_cpu, rw_cpu)]
            speedups = [
                min(times[f"{who} {op} {base}"]) / min(t)
                for who, t in [("kvshelf", kv), ("raw", rw)]
            ]
            rows.append(
                Row(
                    shape.name,
                    op,
                    n,
                    shape.chunk_bytes,
                    chunks,
                    *gbps,
                    *speedups,
                    *ratios,
                    kv,
                    rw,
                    kv_cpu,
                    rw_cpu,
                )
            )
    return rows


def _rotated(steps: list, rep: int) -> list:
    """The steps in the same pairs (a save, then its load), started at another pair each
    repetition."""
    pairs = [steps[i : i + 2] for i in range(0, len(steps), 2)]
    shift = rep % len(pairs)
    return [step for pair in pairs[shift:] + pairs[:shift] for step in pair]


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
        f" parts, redis {info['server']} (io-threads {info['server_io_threads']}),"
        f" {info['cpus']} CPUs"
    )
    caption = (
        f"GB/s, ratio and x1 (against {info['connections'][0]} connection): best of"
        f" {info['reps']} runs; median, cpu: median of paired ratios (wall, process CPU);"
        f" * ratio below {TARGET_RATIO:.0%}, load x1 below {TARGET_SPEEDUP:.0f}x"
    )
    table = Table(title=title, caption=caption)
    columns = (
        "shape",
        "chunk",
        "chunks",
        "op",
        "conns",
        "kvshelf GB/s",
        "raw GB/s",
        "ratio",
        "median",
        "cpu",
        "kvshelf x1",
        "raw x1",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("shape", "op") else "right")
    base = info["connections"][0]
    for r in rows:
        mark = "" if r.ratio >= TARGET_RATIO else " *"
        slow = r.op == "load" and r.connections != base and r.speedup < TARGET_SPEEDUP
        table.add_row(
            r.shape,
            f"{r.chunk_bytes / MiB:.0f} MiB",
            str(r.chunks),
            r.op,
            str(r.connections),
            f"{r.kvshelf_gbps:.2f}",
            f"{r.raw_gbps:.2f}",
            f"{r.ratio:.0%}{mark}",
            f"{r.median_ratio:.0%}",
            f"{r.cpu_ratio:.0%}",
            f"{r.speedup:.2f}x" + (" *" if slow else ""),
            f"{r.raw_speedup:.2f}x",
        )
    Console(width=140).print(table)


def _plot(rows: list[Row], path: Path) -> bool:
    """Write the chart; False without matplotlib (the bench extra), whose numbers the
    JSON holds anyway."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r.shape, r.op) for r in rows))
    counts = list(dict.fromkeys(r.connections for r in rows))
    width = 0.8 / (2 * len(counts))
    fig, ax = plt.subplots(figsize=(10, 5))
    for j, n in enumerate(counts):
        for k, (who, field) in enumerate(
            [("kvshelf", "kvshelf_gbps"), ("raw redis-py", "raw_gbps")]
        ):
            x = np.arange(len(groups)) + (2 * j + k - len(counts) + 0.5) * width
            values = [
                getattr(r, field)
                for g in groups
                for r in rows
                if (r.shape, r.op) == g and r.connections == n
            ]
            style = {"color": f"C{j}", "alpha": 1.0 if k == 0 else 0.45, "hatch": "//" * k}
            bars = ax.bar(x, values, width, label=f"{who}, {n} conn", **style)
            if k == 0:
                ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(np.arange(len(groups)), [f"{shape}\n{op}" for shape, op in groups])
    ax.set_ylabel("GB/s, best run (256-token chunks)")
    ax.set_title("remote tier throughput by connections")
    ax.legend(fontsize=8, ncol=len(counts), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
