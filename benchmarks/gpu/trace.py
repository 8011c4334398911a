"""Summarise a vLLM torch-profiler trace (from ttft.py --profile) step by step.

For each engine step (vLLM's ``execute_*`` range) it prints the CPU span, the span of
GPU work that started before the next step, and per CUDA stream the busy time, span and
bytes of kernels and copies; then kvshelf's own ranges (``kvshelf.*``: lookups, the
start of loads, the end of a step) with their CPU time. Times are ms from the trace's
first event.

usage: python benchmarks/gpu/trace.py TRACE.json.gz [--after MS]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

GPU = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def kind(event: dict) -> str:
    if event["cat"] == "gpu_memcpy":  # "Memcpy HtoD (Pinned -> Device)"
        parts = event["name"].split()
        return parts[1] if len(parts) > 1 else event["name"]
    return event["cat"]


def steps(events: list[dict], t0: float, after_ms: float) -> None:
    ranges = sorted(
        (
            e
            for e in events
            if e.get("cat") == "user_annotation" and e["name"].startswith("execute_")
        ),
        key=lambda e: e["ts"],
    )
    ranges = [r for r in ranges if (r["ts"] - t0) / 1e3 >= after_ms]
    gpu = sorted((e for e in events if e.get("cat") in GPU), key=lambda e: e["ts"])
    for i, step in enumerate(ranges):
        start = step["ts"]
        until = ranges[i + 1]["ts"] if i + 1 < len(ranges) else start + 10e6
        work = [e for e in gpu if start <= e["ts"] < until]
        end = max((e["ts"] + e["dur"] for e in work), default=start)
        print(
            f"{step['name']:44s} cpu {ms(start, t0):9.2f} +{step['dur'] / 1e3:7.2f}"
            f"   gpu until {ms(end, t0):9.2f}"
        )
        streams: dict[tuple, list] = defaultdict(lambda: [0, 0.0, 0, float("inf"), 0.0])
        for e in work:
            s = streams[(e["args"].get("stream"), kind(e))]
            s[0] += 1
            s[1] += e["dur"]
            s[2] += e["args"].get("bytes") or 0
            s[3] = min(s[3], e["ts"])
            s[4] = max(s[4], e["ts"] + e["dur"])
        for (stream, what), (n, busy, nbytes, first, last) in sorted(
            streams.items(), key=lambda kv: kv[1][3]
        ):
            if busy < 50 and nbytes < 1e6:
                continue  # bookkeeping copies and tiny kernels
            print(
                f"    stream {stream!s:>4s} {what:10s} n={n:5d} busy {busy / 1e3:8.2f} ms"
                f"  {ms(first, t0):9.2f} .. {ms(last, t0):9.2f}  {nbytes / 1e9:6.3f} GB"
            )


def kvshelf_ranges(events: list[dict], t0: float, after_ms: float) -> None:
    print("\nkvshelf ranges (CPU ms) over 0.5 ms:")
    for e in sorted(
        (
            e
            for e in events
            if e.get("cat") == "user_annotation" and e["name"].startswith("kvshelf.")
        ),
        key=lambda e: e["ts"],
    ):
        if (e["ts"] - t0) / 1e3 >= after_ms and e["dur"] >= 500:
            print(f"  {ms(e['ts'], t0):9.2f} +{e['dur'] / 1e3:7.2f}  {e['name']}")


def ms(ts: float, t0: float) -> float:
    return (ts - t0) / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trace", type=Path)
    parser.add_argument("--after", type=float, default=0.0, help="skip what starts before (ms)")
    args = parser.parse_args(argv)
    events = load(args.trace)
    t0 = min(e["ts"] for e in events)
    steps(events, t0, args.after)
    kvshelf_ranges(events, t0, args.after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
