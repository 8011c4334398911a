"""Run the bench: for each request type, rounds of concurrent streamed requests.

Round 0 is *cold* (a fresh ``cache_salt`` per run keeps earlier runs' KV out of it), later
rounds repeat the same prompts and are *warm*: whatever cache the server has (vLLM's prefix
cache, kvshelf's tiers) may serve them. To time kvshelf's disk or Redis tier alone, run twice
with the same ``--cache-salt`` and restart the server in between (``make demo`` does that).
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from kvshelf.bench.client import (
    DEFAULT_TIMEOUT,
    BenchError,
    ModalityRejected,
    StreamResult,
    list_models,
    stream_chat,
)
from kvshelf.bench.logs import RequestLine, line_for
from kvshelf.bench.payloads import (
    BUILTIN_MEDIA,
    REQUEST_TYPES,
    TYPE_MEDIA,
    Media,
    builtin_media,
    chat_body,
    fit_filler,
    load_media,
    pick_media,
)

COLD, WARM = "cold", "warm"
DEFAULT_MEDIA_DIR = Path(tempfile.gettempdir()) / "kvshelf-bench-media"


@dataclass
class Measurement:
    """One timed request."""

    request_type: str
    phase: str  # COLD or WARM (the demo: warm = after a server restart)
    round: int  # 0 = first sending of this prompt
    stream: int  # which of the concurrent prompts
    request_id: str  # sent as X-Request-Id
    model: str
    media: str  # where the media came from (file names or URLs)
    ttft_s: float
    total_s: float
    first_token_via: str
    prompt_tokens: int | None
    completion_tokens: int | None
    hit_tokens: int | None = None  # from the server's kvshelf log line, when known
    load_tokens: int | None = None
    log_line: str | None = None

    def attach(self, line: RequestLine | None) -> None:
        if line is not None:
            self.hit_tokens, self.load_tokens, self.log_line = (
                line.hit_tokens,
                line.load_tokens,
                line.line,
            )


@dataclass
class BenchSettings:
    url: str
    model: str | None = None  # None: the server's first model
    chat_types: Sequence[str] = REQUEST_TYPES
    media: Sequence[str] = ()  # paths or URLs; types without a given kind use built-in media
    file_urls: bool = False  # send local files as file:// instead of data:
    repeat: int = 2  # rounds per prompt: 1 cold + (repeat - 1) warm
    concurrency: int = 1  # prompts in flight per round
    prompt_tokens: int = 0  # pad the text to about this many prompt tokens (0: no padding)
    max_tokens: int = 8
    cache_salt: str | None = field(default_factory=lambda: secrets.token_hex(4))
    media_dir: Path | None = None  # where built-in media are generated
    timeout_s: float = 600.0
    warmup: int = 1  # untimed text requests first: a fresh vLLM's first request costs ~2 s more
    skip_rejected: bool = False  # skip types the model rejects (HTTP 400) instead of failing


class BenchRun(NamedTuple):
    model: str
    measurements: list[Measurement]
    warmups: list[Measurement]  # not in the results
    skipped: list[tuple[str, str]]  # (request type, why) when skip_rejected


@dataclass
class Prepared:
    """A request type's prompt, ready to send."""

    request_type: str
    media: list[Media]
    filler_words: int
    exact: bool  # the padding was counted by the server's /tokenize
    filler_seed: int = 0  # another seed, another text: the warm-up shares no prefix


def client(settings: BenchSettings) -> httpx.Client:
    timeout = httpx.Timeout(settings.timeout_s, connect=DEFAULT_TIMEOUT.connect)
    return httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=64))


def resolve_model(http: httpx.Client, settings: BenchSettings) -> str:
    if settings.model:
        return settings.model
    models = list_models(http, settings.url)
    if not models:
        raise BenchError(f"{settings.url} serves no models; pass --model")
    return models[0]


def prepare(http: httpx.Client, settings: BenchSettings, model: str) -> list[Prepared]:
    """Load the media and size the padding for every chat type (no chat request is sent)."""
    types = list(settings.chat_types)
    unknown = [t for t in types if t not in REQUEST_TYPES]
    if unknown:
        raise BenchError(f"unknown chat type(s) {unknown}; choose from {list(REQUEST_TYPES)}")
    builtin_paths: dict[str, Path] = {}
    prepared = []
    for request_type in types:
        as_file = settings.file_urls
        given = [load_media(source, as_file_url=as_file) for source in settings.media]
        builtin: dict[str, Media] = {}
        if any(kind not in {m.kind for m in given} for kind in TYPE_MEDIA[request_type]):
            if not builtin_paths:
                builtin_paths = builtin_media(settings.media_dir or DEFAULT_MEDIA_DIR)
            builtin = {
                name: load_media(builtin_paths[name], as_file_url=as_file)
                for name in BUILTIN_MEDIA[request_type]
            }
        media = pick_media(request_type, given, builtin)
        words, exact = 0, True
        if settings.prompt_tokens > 0:
            words, exact = fit_filler(http, settings.url, model, media, settings.prompt_tokens)
        prepared.append(Prepared(request_type, media, words, exact))
    return prepared


def send(
    http: httpx.Client,
    settings: BenchSettings,
    model: str,
    item: Prepared,
    *,
    phase: str,
    round_index: int,
    stream: int,
    run_id: str,
) -> Measurement:
    """One timed request of a prepared prompt."""
    salt = None if settings.cache_salt is None else f"{settings.cache_salt}-{stream}"
    body = chat_body(
        model,
        item.media,
        filler_words=item.filler_words,
        filler_seed=item.filler_seed,
        max_tokens=settings.max_tokens,
        cache_salt=salt,
    )
    request_id = f"kvb-{run_id}-{item.request_type}-s{stream}-r{round_index}-{phase}"
    result: StreamResult = stream_chat(http, settings.url, body, request_id)
    return Measurement(
        request_type=item.request_type,
        phase=phase,
        round=round_index,
        stream=stream,
        request_id=request_id,
        model=model,
        media=", ".join(m.label for m in item.media),
        ttft_s=result.ttft_s,
        total_s=result.total_s,
        first_token_via=result.first_token_via,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
    )


def run_bench(
    settings: BenchSettings, on_result: Callable[[Measurement], None] | None = None
) -> BenchRun:
    """Warm up, then send every chat type ``repeat`` rounds of ``concurrency`` requests."""
    if settings.repeat < 1 or settings.concurrency < 1:
        raise BenchError("--repeat and --concurrency must be at least 1")
    run_id = secrets.token_hex(3)
    done = BenchRun("", [], [], [])
    with client(settings) as http:
        model = resolve_model(http, settings)
        prepared = prepare(http, settings, model)
        done = done._replace(model=model)
        warmup = _warmup_prompt(http, settings, model)
        for index in range(settings.warmup):
            done.warmups.append(
                send(
                    http,
                    settings,
                    model,
                    warmup,
                    phase="warm-up",
                    round_index=index,
                    stream=0,
                    run_id=run_id,
                )
            )
        with ThreadPoolExecutor(settings.concurrency) as pool:
            for item in prepared:
                try:
                    for round_index in range(settings.repeat):
                        phase = COLD if round_index == 0 else WARM
                        futures = [
                            pool.submit(
                                send,
                                http,
                                settings,
                                model,
                                item,
                                phase=phase,
                                round_index=round_index,
                                stream=stream,
                                run_id=run_id,
                            )
                            for stream in range(settings.concurrency)
                        ]
                        wait(futures)  # all of the round, even if one failed
                        for future in futures:
                            done.measurements.append(future.result())
                            if on_result is not None:
                                on_result(done.measurements[-1])
                except ModalityRejected as exc:
                    if not settings.skip_rejected:
                        raise
                    done.skipped.append((item.request_type, str(exc)))
    return done


def _warmup_prompt(http: httpx.Client, settings: BenchSettings, model: str) -> Prepared:
    """A text-only prompt as long as the others but of other words (no shared prefix)."""
    words, exact = 0, True
    if settings.prompt_tokens > 0 and settings.warmup > 0:
        words, exact = fit_filler(http, settings.url, model, [], settings.prompt_tokens)
    return Prepared("warm-up", [], words, exact, filler_seed=1)


def attach_log_lines(measurements: Sequence[Measurement], lines: list[RequestLine]) -> None:
    for measurement in measurements:
        measurement.attach(line_for(lines, measurement.request_id))


def settings_dict(settings: BenchSettings) -> dict[str, Any]:
    out = {k: v for k, v in vars(settings).items() if k != "media_dir"}
    out["chat_types"] = list(settings.chat_types)
    out["media"] = list(settings.media)
    return out
