"""Pinned (page-locked) host memory for the memory tier when the KV cache is on a GPU.

Copies between the GPU and pinned memory run asynchronously at the link's full speed.
Pinning is slow (hundreds of ms per GiB), so memory is pinned in large segments by a
background thread, ahead of need, and carved into fixed-size slots: every entry of one
cache namespace is at most one full chunk, so one slot size fits all. Until a slot is
free, callers fall back to ordinary memory.
"""

from __future__ import annotations

import logging
import threading

import torch

from kvshelf.storage.base import HostBlock, HostMemory

logger = logging.getLogger("kvshelf.worker")

SEGMENT_BYTES = 1 << 30


class PinnedMemory(HostMemory):
    """Fixed-size slots in pinned segments, up to ``capacity_bytes``. Thread-safe."""

    def __init__(self, slot_bytes: int, capacity_bytes: int, segment_bytes: int = SEGMENT_BYTES):
        self.slot_bytes = slot_bytes
        slots_per_segment = max(1, segment_bytes // slot_bytes)
        self.segment_bytes = slots_per_segment * slot_bytes
        self.max_segments = max(0, capacity_bytes // self.segment_bytes)
        self._free: list[torch.Tensor] = []
        self._segments: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._grower = threading.Thread(target=self._grow, name="kvshelf-pin", daemon=True)
        self._grower.start()

    def alloc(self, nbytes: int) -> HostBlock | None:
        if nbytes > self.slot_bytes:
            return None
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
        view = slot[:nbytes]
        return HostBlock(view.numpy().data, self, view)

    def charge(self, nbytes: int) -> int:
        return max(self.slot_bytes, nbytes)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.slot_bytes

    def free(self, block: HostBlock) -> None:
        view = block.handle
        assert isinstance(view, torch.Tensor)
        # Recover the whole slot this view starts.
        slot = view.as_strided((self.slot_bytes,), (1,), view.storage_offset())
        block.view = memoryview(b"")
        with self._lock:
            self._free.append(slot)

    @property
    def pinned_bytes(self) -> int:
        with self._lock:
            return len(self._segments) * self.segment_bytes

    def close(self) -> None:
        self._stop.set()

    def _grow(self) -> None:
        while not self._stop.is_set() and len(self._segments) < self.max_segments:
            try:
                segment = torch.empty(self.segment_bytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as exc:
                logger.warning("stopped pinning host memory: %s", exc)
                return
            slots = list(segment.split(self.slot_bytes))
            with self._lock:
                self._segments.append(segment)
                self._free.extend(reversed(slots))
        logger.info("memory tier ready: %.1f GB pinned", self.pinned_bytes / 1e9)
