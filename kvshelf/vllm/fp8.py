"""fp8 storage: entries hold the KV cache as float8 (e4m3) with one scale per token and head.

A save gathers the chunk's blocks on the cache's device, quantizes them there and copies
the small bytes out; a load copies the small bytes in, dequantizes them on the device
into the cache's dtype and writes the blocks. The scale group is the cache's innermost
dimension (a head's ``head_size`` values of one token; MLA: one token's latent), so each
group keeps its own range. A payload row is one block row of fp8 bytes followed by its
float32 scales: ``[layers, *outer, blocks, row + 4 * groups]`` of uint8.

The storage format is part of the layout signature, so fp8 entries are never read as
lossless ones nor the reverse. Copies are synchronous: loads before the forward, saves
after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kvshelf.vllm.layout import KVLayout, LayoutError
from kvshelf.vllm.movers import LoadItem, SaveItem, StepMover

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALE_BYTES = 4  # float32
STORAGE_NAME = "fp8_e4m3"


class Fp8Copier:
    """Block copies between a uniform paged cache and fp8 entries."""

    entry_dtype = "uint8"

    def __init__(self, layout: KVLayout, raws: Sequence[torch.Tensor], group: int):
        if group <= 0 or layout.row_elems % group:
            raise LayoutError(f"a row of {layout.row_elems} values has no groups of {group}")
        self.layout = layout
        self.raws = list(raws)
        self.group = group
        self.device = self.raws[0].device
        self.torch_dtype = self.raws[0].dtype
        self.groups_per_row = layout.row_elems // group
        self.row_bytes = layout.row_elems + SCALE_BYTES * self.groups_per_row
        self.block_bytes = layout.num_layers * math.prod(layout.outer) * self.row_bytes

    def signature(self) -> str:
        return f"{self.layout.signature()}/store={STORAGE_NAME}/group={self.group}"

    def entry_shape(self, num_tokens: int) -> tuple[int, ...]:
        layout = self.layout
        return (layout.num_layers, *layout.outer, layout.num_blocks_for(num_tokens), self.row_bytes)

    def payload_view(self, buffer, num_tokens: int) -> torch.Tensor:
        flat = buffer if torch.is_tensor(buffer) else torch.frombuffer(buffer, dtype=torch.uint8)
        return flat.view(torch.uint8).view(self.entry_shape(num_tokens))

    # -- one layer's copies ------------------------------------------------------
    def save_layer(self, items: Sequence[SaveItem], layer: int) -> None:
        """Quantize the items' blocks of ``layer`` into their payloads."""
        ids = [i for item in items for i in item.block_ids]
        if not ids:
            return
        axis = self.layout.block_axis
        index = torch.tensor(ids, device=self.device)
        rows = quantize(self.raws[layer].index_select(axis, index), self.group)
        start = 0
        for item in items:
            count = len(item.block_ids)
            part = rows.narrow(axis, start, count)
            item.payload[layer].narrow(axis, 0, count).copy_(part)
            start += count

    def load_layer(self, items: Sequence[LoadItem], layer: int) -> None:
        """Dequantize the items' payload blocks of ``layer`` into the cache."""
        axis = self.layout.block_axis
        parts = [
            item.payload[layer].narrow(axis, item.first_block, len(item.block_ids))
            for item in items
            if item.block_ids
        ]
        if not parts:
            return
        rows = torch.cat(parts, dim=axis).to(self.device)
        ids = [i for item in items for i in item.block_ids]
        index = torch.tensor(ids, device=self.device)
        values = dequantize(rows, self.group, self.torch_dtype)
        self.raws[layer].index_copy_(axis, index, values)


def quantize(rows: torch.Tensor, group: int) -> torch.Tensor:
    """``[..., row]`` values -> ``[..., row + 4 * row / group]`` bytes: fp8 then scales."""
    values = rows.float().unflatten(-1, (-1, group))
    amax = values.abs().amax(dim=-1, keepdim=True)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    quantized = (values / scales).to(FP8).view(torch.uint8).flatten(-2)
    scale_bytes = scales.squeeze(-1).contiguous().view(torch.uint8)
    return torch.cat([quantized, scale_bytes], dim=-1)


def dequantize(rows: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`quantize`, in ``dtype``."""
    row = rows.shape[-1] * group // (group + SCALE_BYTES)
    quantized, scale_bytes = rows[..., :row], rows[..., row:]
    scales = scale_bytes.contiguous().view(torch.float32).unsqueeze(-1)
    values = quantized.contiguous().view(FP8).float().unflatten(-1, (-1, group)) * scales
    return values.flatten(-2).to(dtype)


class Fp8Mover(StepMover):
    """Synchronous fp8 copies: the step's loads at its start, its saves at its end."""

    def __init__(self, copier: Fp8Copier):
        super().__init__()
        self.copier = copier

    def _load(self, items: Sequence[LoadItem]) -> None:
        for layer in range(self.copier.layout.num_layers):
            self.copier.load_layer(items, layer)
        self._synchronize()

    def _save(self, items: Sequence[SaveItem]) -> None:
        for layer in range(self.copier.layout.num_layers):
            self.copier.save_layer(items, layer)
        self._synchronize()

    def _synchronize(self) -> None:
        if self.copier.device.type == "cuda":
            torch.cuda.current_stream(self.copier.device).synchronize()


def scale_group(tensor: torch.Tensor) -> int:
    """Values that share a scale: the cache tensor's innermost dimension when it is
    dense (a head's values of one token), else 0 (no grouping found)."""
    if tensor.dim() == 0 or tensor.stride(-1) != 1:
        return 0
    return int(tensor.shape[-1])
