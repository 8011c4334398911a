"""vLLM's KV cache groups as kvshelf sees them: which kinds it copies, and how.

With its hybrid KV cache manager on, vLLM splits a model's layers into groups of one
attention kind each (``kv_cache_config.kv_cache_groups``); each group has its own block
ids per request, while groups may share the same memory. kvshelf knows two families:

- *token* groups hold one KV row per token and are copied block by block: full
  attention, MLA latents, sliding-window and chunked-local attention (whose blocks
  outside the window vLLM replaces with its null block, id 0: never written).
- *state* groups (Mamba, Gated-DeltaNet and other linear attention, short convolutions)
  hold one recurrent state per request. kvshelf stores the state after a chunk's last
  token under that chunk's state key, and a hit may end only where such a state exists.

A group of any other kind (cross-attention, encoder-only, sparse caches) makes the model
uncacheable: :attr:`CacheGroups.unsupported` says why and serving goes on uncached.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

NULL_BLOCK_ID = 0  # vLLM's null block: a placeholder for blocks a group does not keep


class GroupKind(enum.Enum):
    FULL = "full"
    MLA = "mla"
    SLIDING_WINDOW = "sliding_window"
    CHUNKED_LOCAL = "chunked_local"
    STATE = "state"


TOKEN_KINDS = frozenset(
    {GroupKind.FULL, GroupKind.MLA, GroupKind.SLIDING_WINDOW, GroupKind.CHUNKED_LOCAL}
)


@dataclass(frozen=True)
class CacheGroup:
    index: int  # position in vLLM's kv_cache_groups (and in every request's block ids)
    kind: GroupKind
    layer_names: tuple[str, ...]
    block_size: int
    detail: str = ""  # window size, attention chunk, state mode: part of the signature
    align: bool = False  # state groups: vLLM keeps a state per block ("align" mode)

    def state_slot(self, block_ids: list[int], num_tokens: int) -> int | None:
        """The block of a state group holding the state after ``num_tokens`` tokens, as
        vLLM lays it out: in "align" mode slot ``i`` holds the state after
        ``(i + 1) * block_size`` tokens (the running state sits in the last slot);
        otherwise the request's one state block. ``None``: no block holds it."""
        index = math.ceil(num_tokens / self.block_size) - 1 if self.align else 0
        if not 0 <= index < len(block_ids) or block_ids[index] == NULL_BLOCK_ID:
            return None
        return block_ids[index]


@dataclass(frozen=True)
class CacheGroups:
    groups: tuple[CacheGroup, ...]
    unsupported: str | None = None  # why kvshelf cannot cache this model; None: it can

    @property
    def uniform(self) -> bool:
        """One group of full attention (or MLA): the single-layout fast path."""
        return len(self.groups) == 1 and self.groups[0].kind in (GroupKind.FULL, GroupKind.MLA)

    @property
    def token_groups(self) -> tuple[CacheGroup, ...]:
        return tuple(g for g in self.groups if g.kind in TOKEN_KINDS)

    @property
    def state_groups(self) -> tuple[CacheGroup, ...]:
        return tuple(g for g in self.groups if g.kind is GroupKind.STATE)

    @property
    def has_state(self) -> bool:
        return bool(self.state_groups)

    def signature(self) -> str:
        return ";".join(
            f"{g.kind.value}{'/' + g.detail if g.detail else ''}:{len(g.layer_names)}"
            for g in self.groups
        )


def describe_groups(kv_cache_config: object) -> CacheGroups:
    """Read vLLM's ``KVCacheConfig`` (``None``, as some callers give: one full group)."""
    from vllm.v1.kv_cache_interface import (
        ChunkedLocalAttentionSpec,
        FullAttentionSpec,
        MambaSpec,
        MLAAttentionSpec,
        SlidingWindowSpec,
        UniformTypeKVCacheSpecs,
    )

    specs = getattr(kv_cache_config, "kv_cache_groups", None)
    if not specs:
        return CacheGroups((CacheGroup(0, GroupKind.FULL, (), 0),))
    groups: list[CacheGroup] = []
    unsupported: list[str] = []
    for index, group in enumerate(specs):
        spec = group.kv_cache_spec
        if isinstance(spec, UniformTypeKVCacheSpecs):
            kinds = {type(s) for s in spec.kv_cache_specs.values()}
            spec = next(iter(spec.kv_cache_specs.values())) if len(kinds) == 1 else spec
        names = tuple(group.layer_names)
        size = spec.block_size
        # Exact types only: subclasses (sinks, sparse or circular caches) lay out
        # their blocks differently and are not copied until someone checks them.
        if type(spec) is MLAAttentionSpec:
            groups.append(CacheGroup(index, GroupKind.MLA, names, size))
        elif type(spec) is FullAttentionSpec:
            groups.append(CacheGroup(index, GroupKind.FULL, names, size))
        elif type(spec) is SlidingWindowSpec:
            window = f"window={spec.sliding_window}"
            groups.append(CacheGroup(index, GroupKind.SLIDING_WINDOW, names, size, window))
        elif type(spec) is ChunkedLocalAttentionSpec:
            chunk = f"chunk={spec.attention_chunk_size}"
            groups.append(CacheGroup(index, GroupKind.CHUNKED_LOCAL, names, size, chunk))
        elif isinstance(spec, MambaSpec):
            groups.append(_state_group(index, spec, names, unsupported))
        else:
            unsupported.append(f"group {index} ({type(spec).__name__}, layers {names[:2]}...)")
    reason = "; ".join(unsupported) if unsupported else None
    return CacheGroups(tuple(groups), reason)


def _state_group(index: int, spec, names: tuple[str, ...], unsupported: list[str]) -> CacheGroup:
    mode = getattr(spec, "mamba_cache_mode", "none")
    if getattr(spec, "num_speculative_blocks", 0):
        unsupported.append(f"group {index}: recurrent state with speculative decoding")
    if mode not in ("none", "align"):
        unsupported.append(f"group {index}: recurrent state in mamba_cache_mode {mode!r}")
    shapes = getattr(spec, "shapes", ())
    dtypes = [str(d).removeprefix("torch.") for d in getattr(spec, "dtypes", ())]
    detail = f"state={list(map(list, shapes))}/{dtypes}/{getattr(spec, 'mamba_type', '')}"
    return CacheGroup(index, GroupKind.STATE, names, spec.block_size, detail, align=mode == "align")
