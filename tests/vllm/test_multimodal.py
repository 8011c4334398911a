"""KVShelfConnector in a real vLLM (CPU build) server, one tiny model per modality.

Each family's server runs with vLLM's prefix caching off and kvshelf's memory tier off,
so every hit below comes from kvshelf's disk tier. float32 makes a cache hit's answer
comparable to the cold one: same greedy text, same first-token logprobs.
"""

from __future__ import annotations

import pytest

from kvshelf.testing import VllmServer, build_model, free_port
from tests.vllm.support import (
    CHUNK_SIZE,
    Client,
    corrupt,
    server_args,
    settled_files,
    wait_for_metric,
)

pytestmark = pytest.mark.vllm

# family, request type, (first item, another item of the same kind)
CASES = [
    ("qwen2_audio", "audio", ("audio_a", "audio_b")),
    ("idefics3", "single-image", ("image_a", "image_b")),
    ("ovis2_5", "video", ("video_a", "video_b")),
]
FILLER = 500  # tokens of text after the media: prompts span several chunks


@pytest.mark.parametrize(("family", "request_type", "items"), CASES, ids=[c[0] for c in CASES])
def test_hits_after_restart_are_exact_and_keyed_by_content(
    family, request_type, items, media, tmp_path
):
    model = build_model(family, tmp_path / "model", size="xs", dtype="float32")
    disk = tmp_path / "cache"
    kv = {"local_disk": str(disk), "max_local_disk_size": 2, "local_cpu": False}
    first, other = items

    def ask(client, names, question="Describe this.", seed=0):
        return client.ask(
            request_type,
            media,
            media_names=names,
            text=question,
            filler_tokens=FILLER,
            filler_seed=seed,
        )

    server = VllmServer(
        model, port=free_port(), args=server_args(family, kv, "--no-enable-prefix-caching")
    )
    with server:
        client = Client(server)
        # Cold: nothing cached yet; each request is saved.
        cold = ask(client, [first])
        assert cold.status == 200 and cold.hit_tokens == 0
        cold_text = client.ask("text-only", media, filler_tokens=FILLER)
        assert cold_text.status == 200 and cold_text.hit_tokens == 0
        before_victim = settled_files(disk)
        victim = ask(client, [first], question="What is in it?", seed=7)
        victim_files = settled_files(disk) - before_victim
        assert victim_files, "the cold request saved nothing to disk"

        # Restart: vLLM's and kvshelf's memory are gone, the disk tier stays. The stop
        # closed kvshelf (queued writes flushed) and kept the prefill speed it measured.
        client.restart()
        assert list(disk.glob("*/PACE.json")), "kvshelf was not closed at shutdown"

        # 1. The same request hits from disk and answers exactly as when cold.
        warm = ask(client, [first])
        assert warm.hit_tokens >= warm.prompt_tokens - CHUNK_SIZE
        assert warm.same_answer(cold), (warm, cold)
        (_, offset, length) = warm.media[0]

        # 2. Another item with the same text: no hit past the start of that item.
        swapped = ask(client, [other])
        assert swapped.status == 200
        assert swapped.hit_tokens <= swapped.media[0][1]

        # 3. The same item with another question after it: the hit covers the item.
        follow_up = ask(client, [first], question="And the colours?", seed=3)
        assert offset + length <= follow_up.hit_tokens < follow_up.prompt_tokens

        # 5. Text-only requests hit too, with the same answer.
        warm_text = client.ask("text-only", media, filler_tokens=FILLER)
        assert warm_text.hit_tokens >= warm_text.prompt_tokens - CHUNK_SIZE
        assert warm_text.same_answer(cold_text)

        # 6. A corrupted entry: detected, counted, recomputed; the right answer, engine alive.
        for path in victim_files:
            corrupt(path)
        recomputed = ask(client, [first], question="What is in it?", seed=7)
        assert recomputed.status == 200
        assert recomputed.same_answer(victim)
        assert recomputed.hit_tokens < recomputed.prompt_tokens - CHUNK_SIZE
        assert "removing corrupt entry" in client.log()
        counted = wait_for_metric(server, "kvshelf_corrupt_entries_total", "disk")
        assert counted[("kvshelf_corrupt_entries_total", "disk")] >= 1
        assert not any(p.exists() and _is_corrupt(p) for p in victim_files)
        assert ask(client, [first]).same_answer(cold)


def test_swapped_images_hit_only_up_to_the_first_difference(idefics3, media, tmp_path):
    model = idefics3
    kv = {"local_disk": str(tmp_path / "cache"), "local_cpu": False}
    server = VllmServer(
        model, port=free_port(), args=server_args("idefics3", kv, "--no-enable-prefix-caching")
    )
    with server:
        client = Client(server)
        pair = client.ask(
            "multi-image", media, media_names=("image_a", "image_b"), filler_tokens=FILLER
        )
        assert pair.status == 200 and pair.hit_tokens == 0
        settled_files(tmp_path / "cache")
        again = client.ask(
            "multi-image", media, media_names=("image_a", "image_b"), filler_tokens=FILLER
        )
        assert again.hit_tokens >= again.prompt_tokens - CHUNK_SIZE and again.same_answer(pair)
        # 4. Two images in swapped order: no hit past the first item, which now differs.
        swapped = client.ask(
            "multi-image", media, media_names=("image_b", "image_a"), filler_tokens=FILLER
        )
        assert swapped.status == 200
        assert swapped.hit_tokens <= swapped.media[0][1]
        assert not swapped.same_answer(pair)


def _is_corrupt(path) -> bool:
    from kvshelf.codec import CorruptEntry, decode

    try:
        decode(path.read_bytes())
    except CorruptEntry:
        return True
    return False
