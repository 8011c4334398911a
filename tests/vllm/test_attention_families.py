"""Hybrid KV caches served with KVShelfConnector: sliding window + global attention
(Gemma 3), Mamba2 + attention (Granite 4.0-H shape), Gated-DeltaNet linear attention +
attention (Qwen3.5). Each: cold, restart, warm (a hit of all but the last chunk, the same
greedy answer), and a new question after the same long prefix (a partial hit at the
last stored boundary, the answer of a cold run of it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from kvshelf.testing import VllmServer, build_model, free_port, media_part, serve_args
from tests.vllm.support import MODEL_NAME, Client, connector_args, settled_files

pytestmark = pytest.mark.vllm

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "and",
    "the",
    "cat",
    "sat",
    "on",
    "the",
    "mat",
]
# family -> (dtype, vLLM arguments). Granite's Mamba2 runs on the CPU backend only without
# prefix caching (its "align" state mode fails in vLLM itself), where states exist at step
# ends only: steps of one chunk keep one at every chunk boundary.
_HYBRIDS = {
    "gemma3": ("float32", ()),
    "granite_hybrid": ("float32", ("--no-enable-prefix-caching",)),
    "qwen3_5": ("bfloat16", ()),
    "gemma3_mm": ("float32", ()),  # with an image before the question
}
_CHUNK = re.compile(r"chunk_size \d+ -> (\d+)")
_KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")


def _text(num_words: int, seed: int) -> str:
    return " ".join(_WORDS[(i * 7 + seed) % len(_WORDS)] for i in range(num_words))


def _messages(question: str, num_words: int, image=None) -> list[dict]:
    """A long system prompt, then (an image and) the question."""
    user = question if image is None else [media_part(image), {"type": "text", "text": question}]
    return [
        {"role": "system", "content": _text(num_words, seed=1)},
        {"role": "user", "content": user},
    ]


def _args(family: str, dtype: str, extra: tuple[str, ...], disk, batched: int | None):
    kv = {"local_disk": str(disk)}
    args = [
        *serve_args(family, dtype=dtype),
        "--served-model-name",
        MODEL_NAME,
        "--enforce-eager",
        "--max-model-len",
        "4096",
        *extra,
        *connector_args(kv),
    ]
    if batched:
        args += ["--max-num-batched-tokens", str(batched)]
    # The chunk size follows the hybrid block size: let kvshelf pick it.
    kv_index = args.index("--kv-transfer-config") + 1
    args[kv_index] = args[kv_index].replace('"chunk_size": 256, ', "")
    return args


@pytest.mark.parametrize("family", list(_HYBRIDS))
def test_model_hits_after_restart(family, tmp_path, request):
    # vLLM's Qwen3.5 and Gemma 3 modules import image processors that need torchvision.
    needs_torchvision = family in ("qwen3_5", "gemma3_mm")
    env = request.getfixturevalue("torchvision_env") if needs_torchvision else None
    image = request.getfixturevalue("media")["image_a"] if family == "gemma3_mm" else None
    dtype, extra = _HYBRIDS[family]
    model = _build(family, tmp_path / family, dtype, env)
    disk = tmp_path / "cache"
    args = _args(family, dtype, extra, disk, batched=None)
    with VllmServer(model, port=free_port(), args=args, env=env) as server:
        client = Client(server)
        log = client.log()
        assert "Turning off hybrid kv cache manager" not in log  # kvshelf supports HMA
        chunk = int(m[1]) if (m := _CHUNK.search(log)) else 256
        if "--no-enable-prefix-caching" in extra:
            # States exist only where a step ends: make every chunk end a step end.
            server.args = _args(family, dtype, extra, disk, batched=chunk)
            client.restart()
        words = 3 * chunk + 100  # about a token each: a prompt of more than three chunks
        cold = client.chat(_messages("what is in this picture", words, image))
        assert cold.status == 200, cold.error
        assert cold.hit_tokens == 0 and cold.prompt_tokens > 3 * chunk
        # The other question, computed cold (another cache_salt keys it apart).
        other_cold = client.chat(_messages("describe the sound", words, image), cache_salt="cold")
        assert other_cold.status == 200 and other_cold.hit_tokens == 0
        settled_files(disk)

        client.restart()
        warm = client.chat(_messages("what is in this picture", words, image))
        assert warm.hit_tokens >= warm.prompt_tokens - chunk, (warm.hit_tokens, chunk)
        assert warm.text == cold.text
        assert warm.same_answer(cold, tolerance=_tolerance(dtype))
        # A new question after the same long prefix: a partial hit, the cold answer.
        other = client.chat(_messages("describe the sound", words, image))
        assert 0 < other.hit_tokens < other.prompt_tokens - 8, other.hit_tokens
        assert other.text == other_cold.text
        assert other.same_answer(other_cold, tolerance=_tolerance(dtype))
        assert "Traceback" not in client.log()


def _build(family: str, out, dtype: str, env: dict[str, str] | None):
    """The tiny model dir; built in a process that can import torchvision when the
    family's processor needs it."""
    if env is None:
        return build_model(family, out, size="xs", dtype=dtype)
    code = (
        f"from kvshelf.testing import build_model; build_model({family!r}, {str(out)!r}, "
        f"size='xs', dtype={dtype!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, **env})
    return out


def _tolerance(dtype: str) -> float:
    # bfloat16 recomputation of the last token from loaded KV rounds differently.
    return 1e-3 if dtype == "float32" else 0.15


def test_sliding_window_keeps_vllm_kv_capacity(tmp_path):
    # With the hybrid manager on, sliding-window layers keep only their window: the KV
    # cache holds as many tokens with kvshelf as without a connector.
    model = build_model("gemma3", tmp_path / "gemma3", size="xs", dtype="float32")
    capacity = []
    for with_kvshelf in (False, True):
        args = _args("gemma3", "float32", (), tmp_path / "cache", batched=None)
        if not with_kvshelf:
            args = args[: args.index("--kv-transfer-config")]
        with VllmServer(model, port=free_port(), args=args) as server:
            found = _KV_TOKENS.search(server.log_text(since_start=True))
            assert found, "vLLM logged no KV cache size"
            capacity.append(int(found[1].replace(",", "")))
    assert capacity[0] == capacity[1]
