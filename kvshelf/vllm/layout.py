"""The paged KV cache as vLLM hands it over, and block-granular copies out of / into it.

Nothing here hard-codes an attention backend's layout. Each layer's cache is one tensor
with a *block dimension* (the one whose size is the number of cache blocks). We look at
its strides to find the physical order of its dimensions: those laid out inside a block
form one dense run of elements, a *row*; those outside it (e.g. a K/V split stored as
two halves of the cache) stay separate. The raw view ``[*outer, blocks, row]`` lets us
copy blocks as opaque bytes, in the backend's own physical layout. An entry's payload is
``[layers, *outer, blocks, row]``.

On a GPU, a contiguous raw view is also a table of rows ``[outer * blocks, row]``: a
step's copies for one layer are then one plain host<->device copy per entry into a
device staging buffer plus one indexed kernel, whatever the block ids look like.

The layout signature (backend, dtype, raw shape, block size, layers) goes into the cache
namespace, so bytes written under one layout are never read under another. Only torch is
imported here: this module is testable without vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

MAX_RUNS = 16  # CPU: more runs of consecutive block ids than this -> one indexed copy
DIRECT_COPY_BYTES = 2 << 20  # GPU, strided caches: copy runs directly above this average
STAGING_BYTES = 256 << 20  # GPU: bound on one staging buffer
BAND_BYTES = 4 << 20  # GPU loads: stage this much of an entry (several layers) per copy


class LayoutError(ValueError):
    """The KV cache tensors do not have a layout kvshelf can copy blocks of."""


@dataclass(frozen=True)
class KVLayout:
    layer_names: tuple[str, ...]  # one per distinct cache tensor, in model order
    outer: tuple[int, ...]  # sizes of the dimensions physically outside the block dimension
    row_elems: int  # elements of one block in one outer slice (a dense run in memory)
    block_size: int  # tokens per block
    dtype: str  # torch dtype name, e.g. "bfloat16"
    backend: str  # attention backend name

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def block_axis(self) -> int:
        """The block axis of a raw view (and, plus one, of a payload)."""
        return len(self.outer)

    def signature(self) -> str:
        return (
            f"{self.backend}/{self.dtype}/layers={self.num_layers}/outer={list(self.outer)}"
            f"/row={self.row_elems}/block_size={self.block_size}"
        )

    def num_blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def payload_shape(self, num_tokens: int) -> tuple[int, ...]:
        return (self.num_layers, *self.outer, self.num_blocks_for(num_tokens), self.row_elems)


def discover_layout(
    kv_caches: Mapping[str, torch.Tensor], num_blocks: int, block_size: int, backend: str
) -> tuple[KVLayout, list[torch.Tensor]]:
    """The layout and one raw view ``[*outer, blocks, row]`` per distinct cache tensor
    (layers sharing one tensor are kept once)."""
    names, tensors, seen = [], [], set()
    for name, tensor in kv_caches.items():
        if not isinstance(tensor, torch.Tensor):
            raise LayoutError(f"KV cache of {name} is a {type(tensor).__name__}, not a tensor")
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        names.append(name)
        tensors.append(tensor)
    if not tensors:
        raise LayoutError("no KV cache tensors were registered")
    block_dim = _block_dim(tensors[0], num_blocks)
    raws = [raw_view(t, block_dim) for t in tensors]
    first = raws[0]
    for name, raw, tensor in zip(names, raws, tensors):
        if raw.shape != first.shape or tensor.dtype != tensors[0].dtype:
            raise LayoutError(
                f"layer {name} has {tuple(tensor.shape)} {tensor.dtype}, layer {names[0]} has "
                f"{tuple(tensors[0].shape)} {tensors[0].dtype}: hybrid caches are not supported"
            )
    dtype = str(tensors[0].dtype).removeprefix("torch.")
    outer = tuple(first.shape[:-2])
    layout = KVLayout(tuple(names), outer, first.shape[-1], block_size, dtype, backend)
    return layout, raws


def _block_dim(tensor: torch.Tensor, num_blocks: int) -> int:
    candidates = [d for d, size in enumerate(tensor.shape) if size == num_blocks]
    if len(candidates) != 1:
        raise LayoutError(
            f"cannot tell the block dimension of KV cache shape {tuple(tensor.shape)} "
            f"with {num_blocks} blocks (candidates: {candidates})"
        )
    return candidates[0]


def raw_view(tensor: torch.Tensor, block_dim: int) -> torch.Tensor:
    """``[*outer, blocks, row]`` over the same memory: dimensions in physical order, those
    inside a block merged into one dense row."""
    dims = [d for d in range(tensor.dim()) if tensor.size(d) > 1 or d == block_dim]
    order = sorted(dims, key=lambda d: -tensor.stride(d))  # outermost first
    at = order.index(block_dim)
    outer, inner = order[:at], order[at + 1 :]
    row = 1
    for d in reversed(inner):
        if tensor.stride(d) != row:
            raise LayoutError(
                f"KV cache with shape {tuple(tensor.shape)} and strides {tuple(tensor.stride())}"
                " has gaps inside a block; kvshelf copies dense blocks only"
            )
        row *= tensor.size(d)
    if tensor.stride(block_dim) < row:
        raise LayoutError(f"blocks overlap in KV cache with strides {tuple(tensor.stride())}")
    shape = [tensor.size(d) for d in outer] + [tensor.size(block_dim), row]
    strides = [tensor.stride(d) for d in outer] + [tensor.stride(block_dim), 1]
    return tensor.as_strided(shape, strides, tensor.storage_offset())


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive ids as ``(offset in block_ids, first id, length)``."""
    runs: list[tuple[int, int, int]] = []
    for i, block in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            offset, first, length = runs[-1]
            runs[-1] = (offset, first, length + 1)
        else:
            runs.append((i, block, 1))
    return runs


@dataclass
class RowGroup:
    """Items copied as rows of a contiguous cache layer. A save gathers the asked-for rows
    of a layer into one buffer and copies each item's share out with one plain copy."""

    items: list[tuple[torch.Tensor, int, list[int]]]  # (payload, first payload block, block ids)
    cache_rows: torch.Tensor  # the cache row of each asked-for row, on the device


@dataclass
class BandGroup(RowGroup):
    """A load's :class:`RowGroup`. It stages a *band* of ``band`` layers of every item's
    whole payload (one plain copy per item and band, large enough to run at the link's
    speed), then, per layer, picks the asked-for rows out of the band and writes them
    with one indexed kernel. The per-row tensors live on the device, in the order of
    ``cache_rows``."""

    within: torch.Tensor  # its row inside its item's payload layer
    item_start: torch.Tensor  # rows of the payload layers of the items before its item
    item_rows: torch.Tensor  # rows of its item's payload layer
    num_rows: int  # rows of one layer of every item's payload
    whole: bool  # every item asks for all its payload's blocks
    band: int  # layers staged at once
    staged: tuple[int, torch.Tensor] | None = None  # (first layer, rows) of the band loaded


@dataclass
class CopyGroup:
    """Items copied through one staging buffer on a GPU (``index`` is ``None``: direct)."""

    items: list[tuple[torch.Tensor, int, list[int]]]  # (payload, first payload block, block ids)
    index: torch.Tensor | None  # every item's block ids, concatenated, on the device
    num_blocks: int


class BlockCopier:
    """Copies whole blocks between raw cache views and entry payloads.

    Payload tensors have :meth:`KVLayout.payload_shape` and live in host memory. A step's
    copies are planned once (:meth:`plan`) and run layer by layer. With ``rows`` (the
    default on a GPU when every raw view is contiguous) each layer's copies go through a
    staging buffer (:class:`RowGroup`, :class:`BandGroup`): plain copies per entry and one
    indexed kernel. Otherwise, on a GPU, blocks whose ids run consecutively in long stretches are copied
    directly and scattered ids go through a staging buffer of blocks; on a CPU each run is
    copied directly. With ``non_blocking`` the copies are only enqueued on the current
    CUDA stream.
    """

    def __init__(self, layout: KVLayout, raws: Sequence[torch.Tensor], rows: bool | None = None):
        self.layout = layout
        self.raws = list(raws)
        self.device = self.raws[0].device
        self.torch_dtype = self.raws[0].dtype
        item = self.raws[0].element_size()
        self.layer_block_bytes = math.prod(layout.outer) * layout.row_elems * item
        self.block_bytes = layout.num_layers * self.layer_block_bytes  # all layers
        if rows is None:
            rows = self.device.type == "cuda" and all(r.is_contiguous() for r in self.raws)
        self.row_tables = [r.view(-1, layout.row_elems) for r in self.raws] if rows else None

    def payload_view(self, buffer, num_tokens: int) -> torch.Tensor:
        """A tensor over an entry's payload buffer (no copy)."""
        flat = buffer if torch.is_tensor(buffer) else torch.frombuffer(buffer, dtype=torch.uint8)
        return flat.view(self.torch_dtype).view(self.layout.payload_shape(num_tokens))

    def plan(
        self, items: Sequence[tuple[torch.Tensor, int, Sequence[int]]], load: bool
    ) -> list[CopyGroup | RowGroup]:
        """Group ``(payload, first payload block, block ids)`` items for copying into the
        cache (``load``) or out of it."""
        items = [(p, first, list(ids)) for p, first, ids in items if ids]
        if not items:
            return []
        if self.row_tables is not None and load:
            most = max(p.size(self.layout.block_axis + 1) for p, _, _ in items)
            band = max(1, min(self.layout.num_layers, BAND_BYTES // (most * self.layer_block_bytes)))
            return [self._band_group(g, band) for g in self._bounded(items, whole=True, layers=band)]
        if self.row_tables is not None:
            return [
                RowGroup(g, self._to_device(torch.cat([self._cache_rows(ids) for _, _, ids in g])))
                for g in self._bounded(items, whole=False)
            ]
        num_blocks = sum(len(ids) for _, _, ids in items)
        num_runs = sum(len(block_runs(ids)) for _, _, ids in items)
        if self.device.type == "cpu":
            return [CopyGroup([item], None, len(item[2])) for item in items]
        if num_blocks / num_runs * self.layer_block_bytes >= DIRECT_COPY_BYTES:
            return [CopyGroup(items, None, num_blocks)]
        return [self._staged_group(g) for g in self._bounded(items, whole=False)]

    def _bounded(self, items, whole: bool, layers: int = 1) -> list[list]:
        """``items`` in groups whose staging buffer of ``layers`` layers stays within
        STAGING_BYTES; ``whole``: it holds every item's whole payload, not only its blocks."""
        groups, current, size = [], [], 0
        for item in items:
            blocks = layers * (item[0].size(self.layout.block_axis + 1) if whole else len(item[2]))
            if current and (size + blocks) * self.layer_block_bytes > STAGING_BYTES:
                groups.append(current)
                current, size = [], 0
            current.append(item)
            size += blocks
        groups.append(current)
        return groups

    def _cache_rows(self, ids: list[int]) -> torch.Tensor:
        """Rows of a contiguous cache layer ``[outer * blocks, row]`` holding ``ids``."""
        outer = math.prod(self.layout.outer)
        num_blocks = self.raws[0].size(self.layout.block_axis)
        slices = torch.arange(outer, dtype=torch.long).unsqueeze(1)
        return (slices * num_blocks + torch.tensor(ids, dtype=torch.long)).flatten()

    def _band_group(self, items, band: int) -> BandGroup:
        outer = math.prod(self.layout.outer)
        slices = torch.arange(outer, dtype=torch.long).unsqueeze(1)
        cache_rows, within, starts, sizes = [], [], [], []
        start, whole = 0, True
        for payload, first, ids in items:
            blocks = payload.size(self.layout.block_axis + 1)
            span = torch.arange(first, first + len(ids), dtype=torch.long)
            cache_rows.append(self._cache_rows(ids))
            within.append((slices * blocks + span).flatten())
            starts.append(torch.full((outer * len(ids),), start, dtype=torch.long))
            sizes.append(torch.full((outer * len(ids),), outer * blocks, dtype=torch.long))
            whole = whole and first == 0 and len(ids) == blocks
            start += outer * blocks
        device = [self._to_device(torch.cat(t)) for t in (cache_rows, within, starts, sizes)]
        return BandGroup(items, *device, num_rows=start, whole=whole, band=band)

    def _to_device(self, index: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned, so the copy is truly asynchronous
            return index.pin_memory().to(self.device, non_blocking=True)
        return index

    def _staged_group(self, items) -> CopyGroup:
        ids = [block for _, _, block_ids in items for block in block_ids]
        return CopyGroup(items, self._to_device(torch.tensor(ids, dtype=torch.long)), len(ids))

    def gather(
        self, groups: list[CopyGroup | RowGroup], layer: int, non_blocking: bool = False
    ) -> None:
        """Copy every group's blocks of ``layer`` out of the cache into the payloads."""
        axis, raw = self.layout.block_axis, self.raws[layer]
        for group in groups:
            if isinstance(group, RowGroup):
                self._gather_rows(group, layer, non_blocking)
                continue
            if group.index is None:
                for payload, first, ids in group.items:
                    _copy_blocks(payload[layer], first, raw, ids, axis, to_cache=False,
                                 non_blocking=non_blocking)
                continue
            staged = raw.index_select(axis, group.index)
            offset = 0
            for payload, first, ids in group.items:
                payload[layer].narrow(axis, first, len(ids)).copy_(
                    staged.narrow(axis, offset, len(ids)), non_blocking=non_blocking
                )
                offset += len(ids)

    def scatter(
        self, groups: list[CopyGroup | BandGroup], layer: int, non_blocking: bool = False
    ) -> None:
        """Copy every group's payload blocks of ``layer`` into the cache."""
        axis, raw = self.layout.block_axis, self.raws[layer]
        for group in groups:
            if isinstance(group, BandGroup):
                self._scatter_rows(group, layer, non_blocking)
                continue
            if group.index is None:
                for payload, first, ids in group.items:
                    _copy_blocks(payload[layer], first, raw, ids, axis, to_cache=True,
                                 non_blocking=non_blocking)
                continue
            shape = list(raw.shape)
            shape[axis] = group.num_blocks
            staged = torch.empty(shape, dtype=raw.dtype, device=self.device)
            offset = 0
            for payload, first, ids in group.items:
                staged.narrow(axis, offset, len(ids)).copy_(
                    payload[layer].narrow(axis, first, len(ids)), non_blocking=non_blocking
                )
                offset += len(ids)
            raw.index_copy_(axis, group.index, staged)

    def _gather_rows(self, group: RowGroup, layer: int, non_blocking: bool) -> None:
        staged = self.row_tables[layer].index_select(0, group.cache_rows)
        axis, row = self.layout.block_axis, self.layout.row_elems
        offset = 0
        for payload, first, ids in group.items:
            part = staged.narrow(0, offset, math.prod(self.layout.outer) * len(ids))
            dst = payload[layer]
            if first == 0 and len(ids) == dst.size(axis):
                dst.view(-1, row).copy_(part, non_blocking=non_blocking)  # one plain copy
            else:
                dst.narrow(axis, first, len(ids)).copy_(
                    part.view(*self.layout.outer, len(ids), row), non_blocking=non_blocking
                )
            offset += part.size(0)

    def _scatter_rows(self, group: BandGroup, layer: int, non_blocking: bool) -> None:
        first = layer - layer % group.band
        band = min(group.band, self.layout.num_layers - first)
        if group.staged is None or group.staged[0] != first:
            group.staged = (first, self._stage_band(group, first, band, non_blocking))
        staged = group.staged[1]
        if band > 1 or not group.whole:
            # Row r of layer `layer` of item i sits at band * start_i + k * rows_i + r.
            picked = group.item_start * band + group.item_rows * (layer - first) + group.within
            staged = staged.index_select(0, picked)
        self.row_tables[layer].index_copy_(0, group.cache_rows, staged)
        if layer == first + band - 1:
            group.staged = None

    def _stage_band(self, group: BandGroup, first: int, band: int, non_blocking: bool):
        """Layers ``first .. first + band - 1`` of every item's payload, item after item."""
        row = self.layout.row_elems
        staged = torch.empty(
            (band * group.num_rows, row), dtype=self.torch_dtype, device=self.device
        )
        offset = 0
        for payload, _, _ in group.items:
            src = payload[first : first + band].view(-1, row)  # contiguous: one plain copy
            staged.narrow(0, offset, src.size(0)).copy_(src, non_blocking=non_blocking)
            offset += src.size(0)
        return staged


def _copy_blocks(payload, first, raw, ids, axis, to_cache: bool, non_blocking: bool) -> None:
    """Copy one item's blocks directly: a copy per run of consecutive ids, or (many short
    runs, CPU) one indexed copy."""
    runs = block_runs(ids)
    if len(runs) > MAX_RUNS:
        index = torch.tensor(ids, dtype=torch.long, device=raw.device)
        part = payload.narrow(axis, first, len(ids))
        if to_cache:
            raw.index_copy_(axis, index, part.to(raw.device, non_blocking=non_blocking))
        else:
            part.copy_(raw.index_select(axis, index), non_blocking=non_blocking)
        return
    for offset, block, length in runs:
        cache_part = raw.narrow(axis, block, length)
        payload_part = payload.narrow(axis, first + offset, length)
        if to_cache:
            cache_part.copy_(payload_part, non_blocking=non_blocking)
        else:
            payload_part.copy_(cache_part, non_blocking=non_blocking)
