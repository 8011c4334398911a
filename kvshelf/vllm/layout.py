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
imported here (and numpy): this module is testable without vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

MAX_RUNS = 16  # CPU: more runs of consecutive block ids than this -> one indexed copy
DIRECT_COPY_BYTES = 2 << 20  # GPU, strided caches: copy runs directly above this average
STAGING_BYTES = 128 << 20  # GPU: bound on one staging buffer
BAND_BYTES = 32 << 20  # GPU loads: stage this much of an entry (several layers) per copy
MIN_BANDS = 4  # GPU loads: at least this many bands, so early layers attend while later load
SAVE_BAND_BYTES = 4 << 20  # GPU saves: copy at least this much of an entry out per copy


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
    order = sorted(dims, key=lambda d: tensor.stride()[d], reverse=True)  # outermost first
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
    of a layer into one buffer and copies each item's share out with one plain copy
    (all of a layer's copies in one call: ``layers[i][layer]`` is item i's destination)."""

    items: list[tuple[torch.Tensor, int, Sequence[int]]]  # (payload, first block, block ids)
    cache_rows: torch.Tensor  # the cache row of each asked-for row, on the device
    layers: list[tuple[torch.Tensor, ...]] | None = None  # per item, its payload's layers as rows
    sizes: list[int] | None = None  # rows of each item


@dataclass
class BandGroup(RowGroup):
    """A :class:`RowGroup` moved a *band* of layers of every item's whole payload at a
    time: one plain copy per item and band, large enough to run at the link's speed.
    A load stages a band, then, per layer, picks the asked-for rows out of it and writes
    them with one indexed kernel. A save gathers each layer's rows into their places in
    a band and copies the band out once all its layers are in; its last layer is a band
    of its own (``tail``), so little is left to copy when the forward ends.
    ``picks[b][k]`` holds, for a band of ``b`` layers, the staged row of each asked-for
    row of its k-th layer, in the order of ``cache_rows`` (none for single-layer bands
    of whole items: there a layer's rows are the band as it is)."""

    picks: dict[int, torch.Tensor] = field(default_factory=dict)
    num_rows: int = 0  # rows of one layer of every item's payload
    whole: bool = True  # every item asks for all its payload's blocks
    band: int = 1  # layers moved at once
    tail: bool = False  # the last layer is a band of its own
    staged: tuple[int, torch.Tensor] | None = None  # loads: (first layer, rows) of the band
    filling: dict[int, tuple[torch.Tensor, set[int]]] = field(default_factory=dict)  # saves:
    # first layer of a band -> (its rows, the layers gathered into them so far)


@dataclass
class CopyGroup:
    """Items copied through one staging buffer on a GPU (``index`` is ``None``: direct)."""

    items: list[tuple[torch.Tensor, int, Sequence[int]]]  # (payload, first block, block ids)
    index: torch.Tensor | None  # every item's block ids, concatenated, on the device
    num_blocks: int


class BlockCopier:
    """Copies whole blocks between raw cache views and entry payloads.

    Payload tensors have :meth:`KVLayout.payload_shape` and live in host memory. A step's
    copies are planned once (:meth:`plan`) and run layer by layer. With ``rows`` (the
    default on a GPU when every raw view is contiguous) each layer's copies go through a
    staging buffer (:class:`RowGroup`, :class:`BandGroup`): plain copies per entry and one
    indexed kernel; a load stages ``band_bytes`` (default BAND_BYTES) of each entry per
    copy, a save copies out at least ``save_band_bytes`` (default SAVE_BAND_BYTES).
    Otherwise, on a GPU, blocks whose ids run consecutively in long stretches are copied
    directly and scattered ids go through a staging buffer of blocks; on a CPU each run
    is copied directly. With ``non_blocking`` the copies are only enqueued on the
    current CUDA stream.
    """

    def __init__(
        self,
        layout: KVLayout,
        raws: Sequence[torch.Tensor],
        rows: bool | None = None,
        band_bytes: int | None = None,
        save_band_bytes: int | None = None,
    ):
        self.layout = layout
        self.band_bytes = band_bytes
        self.save_band_bytes = save_band_bytes
        self.raws = list(raws)
        self.device = self.raws[0].device
        self.torch_dtype = self.raws[0].dtype
        item = self.raws[0].element_size()
        self.layer_block_bytes = math.prod(layout.outer) * layout.row_elems * item
        self.block_bytes = layout.num_layers * self.layer_block_bytes  # all layers
        if rows is None:
            rows = self.device.type == "cuda" and all(r.is_contiguous() for r in self.raws)
        self.row_tables = [r.view(-1, layout.row_elems) for r in self.raws] if rows else None

    @property
    def entry_dtype(self) -> str:
        return self.layout.dtype

    def entry_shape(self, num_tokens: int) -> tuple[int, ...]:
        return self.layout.payload_shape(num_tokens)

    def signature(self) -> str:
        return self.layout.signature()

    def payload_view(self, buffer, num_tokens: int) -> torch.Tensor:
        """A tensor over an entry's payload buffer (no copy)."""
        flat = buffer if torch.is_tensor(buffer) else torch.frombuffer(buffer, dtype=torch.uint8)
        return flat.view(self.torch_dtype).view(self.layout.payload_shape(num_tokens))

    def _row_table(self, layer: int) -> torch.Tensor:
        """``layer`` as ``[rows, row]``; row and band groups are planned only with tables."""
        if self.row_tables is None:
            raise RuntimeError("row groups need row tables (a contiguous cache on a GPU)")
        return self.row_tables[layer]

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
            band_bytes = self.band_bytes or BAND_BYTES
            most_layers = math.ceil(self.layout.num_layers / MIN_BANDS)
            band = max(1, min(most_layers, band_bytes // (most * self.layer_block_bytes)))
            return [
                self._band_group(g, band) for g in self._bounded(items, whole=True, layers=band)
            ]
        if self.row_tables is not None:
            band = self._save_band(items)
            if band > 1:
                return [
                    self._band_group(g, band, tail=True)
                    for g in self._bounded(items, whole=True, layers=band)
                ]
            return [self._row_group(g) for g in self._bounded(items, whole=False)]
        num_blocks = sum(len(ids) for _, _, ids in items)
        num_runs = sum(len(block_runs(ids)) for _, _, ids in items)
        if self.device.type == "cpu":
            return [CopyGroup([item], None, len(item[2])) for item in items]
        if num_blocks / num_runs * self.layer_block_bytes >= DIRECT_COPY_BYTES:
            return [CopyGroup(items, None, num_blocks)]
        return [self._staged_group(g) for g in self._bounded(items, whole=False)]

    def _save_band(self, items) -> int:
        """Layers a save gathers before one copy per entry: 1 unless every entry is saved
        whole and one layer of it is under SAVE_BAND_BYTES (short chunks, few KV heads)."""
        if not all(self._whole(item) for item in items):
            return 1
        most = max(len(ids) for _, _, ids in items) * self.layer_block_bytes
        wanted = SAVE_BAND_BYTES if self.save_band_bytes is None else self.save_band_bytes
        return max(1, min(self.layout.num_layers, wanted // most))

    def _bounded(self, items, whole: bool, layers: int = 1) -> list[list]:
        """``items`` in groups whose staging buffer of ``layers`` layers stays within
        STAGING_BYTES; ``whole``: it holds every item's whole payload, not only its blocks."""
        groups: list[list] = []
        current: list = []
        size = 0
        for item in items:
            blocks = layers * (item[0].size(self.layout.block_axis + 1) if whole else len(item[2]))
            if current and (size + blocks) * self.layer_block_bytes > STAGING_BYTES:
                groups.append(current)
                current, size = [], 0
            current.append(item)
            size += blocks
        groups.append(current)
        return groups

    def _cache_rows(self, ids: list[int]) -> np.ndarray:
        """Rows of a contiguous cache layer ``[outer * blocks, row]`` holding ``ids``."""
        outer = math.prod(self.layout.outer)
        num_blocks = self.raws[0].size(self.layout.block_axis)
        slices = np.arange(outer, dtype=np.int64)[:, None] * num_blocks
        return (slices + np.asarray(ids, dtype=np.int64)).ravel()

    def _whole(self, item) -> bool:
        """The item asks for every block of its payload."""
        payload, first, ids = item
        return first == 0 and len(ids) == payload.size(self.layout.block_axis + 1)

    def _row_group(self, items) -> RowGroup:
        rows = np.concatenate([self._cache_rows(ids) for _, _, ids in items])
        group = RowGroup(items, self._to_device(rows)[0])
        outer, row = math.prod(self.layout.outer), self.layout.row_elems
        if all(self._whole(item) for item in items):
            group.layers = [p.view(p.size(0), -1, row).unbind(0) for p, _, _ in items]
            group.sizes = [outer * len(ids) for _, _, ids in items]
        return group

    def _band_group(self, items, band: int, tail: bool = False) -> BandGroup:
        """The rows to write and, for each band size that occurs, where each sits in a
        staged band (built on the host, then one copy to the device)."""
        outer = math.prod(self.layout.outer)
        slices = np.arange(outer, dtype=np.int64)[:, None]
        cache_rows, within, starts, sizes = [], [], [], []
        start, whole = 0, True
        for payload, first, ids in items:
            blocks = payload.size(self.layout.block_axis + 1)
            span = np.arange(first, first + len(ids), dtype=np.int64)
            cache_rows.append(self._cache_rows(ids))
            within.append((slices * blocks + span).ravel())
            starts.append(np.full(outer * len(ids), start, dtype=np.int64))
            sizes.append(np.full(outer * len(ids), outer * blocks, dtype=np.int64))
            whole = whole and self._whole((payload, first, ids))
            start += outer * blocks
        item_within, item_start, item_rows = (np.concatenate(a) for a in (within, starts, sizes))
        layers = self.layout.num_layers
        bands = {band_span(layers, band, tail, layer)[1] for layer in range(layers)}
        bands -= {1} if whole else set()
        # Row r of layer k of a band of b layers, item i: b * start_i + k * rows_i + r.
        layer = np.arange(max(bands, default=1), dtype=np.int64)[:, None]
        picks = {b: item_start * b + item_within + item_rows * layer[:b] for b in sorted(bands)}
        device = self._to_device(np.concatenate(cache_rows), *picks.values())
        return BandGroup(
            items,
            device[0],
            picks=dict(zip(picks, device[1:])),
            num_rows=start,
            whole=whole,
            band=band,
            tail=tail,
        )

    def _to_device(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """``arrays`` as int64 tensors on the device: on a GPU, one pinned copy for all."""
        values = np.concatenate([a.ravel() for a in arrays]).astype(np.int64)
        if self.device.type == "cuda":  # pinned, so the copy is truly asynchronous
            host = torch.empty(values.size, dtype=torch.int64, pin_memory=True)
            host.numpy()[:] = values  # not .pin_memory(): its is_pinned check can take ms
            flat = host.to(self.device, non_blocking=True)
        else:
            flat = torch.from_numpy(values)
        out, offset = [], 0
        for a in arrays:
            out.append(flat[offset : offset + a.size].view(a.shape))
            offset += a.size
        return out

    def _staged_group(self, items) -> CopyGroup:
        ids = [block for _, _, block_ids in items for block in block_ids]
        return CopyGroup(items, self._to_device(np.asarray(ids, dtype=np.int64))[0], len(ids))

    def gather(
        self, groups: list[CopyGroup | RowGroup], layer: int, non_blocking: bool = False
    ) -> None:
        """Copy every group's blocks of ``layer`` out of the cache into the payloads."""
        axis, raw = self.layout.block_axis, self.raws[layer]
        for group in groups:
            if isinstance(group, BandGroup):
                self._gather_band(group, layer, non_blocking)
                continue
            if isinstance(group, RowGroup):
                self._gather_rows(group, layer, non_blocking)
                continue
            if group.index is None:
                for payload, first, ids in group.items:
                    _copy_blocks(
                        payload[layer],
                        first,
                        raw,
                        ids,
                        axis,
                        to_cache=False,
                        non_blocking=non_blocking,
                    )
                continue
            staged = raw.index_select(axis, group.index)
            offset = 0
            for payload, first, ids in group.items:
                payload[layer].narrow(axis, first, len(ids)).copy_(
                    staged.narrow(axis, offset, len(ids)), non_blocking=non_blocking
                )
                offset += len(ids)

    def scatter(
        self, groups: list[CopyGroup | RowGroup], layer: int, non_blocking: bool = False
    ) -> None:
        """Copy every group's payload blocks of ``layer`` into the cache (groups planned
        with ``load``: band groups or copy groups)."""
        axis, raw = self.layout.block_axis, self.raws[layer]
        for group in groups:
            if isinstance(group, BandGroup):
                self._scatter_rows(group, layer, non_blocking)
                continue
            if isinstance(group, RowGroup):
                raise TypeError("row groups are planned for saves only; plan with load=True")
            if group.index is None:
                for payload, first, ids in group.items:
                    _copy_blocks(
                        payload[layer],
                        first,
                        raw,
                        ids,
                        axis,
                        to_cache=True,
                        non_blocking=non_blocking,
                    )
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
        staged = self._row_table(layer).index_select(0, group.cache_rows)
        if group.layers is not None:  # whole items: one call for all the layer's copies
            dsts = [layers[layer] for layers in group.layers]
            torch._foreach_copy_(dsts, staged.split(group.sizes), non_blocking=non_blocking)
            return
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

    def _gather_band(self, group: BandGroup, layer: int, non_blocking: bool) -> None:
        """Gather ``layer``'s rows into its band; once every layer of the band is in (in
        whatever order they came), copy each item's share of the band out in one call."""
        first, size = self.band_span(group, layer)
        gathered = self._row_table(layer).index_select(0, group.cache_rows)
        picks = group.picks.get(size)
        if picks is None:  # a single-layer band of whole items: the gathered rows are it
            self._copy_band_out(group, first, size, gathered, non_blocking)
            return
        if first not in group.filling:
            rows = torch.empty(
                (size * group.num_rows, self.layout.row_elems),
                dtype=self.torch_dtype,
                device=self.device,
            )
            group.filling[first] = (rows, set())
        staged, done = group.filling[first]
        staged.index_copy_(0, picks[layer - first], gathered)
        done.add(layer)
        if len(done) == size:
            del group.filling[first]
            self._copy_band_out(group, first, size, staged, non_blocking)

    def _copy_band_out(
        self, group: BandGroup, first: int, size: int, staged: torch.Tensor, non_blocking: bool
    ) -> None:
        hosts, parts = self._band_parts(group, first, size, staged)
        torch._foreach_copy_(hosts, parts, non_blocking=non_blocking)

    def _band_parts(
        self, group: BandGroup, first: int, size: int, staged: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each item's ``size`` layers from ``first`` (contiguous rows of its payload) and
        its share of ``staged``, where the items' bands sit one after another."""
        row, offset, hosts, parts = self.layout.row_elems, 0, [], []
        for payload, _, _ in group.items:
            host = payload[first : first + size].view(-1, row)
            hosts.append(host)
            parts.append(staged.narrow(0, offset, host.size(0)))
            offset += host.size(0)
        return hosts, parts

    def _scatter_rows(self, group: BandGroup, layer: int, non_blocking: bool) -> None:
        first, size = self.band_span(group, layer)
        if group.staged is None or group.staged[0] != first:
            group.staged = (first, self.stage_band(group, first, non_blocking=non_blocking))
        self.scatter_staged(group, layer, first, group.staged[1])
        if layer == first + size - 1:
            group.staged = None

    def band_span(self, group: BandGroup, layer: int) -> tuple[int, int]:
        """(first layer, number of layers) of the band of ``group`` holding ``layer``."""
        return band_span(self.layout.num_layers, group.band, group.tail, layer)

    def band_size(self, group: BandGroup, first: int) -> int:
        """Layers in the band that starts at layer ``first``."""
        return self.band_span(group, first)[1]

    def staging_elems(self, group: BandGroup) -> int:
        """Elements of the staging buffer that one band of ``group`` needs."""
        return group.band * group.num_rows * self.layout.row_elems

    def stage_band(
        self,
        group: BandGroup,
        first: int,
        out: torch.Tensor | None = None,
        non_blocking: bool = False,
    ) -> torch.Tensor:
        """Copy the band of layers starting at ``first`` of every item's payload, item
        after item, into ``out`` (a device buffer of at least :meth:`staging_elems`
        elements of the cache dtype) or a new buffer; one plain copy per item."""
        row, size = self.layout.row_elems, self.band_size(group, first)
        rows = size * group.num_rows
        if out is None:
            staged = torch.empty((rows, row), dtype=self.torch_dtype, device=self.device)
        else:
            staged = out[: rows * row].view(rows, row)
        for host, part in zip(*self._band_parts(group, first, size, staged)):
            part.copy_(host, non_blocking=non_blocking)
        return staged

    def scatter_staged(
        self, group: BandGroup, layer: int, first: int, staged: torch.Tensor
    ) -> None:
        """Write ``layer``'s asked-for rows out of a band staged by :meth:`stage_band`."""
        picks = group.picks.get(self.band_size(group, first))
        if picks is not None:
            staged = staged.index_select(0, picks[layer - first])
        self._row_table(layer).index_copy_(0, group.cache_rows, staged)


def band_span(num_layers: int, band: int, tail: bool, layer: int) -> tuple[int, int]:
    """(first layer, number of layers) of the band holding ``layer``: bands of ``band``
    layers from layer 0; with ``tail`` (and bands of several layers) the last layer alone."""
    banded = num_layers - 1 if tail and band > 1 else num_layers
    if layer >= banded:
        return layer, 1
    first = layer - layer % band
    return first, min(band, banded - first)


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
