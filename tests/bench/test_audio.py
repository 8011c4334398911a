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
    settings = BenchSettings(url=audio.url, chat_types=["audio"], file_urls=file_urls,
                             media=[str(audio.media["audio_b"])])

    _, (cold, warm) = run_bench(settings)

    assert warm.phase == WARM
    assert cold.media == "audio_b.wav" + (" (file://)" if file_urls else "")
    for m in (cold, warm):
        assert 0 < m.ttft_s <= m.total_s
        assert m.prompt_tokens and m.prompt_tokens > 50  # 2 s of audio is ~50 tokens


def test_text_only_returns_a_ttft(audio):
    _, results = run_bench(BenchSettings(url=audio.url, chat_types=["text-only"]))
    assert all(m.ttft_s > 0 for m in results)


@pytest.mark.parametrize("chat_type", ["single-image", "video"])
def test_other_modalities_are_rejected_clearly(audio, chat_type):
    kind = "image" if chat_type == "single-image" else "video"
    settings = BenchSettings(url=audio.url, chat_types=[chat_type],
                             media_dir=audio.media["audio_a"].parent)
    with pytest.raises(ModalityRejected, match=f"does not accept {kind} input"):
        run_bench(settings)


def test_cli_all_chat_types_stops_at_the_first_rejected_one(audio, capsys):
    code = main(["bench", "--url", audio.url, "--chat-type", "all", "--repeat", "1"])
    assert code == 1
    captured = capsys.readouterr()
    assert "text-only" in captured.out  # sent and timed before the image request failed
    assert "does not accept image input" in captured.err
