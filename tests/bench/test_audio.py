"""The bench client against a real vLLM serving Qwen2-Audio: audio in every form, and the
other modalities rejected with a clear message."""

from __future__ import annotations

import pytest

from kvshelf.bench import WARM, BenchSettings, ModalityRejected, run_bench
from kvshelf.cli import main
from tests.bench.conftest import serve

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    yield from serve(tmp_path_factory, "qwen2_audio")


@pytest.mark.parametrize("file_urls", [False, True], ids=["data-url", "file-url"])
def test_audio_returns_a_ttft(audio, file_urls):
    settings = BenchSettings(
        url=audio.url,
        chat_types=["audio"],
        file_urls=file_urls,
        media=[str(audio.media["audio_b"])],
    )

    cold, warm = run_bench(settings).measurements

    assert warm.phase == WARM
    assert cold.media == "audio_b.wav" + (" (file://)" if file_urls else "")
    for m in (cold, warm):
        assert 0 < m.ttft_s <= m.total_s
        assert m.prompt_tokens and m.prompt_tokens > 50  # 2 s of audio is ~50 tokens


def test_text_only_returns_a_ttft(audio):
    run = run_bench(BenchSettings(url=audio.url, chat_types=["text-only"], warmup=2))
    assert len(run.warmups) == 2 and len(run.measurements) == 2
    assert all(m.ttft_s > 0 for m in run.measurements)


@pytest.mark.parametrize("chat_type", ["single-image", "video"])
def test_other_modalities_are_rejected_clearly(audio, chat_type):
    kind = "image" if chat_type == "single-image" else "video"
    settings = BenchSettings(
        url=audio.url, chat_types=[chat_type], media_dir=audio.media["audio_a"].parent
    )
    with pytest.raises(ModalityRejected, match=f"does not accept {kind} input"):
        run_bench(settings)


def test_cli_all_chat_types_skips_what_the_model_rejects(audio, capsys):
    code = main(["bench", "--url", audio.url, "--chat-type", "all", "--repeat", "1"])
    assert code == 0
    out = capsys.readouterr().out
    for skipped in ("single-image", "multi-image", "video"):
        assert f"skipped {skipped}: the server rejected the" in out
    assert "does not accept image input" in out and "does not accept video input" in out
    table = out[out.index("TTFT at ") :]
    assert "text-only" in table and "audio" in table and "video" not in table


def test_cli_a_rejected_type_asked_for_by_name_is_an_error(audio, capsys):
    code = main(["bench", "--url", audio.url, "--chat-type", "video"])
    assert code == 1
    assert "does not accept video input" in capsys.readouterr().err


def test_reference_client_audio_sequence_hits_across_forms(audio):
    # input_audio, then by URL, then base64 in a data: URL: one audio, one content hash.
    from kvshelf.bench.logs import line_for, request_lines
    from kvshelf.bench.reference import run_reference

    settings = BenchSettings(
        url=audio.url,
        chat_types=["audio"],
        repeat=2,
        warmup=0,
        media=[str(audio.media["audio_b"])],
        max_tokens=2,
        cache_salt="reference-audio",
    )
    run = run_reference(settings)

    assert [m.request_type for m in run.measurements] == [
        "audio: input_audio",
        "audio: audio URL",
        "audio: audio base64",
    ] * 2
    lines = request_lines(audio.server.log_text())
    hits = [line_for(lines, m.request_id).hit_tokens for m in run.measurements]
    assert hits[0] == 0  # the first request of run 1 is cold
    prompt = run.measurements[0].prompt_tokens
    assert all(h == prompt for h in hits[1:]), hits  # every other request: a full hit
