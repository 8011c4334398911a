"""Save/load throughput of the memory and disk tiers through CacheEngine, and lookup time.

Everything goes the way the vLLM worker drives the engine: a save is ``new_entry`` ->
fill (a copy from a stand-in KV tensor) -> ``save`` -> ``flush``; a load is
``fetch_plan`` -> ``held`` -> copy into the stand-in. Chunks are 256 tokens of two bf16
shapes (LLaVA-1.5-7B: 128 MiB a chunk; a 28-layer GQA model: 14 MiB).

Memory tier: saves into a full tier (each evicts an older prompt, as in a long-running
worker; the first fill of an empty tier is shown apart), then loads. Disk tier: two
prompts on disk and memory room for one. Each repeat measures, in the disk tier's own
directory and on a prompt's worth of bytes, the device with fio: a sequential write of a
new file, then its read (O_DIRECT, 4 MiB blocks, 16 in flight). Then the disk tier alone
the same way: ``DiskStore.put`` of a new prompt with fsync, then ``DiskStore.get`` of
it, a hit with the page cache dropped, into buffers used before (as the memory tier
reuses evicted ones). Then it drops the page cache and loads through the engine the
prompt that is not in memory. Without fio (``apt-get install fio``) the reference is the
faster of ``dd iflag=direct`` and a plain buffered read of a file of the same size, and
the writes have none. A cold load by a
restarted worker (empty memory tier, so every buffer is new memory) is shown apart.
Lookup is ``plan`` + ``locate`` of a 32K-token prompt with 4 images: never seen, all in
memory, all on disk only.

Targets: memory load >= 5 GB/s; a disk-tier hit >= 80% of fio's sequential read; a load
through the engine >= 70% of it; lookup < 2 ms.

    python benchmarks/engine.py                      # ~1 GiB per shape; needs root to
    python benchmarks/engine.py --gib 0.5 --repeats 5   # drop the page cache (else fadvise)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kvshelf.codec import FORMAT_VERSION, Entry
from kvshelf.config import load_config
from kvshelf.engine import CacheEngine
from kvshelf.keys import ChunkPlan, MediaSpan, Namespace, StoreKey
from kvshelf.storage.base import HeapMemory, HostBlock
from kvshelf.storage.disk import DiskStore

GB = 1e9
MiB = 2**20
TOKENS = 256
MEMORY_TARGET_GBPS = 5.0
DISK_TARGET_RATIO = 0.7  # a load through the engine, of the sequential read
DISK_HIT_TARGET_RATIO = 0.8  # DiskStore.get alone, of the sequential read
LOOKUP_TARGET_MS = 2.0
FIO_JOB = ["--bs=4M", "--iodepth=16", "--direct=1", "--output-format=json"]
FIO_ENGINES = ("io_uring", "libaio", "psync")  # the first that runs here is used


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    kv_heads: int
    head_size: int

    def payload_shape(self, num_tokens: int) -> tuple[int, ...]:
        return (self.layers, 2, num_tokens, self.kv_heads, self.head_size)

    @property
    def chunk_bytes(self) -> int:
        return 2 * int(np.prod(self.payload_shape(TOKENS)))


SHAPES = {
    "llava-1.5-7b": Shape("llava-1.5-7b", layers=32, kv_heads=32, head_size=128),  # 128 MiB
    "gqa-28L-4kv": Shape("gqa-28L-4kv", layers=28, kv_heads=4, head_size=128),  # 14 MiB
}


@dataclass
class Result:
    shape: str
    tier: str
    op: str
    chunks: int
    bytes: int
    seconds: float  # median over repeats
    gbps: float
    target: str
    ok: bool | None
    ratio: float | None = None  # of fio's rate for the same direction (else the reference)


# -- helpers -------------------------------------------------------------------------------


def make_engine(shape: Shape, cpu_bytes: int, disk: Path | None, disk_bytes: int = 0):
    settings = {"chunk_size": TOKENS, "cpu_bytes": cpu_bytes, "save_threads": 2}
    if disk is not None:
        settings |= {"disk_path": str(disk), "disk_bytes": disk_bytes}
    config = load_config(settings, environ={})
    layout = f"L{shape.layers}xH{shape.kv_heads}xD{shape.head_size}:bfloat16"
    namespace = Namespace("bench/" + shape.name, layout, 0, 1, TOKENS, FORMAT_VERSION)
    return CacheEngine(config, namespace, lambda n: ("bfloat16", shape.payload_shape(n)))


def prompt_plan(engine: CacheEngine, num_chunks: int, seed: int) -> ChunkPlan:
    tokens = np.random.default_rng(seed).integers(0, 32000, num_chunks * TOKENS)
    return engine.plan(tokens)


def save_all(engine: CacheEngine, plan: ChunkPlan, kv: torch.Tensor) -> float:
    """new_entry -> fill from the KV stand-in -> save, for every chunk; then flush."""
    start = time.perf_counter()
    for chunk in plan.full:
        entry = engine.new_entry(chunk, "bfloat16", engine.payload_spec(chunk.num_tokens)[1])
        torch.frombuffer(entry.payload, dtype=torch.uint8).copy_(kv)
        engine.save([entry])
    if not engine.flush(600):
        raise RuntimeError("flush timed out")
    return time.perf_counter() - start


def load_all(engine: CacheEngine, plan: ChunkPlan, kv: torch.Tensor) -> float:
    """fetch_plan -> held -> copy each entry into the KV stand-in; then release."""
    start = time.perf_counter()
    hold = engine.fetch_plan(plan, "bench")
    for held in hold.items:
        kv.copy_(torch.frombuffer(held.entry.payload, dtype=torch.uint8))
    elapsed = time.perf_counter() - start
    hold.release()
    hit = hold.num_tokens
    if hit != plan.num_tokens:
        raise RuntimeError(f"expected a full hit of {plan.num_tokens} tokens, got {hit}")
    return elapsed


def drop_page_cache(root: Path) -> str:
    """Drop cached pages of every file under ``root``; returns how."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "posix_fadvise(DONTNEED)"


# -- throughput ----------------------------------------------------------------------------


def raw_copy_seconds(shape: Shape, num_chunks: int, kv: torch.Tensor) -> float:
    """The same copies as a memory-tier load, without the engine: the machine's limit."""
    sources = [torch.ones(shape.chunk_bytes, dtype=torch.uint8) for _ in range(num_chunks)]
    start = time.perf_counter()
    for source in sources:
        kv.copy_(source)
    return time.perf_counter() - start


def fresh_pages_seconds(shape: Shape, num_chunks: int) -> float:
    """Allocating and touching new memory, without the engine: what a first fill pays."""
    start = time.perf_counter()
    held = [np.empty(shape.chunk_bytes, dtype=np.uint8) for _ in range(num_chunks)]
    for array in held:
        array.fill(1)
    return time.perf_counter() - start


def bench_memory(shape: Shape, num_chunks: int, repeats: int, kv: torch.Tensor) -> list[Result]:
    """Saves into a full memory tier (each save evicts an older prompt), then loads."""
    engine = make_engine(shape, num_chunks * shape.chunk_bytes, None)
    plans = [prompt_plan(engine, num_chunks, seed=10 + i) for i in range(repeats + 1)]
    first = save_all(engine, plans[0], kv)  # fills the empty tier: fresh pages
    steady = [save_all(engine, plan, kv) for plan in plans[1:]]
    loads = [load_all(engine, plans[-1], kv) for _ in range(repeats)]
    engine.close()
    raw = statistics.median(raw_copy_seconds(shape, num_chunks, kv) for _ in range(repeats))
    load = statistics.median(loads)
    ok = num_chunks * shape.chunk_bytes / load / GB >= MEMORY_TARGET_GBPS
    return [
        _result(shape, "memory", "save, first fill", num_chunks, first),
        _result(shape, "memory", "save, full tier", num_chunks, statistics.median(steady)),
        _result(shape, "memory", "load", num_chunks, load, f">= {MEMORY_TARGET_GBPS:g} GB/s", ok),
        _result(shape, "(reference)", "copy, no engine", num_chunks, raw),
        _result(
            shape,
            "(reference)",
            "new pages, no engine",
            num_chunks,
            fresh_pages_seconds(shape, num_chunks),
        ),
    ]


def bench_disk(
    shape: Shape, num_chunks: int, repeats: int, kv: torch.Tensor, work: Path
) -> tuple[list[Result], list[dict]]:
    """Two prompts on disk, memory room for one. Each repeat measures fio, then the disk
    tier alone, then loads through the engine the prompt that is not in memory, with the
    page cache dropped; the load evicts the other prompt from memory, as in a
    long-running worker. Last, the same cold load by a restarted worker."""
    total = num_chunks * shape.chunk_bytes
    budget = total  # room for one prompt
    disk_dir = work / shape.name
    engine = make_engine(shape, budget, disk_dir, 3 * total)
    plans = [prompt_plan(engine, num_chunks, seed=20 + i) for i in range(2)]
    saves = [save_all(engine, plan, kv) for plan in plans]  # the second evicts the first
    device = DeviceRate(disk_dir, total)
    tier = TierAlone(disk_dir, 5 * total)
    unsaved = prompt_plan(engine, num_chunks, seed=30)
    tier.read([engine.key(c) for c in plans[0].full])  # touch the reused buffers once
    loads, rounds = [], []
    for attempt in range(repeats):
        plan = plans[attempt % 2]  # not in memory: the other one is
        sequential = device.measure()
        # The disk tier alone, as fio: a prompt written, then read back (page cache dropped).
        written = tier.write(tier.entries(engine, shape, unsaved, kv))  # new: hashed again
        how = drop_page_cache(disk_dir)
        hit = tier.read([engine.key(c) for c in unsaved.full])
        tier.store.delete([engine.key(c) for c in unsaved.full])
        drop_page_cache(disk_dir)
        hits = engine.store.lower[0].stats().hits
        loads.append(load_all(engine, plan, kv))
        if engine.store.lower[0].stats().hits - hits != num_chunks:
            raise RuntimeError("the load did not come from disk")
        rounds.append(
            sequential
            | {
                "tier_write_gbps": total / written / GB,
                "tier_read_gbps": total / hit / GB,
                "engine_gbps": total / loads[-1] / GB,
                "cache_drop": how,
                "o_direct": tier.store.direct,
                "o_direct_memory_align": tier.store.direct_memory_align,
            }
        )
    engine.close()
    tier.close()
    device.close()
    restarted = make_engine(shape, budget, disk_dir, 3 * total)
    drop_page_cache(disk_dir)
    after_restart = load_all(restarted, plans[0], kv)
    restarted.close()
    shutil.rmtree(disk_dir, ignore_errors=True)
    return disk_results(shape, num_chunks, rounds, saves[-1], after_restart), rounds


def disk_results(shape, num_chunks, rounds, save, after_restart) -> list[Result]:
    total = num_chunks * shape.chunk_bytes

    def median(name: str) -> float:
        return statistics.median(r[name] for r in rounds)

    fio = "fio_read_gbps" in rounds[0]
    read_ref = median("fio_read_gbps") if fio else median("sequential_gbps")
    write_ref = median("fio_write_gbps") if fio else None

    def rate(tier, op, gbps, reference=None, ratio_target=None) -> Result:
        ratio = gbps / reference if reference else None
        target, ok = "", None
        if ratio_target is not None and ratio is not None:
            target = f">= {ratio_target:.0%} of {'fio' if fio else 'sequential'} read"
            ok = ratio >= ratio_target
        seconds = total / GB / gbps
        return _result(shape, tier, op, num_chunks, seconds, target, ok, ratio)

    results = [
        _result(shape, "disk", "save (+ memory, full tier)", num_chunks, save),
        rate("disk", "write, tier alone (put, fsync)", median("tier_write_gbps"), write_ref),
        rate(
            "disk",
            "read, tier alone (get, a hit)",
            median("tier_read_gbps"),
            read_ref,
            DISK_HIT_TARGET_RATIO,
        ),
        rate("disk", "load, cold", median("engine_gbps"), read_ref, DISK_TARGET_RATIO),
        _result(shape, "disk", "load, cold, restarted", num_chunks, after_restart),
    ]
    if fio:
        engine_name = rounds[0]["fio_engine"]
        for op in ("write", "read"):
            gbps = median(f"fio_{op}_gbps")
            label = f"fio sequential {op} ({engine_name}, O_DIRECT)"
            results.append(rate("(reference)", label, gbps))
    else:
        for name in ("dd_direct", "buffered"):
            results.append(rate("(reference)", f"sequential read, {name}", median(name)))
    return results


def _result(shape, tier, op, num_chunks, seconds, target="", ok=None, ratio=None) -> Result:
    total = num_chunks * shape.chunk_bytes
    return Result(
        shape.name, tier, op, num_chunks, total, seconds, total / seconds / GB, target, ok, ratio
    )


class RecycledBuffers:
    """Read buffers touched once and used again, as the memory tier reuses evicted ones:
    a read then pays for the disk, not for new pages. Alignment as ordinary memory."""

    def __init__(self):
        self.heap = HeapMemory()
        self.free: dict[int, list[HostBlock]] = {}

    def allocate(self, nbytes: int, key: StoreKey | None = None) -> HostBlock:
        free = self.free.setdefault(nbytes, [])
        return free.pop() if free else self.heap.alloc(nbytes)

    def discard(self, block: HostBlock) -> None:
        self.free[block.view.nbytes].append(block)


class TierAlone:
    """A second DiskStore on the engine's directory (the tier is multi-process safe)."""

    def __init__(self, root: Path, capacity_bytes: int):
        self.buffers = RecycledBuffers()
        self.store = DiskStore(root, capacity_bytes, fsync=True, buffers=self.buffers)

    @staticmethod
    def entries(engine, shape: Shape, plan: ChunkPlan, kv: torch.Tensor) -> list[Entry]:
        payload = memoryview(kv.numpy())
        return [
            Entry(
                engine.key(c),
                c.check,
                c.num_tokens,
                "bfloat16",
                shape.payload_shape(c.num_tokens),
                payload,
            )
            for c in plan.full
        ]

    def write(self, entries: list[Entry]) -> float:
        """Seconds to put ``entries`` (each fsynced before it is published)."""
        start = time.perf_counter()
        stored = self.store.put(entries)
        elapsed = time.perf_counter() - start
        if stored != len(entries):
            raise RuntimeError(f"the disk tier stored {stored} of {len(entries)} entries")
        return elapsed

    def read(self, keys) -> float:
        """Seconds to get ``keys``, every one a hit."""
        start = time.perf_counter()
        got = self.store.get(keys)
        elapsed = time.perf_counter() - start
        if any(entry is None for entry in got):
            raise RuntimeError("a disk-tier read missed")
        for entry in got:
            self.buffers.discard(entry.owner)
        return elapsed

    def close(self) -> None:
        self.store.close()


def write_file(path: Path, nbytes: int) -> None:
    block = np.random.default_rng(0).integers(0, 256, 16 * MiB, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.writelines(
            block[: min(len(block), nbytes - offset)] for offset in range(0, nbytes, len(block))
        )
    os.sync()


class DeviceRate:
    """The device's own sequential rates in the disk tier's directory, each repeat: fio
    writes a new file of a prompt's size, then reads it back (as the disk tier alone
    does with a prompt). Without fio: the faster of dd iflag=direct and a buffered read
    of a file written once, and no write rate."""

    def __init__(self, directory: Path, nbytes: int):
        self.directory, self.nbytes = directory, nbytes
        self.path = directory / "sequential.bin"
        self.fio, self.engine, self.failure = shutil.which("fio"), None, ""
        if self.fio is None:
            print("fio not found (apt-get install fio): the reference is dd and a buffered read")
        else:
            self.engine = next((e for e in FIO_ENGINES if self._fio(e, "write", self.path)), None)
        if self.fio and self.engine is None:
            print(f"fio failed with every engine here ({self.failure}): using dd instead")
        if self.engine is None:
            write_file(self.path, nbytes)

    def measure(self) -> dict:
        if self.engine is None:
            out = sequential_read_gbps(self.path)
            return out | {"sequential_gbps": max(out.values())}
        self.path.unlink(missing_ok=True)  # a new file, as the disk tier writes new ones
        write = self._fio(self.engine, "write", self.path)
        read = self._fio(self.engine, "read", self.path)
        if read is None or write is None:
            raise RuntimeError(f"fio failed mid-run: {self.failure}")
        return {"fio_engine": self.engine, "fio_write_gbps": write, "fio_read_gbps": read}

    def _fio(self, engine: str, op: str, path: Path) -> float | None:
        command = [self.fio, "--name=sequential", f"--filename={path}", f"--size={self.nbytes}"]
        command += [f"--rw={op}", f"--ioengine={engine}", *FIO_JOB]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        try:  # fio may print notes before the JSON
            job = json.loads(done.stdout[done.stdout.index("{") :])["jobs"][0]
            if job["error"] == 0:
                return job[op]["bw_bytes"] / GB
        except (ValueError, KeyError, IndexError):
            pass
        lines = (done.stderr or done.stdout).strip().splitlines()
        self.failure = f"{engine}: {lines[-1] if lines else 'no output'}"
        return None

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def sequential_read_gbps(path: Path) -> dict[str, float]:
    """The disk's own speed on one file: dd with O_DIRECT, and a plain cold read."""
    size = path.stat().st_size
    out = {"dd_direct": 0.0}
    if shutil.which("dd"):
        drop_page_cache(path.parent)
        start = time.perf_counter()
        done = subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"],
            capture_output=True,
            check=False,
        )
        if done.returncode == 0:
            out["dd_direct"] = size / (time.perf_counter() - start) / GB
    drop_page_cache(path.parent)
    buffer = bytearray(16 * MiB)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    out["buffered"] = size / (time.perf_counter() - start) / GB
    return out


# -- lookup ----------------------------------------------------------------------------------


def lookup_prompt(num_tokens: int = 32 * 1024, images: int = 4, image_tokens: int = 576):
    """A 32K-token prompt with a few images spread through it."""
    tokens = np.random.default_rng(3).integers(0, 32000, num_tokens)
    spans = []
    for i in range(images):
        offset = 1000 + i * (num_tokens // images)
        tokens[offset : offset + image_tokens] = 32000
        spans.append(
            MediaSpan(hashlib.sha256(f"image {i}".encode()).hexdigest(), offset, image_tokens)
        )
    return tokens, spans


def bench_lookup(work: Path, iterations: int) -> list[dict]:
    """plan + locate of one prompt: never seen, all in memory, all on disk only."""
    shape = Shape("tiny", layers=1, kv_heads=1, head_size=1)  # payload size is irrelevant here
    disk_dir = work / "lookup"
    engine = make_engine(shape, 2**30, disk_dir, 2**30)
    tokens, spans = lookup_prompt()
    plan = engine.plan(tokens, spans)
    cases = []

    def timed(case: str) -> None:
        asked = sum(s.lookups for s in engine.store.stats())
        plan_ms, locate_ms, total_ms = [], [], []
        for _ in range(iterations):
            t0 = time.perf_counter()
            fresh = engine.plan(tokens, spans)
            t1 = time.perf_counter()
            found = engine.locate(fresh)
            t2 = time.perf_counter()
            plan_ms.append((t1 - t0) * 1e3)
            locate_ms.append((t2 - t1) * 1e3)
            total_ms.append((t2 - t0) * 1e3)
        asked = (sum(s.lookups for s in engine.store.stats()) - asked) / iterations
        median = statistics.median(total_ms)
        cases.append(
            {
                "case": case,
                "num_tokens": plan.num_tokens,
                "chunks": len(plan.all_chunks()),
                "keys_asked": asked,  # key checks summed over tiers, per lookup
                "hit_tokens": found[-1].end if found else 0,
                "plan_ms": statistics.median(plan_ms),
                "locate_ms": statistics.median(locate_ms),
                "median_ms": median,
                "p99_ms": float(np.percentile(total_ms, 99)),
                "target": f"< {LOOKUP_TARGET_MS:g} ms",
                "ok": median < LOOKUP_TARGET_MS,
            }
        )

    timed("miss")
    for chunk in plan.all_chunks():
        entry = engine.new_entry(chunk, "bfloat16", shape.payload_shape(chunk.num_tokens))
        torch.frombuffer(entry.payload, dtype=torch.uint8).fill_(1)
        engine.save([entry])
    engine.flush(60)
    timed("hit in memory")
    engine.store.memory.delete([engine.key(c) for c in plan.all_chunks()])
    timed("hit on disk only")
    engine.close()
    shutil.rmtree(disk_dir, ignore_errors=True)
    return cases


# -- report ----------------------------------------------------------------------------------


def print_tables(results: list[Result], lookups: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    table = Table(title="kvshelf engine: save / load through CacheEngine (256-token chunks, bf16)")
    ratio = "of fio" if any(r.op.startswith("fio") for r in results) else "of seq."
    numeric = ("chunks", "MiB", "seconds", "GB/s", ratio)
    for column in ("shape", "tier", "op", *numeric, "target", "ok"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for r in results:
        ok = "" if r.ok is None else ("yes" if r.ok else "NO")
        table.add_row(
            r.shape,
            r.tier,
            r.op,
            str(r.chunks),
            f"{r.bytes / MiB:.0f}",
            f"{r.seconds:.3f}",
            f"{r.gbps:.2f}",
            "" if r.ratio is None else f"{r.ratio:.0%}",
            r.target,
            ok,
        )
    console.print(table)
    lookup = Table(
        title=f"lookup: plan + locate of a {lookups[0]['num_tokens']}-token prompt, 4 images"
    )
    columns = ("case", "chunks", "keys asked", "hit tokens", "plan ms", "locate ms", "median ms")
    for column in (*columns, "p99 ms", "target", "ok"):
        lookup.add_column(column, justify="left" if column in ("case", "target", "ok") else "right")
    for c in lookups:
        lookup.add_row(
            c["case"],
            str(c["chunks"]),
            f"{c['keys_asked']:.0f}",
            str(c["hit_tokens"]),
            f"{c['plan_ms']:.3f}",
            f"{c['locate_ms']:.3f}",
            f"{c['median_ms']:.3f}",
            f"{c['p99_ms']:.3f}",
            c["target"],
            "yes" if c["ok"] else "NO",
        )
    console.print(lookup)


def plot(results: list[Result], lookups: list[dict], path: Path) -> bool:
    """Write the chart; False without matplotlib (the bench extra), whose numbers the
    JSON holds anyway."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(
        1, 2, figsize=(13, 0.32 * len(results) + 1.5), gridspec_kw={"width_ratios": [3, 1]}
    )
    colors = {"memory": "tab:blue", "disk": "tab:orange", "(reference)": "tab:gray"}
    rows = list(reversed(results))
    left.barh(range(len(rows)), [r.gbps for r in rows], color=[colors[r.tier] for r in rows])
    for y, r in enumerate(rows):
        if r.ratio is not None:  # a disk rate against fio's (or the reference's) rate
            left.annotate(f" {r.ratio:.0%}", (r.gbps, y), va="center", fontsize=6)
    left.set_yticks(range(len(rows)), [f"{r.shape}  {r.tier}  {r.op}" for r in rows], fontsize=7)
    left.axvline(MEMORY_TARGET_GBPS, color="tab:blue", linestyle="--", label="memory load target")
    left.set_xscale("log")
    left.set_xlabel("GB/s")
    left.legend(fontsize=7)
    left.set_title("through CacheEngine (gray: the machine alone)", fontsize=9)
    right.bar(range(len(lookups)), [c["median_ms"] for c in lookups], color="tab:green")
    right.set_xticks(range(len(lookups)), [c["case"] for c in lookups], fontsize=7)
    right.axhline(LOOKUP_TARGET_MS, color="red", linestyle="--", label="target")
    right.set_ylabel("ms (median)")
    right.set_title("lookup: plan + locate, 32K tokens", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--gib", type=float, default=1.0, help="data per shape and tier")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument("--lookup-iterations", type=int, default=500)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the disk tier lives")
    parser.add_argument("--out", type=Path, default=Path("out/engine.json"))
    args = parser.parse_args()
    # The copies stand in for the worker's device copies; torch's multi-threaded copy
    # only adds scheduling noise on a machine of a few cores.
    torch.set_num_threads(1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kvshelf-bench-", dir=args.out.parent))
    work.mkdir(parents=True, exist_ok=True)
    results, rounds = [], {}
    try:
        os.sync()  # lookups first, before the throughput runs leave the disk busy
        lookups = bench_lookup(work, args.lookup_iterations)
        for name in args.shapes:
            shape = SHAPES[name]
            num_chunks = max(2, round(args.gib * 2**30 / shape.chunk_bytes))
            kv = torch.from_numpy(
                np.random.default_rng(1).integers(0, 256, shape.chunk_bytes, dtype=np.uint8)
            )
            results += bench_memory(shape, num_chunks, args.repeats, kv)
            disk_results, rounds[name] = bench_disk(shape, num_chunks, args.repeats, kv, work)
            results += disk_results
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print_tables(results, lookups)
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "throughput": [asdict(r) for r in results],
        "disk_rounds": rounds,  # per repeat: sequential read speeds and the engine's cold load
        "lookup": lookups,
    }
    args.out.write_text(json.dumps(report, indent=2))
    png = args.out.with_suffix(".png")
    print(f"wrote {args.out}" + (f" and {png}" if plot(results, lookups, png) else ""))


if __name__ == "__main__":
    main()
