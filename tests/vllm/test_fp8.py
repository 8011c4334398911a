"""fp8 storage on plain tensors (no vLLM server): round trips, error bounds, layout."""

from __future__ import annotations

import pytest
import torch

from kvshelf.vllm.fp8 import Fp8Copier, Fp8Mover, dequantize, quantize, scale_group
from kvshelf.vllm.layout import BlockCopier, LayoutError, discover_layout
from kvshelf.vllm.movers import LoadItem, SaveItem

NUM_BLOCKS = 24
BLOCK = 4
HEADS, HEAD_SIZE = 2, 16


def caches(layers=3, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """vLLM's flash layout: [K/V, blocks, block_size, heads, head_size]; heads of very
    different ranges, so one scale for all would lose the small ones."""
    torch.manual_seed(0)
    out = {}
    for i in range(layers):
        values = torch.randn(2, NUM_BLOCKS, BLOCK, HEADS, HEAD_SIZE)
        values[..., 1, :] *= 1e-3
        out[f"layers.{i}.attn"] = values.to(dtype)
    return out


def copier_for(kv):
    layout, raws = discover_layout(kv, NUM_BLOCKS, BLOCK, "flash")
    return Fp8Copier(layout, raws, scale_group(next(iter(kv.values()))))


def test_quantize_keeps_each_group_within_fp8_precision():
    rows = torch.randn(3, 5, 64) * torch.logspace(-4, 2, 64 // 16).repeat_interleave(16)
    back = dequantize(quantize(rows, 16), 16, torch.float32)
    groups, restored = rows.unflatten(-1, (-1, 16)), back.unflatten(-1, (-1, 16))
    amax = groups.abs().amax(-1, keepdim=True)
    # e4m3 has 3 mantissa bits: a value is off by at most 1/16 of its power of two,
    # and values far below the group's amax may flush to the smallest subnormal.
    assert ((restored - groups).abs() <= groups.abs() / 16 + amax / 448 * 2**-9 + 1e-12).all()
    zeros = torch.zeros(2, 32)
    assert torch.equal(dequantize(quantize(zeros, 16), 16, torch.float32), zeros)


def test_entries_hold_a_byte_per_value_plus_a_scale_per_head_and_token():
    copier = copier_for(caches())
    assert copier.group == HEAD_SIZE
    row = BLOCK * HEADS * HEAD_SIZE
    assert copier.entry_shape(2 * BLOCK) == (3, 2, 2, row + 4 * row // HEAD_SIZE)
    lossless = BlockCopier(*discover_layout(caches(), NUM_BLOCKS, BLOCK, "flash"))
    # bf16: 2 bytes a value; fp8: 1, plus 4 per 16 (per 128 for a real head: 3%)
    assert copier.block_bytes * 2 == lossless.block_bytes * (1 + 4 / HEAD_SIZE)
    assert copier.signature() != lossless.signature()
    assert "store=fp8_e4m3" in copier.signature()


def test_save_then_load_restores_the_blocks_within_fp8_error():
    source = caches()
    copier = copier_for(source)
    saved = {"a": [3, 7, 8], "b": [20, 1]}
    payloads = {
        name: copier.payload_view(bytearray(len(ids) * copier.block_bytes), len(ids) * BLOCK)
        for name, ids in saved.items()
    }
    mover = Fp8Mover(copier)
    mover.begin_saves([SaveItem(payloads[n], ids) for n, ids in saved.items()])
    mover.finish_step()

    target = {name: torch.zeros_like(t) for name, t in source.items()}
    into = copier_for(target)
    placed = {"a": [10, 11, 12], "b": [0, 5]}
    Fp8Mover(into).load([LoadItem(payloads[n], 0, ids) for n, ids in placed.items()])
    for name in source:
        for key in saved:
            want = source[name][:, saved[key]].float()
            got = target[name][:, placed[key]].float()
            # bf16 rounding of the restored values on top of fp8's 1/16
            assert ((got - want).abs() <= want.abs() / 12 + 1e-6).all()
            small = want[..., 1, :]  # the 1e-3 head kept its own scale
            assert ((got[..., 1, :] - small).abs() <= small.abs() / 12 + 1e-8).all()
    untouched = [b for b in range(NUM_BLOCKS) if b not in (10, 11, 12, 0, 5)]
    assert not target["layers.0.attn"][:, untouched].any()


def test_a_load_can_start_inside_an_entry():
    source = caches(layers=1)
    copier = copier_for(source)
    payload = copier.payload_view(bytearray(3 * copier.block_bytes), 3 * BLOCK)
    Fp8Mover(copier).begin_saves([SaveItem(payload, [4, 5, 6])])
    copier.save_layer([SaveItem(payload, [4, 5, 6])], 0)
    target = {n: torch.zeros_like(t) for n, t in source.items()}
    copier_for(target).load_layer([LoadItem(payload, 1, [9, 10])], 0)
    cache = target["layers.0.attn"].float()
    want = source["layers.0.attn"][:, [5, 6]].float()
    assert ((cache[:, [9, 10]] - want).abs() <= want.abs() / 12 + 1e-6).all()


def test_a_row_without_whole_groups_is_refused():
    layout, raws = discover_layout(caches(), NUM_BLOCKS, BLOCK, "flash")
    with pytest.raises(LayoutError, match="groups of 48"):
        Fp8Copier(layout, raws, 48)


@pytest.mark.vllm
def test_fp8_entries_in_a_real_server(idefics3, media, tmp_path):
    """Saved as fp8, a quarter of float32's bytes plus scales, in their own namespace;
    a restart loads them whole and the answer stays close to the lossless one."""
    from kvshelf.testing import VllmServer, free_port
    from tests.vllm.support import CHUNK_SIZE, Client, server_args, settled_files

    disk = tmp_path / "cache"

    def serve(storage: str) -> VllmServer:
        kv = {"disk_path": str(disk), "cpu_bytes": 0, "kv_storage_dtype": storage}
        return VllmServer(
            idefics3,
            port=free_port(),
            args=server_args("idefics3", kv, "--no-enable-prefix-caching"),
        )

    def ask(client: Client):
        return client.ask("single-image", media, media_names=["image_a"], filler_tokens=500)

    with serve("auto") as server:
        lossless = ask(Client(server))
    lossless_files = settled_files(disk)
    with serve("fp8_e4m3") as server:
        client = Client(server)
        cold = ask(client)
        assert cold.hit_tokens == 0, "fp8 entries must not be read from lossless ones"
        fp8_files = settled_files(disk) - lossless_files
        client.restart()
        warm = ask(client)
    assert warm.hit_tokens >= warm.prompt_tokens - CHUNK_SIZE
    assert cold.same_answer(lossless)  # both computed: storage changes nothing yet
    fp8_bytes = sum(p.stat().st_size for p in fp8_files)
    lossless_bytes = sum(p.stat().st_size for p in lossless_files)
    assert len(fp8_files) == len(lossless_files)
    assert 0.2 < fp8_bytes / lossless_bytes < 0.3  # (1 + 4 / head_size) / 4 + headers
    drift = max(abs(v - lossless.first_logprobs.get(k, v)) for k, v in warm.first_logprobs.items())
    print(f"fp8 first-token logprob drift {drift:.4f}; same text: {warm.text == lossless.text}")
    assert drift < 0.1
