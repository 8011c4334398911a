"""The request sequence of the multimodal chat client that LMCache's multimodal page runs
twice against each server (vLLM's ``examples/online_serving/
openai_chat_completion_client_for_multimodal.py``), one chat type at a time.

Per chat type, in the client's order, each request one user message with the text part
first and then the media part(s), ``max_completion_tokens`` 128 (the client's default), no
temperature, no ``cache_salt``:

    text-only     "What's the capital of France?" (a plain string)
    single-image  the image by URL; the same image base64-encoded in a data: URL
    multi-image   two images by URL
    video         the video by URL; the same video base64-encoded in a data: URL
    audio         input_audio (base64); audio_url by URL; audio_url base64-encoded
    multi-audio   two input_audio parts

Media default to the client's own public URLs; local files replace them and are served to
the vLLM server from a small HTTP server here (the URL variants must stay URLs). The bench
adds only what timing needs: ``stream`` with usage and ``logprobs``. data: URLs carry the
medium's own MIME type (the client's files are a JPEG, an MP4 and an Ogg).
"""

from __future__ import annotations

import base64
import http.server
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlparse

import httpx

from kvshelf.bench.client import MediaError, ModalityRejected, stream_chat
from kvshelf.bench.payloads import filler_text, fit_words, mime_of
from kvshelf.bench.run import (
    COLD,
    WARM,
    BenchRun,
    BenchSettings,
    Measurement,
    client,
    resolve_model,
)

MAX_COMPLETION_TOKENS = 128  # the client's --max-completion-tokens default
_ASSETS = "https://vllm-public-assets.s3.us-west-2.amazonaws.com"
# The client's media, by kind, in the order its chat types use them.
CLIENT_MEDIA: dict[str, tuple[str, ...]] = {
    "image": (
        (f"{_ASSETS}/vision_model_images/2560px-Gfp-wisconsin-madison-the-nature-boardwalk.jpg"),
        f"{_ASSETS}/multimodal_asset/duck.jpg",
        f"{_ASSETS}/multimodal_asset/lion.jpg",
    ),
    "video": ("http://commondatastorage.googleapis.com/gtv-videos-bucket/sample/ForBiggerFun.mp4",),
    "audio": (
        f"{_ASSETS}/multimodal_asset/winning_call.ogg",
        f"{_ASSETS}/multimodal_asset/azacinto_foscolo.ogg",
    ),
}
_USER_AGENT = {"User-Agent": "vLLM Example Client"}  # what the client sends when it downloads


@dataclass(frozen=True)
class Step:
    """One request of a chat type's sequence."""

    label: str  # what the table calls it, e.g. "image base64"
    question: str
    # (form, kind, slot): form is "url", "base64" or "input_audio"; slot picks the medium
    parts: tuple[tuple[str, str, int], ...] = ()


SEQUENCES: dict[str, tuple[Step, ...]] = {
    "text-only": (Step("text", "What's the capital of France?"),),
    "single-image": (
        Step("image URL", "What's in this image?", (("url", "image", 0),)),
        Step("image base64", "What's in this image?", (("base64", "image", 0),)),
    ),
    "multi-image": (
        Step(
            "2 image URLs",
            "What are the animals in these images?",
            (("url", "image", 1), ("url", "image", 2)),
        ),
    ),
    "video": (
        Step("video URL", "What's in this video?", (("url", "video", 0),)),
        Step("video base64", "What's in this video?", (("base64", "video", 0),)),
    ),
    "audio": (
        Step("input_audio", "What's in this audio?", (("input_audio", "audio", 0),)),
        Step("audio URL", "What's in this audio?", (("url", "audio", 0),)),
        Step("audio base64", "What's in this audio?", (("base64", "audio", 0),)),
    ),
    "multi-audio": (
        Step(
            "2 input_audio",
            "Are these two audios the same?",
            (("input_audio", "audio", 0), ("input_audio", "audio", 1)),
        ),
    ),
}
CHAT_TYPES: tuple[str, ...] = tuple(SEQUENCES)
_PART_TYPES = {"image": "image_url", "video": "video_url", "audio": "audio_url"}


class Medium:
    """One medium as the client sends it: by URL or base64-encoded. Local files are served
    by a :class:`MediaServer`; a URL's bytes are fetched once, when first encoded."""

    def __init__(self, source: str, server: MediaServer | None = None):
        self.source = source
        self.path = None if _is_url(source) else Path(source).expanduser()
        if self.path is not None:
            if not self.path.is_file():
                raise MediaError(f"cannot read media {source!r}: no such file")
            if server is None:
                raise MediaError(f"media {source!r} is a local file: it needs a MediaServer")
            self.url = server.add(self.path)
        else:
            self.url = source
        name = self.path.name if self.path else urlparse(source).path
        self.mime = mime_of(name) or "application/octet-stream"
        self.label = self.path.name if self.path else Path(urlparse(source).path).name
        self._data: bytes | None = None

    def base64(self, http: httpx.Client) -> str:
        if self._data is None:
            self._data = self.path.read_bytes() if self.path else _download(http, self.url)
        return base64.b64encode(self._data).decode("ascii")


class MediaServer:
    """Serves chosen local files over HTTP from a thread, for the URL requests of the
    sequence. ``host`` must be an address the vLLM server can reach this machine at."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self._files: dict[str, Path] = {}
        self._httpd: http.server.ThreadingHTTPServer | None = None

    def add(self, path: Path) -> str:
        if self._httpd is None:
            self._start()
        assert self._httpd is not None
        name = f"{len(self._files)}/{quote(path.name)}"
        self._files["/" + name] = path.resolve()
        return f"http://{self.host}:{self._httpd.server_address[1]}/{name}"

    def _start(self) -> None:
        files = self._files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = files.get(self.path)
                if path is None:
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", mime_of(path.name) or "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the bench prints its own lines

        self._httpd = http.server.ThreadingHTTPServer((self.host, 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def pick_media(sources: Sequence[str], server: MediaServer) -> dict[str, list[Medium]]:
    """Media per kind: the given sources of each kind (in order), else the client's own.

    With given images, single-image sends the first and multi-image the first two (one
    image given: it twice); with given audio, multi-audio sends the first two likewise.
    """
    given: dict[str, list[str]] = {}
    for source in sources:
        kind = mime_of(urlparse(source).path if _is_url(source) else source).split("/")[0]
        if kind not in CLIENT_MEDIA:
            raise MediaError(f"media {source!r}: not an image, video or audio file name")
        given.setdefault(kind, []).append(os.fspath(source))
    picked = {}
    for kind, defaults in CLIENT_MEDIA.items():
        mine = given.get(kind)
        if mine and kind == "image":  # slots 0 (single) and 1, 2 (multi)
            mine = [mine[0], mine[0], mine[1 % len(mine)]]
        picked[kind] = [Medium(s, server) for s in (mine or defaults)]
    return picked


def step_body(
    step: Step,
    model: str,
    media: dict[str, list[Medium]],
    http: httpx.Client,
    *,
    max_tokens: int = MAX_COMPLETION_TOKENS,
    filler_words: int = 0,
    cache_salt: str | None = None,
) -> dict[str, Any]:
    """The client's request for ``step``; ``filler_words`` (not the client's) pads the text."""
    text = step.question
    if filler_words:
        text = f"{filler_text(filler_words)}\n{text}"
    parts: list[dict[str, Any]] = []
    for form, kind, slot in step.parts:
        medium = media[kind][slot % len(media[kind])]
        if form == "input_audio":
            fmt = medium.mime.split("/")[-1].removeprefix("x-")
            parts.append(
                {"type": "input_audio", "input_audio": {"data": medium.base64(http), "format": fmt}}
            )
            continue
        url = medium.url if form == "url" else f"data:{medium.mime};base64,{medium.base64(http)}"
        parts.append({"type": _PART_TYPES[kind], _PART_TYPES[kind]: {"url": url}})
    content: Any = [{"type": "text", "text": text}, *parts] if parts else text
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": content}],
        "model": model,
        "max_completion_tokens": max_tokens,
    }
    if cache_salt:
        body["cache_salt"] = cache_salt
    return body


def run_reference(
    settings: BenchSettings,
    media_host: str = "127.0.0.1",
    on_result: Callable[[Measurement], None] | None = None,
) -> BenchRun:
    """Send each chat type's sequence ``settings.repeat`` times (run 1 is ``cold``, later
    runs ``warm``), the types one after another, every request timed."""
    run_id = secrets.token_hex(3)
    done = BenchRun("", [], [], [])
    with client(settings) as http, MediaServer(media_host) as server:
        model = resolve_model(http, settings)
        done = done._replace(model=model)
        media = pick_media(settings.media, server)
        for index in range(settings.warmup):  # untimed; off unless asked for
            warm_up = Step("warm-up", "Say hello.")
            done.warmups.append(
                send_step(
                    http, settings, model, "warm-up", warm_up, media, 0, f"{run_id}-w{index}", 0
                )
            )
        for chat_type in settings.chat_types:
            try:
                words = [
                    fit_step(http, settings, model, step, media) for step in SEQUENCES[chat_type]
                ]
                for round_index in range(settings.repeat):
                    for step, filler_words in zip(SEQUENCES[chat_type], words):
                        m = send_step(
                            http,
                            settings,
                            model,
                            chat_type,
                            step,
                            media,
                            round_index,
                            run_id,
                            filler_words,
                        )
                        done.measurements.append(m)
                        if on_result is not None:
                            on_result(m)
            except ModalityRejected as exc:
                if not settings.skip_rejected:
                    raise
                done.skipped.append((chat_type, str(exc)))
    return done


def fit_step(
    http: httpx.Client,
    settings: BenchSettings,
    model: str,
    step: Step,
    media: dict[str, list[Medium]],
) -> int:
    """Filler words that pad ``step`` to ``settings.prompt_tokens`` (0: the client's own
    text), counted with the server's /tokenize."""
    if settings.prompt_tokens <= 0:
        return 0

    def messages(words: int) -> list[dict[str, Any]]:
        return step_body(step, model, media, http, filler_words=words)["messages"]

    return fit_words(http, settings.url, model, messages, settings.prompt_tokens)[0]


def send_step(
    http: httpx.Client,
    settings: BenchSettings,
    model: str,
    chat_type: str,
    step: Step,
    media: dict[str, list[Medium]],
    round_index: int,
    run_id: str,
    filler_words: int,
) -> Measurement:
    """One timed request: ``step`` of ``chat_type``, in run ``round_index`` (0 is cold)."""
    body = step_body(
        step,
        model,
        media,
        http,
        max_tokens=settings.max_tokens,
        filler_words=filler_words,
        cache_salt=settings.cache_salt,
    )
    slug = step.label.replace(" ", "_")
    request_id = f"kvb-{run_id}-{chat_type}-{slug}-r{round_index}"
    result = stream_chat(http, settings.url, body, request_id)
    labels = [media[kind][slot % len(media[kind])].label for _, kind, slot in step.parts]
    return Measurement(
        request_type=f"{chat_type}: {step.label}",
        phase=COLD if round_index == 0 else WARM,
        round=round_index,
        stream=0,
        request_id=request_id,
        model=model,
        media=", ".join(labels),
        ttft_s=result.ttft_s,
        total_s=result.total_s,
        first_token_via=result.first_token_via,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
    )


def run_totals(measurements: Sequence[Measurement]) -> dict[int, float]:
    """Seconds each run took, request by request (they go one at a time): run -> total."""
    totals: dict[int, float] = {}
    for m in measurements:
        totals[m.round] = totals.get(m.round, 0.0) + m.total_s
    return totals


def _download(http: httpx.Client, url: str) -> bytes:
    try:
        response = http.get(url, headers=_USER_AGENT, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise MediaError(
            f"cannot download {url} to base64-encode it ({exc}); pass --media "
            "with a local file instead"
        ) from None
    if response.status_code != 200:
        raise MediaError(
            f"downloading {url} answered HTTP {response.status_code}; pass "
            "--media with a local file instead"
        )
    return response.content


def _is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")
