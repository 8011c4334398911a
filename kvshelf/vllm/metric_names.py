"""The names of kvshelf's metrics, in one place: the keys the workers and the scheduler
report each step are the Prometheus series vLLM exposes (help texts in
:mod:`kvshelf.vllm.metrics`). No vLLM import."""

from __future__ import annotations

# Counters; per tier where a stats key carries "|tier" (see series()).
LOOKUPS = "kvshelf_lookups_total"
LOOKUP_TOKENS = "kvshelf_lookup_tokens_total"
HIT_TOKENS = "kvshelf_hit_tokens_total"
LOADED_TOKENS = "kvshelf_loaded_tokens_total"
READ_BYTES = "kvshelf_read_bytes_total"
WRITTEN_BYTES = "kvshelf_written_bytes_total"
SAVED_CHUNKS = "kvshelf_saved_chunks_total"
DROPPED_SAVES = "kvshelf_dropped_saves_total"
UNPAID_TOKENS = "kvshelf_unpaid_tokens_total"
EVICTIONS = "kvshelf_evictions_total"
CORRUPT_ENTRIES = "kvshelf_corrupt_entries_total"
VERIFICATION_FAILURES = "kvshelf_verification_failures_total"
WRITE_FAILURES = "kvshelf_write_failures_total"
ERRORS = "kvshelf_errors_total"
TIMEOUTS = "kvshelf_timeouts_total"
LOAD_FAILURES = "kvshelf_load_failures_total"

# Gauges, per tier.
USED_BYTES = "kvshelf_used_bytes"
CAPACITY_BYTES = "kvshelf_capacity_bytes"
ENTRIES = "kvshelf_entries"

# Histograms.
LOAD_SECONDS = "kvshelf_load_seconds"
SAVE_SECONDS = "kvshelf_save_seconds"

# The per-tier series and the StoreStats field each one reports.
TIER_COUNTERS = {
    READ_BYTES: "bytes_read",
    WRITTEN_BYTES: "bytes_written",
    EVICTIONS: "evictions",
    CORRUPT_ENTRIES: "corrupt",
    WRITE_FAILURES: "write_failures",
    ERRORS: "errors",
    TIMEOUTS: "timeouts",
}
TIER_GAUGES = {
    USED_BYTES: "used_bytes",
    CAPACITY_BYTES: "capacity_bytes",
    ENTRIES: "entries",
}

# The encoder cache's counters, one series per modality ("|modality").
ENCODER_LOOKUPS = "kvshelf_encoder_lookups_total"
ENCODER_HITS = "kvshelf_encoder_hits_total"
ENCODER_MISSES = "kvshelf_encoder_misses_total"
ENCODER_CORRUPT = "kvshelf_encoder_corrupt_total"
ENCODER_STORED = "kvshelf_encoder_stored_total"
ENCODER_UNCACHEABLE = "kvshelf_encoder_uncacheable_total"
ENCODER_EVENTS = {  # what the encoder book counts -> its counter
    "lookups": ENCODER_LOOKUPS,
    "hits": ENCODER_HITS,
    "misses": ENCODER_MISSES,
    "corrupt": ENCODER_CORRUPT,
    "stored": ENCODER_STORED,
    "uncacheable": ENCODER_UNCACHEABLE,
}


def series(name: str, label: str = "") -> str:
    """The stats key of one time series: ``name``, or ``name|label`` (a tier, a modality)."""
    return f"{name}|{label}" if label else name
