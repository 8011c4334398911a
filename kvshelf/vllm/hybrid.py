"""Copies for hybrid KV caches: several groups, each with its own blocks per request.

An entry of a hybrid model is a byte payload. A *chunk* entry holds, one after another,
every token group's blocks of the chunk in that group's own layout (a payload of
:class:`~kvshelf.vllm.layout.KVLayout` per group). A *state* entry (``num_tokens == 0``)
holds every state group's recurrent state, layer after layer, as the opaque bytes of
one cache block. Copies are synchronous, the CPU backend's way; blocks that vLLM left
null (a sliding window's past) are neither written nor read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kvshelf.vllm.groups import NULL_BLOCK_ID, CacheGroup, CacheGroups
from kvshelf.vllm.layout import BlockCopier, LayoutError, discover_layout
from kvshelf.vllm.movers import StepCopies

PAYLOAD_DTYPE = "uint8"


@dataclass
class ChunkCopy:
    """One chunk's blocks: ``block_ids[g]`` are token group ``g``'s cache blocks for the
    chunk's blocks from ``first_block`` on."""

    buffer: object  # the entry's payload: a host tensor or a memoryview
    num_tokens: int  # tokens in the chunk (fixes each group's payload shape)
    first_block: int
    block_ids: list[list[int]]

    @property
    def num_blocks(self) -> int:
        return max((len(ids) for ids in self.block_ids), default=0)


@dataclass
class StateCopy:
    """One state entry: ``slots[g]`` is state group ``g``'s block holding the state."""

    buffer: object
    slots: list[int]


@dataclass
class _StateGroup:
    group: CacheGroup
    rows: list[torch.Tensor]  # per state tensor: [blocks, bytes of one block's state]


class HybridCache:
    """The groups of one worker's cache and how their bytes map into entries."""

    def __init__(
        self,
        groups: CacheGroups,
        kv_caches: Mapping[str, torch.Tensor],
        num_blocks: int,
        backend: str,
    ):
        self.groups = groups
        self.copiers: list[BlockCopier] = []
        for group in groups.token_groups:
            tensors = {name: kv_caches[name] for name in group.layer_names}
            layout, raws = discover_layout(tensors, num_blocks, group.block_size, backend)
            self.copiers.append(BlockCopier(layout, raws, rows=False))
        self.states = [
            _StateGroup(g, _state_rows(kv_caches, g, num_blocks)) for g in groups.state_groups
        ]
        self._state_bytes = sum(r.size(1) for s in self.states for r in s.rows)
        first = self.copiers[0] if self.copiers else None
        self.device = first.device if first else self.states[0].rows[0].device

    # -- shapes ------------------------------------------------------------------
    def group_bytes(self, copier: BlockCopier, num_tokens: int) -> int:
        return copier.block_bytes * copier.layout.num_blocks_for(num_tokens)

    def payload_shape(self, num_tokens: int) -> tuple[int, ...]:
        """Bytes of a chunk entry of ``num_tokens`` tokens, or of a state entry (0)."""
        if num_tokens == 0:
            return (self._state_bytes,)
        return (sum(self.group_bytes(c, num_tokens) for c in self.copiers),)

    def block_bytes(self) -> int:
        """Bytes one block of every token group takes."""
        return sum(c.block_bytes for c in self.copiers)

    def signature(self) -> str:
        parts = [c.layout.signature() for c in self.copiers]
        parts += [f"state:{[r.size(1) for r in s.rows]}" for s in self.states]
        return f"hybrid[{self.groups.signature()}]/" + "|".join(parts)

    # -- copies ------------------------------------------------------------------
    def load(self, chunks: Sequence[ChunkCopy], states: Sequence[StateCopy]) -> None:
        self._copy(chunks, to_cache=True)
        for state in states:
            self._copy_state(state, to_cache=True)

    def save(self, chunks: Sequence[ChunkCopy], states: Sequence[StateCopy]) -> None:
        self._copy(chunks, to_cache=False)
        for state in states:
            self._copy_state(state, to_cache=False)

    def _copy(self, chunks: Sequence[ChunkCopy], to_cache: bool) -> None:
        for g, copier in enumerate(self.copiers):
            items = []
            for chunk in chunks:
                payload = self._group_view(chunk.buffer, chunk.num_tokens, g)
                ids = chunk.block_ids[g]
                # Null blocks (outside a window) break the run: copy the real ones only.
                for offset, run in _real_runs(ids):
                    items.append((payload, chunk.first_block + offset, run))
            groups = copier.plan(items, load=to_cache)
            for layer in range(copier.layout.num_layers):
                if to_cache:
                    copier.scatter(groups, layer)
                else:
                    copier.gather(groups, layer)

    def _group_view(self, buffer, num_tokens: int, g: int) -> torch.Tensor:
        flat = _as_bytes(buffer)
        offset = sum(self.group_bytes(c, num_tokens) for c in self.copiers[:g])
        copier = self.copiers[g]
        part = flat[offset : offset + self.group_bytes(copier, num_tokens)]
        return part.view(copier.torch_dtype).view(copier.layout.payload_shape(num_tokens))

    def _copy_state(self, state: StateCopy, to_cache: bool) -> None:
        flat, offset = _as_bytes(state.buffer), 0
        for group, slot in zip(self.states, state.slots):
            for rows in group.rows:
                part = flat[offset : offset + rows.size(1)]
                if to_cache:
                    rows[slot].copy_(part)
                else:
                    part.copy_(rows[slot])
                offset += rows.size(1)


def _state_rows(kv_caches: Mapping[str, object], group: CacheGroup, num_blocks: int):
    """Each state tensor of ``group``'s layers as ``[blocks, bytes]`` over its memory."""
    rows = []
    for name in group.layer_names:
        value = kv_caches[name]
        tensors = list(value) if isinstance(value, (list, tuple)) else [value]
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
                raise LayoutError(f"state cache of {name} is a {type(tensor).__name__}")
            if tensor.size(0) != num_blocks or not tensor[0].is_contiguous():
                raise LayoutError(
                    f"state cache of {name} ({tuple(tensor.shape)}, strides "
                    f"{tuple(tensor.stride())}) is not [blocks, dense state]"
                )
            item = tensor.element_size()
            storage = torch.empty(0, dtype=torch.uint8, device=tensor.device)
            storage.set_(tensor.untyped_storage())
            raw = storage.as_strided(
                (num_blocks, tensor[0].numel() * item),
                (tensor.stride(0) * item, 1),
                tensor.storage_offset() * item,
            )
            rows.append(raw)
    return rows


def _as_bytes(buffer) -> torch.Tensor:
    if torch.is_tensor(buffer):
        return buffer.view(torch.uint8).view(-1)
    return torch.frombuffer(buffer, dtype=torch.uint8)


def _real_runs(block_ids: list[int]) -> list[tuple[int, list[int]]]:
    """Stretches of ``block_ids`` without null blocks, as (offset, ids)."""
    runs: list[tuple[int, list[int]]] = []
    for i, block in enumerate(block_ids):
        if block == NULL_BLOCK_ID:
            continue
        if runs and runs[-1][0] + len(runs[-1][1]) == i:
            runs[-1][1].append(block)
        else:
            runs.append((i, [block]))
    return runs


class HybridMover:
    """The mover interface (see :mod:`kvshelf.vllm.movers`) over a :class:`HybridCache`:
    loads before the forward, saves when the step ends."""

    def __init__(self, cache: HybridCache):
        self.cache = cache
        self._saves: tuple[list[ChunkCopy], list[StateCopy]] = ([], [])

    def load(self, items: tuple[list[ChunkCopy], list[StateCopy]], forward_context=None) -> None:
        self.cache.load(*items)

    def wait_layer(self, layer: int) -> None:
        return

    def begin_saves(self, items: tuple[list[ChunkCopy], list[StateCopy]]) -> None:
        self._saves = items

    def save_layer(self, layer: int) -> None:
        return

    def finish_step(self) -> StepCopies:
        chunks, states = self._saves
        if chunks or states:
            self.cache.save(chunks, states)
        self._saves = ([], [])
        return StepCopies()
