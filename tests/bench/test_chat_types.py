"""The bench client and `kvshelf bench` against a real vLLM serving Ovis2.5 (text, image, video).

Ovis2.5 takes four of the five request types; audio has its own module (Qwen2-Audio), where
the other modalities' rejection is tested too.
"""

from __future__ import annotations

import json

import pytest

from kvshelf.bench import (
    COLD,
    WARM,
    BenchSettings,
    ModalityRejected,
    RequestRejected,
    chat_body,
    load_media,
    run_bench,
    stream_chat,
)
from kvshelf.bench.logs import request_lines
from kvshelf.bench.run import client
from kvshelf.cli import main
from tests.bench.conftest import serve

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
FIRST_TOKEN_FIELDS = {"content", "logprobs", "reasoning", "tool_calls", "finish"}


@pytest.fixture(scope="module")
def ovis(tmp_path_factory):
    yield from serve(tmp_path_factory, "ovis2_5")


@pytest.mark.parametrize("chat_type", ["text-only", "single-image", "multi-image", "video"])
def test_each_chat_type_returns_a_ttft(ovis, chat_type):
    settings = BenchSettings(
        url=ovis.url, chat_types=[chat_type], repeat=2, media_dir=ovis.media["image_a"].parent
    )

    run = run_bench(settings)

    assert run.model == "ovis2_5"  # found through /v1/models
    assert len(run.warmups) == 1  # sent first, kept out of the results
    results = run.measurements
    assert [m.phase for m in results] == [COLD, WARM]
    for m in results:
        assert 0 < m.ttft_s <= m.total_s
        assert m.first_token_via in FIRST_TOKEN_FIELDS
        assert m.prompt_tokens and m.prompt_tokens > 10
        assert m.completion_tokens and m.completion_tokens >= 1
    # Media placeholders make image and video prompts longer than the text-only one.
    if chat_type != "text-only":
        assert results[0].prompt_tokens > 60


def test_prompt_tokens_pads_to_the_length_and_server_log_gives_hits(ovis):
    settings = BenchSettings(
        url=ovis.url,
        model="ovis2_5",
        chat_types=["single-image"],
        prompt_tokens=700,
        media_dir=ovis.media["image_a"].parent,
    )

    results = run_bench(settings).measurements

    # /tokenize counts the media placeholders too, so the padding lands on the token.
    assert [m.prompt_tokens for m in results] == [700, 700]
    lines = request_lines(ovis.server.log_text())
    cold, warm = ([ln for ln in lines if ln.is_for(m.request_id)] for m in results)
    assert len(cold) == len(warm) == 1
    assert cold[0].hit_tokens == 0  # a fresh cache_salt: nothing cached yet
    assert warm[0].hit_tokens > 0  # the repeat finds the cold request's chunks


def test_concurrent_prompts_are_distinct_and_all_timed(ovis):
    settings = BenchSettings(
        url=ovis.url, chat_types=["text-only"], repeat=2, concurrency=3, warmup=0
    )

    results = run_bench(settings).measurements

    assert len(results) == 6
    assert len({m.request_id for m in results}) == 6
    assert sorted((m.round, m.stream) for m in results) == [
        (r, s) for r in (0, 1) for s in range(3)
    ]
    assert all(m.ttft_s > 0 for m in results)


def test_the_role_only_first_chunk_does_not_count(ovis):
    """vLLM's first chunk ({"role": "assistant", "content": ""}) may come before any token."""
    body = chat_body("ovis2_5", [], max_tokens=1)
    with client(BenchSettings(url=ovis.url)) as http:
        result = stream_chat(http, ovis.url, body, "role-chunk-check")
    assert result.completion_tokens == 1
    assert result.first_token_via in FIRST_TOKEN_FIELDS - {"finish"}
    assert result.response_id == "chatcmpl-role-chunk-check"


def test_audio_to_a_model_without_audio_is_a_clear_error(ovis):
    body = chat_body("ovis2_5", [load_media(ovis.media["audio_a"])])
    with client(BenchSettings(url=ovis.url)) as http, pytest.raises(ModalityRejected) as caught:
        stream_chat(http, ovis.url, body)
    message = str(caught.value)
    assert "HTTP 400" in message and "does not accept audio input" in message
    assert caught.value.server_message  # vLLM's own words are kept


def test_file_url_outside_the_allowed_path_is_rejected(ovis, tmp_path):
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(ovis.media["image_a"].read_bytes())
    body = chat_body("ovis2_5", [load_media(outside, as_file_url=True)])
    with client(BenchSettings(url=ovis.url)) as http, pytest.raises(RequestRejected) as caught:
        stream_chat(http, ovis.url, body)
    assert caught.value.status == 400


def test_cli_bench_writes_table_json_and_plot(ovis, tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"

    code = main(
        [
            "bench",
            "--url",
            f"{ovis.url}/v1",
            "--chat-type",
            "single-image",
            "--media",
            str(ovis.media["image_b"]),
            "--file-urls",
            "--repeat",
            "3",
            "--server-log",
            str(ovis.server.log_path),
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )

    assert code == 0
    out = capsys.readouterr().out
    assert "single-image" in out and "image_b.jpg (file://)" in out and "speedup" in out
    data = json.loads(out_json.read_text())
    assert data["model"] == "ovis2_5" and len(data["requests"]) == 3
    (summary,) = data["summary"]
    assert summary["ttft_cold_s"] > 0 and summary["ttft_warm_s"] > 0
    assert summary["hit_tokens"] > 0  # read from --server-log
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_a_rejected_modality(ovis, capsys):
    code = main(["bench", "--url", ovis.url, "--chat-type", "audio"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("kvshelf bench: error: the server rejected the audio request")


def test_reference_client_sequence_for_video_runs_twice_and_hits(ovis, tmp_path, capsys):
    # The page's "run it twice": the video by URL (from the bench's own HTTP server) and
    # base64-encoded, two runs; the log lines give kvshelf's hits.
    code = main(
        [
            "bench",
            "--url",
            ovis.url,
            "--reference-client",
            "--chat-type",
            "video",
            "--media",
            str(ovis.media["video_b"]),
            "--max-tokens",
            "2",
            "--server-log",
            str(ovis.server.log_path),
            "--json",
            str(tmp_path / "ref.json"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    for label in ("video: video URL", "video: video base64", "run 1 TTFT", "run 2 TTFT"):
        assert label in out
    requests = json.loads((tmp_path / "ref.json").read_text())["requests"]
    assert [(r["request_type"], r["round"]) for r in requests] == [
        ("video: video URL", 0),
        ("video: video base64", 0),
        ("video: video URL", 1),
        ("video: video base64", 1),
    ]
    # The base64 request carries the URL request's video: one content hash, so from the
    # second request on every prompt is found whole.
    assert all(r["hit_tokens"] == r["prompt_tokens"] for r in requests[1:]), requests
