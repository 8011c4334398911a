"""The demo's results: the table, the checks (every run-2 request hits; P1 at size l),
demo.json and demo.png."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from kvshelf.bench.report import plot_ttft, runs_table, write_json
from kvshelf.bench.run import COLD, WARM, Measurement
from kvshelf.demo.machine import cpu_name, machine

if TYPE_CHECKING:
    from kvshelf.demo.run import Demo

P1_RATIO = 0.10
RUN_LABELS = {0: "run 1", 1: "run 2"}
DEMO_LABELS = {COLD: "run 1 (empty cache)", WARM: "run 2 (after a restart: kvshelf disk tier)"}


def report(demo: Demo, total_s: float) -> int:
    """Print the runs, check them, write demo.json and demo.png; the exit status."""
    demo.timings["total_s"] = total_s
    console = demo.console
    console.print()
    console.print(
        runs_table(
            demo.measurements,
            f"kvshelf demo: the page's client, run 1 on an empty cache, run 2 "
            f"after a restart; prompts padded to "
            f"{demo.args.prompt_tokens} tokens, tiny models size "
            f"{demo.args.size} ({demo.dtype})",
            RUN_LABELS,
            show_media=False,
        )
    )
    console.print(
        "TTFT: request sent -> first streamed chunk with a generated token. Run 2 follows "
        "a server restart: a hit's first request loads from kvshelf's disk tier; a later "
        "request with the same media and text also finds vLLM's own prefix cache "
        '("loaded" counts what kvshelf copied in).',
        style="dim",
    )
    console.print(
        f"Measured on {cpu_name()}, {os.cpu_count()} CPU cores; dtype "
        f"{demo.dtype} ({demo.dtype_why}).",
        style="dim",
        highlight=False,
    )
    console.print("\nkvshelf's log lines (from the servers' logs):")
    for phase, line in demo.log_lines:
        console.print(f"  {phase:<4} {line}", highlight=False, soft_wrap=True)
    ok = _check(demo)
    out = demo.args.out_dir
    meta = {
        "kind": "kvshelf-demo",
        "size": demo.args.size,
        "dtype": demo.dtype,
        "dtype_why": demo.dtype_why,
        "prompt_tokens": demo.args.prompt_tokens,
        "timings_s": demo.timings,
        "machine": machine(),
        "warmups": [vars(m) for m in demo.warmups],
        "log_lines": [{"phase": p, "line": ln} for p, ln in demo.log_lines],
    }
    console.print(f"\nwrote {write_json(out / 'demo.json', demo.measurements, meta)}")
    title = (
        f"kvshelf demo: TTFT per request, {demo.args.prompt_tokens}-token prompts, "
        f"tiny models size {demo.args.size} on {os.cpu_count()} CPU cores"
    )
    console.print(f"wrote {plot_ttft(out / 'demo.png', demo.measurements, title, DEMO_LABELS)}")
    console.print(
        f"demo took {total_s:.0f} s (servers starting: "
        f"{demo.timings.get('server_starts_s', 0):.0f} s)"
    )
    return 0 if ok else 1


def _check(demo: Demo) -> bool:
    """Every run-2 request hit kvshelf; the first media request of each system after
    the restart (a disk-tier load) meets P1 (reported, not fatal)."""
    ok = True
    for m in demo.measurements:
        if m.phase == WARM and not m.hit_tokens:
            demo.console.print(
                f"[bold red]{m.request_type}: the request after the restart "
                f"found no kvshelf hit[/] (log line: {m.log_line})"
            )
            ok = False
    if demo.args.size != "l":  # P1 is defined for size l (a >= 2 s cold prefill)
        return ok
    firsts: dict[str, Measurement] = {}  # each system's first media request, run 1
    for m in demo.measurements:
        if m.phase == COLD and not m.request_type.startswith("text-only"):
            firsts.setdefault(m.model, m)
    for model, cold in firsts.items():
        warm = next(
            (
                m
                for m in demo.measurements
                if m.model == model and m.phase == WARM and m.request_type == cold.request_type
            ),
            None,
        )
        if warm is None or not cold.ttft_s:
            continue
        ratio = warm.ttft_s / cold.ttft_s
        verdict = "met" if ratio <= P1_RATIO else "[bold yellow]missed[/]"
        demo.console.print(
            f"P1 {model} {cold.request_type}: run 2 = {ratio:.3f} x run 1 "
            f"(target <= {P1_RATIO:.2f}): {verdict}"
        )
    return ok
