"""KV layout discovery and block copies on plain tensors (no vLLM server)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvshelf.vllm.layout import (
    BandGroup,
    BlockCopier,
    LayoutError,
    RowGroup,
    band_span,
    block_runs,
    discover_layout,
    raw_view,
)
from kvshelf.vllm.movers import Completer, LoadItem, SaveItem, SyncMover

NUM_BLOCKS = 40


def caches(shape=(NUM_BLOCKS, 2, 4, 6), layers=3, permute=None):
    out = {}
    for i in range(layers):
        tensor = torch.randn(shape)
        out[f"layers.{i}.attn"] = tensor.permute(*permute) if permute else tensor
    return out


def payload(copier: BlockCopier, num_blocks: int) -> torch.Tensor:
    tokens = num_blocks * copier.layout.block_size
    return copier.payload_view(bytearray(num_blocks * copier.block_bytes), tokens)


def test_the_block_dimension_is_found_wherever_it_is():
    layout, raws = discover_layout(caches((2, NUM_BLOCKS, 4, 6)), NUM_BLOCKS, 4, "b")
    assert layout.outer == (2,) and layout.row_elems == 24 and raws[0].shape == (2, NUM_BLOCKS, 24)
    with pytest.raises(LayoutError, match="block dimension"):
        discover_layout(caches((NUM_BLOCKS, NUM_BLOCKS, 3)), NUM_BLOCKS, 4, "b")


def test_the_raw_view_follows_physical_order():
    # Logical [blocks, heads, tokens, dim] stored as [blocks, tokens, heads, dim].
    physical = torch.randn(NUM_BLOCKS, 4, 2, 6)
    logical = physical.permute(0, 2, 1, 3)
    raw = raw_view(logical, 0)
    assert raw.shape == (NUM_BLOCKS, 48)
    assert torch.equal(raw[7], physical[7].reshape(-1))


def test_layers_sharing_a_tensor_count_once():
    shared = torch.randn(NUM_BLOCKS, 2, 4, 6)
    layout, raws = discover_layout({"a": shared, "b": shared}, NUM_BLOCKS, 4, "x")
    assert layout.num_layers == 1 and len(raws) == 1


def test_block_runs():
    assert block_runs([3, 4, 5, 9, 8, 10]) == [(0, 3, 3), (3, 9, 1), (4, 8, 1), (5, 10, 1)]


SCATTERED = [30, 29, 28, 5, 6, 7, 1, 3, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 31, 33]


@pytest.mark.parametrize("ids", [[3, 4, 5, 6], SCATTERED], ids=["runs", "scattered"])
def test_save_then_load_moves_exactly_those_blocks(ids):
    source = caches()
    layout, raws = discover_layout(source, NUM_BLOCKS, 4, "x")
    copier = BlockCopier(layout, raws)
    saved = payload(copier, len(ids))
    mover = SyncMover(copier)
    mover.begin_saves([SaveItem(saved, ids)])
    mover.finish_step()

    target = {name: torch.zeros_like(t) for name, t in source.items()}
    layout2, raws2 = discover_layout(target, NUM_BLOCKS, 4, "x")
    SyncMover(BlockCopier(layout2, raws2)).load([LoadItem(saved, 1, ids[1:])])
    for name in source:
        assert torch.equal(target[name][ids[0]], torch.zeros(2, 4, 6))  # not asked for
        for block in ids[1:]:
            assert torch.equal(target[name][block], source[name][block])


def test_staged_groups_copy_like_direct_ones():
    # The GPU path for scattered block ids: one staging buffer per group and layer.
    source = caches()
    layout, raws = discover_layout(source, NUM_BLOCKS, 4, "x")
    copier = BlockCopier(layout, raws)
    first, second = payload(copier, 6), payload(copier, 5)
    items = [(first, 2, [30, 29, 28, 5]), (second, 0, [6, 7, 1, 3, 9])]
    groups = [copier._staged_group(items)]
    for layer in range(layout.num_layers):
        copier.gather(groups, layer)
    target = {name: torch.zeros_like(t) for name, t in source.items()}
    layout2, raws2 = discover_layout(target, NUM_BLOCKS, 4, "x")
    copier2 = BlockCopier(layout2, raws2)
    for layer in range(layout.num_layers):
        copier2.scatter([copier2._staged_group(items)], layer)
    for name in source:
        for block in (30, 29, 28, 5, 6, 7, 1, 3, 9):
            assert torch.equal(target[name][block], source[name][block])


@pytest.mark.parametrize(
    "shape", [(NUM_BLOCKS, 2, 4, 6), (2, NUM_BLOCKS, 4, 6)], ids=["blocks-first", "kv-first"]
)
@pytest.mark.parametrize("staging_blocks", [1000, 5], ids=["one-group", "many-groups"])
@pytest.mark.parametrize(
    "band", [1, 2, 3, 5], ids=["layer", "bands-of-2", "bands-of-3", "all-layers"]
)
def test_row_groups_copy_like_direct_ones(shape, staging_blocks, band, monkeypatch):
    # The GPU path for contiguous caches, run on CPU tensors: bands of whole payload
    # layers staged as rows, one indexed copy per group and layer; items pick their rows.
    source = caches(shape, layers=5)
    layout, raws = discover_layout(source, NUM_BLOCKS, 4, "x")
    copier = BlockCopier(layout, raws, rows=True)
    monkeypatch.setattr(
        "kvshelf.vllm.layout.STAGING_BYTES", staging_blocks * copier.layer_block_bytes
    )
    monkeypatch.setattr("kvshelf.vllm.layout.BAND_BYTES", band * 6 * copier.layer_block_bytes)
    monkeypatch.setattr("kvshelf.vllm.layout.SAVE_BAND_BYTES", band * 6 * copier.layer_block_bytes)
    monkeypatch.setattr("kvshelf.vllm.layout.MIN_BANDS", 1)
    first, second, third = payload(copier, 6), payload(copier, 5), payload(copier, 3)
    saves = [
        (first, 0, [30, 29, 28, 5, 4, 2]),
        (second, 0, [6, 7, 1, 3, 9]),
        (third, 0, [12, 13, 14]),
    ]
    groups = copier.plan(saves, load=False)
    assert len(groups) == (1 if staging_blocks == 1000 else 3)
    if band == 1:  # entries' layers are big enough: each goes out as it is gathered
        assert all(type(g) is RowGroup for g in groups)
    else:  # small ones gather a band of layers first; the last layer goes out alone
        assert all(isinstance(g, BandGroup) and g.band == band and g.tail for g in groups)
    for layer in (3, 0, 4, 2, 1):  # in any order
        copier.gather(groups, layer)
    assert not any(getattr(g, "filling", None) for g in groups)  # every band went out

    reference = BlockCopier(layout, raws)  # the plain CPU path, for the expected payloads
    expected = [payload(reference, 6), payload(reference, 5), payload(reference, 3)]
    mover = SyncMover(reference)
    mover.begin_saves([SaveItem(p, ids) for p, (_, _, ids) in zip(expected, saves)])
    mover.finish_step()
    for got, want in zip((first, second, third), expected):
        assert torch.equal(got, want)

    target = {name: torch.zeros_like(t) for name, t in source.items()}
    layout2, raws2 = discover_layout(target, NUM_BLOCKS, 4, "x")
    copier2 = BlockCopier(layout2, raws2, rows=True)
    loads = [(first, 2, [20, 21, 22, 23]), (second, 0, [36, 37, 38, 39, 0]), (third, 1, [16])]
    groups = copier2.plan(loads, load=True)
    assert {g.band for g in groups} == {band}
    assert not any(g.tail for g in groups)
    for layer in range(layout.num_layers):
        copier2.scatter(groups, layer)
    assert all(g.staged is None for g in groups)  # each band's buffer let go after its last layer
    moved = {20: 28, 21: 5, 22: 4, 23: 2, 36: 6, 37: 7, 38: 1, 39: 3, 0: 9, 16: 13}
    dim = shape.index(NUM_BLOCKS)
    for name in source:
        for block in range(NUM_BLOCKS):
            got = target[name].select(dim, block)
            if block in moved:
                assert torch.equal(got, source[name].select(dim, moved[block])), (name, block)
            else:
                assert not got.any(), (name, block)  # not asked for


def test_bands_start_at_layer_zero_and_a_tail_leaves_the_last_layer_alone():
    def spans(layers, band, tail):
        return sorted({band_span(layers, band, tail, layer) for layer in range(layers)})

    assert spans(7, 3, tail=False) == [(0, 3), (3, 3), (6, 1)]
    assert spans(7, 3, tail=True) == [(0, 3), (3, 3), (6, 1)]
    assert spans(8, 4, tail=True) == [(0, 4), (4, 3), (7, 1)]
    assert spans(4, 1, tail=True) == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert spans(3, 5, tail=False) == [(0, 3)]


def test_loads_come_in_several_bands_however_small_the_entries():
    # Early layers must be in place while later ones still load (layer-wise loading).
    layout, raws = discover_layout(caches(layers=8), NUM_BLOCKS, 4, "x")
    copier = BlockCopier(layout, raws, rows=True)  # tiny entries: one band would hold all
    groups = copier.plan([(payload(copier, 2), 0, [3, 4])], load=True)
    assert [g.band for g in groups] == [2]  # 8 layers in MIN_BANDS = 4 bands


def test_row_groups_are_the_default_only_for_contiguous_gpu_caches():
    layout, raws = discover_layout(caches(), NUM_BLOCKS, 4, "x")
    assert BlockCopier(layout, raws).row_tables is None  # CPU: direct copies
    assert BlockCopier(layout, raws, rows=True).plan([], load=True) == []


def test_the_completer_runs_callbacks_in_order_after_their_waits():
    release = threading.Event()
    ran: list[tuple[str, bool]] = []
    completer = Completer()
    completer.after(None, lambda ok: ran.append(("inline", ok)))  # nothing queued: at once
    assert ran == [("inline", True)]

    def broken():
        raise RuntimeError("copy failed")

    completer.after(release.wait, lambda ok: ran.append(("first", ok)))
    completer.after(broken, lambda ok: ran.append(("broken", ok)))
    completer.after(None, lambda ok: ran.append(("queued", ok)))  # behind the others
    time.sleep(0.05)
    assert ran == [("inline", True)]  # the first wait holds every later callback
    release.set()
    assert completer.drain(5)
    assert ran == [("inline", True), ("first", True), ("broken", False), ("queued", True)]
    completer.close()
