"""Hybrid KV caches without a server: vLLM's group specs read into kvshelf's groups, and
chunk and state copies between shared cache tensors and entry payloads."""

from __future__ import annotations

import torch
from vllm.v1.kv_cache_interface import (
    CrossAttentionSpec,
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
)

from kvshelf.vllm.groups import NULL_BLOCK_ID, GroupKind, describe_groups
from kvshelf.vllm.hybrid import ChunkCopy, HybridCache, StateCopy

NUM_BLOCKS = 12
BLOCK = 4  # tokens per block
ATTN = {"block_size": BLOCK, "num_kv_heads": 2, "head_size": 8, "dtype": torch.float32}


def config(*groups) -> KVCacheConfig:
    return KVCacheConfig(NUM_BLOCKS, [], [KVCacheGroupSpec(list(n), s) for n, s in groups])


def mamba(mode: str = "none") -> MambaSpec:
    return MambaSpec(
        block_size=BLOCK,
        shapes=((3, 8), (2, 4, 4)),
        dtypes=(torch.float32, torch.float32),
        mamba_cache_mode=mode,
    )


def test_group_kinds_are_read_from_vllms_specs():
    groups = describe_groups(
        config(
            (["l0", "l2"], SlidingWindowSpec(**ATTN, sliding_window=8)),
            (["l1", "l3"], FullAttentionSpec(**ATTN)),
            (["m4", "m5"], mamba("align")),
        )
    )
    assert [g.kind for g in groups.groups] == [
        GroupKind.SLIDING_WINDOW,
        GroupKind.FULL,
        GroupKind.STATE,
    ]
    assert groups.unsupported is None and not groups.uniform and groups.has_state
    assert groups.state_groups[0].align
    assert "window=8" in groups.signature()
    # One full-attention group is the uniform (single-layout) case.
    assert describe_groups(config((["l0"], FullAttentionSpec(**ATTN)))).uniform


def test_a_group_kvshelf_cannot_copy_makes_the_model_uncacheable():
    groups = describe_groups(
        config((["l0"], FullAttentionSpec(**ATTN)), (["x0"], CrossAttentionSpec(**ATTN)))
    )
    assert groups.unsupported and "CrossAttentionSpec" in groups.unsupported


def test_state_slots_follow_vllms_modes():
    none = describe_groups(config((["m"], mamba("none")))).state_groups[0]
    align = describe_groups(config((["m"], mamba("align")))).state_groups[0]
    assert none.state_slot([7], 10) == 7  # one state block per request
    # align: slot i holds the state after (i + 1) * BLOCK tokens; the running state
    # after 10 tokens sits in the slot of the block token 10 is in.
    assert align.state_slot([NULL_BLOCK_ID, 5, 6], 8) == 5
    assert align.state_slot([NULL_BLOCK_ID, 5, 6], 10) == 6
    assert align.state_slot([NULL_BLOCK_ID, 5, 6], 4) is None  # null: nothing kept there


def shared_caches():
    """Three groups whose layers share memory, as vLLM lays them out: each tensor is
    one layer of every group, viewed in that group's shape; block ids are disjoint."""
    page = 2 * BLOCK * 16  # floats: K/V x tokens x (2 heads x 8)
    memory = [torch.zeros(NUM_BLOCKS, page) for _ in range(2)]
    caches = {}
    for i, flat in enumerate(memory):
        caches[f"sw{i}"] = flat.view(NUM_BLOCKS, 2, BLOCK, 16)
        caches[f"full{i}"] = flat.view(NUM_BLOCKS, 2, BLOCK, 16)
        caches[f"m{i}"] = flat.view(torch.uint8)[:, : (3 * 8 + 2 * 4 * 4) * 4]
    groups = describe_groups(
        config(
            ([f"sw{i}" for i in range(2)], SlidingWindowSpec(**ATTN, sliding_window=8)),
            ([f"full{i}" for i in range(2)], FullAttentionSpec(**ATTN)),
            ([f"m{i}" for i in range(2)], mamba()),
        )
    )
    return groups, caches, memory


def test_chunks_and_states_round_trip_and_null_blocks_stay_untouched():
    groups, caches, memory = shared_caches()
    for flat in memory:
        flat.copy_(torch.randn_like(flat))
    cache = HybridCache(groups, caches, NUM_BLOCKS, "test")
    tokens = 3 * BLOCK
    chunk = bytearray(cache.payload_shape(tokens)[0])
    state = bytearray(cache.payload_shape(0)[0])
    # Save: sliding-window blocks 1, 2, 3; full-attention blocks 4, 5, 6; state in 7.
    cache.save([ChunkCopy(chunk, tokens, 0, [[1, 2, 3], [4, 5, 6]])], [StateCopy(state, [7])])
    before = [flat.clone() for flat in memory]
    for flat in memory:
        flat.zero_()
    # Load elsewhere; the window's first block is null (outside the window): skipped.
    cache.load(
        [ChunkCopy(chunk, tokens, 0, [[NULL_BLOCK_ID, 8, 9], [10, 11, 0]])], [StateCopy(state, [3])]
    )
    for old, new in zip(before, memory):
        assert torch.equal(new[8:10], old[2:4])  # window blocks 2, 3 -> 8, 9
        assert torch.equal(new[10:12], old[4:6])  # full blocks 4, 5 -> 10, 11
        state_bytes = (3 * 8 + 2 * 4 * 4) * 4
        assert torch.equal(
            new.view(torch.uint8)[3, :state_bytes], old.view(torch.uint8)[7, :state_bytes]
        )
        # The null block: full's third id is 0 here, so block 0 is never written.
        assert not new[0].any()
