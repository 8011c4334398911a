"""Load only what pays: a hit's chunks against the time vLLM takes to recompute them.

Reading a chunk costs its bytes over the measured read rate of the tier holding it;
recomputing it costs its tokens times this model's measured prefill seconds per token.
The hit offered to vLLM is the prefix that saves the most time: all of it, a prefix
(memory first, then a slow disk's chunks left to recompute), or none. A tier not read
yet is probed with at most :data:`PROBE_BYTES` before more of it is trusted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PROBE_BYTES = 64 * 2**20  # what one read from a tier of unknown speed may cost


@dataclass(frozen=True)
class ChunkCost:
    tokens: int
    nbytes: int
    rate: float | None  # bytes/s of the tier holding it (math.inf: memory); None: unknown


def paying_prefix(costs: Sequence[ChunkCost], seconds_per_token: float, whole: bool = False) -> int:
    """How many leading chunks to read next. Where a chunk's tier speed is unknown,
    the answer stops after a probe of that tier (read it, then ask again). With
    ``whole`` the answer is all or nothing (a recurrent state must be reached)."""
    gain = best_gain = 0.0
    best = probed = 0
    for i, cost in enumerate(costs):
        if cost.rate is None:
            probed += cost.nbytes
            if probed >= PROBE_BYTES or i + 1 == len(costs) or costs[i + 1].rate is not None:
                return i + 1
            continue
        gain += cost.tokens * seconds_per_token - read_seconds(cost)
        if gain > best_gain or (gain == best_gain and read_seconds(cost) == 0):
            best, best_gain = i + 1, gain
    if whole:
        return len(costs) if gain > 0 or best == len(costs) else 0
    return best


def read_seconds(cost: ChunkCost) -> float:
    if cost.rate is None or math.isinf(cost.rate) or cost.nbytes == 0:
        return 0.0
    return cost.nbytes / cost.rate


class PrefillClock:
    """This model's prefill seconds per token, from the scheduler's own steps.

    A step's time is the gap to the next step's scheduling, counted only when a request
    of the step is still scheduled in the next one (the engine did not idle between)
    and the step computed at least ``min_tokens`` tokens (a prefill, not decodes).
    A moving estimate; ``None`` until the first such step.
    """

    def __init__(self, min_tokens: int, weight: float = 0.3):
        self.min_tokens = min_tokens
        self.weight = weight
        self.seconds_per_token: float | None = None
        self._last: tuple[float, int, frozenset[str]] | None = None

    def step(self, now: float, tokens: int, req_ids: frozenset[str]) -> None:
        last, self._last = self._last, (now, tokens, req_ids)
        if last is None:
            return
        began, computed, running = last
        if computed < self.min_tokens or not running & req_ids or now <= began:
            return
        sample = (now - began) / computed
        old = self.seconds_per_token
        self.seconds_per_token = sample if old is None else old + self.weight * (sample - old)
