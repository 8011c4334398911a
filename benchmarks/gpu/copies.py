"""Copy speed on a GPU without vLLM: the pinned link, and kvshelf's own load and save paths.

1. Pinned host<->device GB/s by size of each copy (2 GiB moved per size).
2. kvshelf's CudaMover on synthetic paged caches shaped like the two 7B models of
   ttft.py (FLASH_ATTN layout, 16-token blocks, 256-token chunks, ~8.7K tokens, block
   ids scattered at random): saves, for several save bands (how much of an entry one
   device->host copy takes out): GB/s and the CPU time to enqueue a step's copies (what
   a step pays when the GPU waits for the CPU); loads, for several bands (how much of an
   entry one host->device copy stages): GB/s. Every load is checked byte for byte
   against the blocks that were saved, with every save band.

It prints the tables and writes OUT/copies.json and OUT/copies.png.

usage: python benchmarks/gpu/copies.py --out OUT [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from kvshelf.vllm.layout import BlockCopier, discover_layout
from kvshelf.vllm.movers import CudaMover, LoadItem, SaveItem

MiB = 1 << 20
SHAPES = {"llava7b": (32, 32, 128), "gqa7b": (28, 4, 128)}  # layers, KV heads, head dim
BLOCK, CHUNK, TOKENS = 16, 256, 8704
COPY_SIZES = [256 << 10, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]
BANDS = [4 * MiB, 8 * MiB, 16 * MiB, 32 * MiB, 64 * MiB]
SAVE_BANDS = [0, 4 * MiB, 16 * MiB]  # 0: each layer of each entry goes out on its own


def link(repeats: int) -> list[dict]:
    """GB/s of pinned copies of each size, back to back on one stream (median)."""
    total = 2 << 30
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(total, dtype=torch.uint8, device="cuda")
    rows = []
    for size in COPY_SIZES:
        for kind in ("h2d", "d2h"):
            rates = []
            for _ in range(repeats):
                torch.cuda.synchronize()
                began = time.perf_counter()
                for offset in range(0, total, size):
                    d, h = device[offset : offset + size], host[offset : offset + size]
                    (
                        d.copy_(h, non_blocking=True)
                        if kind == "h2d"
                        else h.copy_(d, non_blocking=True)
                    )
                torch.cuda.synchronize()
                rates.append(total / (time.perf_counter() - began) / 1e9)
            rows.append({"copy_bytes": size, "kind": kind, "gbps": statistics.median(rates)})
    return rows


class Rig:
    """One model shape: paged caches on the GPU and one pinned entry per chunk."""

    def __init__(self, layers: int, heads: int, dim: int):
        chunks = TOKENS // CHUNK
        self.needed = chunks * CHUNK // BLOCK
        num_blocks = 2 * self.needed + 64
        caches = {
            f"layers.{i}": torch.randn(
                num_blocks, 2, BLOCK, heads, dim, dtype=torch.bfloat16, device="cuda"
            )
            for i in range(layers)
        }
        self.layout, self.raws = discover_layout(caches, num_blocks, BLOCK, "FLASH_ATTN")
        ids = random.Random(0).sample(range(num_blocks), 2 * self.needed)
        self.source, self.target = ids[: self.needed], ids[self.needed :]
        per_chunk = CHUNK // BLOCK
        copier = BlockCopier(self.layout, self.raws)
        self.payloads = []
        for _ in range(chunks):
            buffer = torch.empty(per_chunk * copier.block_bytes, dtype=torch.uint8, pin_memory=True)
            self.payloads.append(copier.payload_view(buffer, CHUNK))
        self.nbytes = self.needed * copier.block_bytes
        self.per_chunk = per_chunk

    def blocks(self, ids: list[int], c: int) -> list[int]:
        return ids[c * self.per_chunk : (c + 1) * self.per_chunk]

    def save(self, band_bytes: int, repeats: int) -> dict:
        copier = BlockCopier(self.layout, self.raws, save_band_bytes=band_bytes)
        mover = CudaMover(copier)
        rates, enqueue = [], []
        for _ in range(repeats):
            for payload in self.payloads:
                payload.zero_()
            items = [SaveItem(p, self.blocks(self.source, c)) for c, p in enumerate(self.payloads)]
            torch.cuda.synchronize()
            began = time.perf_counter()
            mover.begin_saves(items)
            for layer in range(self.layout.num_layers):
                mover.save_layer(layer)
            done = mover.finish_step()
            enqueue.append(time.perf_counter() - began)
            done.wait_saved()
            rates.append(self.nbytes / (time.perf_counter() - began) / 1e9)
        groups = copier.plan(
            [(p, 0, self.blocks(self.source, 0)) for p in self.payloads[:1]], load=False
        )
        return {
            "save_band_bytes": band_bytes,
            "save_layers": getattr(groups[0], "band", 1),
            "save_gbps": statistics.median(rates),
            "enqueue_ms": statistics.median(enqueue) * 1e3,
        }

    def load(self, band_bytes: int, repeats: int) -> dict:
        copier = BlockCopier(self.layout, self.raws, band_bytes=band_bytes)
        mover = CudaMover(copier)
        gpu, wall = [], []
        for _ in range(repeats):
            for raw in self.raws:
                raw[self.target] = 0
            items = [
                LoadItem(p, 0, self.blocks(self.target, c)) for c, p in enumerate(self.payloads)
            ]
            torch.cuda.synchronize()
            began = time.perf_counter()
            mover.load(items, None)  # no layer hooks: the compute stream waits for it all
            seconds = mover.finish_step().wait_loaded()
            torch.cuda.synchronize()
            wall.append(time.perf_counter() - began)
            gpu.append(seconds)
            for raw in self.raws:
                if not torch.equal(raw[self.target], raw[self.source]):
                    raise AssertionError(
                        f"band {band_bytes}: loaded blocks differ from the saved ones"
                    )
        return {
            "band_bytes": band_bytes,
            "band_layers": copier.plan([(items[0].payload, 0, items[0].block_ids)], load=True)[
                0
            ].band,
            "gpu_gbps": self.nbytes / statistics.median(gpu) / 1e9,
            "wall_gbps": self.nbytes / statistics.median(wall) / 1e9,
        }


def kvshelf_paths(repeats: int) -> tuple[list[dict], list[dict]]:
    saves, loads = [], []
    for model, shape in SHAPES.items():
        rig = Rig(*shape)
        for band in SAVE_BANDS:  # each save band's entries are then loaded and checked
            saves.append({"model": model, "bytes": rig.nbytes, **rig.save(band, repeats)})
            rig.load(BANDS[0], 1)
        for band in BANDS:
            loads.append({"model": model, "bytes": rig.nbytes, **rig.load(band, repeats)})
        del rig
        torch.cuda.empty_cache()
    return saves, loads


def report(link_rows: list[dict], save_rows: list[dict], kv_rows: list[dict], out: Path) -> None:
    print(f"\n{torch.cuda.get_device_name()}: pinned copies, GB/s by copy size")
    print(f"{'copy':>9s} {'H2D':>7s} {'D2H':>7s}")
    for size in COPY_SIZES:
        h2d, d2h = (
            next(r["gbps"] for r in link_rows if r["copy_bytes"] == size and r["kind"] == k)
            for k in ("h2d", "d2h")
        )
        print(f"{size / MiB:7.2f}Mi {h2d:7.1f} {d2h:7.1f}")
    print("\nkvshelf saves (CudaMover), ~8.7K tokens, block ids scattered")
    print(
        f"{'model':8s} {'GB':>5s} {'band':>7s} {'layers':>6s} {'GB/s':>6s} {'CPU ms to enqueue':>18s}"
    )
    for r in save_rows:
        print(
            f"{r['model']:8s} {r['bytes'] / 1e9:5.2f} {r['save_band_bytes'] / MiB:5.0f}Mi "
            f"{r['save_layers']:6d} {r['save_gbps']:6.1f} {r['enqueue_ms']:18.2f}"
        )
    print("\nkvshelf loads (CudaMover), same entries; every load checked byte for byte")
    print(f"{'model':8s} {'GB':>5s} {'band':>7s} {'layers':>6s} {'load GPU':>8s} {'load wall':>9s}")
    for r in kv_rows:
        print(
            f"{r['model']:8s} {r['bytes'] / 1e9:5.2f} "
            f"{r['band_bytes'] / MiB:5.0f}Mi {r['band_layers']:6d} {r['gpu_gbps']:8.1f} {r['wall_gbps']:9.1f}"
        )
    (out / "copies.json").write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "link": link_rows,
                "saves": save_rows,
                "loads": kv_rows,
            },
            indent=1,
        )
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in ("h2d", "d2h"):
        chosen = [r for r in link_rows if r["kind"] == kind]
        left.plot(
            [r["copy_bytes"] / MiB for r in chosen], [r["gbps"] for r in chosen], "o-", label=kind
        )
    left.set_xscale("log")
    left.set_xlabel("bytes per copy (MiB)")
    left.set_ylabel("GB/s")
    left.set_title("pinned copies")
    left.legend()
    for model in SHAPES:
        chosen = [r for r in kv_rows if r["model"] == model]
        right.plot(
            [r["band_bytes"] / MiB for r in chosen],
            [r["gpu_gbps"] for r in chosen],
            "o-",
            label=model,
        )
    right.set_xscale("log")
    right.set_xlabel("band (MiB staged per entry and copy)")
    right.set_title("kvshelf load, GB/s")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "copies.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("copies.py measures a GPU; none here", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    link_rows = link(args.repeats)
    save_rows, kv_rows = kvshelf_paths(args.repeats)
    report(link_rows, save_rows, kv_rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
