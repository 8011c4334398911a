"""kvshelf's metrics, carried by vLLM's connector-stats channel into its own /metrics.

Workers and the scheduler each hand vLLM a :class:`KVShelfStats` every step: counter
increments since their last report, current gauge values and latency observations.
vLLM aggregates them across workers and passes the result to
:class:`KVShelfPromMetrics`, which feeds Prometheus counters, gauges and histograms
labelled like vLLM's own (model name, engine) plus ``tier``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from prometheus_client import Counter, Gauge, Histogram
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvshelf.vllm import metric_names as m

# name -> help. Counters: one time series per tier where the key carries "|tier".
COUNTERS = {
    m.LOOKUPS: "Requests kvshelf looked up.",
    m.LOOKUP_TOKENS: "Prompt tokens of the requests looked up.",
    m.HIT_TOKENS: "Prompt tokens found in kvshelf (any tier).",
    m.LOADED_TOKENS: "Prompt tokens loaded into vLLM's cache, by source tier.",
    m.READ_BYTES: "Bytes read from a tier.",
    m.WRITTEN_BYTES: "Bytes written to a tier.",
    m.SAVED_CHUNKS: "Chunks copied out of vLLM's cache to be stored.",
    m.DROPPED_SAVES: "Chunks never stored in lower tiers: evicted from memory "
    "before they were written, or no room to queue them.",
    m.UNPAID_TOKENS: "Prompt tokens found in a tier and recomputed: reading them "
    "would have taken longer.",
    m.EVICTIONS: "Entries evicted to stay within a tier's budget.",
    m.CORRUPT_ENTRIES: "Entries that failed their checksum and were removed.",
    m.VERIFICATION_FAILURES: "Entries whose recorded origin did not match the prompt.",
    m.WRITE_FAILURES: "Entries a tier failed to store (full, unreachable, I/O error).",
    m.ERRORS: "I/O or connection errors of a tier.",
    m.TIMEOUTS: "Operations of a tier that timed out.",
    m.LOAD_FAILURES: "Blocks reported to vLLM as failed to load (recomputed).",
}
GAUGES = {
    m.USED_BYTES: "Bytes a tier holds now.",
    m.CAPACITY_BYTES: "A tier's byte budget.",
    m.ENTRIES: "Entries a tier holds now.",
}
HISTOGRAMS = {
    m.LOAD_SECONDS: "Time to start a step's loads into vLLM's cache (CPU: the whole copy).",
    m.SAVE_SECONDS: "Time the step waited for its saves to be copied out of vLLM's cache.",
}
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class KVShelfStats(KVConnectorStats):
    """``data`` = {"counters": {key: increment}, "gauges": {key@rank: value},
    "observations": {histogram: [seconds, ...]}}: plain numbers, serialisable."""

    def __post_init__(self) -> None:
        for part in ("counters", "gauges", "observations"):
            self.data.setdefault(part, {})

    def reset(self) -> None:
        self.data = {"counters": {}, "gauges": {}, "observations": {}}

    def aggregate(self, other: KVConnectorStats) -> KVShelfStats:
        ours = self.data
        merged = KVShelfStats(
            data={
                "counters": dict(ours["counters"]),
                "gauges": dict(ours["gauges"]),
                "observations": {k: list(v) for k, v in ours["observations"].items()},
            }
        )
        theirs = other.data
        for key, value in theirs.get("counters", {}).items():
            merged.data["counters"][key] = merged.data["counters"].get(key, 0) + value
        merged.data["gauges"].update(theirs.get("gauges", {}))  # the latest value per rank
        for key, values in theirs.get("observations", {}).items():
            merged.data["observations"].setdefault(key, []).extend(values)
        return merged

    def reduce(self) -> dict[str, int | float]:
        counters = self.data["counters"]
        looked = counters.get(m.LOOKUP_TOKENS, 0)
        hit = counters.get(m.HIT_TOKENS, 0)
        read = sum(v for k, v in counters.items() if k.partition("|")[0] == m.READ_BYTES)
        return {
            "lookups": counters.get(m.LOOKUPS, 0),
            "hit_rate": round(hit / looked, 3) if looked else 0.0,
            "read_GB": round(read / 1e9, 3),
            "dropped_saves": counters.get(m.DROPPED_SAVES, 0),
        }

    def is_empty(self) -> bool:
        return not any(self.data[part] for part in ("counters", "gauges", "observations"))


class KVShelfPromMetrics(KVConnectorPromMetrics):
    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        names = [*labelnames, "tier"]
        # vLLM types its metric classes as one union; each is the prometheus class (or
        # vLLM's Ray wrapper of it) its name says.
        counter_cls = cast("type[Counter]", self._counter_cls)
        gauge_cls = cast("type[Gauge]", self._gauge_cls)
        histogram_cls = cast("type[Histogram]", self._histogram_cls)
        self._counters = {
            n: counter_cls(name=n, documentation=h, labelnames=names) for n, h in COUNTERS.items()
        }
        self._gauges = {
            n: gauge_cls(name=n, documentation=h, labelnames=names, multiprocess_mode="mostrecent")
            for n, h in GAUGES.items()
        }
        self._histograms = {
            n: histogram_cls(name=n, documentation=h, labelnames=labelnames, buckets=BUCKETS)
            for n, h in HISTOGRAMS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for key, value in transfer_stats_data.get("counters", {}).items():
            name, _, tier = key.partition("|")
            if name in self._counters and value > 0:
                self._counters[name].labels(*labels, tier).inc(value)
        totals: dict[tuple[str, str], float] = {}
        for key, value in transfer_stats_data.get("gauges", {}).items():
            name_tier, _, _rank = key.partition("@")
            name, _, tier = name_tier.partition("|")
            totals[(name, tier)] = totals.get((name, tier), 0) + value
        for (name, tier), value in totals.items():
            if name in self._gauges:
                self._gauges[name].labels(*labels, tier).set(value)
        for name, values in transfer_stats_data.get("observations", {}).items():
            if name in self._histograms:
                histogram = self._histograms[name].labels(*labels)
                for value in values:
                    histogram.observe(value)
