"""Bench errors and outputs that need no vLLM: unreachable servers, unreadable media, log
lines, the JSON and the plot."""

from __future__ import annotations

import json
import os

import pytest

from kvshelf.bench import (
    COLD,
    WARM,
    BenchSettings,
    Measurement,
    MediaError,
    ServerUnreachable,
    load_media,
    request_lines,
    run_bench,
)
from kvshelf.bench.client import base_url
from kvshelf.bench.logs import line_for
from kvshelf.bench.report import plot_ttft, summarise, write_json
from kvshelf.cli import main
from kvshelf.testing import free_port, make_media

LOG = (
    "[2026-11-27 06:39:19,720] kvshelf INFO: Reqid: chatcmpl-kvb-1-audio-s0-r1-warm-b8a9b0e5, "
    "Total tokens 2048, kvshelf hit tokens: 2048, need to load: 2047 (scheduler.py:214)\n"
    "(APIServer pid=1) INFO 11-27 06:39:19 [loggers.py:1] Engine 000: something else\n"
    "[2026-11-27 06:39:20,000] kvshelf INFO: Reqid: chatcmpl-kvb-1-audio-s0-r10-warm, "
    "Total tokens 30, kvshelf hit tokens: 0, need to load: 0 (scheduler.py:214)\n"
)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return make_media(tmp_path_factory.mktemp("media"))


def test_unreachable_server_says_so():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(
        ServerUnreachable,
        match=r"cannot reach an OpenAI-compatible server at "
        r"http://127\.0\.0\.1:\d+ .*Is it running",
    ):
        run_bench(BenchSettings(url=url, model="m", chat_types=["text-only"]))


def test_cli_unreachable_server_exits_1_with_the_message(capsys):
    code = main(["bench", "--url", f"127.0.0.1:{free_port()}", "--model", "m"])
    assert code == 1
    assert "kvshelf bench: error: cannot reach" in capsys.readouterr().err


def test_unreadable_media_is_named(tmp_path, media):
    with pytest.raises(MediaError, match=r"cannot read media '.*missing\.png': No such file"):
        load_media(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="Is a directory"):
        (tmp_path / "dir.png").mkdir()
        load_media(tmp_path / "dir.png")
    with pytest.raises(MediaError, match="cannot tell whether it is an image, audio or video"):
        notes = tmp_path / "notes.txt"
        notes.write_text("hello")
        load_media(notes)
    with pytest.raises(MediaError, match="unsupported URL scheme 'ftp'"):
        load_media("ftp://example.com/a.png")
    with pytest.raises(MediaError, match="cannot read media 'file:///nowhere/a.wav'"):
        load_media("file:///nowhere/a.wav")


def test_cli_unreadable_media_fails_before_any_request(tmp_path, capsys):
    # The server is unreachable too: the media error must come first (no request is sent).
    code = main(
        [
            "bench",
            "--url",
            f"http://127.0.0.1:{free_port()}",
            "--model",
            "m",
            "--chat-type",
            "single-image",
            "--media",
            str(tmp_path / "gone.png"),
        ]
    )
    assert code == 1
    assert "cannot read media" in capsys.readouterr().err


def test_media_kinds_and_urls(media):
    assert load_media(media["image_b"]).url.startswith("data:image/jpeg;base64,")
    assert load_media(media["audio_a"]).kind == "audio"
    as_file = load_media(media["video_a"], as_file_url=True)
    assert as_file.kind == "video" and as_file.url == media["video_a"].as_uri()
    remote = load_media("https://example.com/cat.png?size=2")
    assert (remote.kind, remote.url) == ("image", "https://example.com/cat.png?size=2")


def test_base_url_forms():
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "h:8000/v1/"):
        assert base_url(url) == "http://h:8000"


def test_log_lines_match_their_request_only():
    lines = request_lines(LOG)
    assert len(lines) == 2
    # vLLM appends "-<8 hex>" to the request id; r1 must not match r10's line or vice versa.
    warm = line_for(lines, "kvb-1-audio-s0-r1-warm")
    assert (warm.hit_tokens, warm.load_tokens, warm.total_tokens) == (2048, 2047, 2048)
    assert line_for(lines, "kvb-1-audio-s0-r10-warm").hit_tokens == 0
    assert line_for(lines, "kvb-1-audio-s0-r2-warm") is None


def fake(request_type: str, phase: str, ttft_s: float, hit: int | None = None) -> Measurement:
    return Measurement(
        request_type,
        phase,
        0 if phase == COLD else 1,
        0,
        f"id-{ttft_s}",
        "m",
        "",
        ttft_s,
        ttft_s + 0.1,
        "content",
        2048,
        8,
        hit,
    )


def test_summary_json_and_plot(tmp_path):
    results = [
        fake("video", COLD, 2.0),
        fake("video", WARM, 0.1, hit=2048),
        fake("audio", COLD, 3.0),
        fake("audio", WARM, 0.2, hit=2000),
    ]

    video, audio = summarise(results)
    assert (video.request_type, video.speedup, video.hit_tokens) == ("video", 20.0, 2048)
    assert audio.speedup == pytest.approx(15.0)

    data = json.loads(write_json(tmp_path / "r.json", results, {"kind": "test"}).read_text())
    assert data["kind"] == "test" and data["summary"][0]["speedup"] == 20.0
    assert "first streamed chunk" in data["ttft_definition"]
    png = plot_ttft(tmp_path / "sub" / "r.png", results, "test plot")
    assert png.read_bytes()[:4] == b"\x89PNG" and os.path.getsize(png) > 10_000
