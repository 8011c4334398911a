"""How one step's KV moves between the paged cache and host entries.

:class:`SyncMover` copies synchronously: all loads before the forward, all saves after
it. It is right on any device and is what the CPU backend uses.

:class:`CudaMover` overlaps copies with compute on a GPU: loads run on their own stream
layer by layer, and the forward waits for layer ``i`` only right before layer ``i``
attends; saves start on another stream as each layer finishes and the step waits only
for the last ones. Per layer, the copies are one plain pinned-host<->device copy per
entry and one indexed kernel (see :class:`~kvshelf.vllm.layout.BlockCopier`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvshelf.vllm.layout import BlockCopier

logger = logging.getLogger("kvshelf.worker")


@dataclass
class LoadItem:
    payload: torch.Tensor  # an entry's payload view, [layers, *outer, blocks, row]
    first_block: int  # first payload block to write
    block_ids: list[int]  # destination cache blocks


@dataclass
class SaveItem:
    payload: torch.Tensor  # to fill
    block_ids: list[int]  # source cache blocks


def _load_plan(copier: BlockCopier, items: Sequence[LoadItem]):
    return copier.plan([(i.payload, i.first_block, i.block_ids) for i in items], load=True)


def _save_plan(copier: BlockCopier, items: Sequence[SaveItem]):
    return copier.plan([(i.payload, 0, i.block_ids) for i in items], load=False)


class SyncMover:
    """Synchronous copies; layer hooks do nothing."""

    def __init__(self, copier: BlockCopier):
        self.copier = copier
        self._saves: list[SaveItem] = []
        self.last_load_s = 0.0

    def load(self, items: Sequence[LoadItem], forward_context: object = None) -> None:
        started = time.perf_counter()
        groups = _load_plan(self.copier, items)
        for layer in range(self.copier.layout.num_layers):
            self.copier.scatter(groups, layer)
        self.last_load_s = time.perf_counter() - started

    def wait_layer(self, layer: int) -> None:
        return

    def finish_loads(self) -> None:
        return

    def begin_saves(self, items: Sequence[SaveItem]) -> None:
        self._saves = list(items)

    def save_layer(self, layer: int) -> None:
        return

    def finish_saves(self) -> None:
        if self._saves:
            groups = _save_plan(self.copier, self._saves)
            for layer in range(self.copier.layout.num_layers):
                self.copier.gather(groups, layer)
        self._saves = []


class CudaMover:
    """Stream-ordered copies that overlap the forward pass."""

    def __init__(self, copier: BlockCopier):
        self.copier = copier
        self.num_layers = copier.layout.num_layers
        self.load_stream = torch.cuda.Stream(device=copier.device)
        self.save_stream = torch.cuda.Stream(device=copier.device)
        self._layer_loaded: list[torch.cuda.Event | None] = [None] * self.num_layers
        self._load_span: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._saves: list[SaveItem] = []
        self._save_groups: list = []
        self._saved = [False] * self.num_layers
        self.last_load_s = 0.0

    # -- loads -------------------------------------------------------------------
    def load(self, items: Sequence[LoadItem], forward_context: object = None) -> None:
        if not items:
            return
        compute = torch.cuda.current_stream(self.copier.device)
        self.load_stream.wait_stream(compute)  # after the step's block zeroing
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.load_stream):
            begin.record(self.load_stream)
            groups = _load_plan(self.copier, items)
            for layer in range(self.num_layers):
                self.copier.scatter(groups, layer, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.load_stream)
                self._layer_loaded[layer] = event
            end.record(self.load_stream)
        self._load_span = (begin, end)
        if not _runs_layer_hooks(forward_context):
            # A full CUDA graph replays the whole forward without calling
            # wait_for_layer_load: wait for every layer up front.
            compute.wait_stream(self.load_stream)
            self._layer_loaded = [None] * self.num_layers

    def wait_layer(self, layer: int) -> None:
        event = self._layer_loaded[layer]
        if event is not None:
            torch.cuda.current_stream(self.copier.device).wait_event(event)
            self._layer_loaded[layer] = None

    def finish_loads(self) -> None:
        """Block until every enqueued load copy is done (their sources may then go)."""
        self.load_stream.synchronize()
        if self._load_span is not None:
            begin, end = self._load_span
            self.last_load_s = begin.elapsed_time(end) / 1000
            self._load_span = None

    # -- saves -------------------------------------------------------------------
    def begin_saves(self, items: Sequence[SaveItem]) -> None:
        self._saves = list(items)
        self._saved = [False] * self.num_layers
        with torch.cuda.stream(self.save_stream):
            self._save_groups = _save_plan(self.copier, self._saves)

    def save_layer(self, layer: int) -> None:
        if not self._saves or self._saved[layer]:
            return
        self._saved[layer] = True
        self.save_stream.wait_stream(torch.cuda.current_stream(self.copier.device))
        with torch.cuda.stream(self.save_stream):
            self.copier.gather(self._save_groups, layer, non_blocking=True)

    def finish_saves(self) -> None:
        """Copy layers the hooks did not reach, then wait for every device->host copy."""
        # Loads not waited for by a layer (a layer skipped, or an aborted step) must
        # still finish before the blocks they write are reused.
        compute = torch.cuda.current_stream(self.copier.device)
        if any(event is not None for event in self._layer_loaded):
            compute.wait_stream(self.load_stream)
            self._layer_loaded = [None] * self.num_layers
        if self._saves:
            for layer in range(self.num_layers):
                self.save_layer(layer)
            self.save_stream.synchronize()
        self._saves = []
        self._save_groups = []


def _runs_layer_hooks(forward_context: object) -> bool:
    """False when this step replays a full CUDA graph: no per-layer hooks run then (vLLM
    calls start_load_kv without attention metadata, or flags the step FULL)."""
    if getattr(forward_context, "attn_metadata", None) is None:
        return False
    mode = getattr(forward_context, "cudagraph_runtime_mode", None)
    return getattr(mode, "name", "NONE") != "FULL"


def make_mover(copier: BlockCopier) -> SyncMover | CudaMover:
    if copier.device.type == "cuda":
        return CudaMover(copier)
    return SyncMover(copier)
