"""The connector's scheduler side step by step, in process: vLLM's own request and
scheduler-output objects, a real engine behind an in-process lookup, and a stand-in
worker that stores what each step's saves ask for. Seconds, not server starts."""

from __future__ import annotations

import pytest
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.kv_cache_interface import (
    CrossAttentionSpec,
    FullAttentionSpec,
    MambaSpec,
    SlidingWindowSpec,
)

from kvshelf.config import ConfigError, load_config
from kvshelf.keys import state_chunk
from kvshelf.vllm.connector import fit_chunk_size

from .scheduler_harness import ATTN, BLOCK, Setup, request


@pytest.fixture
def mamba_setup(tmp_path):
    setup = Setup(
        tmp_path,
        (["attn"], FullAttentionSpec(**ATTN)),
        (
            ["mamba"],
            MambaSpec(
                block_size=BLOCK, shapes=((2, 4),), dtypes=(torch.float32,), mamba_cache_mode="none"
            ),
        ),
        needs_state=True,
    )
    yield setup
    setup.close()


def test_states_are_saved_where_steps_end_and_a_repeat_loads_the_last_one(mamba_setup):
    tokens = list(range(100))
    blocks = (list(range(1, 8)), [42])  # attention blocks; the one state block
    metas = mamba_setup.run(request(tokens), blocks, [32, 32, 32, 4])
    saved = [[(s.start, slots) for s, slots in spec.states] for m in metas for spec in m.saves]
    # Every step ends on a chunk end or the prompt's end: a state there, from block 42.
    assert saved == [[(32, [42])], [(64, [42])], [(96, [42])], [(100, [42])]]

    # The same prompt again: the hit ends on the last state before its last token.
    again = request(tokens)
    metas = mamba_setup.run(again, (list(range(11, 18)), [77]), [4])
    (load,) = metas[0].loads  # asynchronous: a step of its own, before the request computes
    assert metas[0].saves == [] and metas[1].loads == []
    assert (load.start, load.end) == (0, 96)
    assert [c.end for c in load.chunks] == [32, 64, 96]
    assert load.state == state_chunk(load.chunks[-1]) and load.state_slots == [77]
    # Nothing the hit covers is saved again; the tail after it is (the lookup names the
    # hit only, not what else exists).
    (save,) = metas[1].saves
    assert [c.end for c in save.chunks] == [100] and [s.end for s, _ in save.states] == [100]


def test_a_step_ending_between_chunk_ends_keeps_no_state(mamba_setup):
    tokens = list(range(200, 300))
    metas = mamba_setup.run(request(tokens), (list(range(1, 8)), [5]), [40, 60])
    states = [s.start for m in metas for spec in m.saves for s, _ in spec.states]
    assert states == [100]  # 40 is no chunk end or cut; 100 is the prompt's end
    # The prompt again: a state only after its last token, which vLLM must compute: no hit.
    assert mamba_setup.run(request(tokens), (list(range(11, 18)), [6]), [100])[0].loads == []


def test_sliding_window_groups_keep_their_own_block_ids(tmp_path):
    setup = Setup(
        tmp_path,
        (["sw"], SlidingWindowSpec(**ATTN, sliding_window=16)),
        (["full"], FullAttentionSpec(**ATTN)),
        needs_state=False,
    )
    try:
        tokens = list(range(64))
        metas = setup.run(request(tokens), ([1, 2, 3, 4], [5, 6, 7, 8]), [64])
        assert metas[0].saves[0].block_ids == ([1, 2, 3, 4], [5, 6, 7, 8])
        again = setup.run(request(tokens), ([0, 0, 9, 10], [11, 12, 13, 14]), [1])
        (load,) = again[0].loads
        assert load.block_ids == ([0, 0, 9, 10], [11, 12, 13, 14]) and load.end == 63
        assert load.state is None
    finally:
        setup.close()


def test_a_model_kvshelf_cannot_cache_is_served_uncached(tmp_path):
    setup = Setup(
        tmp_path,
        (["self"], FullAttentionSpec(**ATTN)),
        (["cross"], CrossAttentionSpec(**ATTN)),
        needs_state=False,
    )
    try:
        assert setup.groups.unsupported
        metas = setup.run(request(list(range(64))), ([1, 2, 3, 4], [5]), [64])
        assert metas[0].saves == [] and metas[0].loads == []
        assert setup.run(request(list(range(64))), ([6, 7, 8, 9], [10]), [64])[0].loads == []
    finally:
        setup.close()


def test_the_default_chunk_size_follows_a_hybrid_block_size_and_a_set_one_must_fit():
    fitted = fit_chunk_size(load_config({}, environ={}), 384, KVConnectorRole.WORKER)
    assert fitted.chunk_size == 384  # 256 by default: the nearest whole number of blocks
    assert fit_chunk_size(load_config({}, environ={}), 16, KVConnectorRole.WORKER).chunk_size == 256
    with pytest.raises(ConfigError, match="use 384 instead"):
        fit_chunk_size(load_config({"chunk_size": 256}, environ={}), 384, KVConnectorRole.WORKER)
