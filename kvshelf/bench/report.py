"""Bench results as a rich table, a JSON file and a PNG (TTFT per request, one panel per type)."""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvshelf.bench.run import COLD, WARM, Measurement

PHASE_LABELS = {COLD: "cold", WARM: "warm"}
_PANELS_PER_ROW = 5
_COLOURS = {COLD: "#4878a8", WARM: "#e0813a"}


@dataclass
class Summary:
    """One request type (on one model): medians over its measurements."""

    request_type: str
    model: str
    media: str
    prompt_tokens: int | None
    hit_tokens: int | None  # kvshelf hit tokens of the warm requests (None: no log line)
    ttft_cold_s: float | None
    ttft_warm_s: float | None
    num_cold: int
    num_warm: int

    @property
    def speedup(self) -> float | None:
        if self.ttft_cold_s is None or not self.ttft_warm_s:
            return None
        return self.ttft_cold_s / self.ttft_warm_s


def make_console() -> Console:
    """A console for tables: the terminal's width, or 150 columns when output is piped
    (rich's default of 80 would wrap every cell of the tables)."""
    return Console(width=None if sys.stdout.isatty() else 150)


def summarise(measurements: Sequence[Measurement]) -> list[Summary]:
    """One :class:`Summary` per (model, request type), in first-seen order."""
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.model, m.request_type), []).append(m)
    out = []
    for (model, request_type), group in groups.items():
        cold = [m for m in group if m.phase == COLD]
        warm = [m for m in group if m.phase == WARM]
        hits = [m.hit_tokens for m in warm if m.hit_tokens is not None]
        out.append(
            Summary(
                request_type=request_type,
                model=model,
                media=group[0].media,
                prompt_tokens=_median_int([m.prompt_tokens for m in group]),
                hit_tokens=_median_int(hits) if hits else None,
                ttft_cold_s=_median([m.ttft_s for m in cold]),
                ttft_warm_s=_median([m.ttft_s for m in warm]),
                num_cold=len(cold),
                num_warm=len(warm),
            )
        )
    return out


def summary_table(summaries: Sequence[Summary], title: str, warm_label: str = "TTFT warm") -> Table:
    many = any(s.num_cold > 1 or s.num_warm > 1 for s in summaries)
    table = Table(title=title, title_justify="left")
    for name, justify in (
        ("request type", "left"),
        ("model", "left"),
        ("media", "left"),
        ("prompt tokens", "right"),
        ("kvshelf hit tokens", "right"),
        ("TTFT cold" + (" (median)" if many else ""), "right"),
        (warm_label + (" (median)" if many else ""), "right"),
        ("speedup", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for s in summaries:
        table.add_row(
            s.request_type,
            s.model,
            s.media or "-",
            _int(s.prompt_tokens),
            _int(s.hit_tokens),
            format_seconds(s.ttft_cold_s),
            format_seconds(s.ttft_warm_s),
            "-" if s.speedup is None else f"{s.speedup:.1f}×",
        )
    return table


def requests_table(measurements: Sequence[Measurement], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in (
        "request type",
        "round",
        "stream",
        "phase",
        "prompt tokens",
        "hit tokens",
        "TTFT",
        "total",
    ):
        table.add_column(name, justify="left" if name in ("request type", "phase") else "right")
    for m in measurements:
        table.add_row(
            m.request_type,
            str(m.round),
            str(m.stream),
            m.phase,
            _int(m.prompt_tokens),
            _int(m.hit_tokens),
            format_seconds(m.ttft_s),
            format_seconds(m.total_s),
        )
    return table


def runs_table(
    measurements: Sequence[Measurement],
    title: str,
    run_labels: Mapping[int, str] | None = None,
    show_media: bool = True,
) -> Table:
    """One row per request of a repeated sequence, its TTFT and kvshelf hit tokens (when
    the server log was read; "loaded" is what kvshelf copied in, the rest vLLM's own prefix
    cache held) in each run side by side; the last row has each run's total time."""
    rounds = sorted({m.round for m in measurements})
    labels = {r: (run_labels or {}).get(r, f"run {r + 1}") for r in rounds}
    hits = any(m.hit_tokens is not None for m in measurements)
    models = len({m.model for m in measurements}) > 1
    table = Table(title=title, title_justify="left")
    media = ["media"] if show_media else []
    for name in (["model"] if models else []) + ["request", *media, "prompt tokens"]:
        table.add_column(name, justify="right" if name == "prompt tokens" else "left")
    for r in rounds:
        table.add_column(f"{labels[r]} TTFT", justify="right")
        if hits:
            table.add_column(f"{labels[r]} kvshelf hit", justify="right")
    rows: dict[tuple[str, str], dict[int, Measurement]] = {}
    for m in measurements:
        rows.setdefault((m.model, m.request_type), {})[m.round] = m
    for (model, request), by_round in rows.items():
        first = next(iter(by_round.values()))
        cells = [
            *([model] if models else []),
            request,
            *([first.media or "-"] if show_media else []),
            _int(first.prompt_tokens),
        ]
        for r in rounds:
            found = by_round.get(r)
            cells.append(format_seconds(found.ttft_s if found else None))
            if hits:
                cells.append(_hit(found))
        table.add_row(*cells)
    totals = [*([""] if models else []), "total (one request at a time)", *([""] * len(media)), ""]
    for r in rounds:
        totals.append(format_seconds(sum(m.total_s for m in measurements if m.round == r)))
        if hits:
            totals.append("")
    table.add_row(*totals, style="bold")
    return table


def _hit(m: Measurement | None) -> str:
    if m is None or m.hit_tokens is None:
        return "-"
    if not m.hit_tokens or m.load_tokens is None:
        return _int(m.hit_tokens)
    return f"{m.hit_tokens:,} ({m.load_tokens:,} loaded)"


def write_json(
    path: str | os.PathLike[str], measurements: Sequence[Measurement], meta: Mapping[str, Any]
) -> Path:
    """``{meta..., "summary": [...], "requests": [...]}``, written atomically."""
    summary = [asdict(s) | {"speedup": s.speedup} for s in summarise(measurements)]
    data = {
        **meta,
        "ttft_definition": TTFT_DEFINITION,
        "summary": summary,
        "requests": [asdict(m) for m in measurements],
    }
    return _write(Path(path), (json.dumps(data, indent=1) + "\n").encode())


def plot_ttft(
    path: str | os.PathLike[str],
    measurements: Sequence[Measurement],
    title: str,
    phase_labels: Mapping[str, str] = PHASE_LABELS,
) -> Path:
    """TTFT of every request as a bar, coloured cold/warm, one panel per request type."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups: dict[str, list[Measurement]] = {}
    for m in measurements:
        groups.setdefault(m.request_type, []).append(m)
    num = max(len(groups), 1)
    cols = min(num, _PANELS_PER_ROW)
    rows = -(-num // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1.0, 4.2 * rows), squeeze=False)
    for ax, (request_type, group) in zip(axes.flat, groups.items()):
        _panel(ax, request_type, group)
    for ax in list(axes.flat)[num:]:
        ax.set_visible(False)
    phases = [p for p in (COLD, WARM) if any(m.phase == p for m in measurements)]
    fig.legend(
        handles=[Patch(color=_COLOURS[p], label=phase_labels.get(p, p)) for p in phases],
        loc="upper right",
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(f"{title}\n(time to first token; lower is better)", x=0.01, ha="left", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.08 / rows))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _panel(ax, request_type: str, group: Sequence[Measurement]) -> None:
    """One request type's bars: TTFT per request in send order, coloured by phase."""
    ttfts = [m.ttft_s for m in group]
    bars = ax.bar(range(len(group)), ttfts, color=[_COLOURS[m.phase] for m in group], width=0.7)
    ax.bar_label(bars, labels=[format_seconds(t) for t in ttfts], fontsize=8, padding=2)
    ax.set_xticks(range(len(group)), [_tick(m, group) for m in group], fontsize=8)
    tokens = _median_int([m.prompt_tokens for m in group])
    models = ", ".join(dict.fromkeys(m.model for m in group))
    subtitle = f"{models}, {tokens:,} prompt tokens" if tokens else models
    ax.set_title(f"{request_type}\n{subtitle}", fontsize=9)
    ax.set_ylim(0, max(ttfts) * 1.25)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylabel("TTFT (s)", fontsize=9)
    ax.set_xlabel(_xlabel(group), fontsize=8)
    speedup = summarise(group)[0].speedup
    if speedup is not None:
        medians = " (medians)" if len(group) > 2 else ""
        ax.text(
            0.97,
            0.95,
            f"warm{medians}: {speedup:.1f}× faster",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            color=_COLOURS[WARM],
            fontweight="bold",
        )


TTFT_DEFINITION = (
    "seconds from just before the request is sent (connect + upload included) to the first "
    "streamed chunk carrying a generated token: non-empty delta content/reasoning/tool_calls or "
    "a logprobs entry (logprobs are requested so an empty-text token counts); vLLM's role-only "
    "first chunk does not count"
)


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.0f} ms"


def _tick(m: Measurement, group: Sequence[Measurement]) -> str:
    if len(group) == len({g.phase for g in group}):  # one request per phase: name it
        return m.phase
    if len({g.stream for g in group}) > 1:
        return f"{m.round}.{m.stream}"
    return str(m.round)


def _xlabel(group: Sequence[Measurement]) -> str:
    if len(group) == len({g.phase for g in group}):
        return ""
    if len({g.stream for g in group}) > 1:
        return "round.stream (round 0 is cold)"
    return "round (0 is cold)"


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _median_int(values: Sequence[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return int(statistics.median(known)) if known else None


def _int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)
    return path
