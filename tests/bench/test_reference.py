"""The reference client's request sequence (``kvshelf bench --reference-client``) without
vLLM: the bodies, the media picked for each chat type, and the local media server."""

from __future__ import annotations

import base64

import httpx
import pytest

from kvshelf.bench.reference import (
    CLIENT_MEDIA,
    SEQUENCES,
    MediaServer,
    pick_media,
    run_totals,
    step_body,
)
from kvshelf.bench.report import runs_table
from kvshelf.bench.run import COLD, WARM, Measurement
from kvshelf.cli import main
from kvshelf.testing import make_media


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return make_media(tmp_path_factory.mktemp("media"))


def test_sequences_are_the_clients():
    labels = {t: [s.label for s in steps] for t, steps in SEQUENCES.items()}
    assert labels == {
        "text-only": ["text"],
        "single-image": ["image URL", "image base64"],
        "multi-image": ["2 image URLs"],
        "video": ["video URL", "video base64"],
        "audio": ["input_audio", "audio URL", "audio base64"],
        "multi-audio": ["2 input_audio"],
    }


def test_bodies_put_the_text_first_then_the_media(media):
    with MediaServer() as server, httpx.Client() as http:
        picked = pick_media([str(media["image_a"]), str(media["audio_a"])], server)
        url_step, b64_step = SEQUENCES["single-image"]
        by_url = step_body(url_step, "m", picked, http)
        assert by_url == {
            "model": "m",
            "max_completion_tokens": 128,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What's in this image?"},
                        {"type": "image_url", "image_url": {"url": picked["image"][0].url}},
                    ],
                }
            ],
        }
        # The URL is served here, and its bytes are the file's.
        assert httpx.get(picked["image"][0].url).content == media["image_a"].read_bytes()
        by_b64 = step_body(b64_step, "m", picked, http)["messages"][0]["content"][1]
        encoded = base64.b64encode(media["image_a"].read_bytes()).decode()
        assert by_b64["image_url"]["url"] == f"data:image/png;base64,{encoded}"
        audio = step_body(SEQUENCES["audio"][0], "m", picked, http)["messages"][0]["content"]
        assert audio[1] == {
            "type": "input_audio",
            "input_audio": {
                "data": base64.b64encode(media["audio_a"].read_bytes()).decode(),
                "format": "wav",
            },
        }
        text = step_body(SEQUENCES["text-only"][0], "m", picked, http, cache_salt="s")
        assert text["messages"][0]["content"] == "What's the capital of France?"
        assert text["cache_salt"] == "s"
        padded = step_body(SEQUENCES["text-only"][0], "m", picked, http, filler_words=5)
        assert padded["messages"][0]["content"].endswith("\nWhat's the capital of France?")


def test_media_default_to_the_clients_and_given_ones_replace_them(media):
    with MediaServer() as server:
        default = pick_media([], server)
        assert [m.url for m in default["image"]] == list(CLIENT_MEDIA["image"])
        given = pick_media([str(media["image_c"]), str(media["image_d"])], server)
        # single-image sends the first, multi-image the first two
        assert [m.label for m in given["image"]] == ["image_c.png", "image_c.png", "image_d.jpg"]
        assert [m.url for m in given["video"]] == list(CLIENT_MEDIA["video"])
        assert httpx.get(given["image"][0].url.rsplit("/", 1)[0] + "/nope").status_code == 404


def test_runs_table_shows_each_run_and_its_total():
    def m(request: str, round_index: int, ttft: float, hit: int) -> Measurement:
        return Measurement(
            request,
            COLD if round_index == 0 else WARM,
            round_index,
            0,
            f"r{round_index}",
            "m",
            "a.wav",
            ttft,
            ttft + 0.1,
            "content",
            40,
            8,
            hit,
            max(hit - 1, 0),
            "line",
        )

    runs = [
        m("audio: input_audio", 0, 2.0, 0),
        m("audio: audio URL", 0, 0.5, 40),
        m("audio: input_audio", 1, 0.1, 40),
        m("audio: audio URL", 1, 0.1, 40),
    ]
    assert run_totals(runs) == pytest.approx({0: 2.7, 1: 0.4})
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(runs_table(runs, "t"))
    text = console.export_text()
    assert "run 1 TTFT" in text and "run 2 kvshelf hit" in text
    assert "40 (39 loaded)" in text and "2.70 s" in text


def test_cli_multi_audio_needs_the_reference_client(capsys):
    assert main(["bench", "--chat-type", "multi-audio"]) == 2
    assert "--reference-client" in capsys.readouterr().err
