"""The encoder cache's counters in vLLM's ``/metrics``: vLLM's EC connector stats and
Prometheus classes, which older vLLMs (0.26) lack; :mod:`kvshelf.vllm.ec_connector`
imports this module only where they exist."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from vllm.distributed.ec_transfer.ec_connector.metrics import (
    ECConnectorPromMetrics,
    ECConnectorStats,
)

from kvshelf.vllm import metric_names as m

# name -> help; one time series per modality.
COUNTERS = {
    m.ENCODER_LOOKUPS: "Media items looked up in kvshelf's encoder cache.",
    m.ENCODER_HITS: "Media items whose encoder output was loaded from kvshelf.",
    m.ENCODER_MISSES: "Media items looked up and not found (or unreadable).",
    m.ENCODER_CORRUPT: "Encoder entries found but corrupt or unverifiable: "
    "removed, and the encoder ran.",
    m.ENCODER_STORED: "Encoder outputs stored.",
    m.ENCODER_UNCACHEABLE: "Media items not cached: no content hash, or an "
    "encoder output of another layout than expected.",
}


@dataclass
class KVShelfECStats(ECConnectorStats):
    """``data`` = {"counters": {"name|modality": increment}}: plain numbers."""

    def __post_init__(self) -> None:
        self.data.setdefault("counters", {})

    def reset(self) -> None:
        self.data = {"counters": {}}

    def aggregate(self, other: ECConnectorStats) -> KVShelfECStats:
        counts = Counter(self.data["counters"])
        counts.update(other.data.get("counters", {}))
        return KVShelfECStats(data={"counters": dict(counts)})

    def reduce(self) -> dict[str, int | float]:
        totals: Counter[str] = Counter()
        for key, value in self.data["counters"].items():
            totals[key.partition("|")[0]] += value
        looked = totals[m.ENCODER_LOOKUPS]
        return {
            "encoder_lookups": looked,
            "encoder_hit_rate": round(totals[m.ENCODER_HITS] / looked, 3) if looked else 0.0,
            "encoder_stored": totals[m.ENCODER_STORED],
            "encoder_corrupt": totals[m.ENCODER_CORRUPT],
        }

    def is_empty(self) -> bool:
        return not self.data["counters"]


class KVShelfECPromMetrics(ECConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        names = [*labelnames, "modality"]
        self._counters = {
            n: self._counter_cls(name=n, documentation=h, labelnames=names)
            for n, h in COUNTERS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for key, value in transfer_stats_data.get("counters", {}).items():
            name, _, modality = key.partition("|")
            if name in self._counters and value > 0:
                self._counters[name].labels(*labels, modality).inc(value)
