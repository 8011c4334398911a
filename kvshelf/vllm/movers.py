"""How one step's KV moves between the paged cache and host entries.

:class:`SyncMover` copies synchronously: all loads before the forward, all saves after
it. It is right on any device and is what the CPU backend uses.

:class:`CudaMover` overlaps copies with compute on a GPU: loads run on their own streams
band of layers by band (one stream stages the next band from pinned host memory while
another scatters the last one into the cache), and the forward waits for layer ``i``
only right before layer ``i`` attends; saves start on another stream as each layer
finishes. At the step's end only the compute stream waits for the copies, never the
CPU: :class:`Completer` runs what must follow them (handing saved entries to the engine,
dropping the holds on loaded ones) on a thread once they are done.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvshelf.vllm.layout import STAGING_BYTES, BandGroup, BlockCopier

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


@dataclass
class StepCopies:
    """What a step's copies left in flight: CUDA events that pass once the loads (whose
    host sources must live until then) and the saves (whose entries are only complete
    then) are done; ``None``: done already. The loads' span ends after both load
    streams' work."""

    saved: torch.cuda.Event | None = None
    load_span: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # (begin, end)
    load_seconds: float = 0.0  # when measured on the host

    def wait_loaded(self) -> float:
        """Block until the loads are done; their copy time in seconds."""
        if self.load_span is None:
            return self.load_seconds
        begin, end = self.load_span
        end.synchronize()
        return begin.elapsed_time(end) / 1000

    def wait_saved(self) -> None:
        if self.saved is not None:
            self.saved.synchronize()


def _load_plan(copier: BlockCopier, items: Sequence[LoadItem]):
    return copier.plan([(i.payload, i.first_block, i.block_ids) for i in items], load=True)


def _save_plan(copier: BlockCopier, items: Sequence[SaveItem]):
    return copier.plan([(i.payload, 0, i.block_ids) for i in items], load=False)


class StepMover(ABC):
    """Synchronous copies, the step's loads at its start and its saves at its end;
    layer hooks do nothing. Subclasses say how one step's items are copied."""

    def __init__(self) -> None:
        self._saves: list[SaveItem] = []
        self._done = StepCopies()

    def load(self, items: Sequence[LoadItem], forward_context: object = None) -> None:
        started = time.perf_counter()
        self._load(items)
        self._done.load_seconds = time.perf_counter() - started

    def wait_layer(self, layer: int) -> None:
        return

    def begin_saves(self, items: Sequence[SaveItem]) -> None:
        self._saves = list(items)

    def save_layer(self, layer: int) -> None:
        return

    def finish_step(self) -> StepCopies:
        if self._saves:
            self._save(self._saves)
        self._saves = []
        done, self._done = self._done, StepCopies()
        return done

    @abstractmethod
    def _load(self, items: Sequence[LoadItem]) -> None: ...

    @abstractmethod
    def _save(self, items: Sequence[SaveItem]) -> None: ...


class SyncMover(StepMover):
    """Synchronous block copies of one layout (a CPU cache)."""

    def __init__(self, copier: BlockCopier):
        super().__init__()
        self.copier = copier

    def _load(self, items: Sequence[LoadItem]) -> None:
        groups = _load_plan(self.copier, items)
        for layer in range(self.copier.layout.num_layers):
            self.copier.scatter(groups, layer)

    def _save(self, items: Sequence[SaveItem]) -> None:
        groups = _save_plan(self.copier, items)
        for layer in range(self.copier.layout.num_layers):
            self.copier.gather(groups, layer)


class CudaMover:
    """Stream-ordered copies that overlap the forward pass."""

    def __init__(self, copier: BlockCopier):
        self.copier = copier
        self.num_layers = copier.layout.num_layers
        self.copy_stream = torch.cuda.Stream(device=copier.device)  # host -> staging
        self.load_stream = torch.cuda.Stream(device=copier.device)  # staging -> cache
        self.save_stream = torch.cuda.Stream(device=copier.device)
        self._ring = [_Slot(), _Slot()]  # staging buffers: one fills while one drains
        self._turn = 0
        self._layer_loaded: list[torch.cuda.Event | None] = [None] * self.num_layers
        self._load_span: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._saves: list[SaveItem] = []
        self._save_groups: list = []
        self._saved = [False] * self.num_layers

    # -- loads -------------------------------------------------------------------
    def load(self, items: Sequence[LoadItem], forward_context: object = None) -> None:
        if not items:
            return
        compute = torch.cuda.current_stream(self.copier.device)
        self.load_stream.wait_stream(compute)  # cache writes after the step's block zeroing
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(self.copy_stream)
        with torch.cuda.stream(self.load_stream):
            groups = _load_plan(self.copier, items)
            if groups and isinstance(groups[0], BandGroup):
                self._load_bands(groups)
            else:
                for layer in range(self.num_layers):
                    self.copier.scatter(groups, layer, non_blocking=True)
                    self._layer_loaded[layer] = _recorded(self.load_stream)
            self.copy_stream.wait_stream(self.load_stream)  # so `end` closes the span
            end.record(self.copy_stream)
        self._load_span = (begin, end)
        if not _runs_layer_hooks(forward_context):
            # A full CUDA graph replays the whole forward without calling
            # wait_for_layer_load: wait for every layer up front.
            compute.wait_stream(self.load_stream)
            self._layer_loaded = [None] * self.num_layers

    def _load_bands(self, groups: list[BandGroup]) -> None:
        """Band after band: the copy stream stages a group's band into one ring buffer
        while the load stream scatters the previous one out of the other."""
        band = groups[0].band
        for first in range(0, self.num_layers, band):
            for group in groups:
                slot = self._slot(self.copier.staging_elems(group))
                if slot.free is not None:
                    self.copy_stream.wait_event(slot.free)
                with torch.cuda.stream(self.copy_stream):
                    staged = self.copier.stage_band(group, first, slot.buffer, non_blocking=True)
                self.load_stream.wait_event(_recorded(self.copy_stream))
                for layer in range(first, first + self.copier.band_size(group, first)):
                    self.copier.scatter_staged(group, layer, first, staged)
                slot.free = _recorded(self.load_stream)
            for layer in range(first, min(first + band, self.num_layers)):
                self._layer_loaded[layer] = _recorded(self.load_stream)

    def _slot(self, elems: int) -> _Slot:
        slot = self._ring[self._turn]
        self._turn = (self._turn + 1) % len(self._ring)
        if slot.buffer is None or slot.buffer.numel() < elems:
            if slot.buffer is not None:  # rare: a bigger band than ever; let the old go
                self.copy_stream.synchronize()
                self.load_stream.synchronize()
            elems = max(elems, STAGING_BYTES // self.copier.raws[0].element_size())
            slot.buffer = torch.empty(
                elems, dtype=self.copier.torch_dtype, device=self.copier.device
            )
            slot.free = None
        return slot

    def wait_layer(self, layer: int) -> None:
        event = self._layer_loaded[layer]
        if event is not None:
            torch.cuda.current_stream(self.copier.device).wait_event(event)
            self._layer_loaded[layer] = None

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

    # -- end of step -------------------------------------------------------------
    def finish_step(self) -> StepCopies:
        """Enqueue what the layer hooks did not reach and order the compute stream after
        every copy of this step (blocks written or read by a copy in flight may be
        zeroed or reused by the next step), without blocking the CPU. This is the last
        hook before such writes: vLLM's V2 model runner zeroes a step's new blocks before
        it calls any connector hook of that step."""
        compute = torch.cuda.current_stream(self.copier.device)
        done = StepCopies()
        if self._load_span is not None:
            compute.wait_stream(self.load_stream)  # also covers layers no hook waited for
            self._layer_loaded = [None] * self.num_layers
            done.load_span, self._load_span = self._load_span, None
        if self._saves:
            for layer in range(self.num_layers):
                self.save_layer(layer)
            compute.wait_stream(self.save_stream)
            done.saved = _recorded(self.save_stream)
        self._saves = []
        self._save_groups = []
        return done


@dataclass
class _Slot:
    buffer: torch.Tensor | None = None
    free: torch.cuda.Event | None = None  # recorded once the load stream has drained it


def _recorded(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream)
    return event


class Completer:
    """Runs callbacks once their step's copies are done, in order, on one thread.

    ``after(wait, fn)`` calls ``wait()`` (``None``: nothing to wait for), then
    ``fn(ok)``; ``ok`` is False when the wait failed (the copies cannot be trusted). A
    callback with nothing to wait for and nothing queued before it runs at once on the
    caller's thread.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[
            tuple[Callable[[], object] | None, Callable[[bool], None]] | None
        ] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._lock = threading.Lock()

    def after(self, wait: Callable[[], object] | None, fn: Callable[[bool], None]) -> None:
        with self._lock:
            inline = wait is None and self._pending == 0
            if not inline:
                self._pending += 1
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="kvshelf-complete", daemon=True
                    )
                    self._thread.start()
        if inline:
            _call(fn, True)
        else:
            self._queue.put((wait, fn))

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until every queued callback has run."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending == 0:
                    return True
            time.sleep(0.001)
        return False

    def close(self) -> None:
        self.drain()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            wait, fn = job
            ok = True
            try:
                if wait is not None:
                    wait()
            except RuntimeError:
                logger.exception("waiting for KV copies failed")
                ok = False
            _call(fn, ok)
            with self._lock:
                self._pending -= 1


def _call(fn: Callable[[bool], None], ok: bool) -> None:
    try:
        fn(ok)
    except Exception:  # a callback's failure must not stop the ones after it
        logger.exception("kvshelf completion callback failed")


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
