"""The four systems of LMCache's multimodal page, tiny and on CPU, served with kvshelf by
name and the page's serve flags: LLaVA-1.5 (one image), Phi-3.5-vision (two images),
LLaVA-OneVision (video), Ultravox (audio). Each: a cold request, a restart (the disk tier
stays), then the same request hits in full with the same greedy answer, and so does the
same media sent the way the page's client also sends it (a local file, ``input_audio``):
vLLM's content hash, and so kvshelf's key, does not depend on how the bytes came.

vLLM's own prefix caching is off, so the second warm request is kvshelf's hit too."""

from __future__ import annotations

import pytest

from kvshelf.testing import (
    VllmServer,
    build_content,
    build_model,
    free_port,
    input_audio_part,
    media_part,
)
from kvshelf.testing.reference_models import NEEDS_TORCHVISION, PAGE_CHAT_TYPE
from tests.vllm.support import CHUNK_SIZE, Client, server_args

pytestmark = pytest.mark.vllm

MEDIA = {
    "single-image": ("image_a",),
    "multi-image": ("image_a", "image_b"),
    "video": ("video_a",),
    "audio": ("audio_a",),
}
FILLER = 300  # tokens of text after the media: every prompt spans two chunks or more


@pytest.mark.parametrize("family", list(PAGE_CHAT_TYPE))
def test_reference_model_hits_in_full_after_restart(family, media, tmp_path, request):
    env = request.getfixturevalue("torchvision_env") if family in NEEDS_TORCHVISION else None
    request_type = PAGE_CHAT_TYPE[family]
    model = build_model(family, tmp_path / family, size="xs", dtype="float32")
    kv = {"local_disk": str(tmp_path / "cache")}
    args = server_args(
        family,
        kv,
        "--no-enable-prefix-caching",
        "--allowed-local-media-path",
        str(media["image_a"].parent),
    )
    names = MEDIA[request_type]

    def ask(client, *, as_file_or_input_audio: bool = False):
        content = build_content(request_type, media, media_names=names, filler_tokens=FILLER)
        if as_file_or_input_audio:  # the same files, sent another way
            content[: len(names)] = [
                input_audio_part(media[n])
                if request_type == "audio"
                else media_part(media[n], use_file_url=True)
                for n in names
            ]
        return client.chat([{"role": "user", "content": content}])

    with VllmServer(model, port=free_port(), args=args, env=env) as server:
        client = Client(server)
        # Cold: an empty cache; the request is computed and saved.
        cold = ask(client)
        assert cold.status == 200, cold.error
        assert cold.hit_tokens == 0
        assert [m[0] for m in cold.media] == [request_type.split("-")[-1]] * len(names)

        # Restart: vLLM's prefix cache and kvshelf's memory tier are gone, the disk stays.
        client.restart()

        # Warm: the same request loads all but (at most) its last partial chunk...
        warm = ask(client)
        assert warm.hit_tokens >= warm.prompt_tokens - CHUNK_SIZE, warm
        assert warm.same_answer(cold), (warm, cold)
        # ...and so does the same media sent as a file:// URL or as input_audio.
        other = ask(client, as_file_or_input_audio=True)
        assert other.prompt_tokens == cold.prompt_tokens
        assert other.hit_tokens >= other.prompt_tokens - CHUNK_SIZE, other
        assert other.same_answer(cold), (other, cold)


def test_a_bf16_hit_is_the_first_attention_after_a_restart(media, tmp_path, torchvision_env):
    """vLLM-CPU's bf16 attention uses AMX; a worker whose first attention reads loaded KV
    died with an illegal instruction until kvshelf asked Linux for AMX state at start."""
    model = build_model("llava", tmp_path / "llava", size="xs", dtype="bfloat16")
    kv = {"local_disk": str(tmp_path / "cache")}
    args = server_args("llava", kv, "--no-enable-prefix-caching", "--dtype", "bfloat16")
    with VllmServer(model, port=free_port(), args=args, env=torchvision_env) as server:
        client = Client(server)
        cold = client.ask("text-only", media, filler_tokens=FILLER)
        assert cold.status == 200 and cold.hit_tokens == 0
        client.restart()
        warm = client.ask("text-only", media, filler_tokens=FILLER)
        assert warm.status == 200, warm.error
        assert warm.hit_tokens >= warm.prompt_tokens - CHUNK_SIZE
