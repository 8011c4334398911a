"""Chat-completion bodies for the five request types, from user media or generated media.

A request is ``[media parts..., text]``: the media first (the "same image, new question"
pattern a KV cache helps most), then optional filler text that pads the prompt to a length, then
the question. Local files go out as ``data:`` URLs, or as ``file://`` URLs when asked (the
server must allow their directory with ``--allowed-local-media-path``); ``http(s)://``,
``file://`` and ``data:`` sources pass through unchanged.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

from kvshelf.bench.client import MediaError, base_url
from kvshelf.bench.media import make_media, mime_of
from kvshelf.bench.words import filler_text

REQUEST_TYPES: tuple[str, ...] = ("text-only", "single-image", "multi-image", "video", "audio")
# Media kinds each request type sends, in order.
TYPE_MEDIA: dict[str, tuple[str, ...]] = {
    "text-only": (),
    "single-image": ("image",),
    "multi-image": ("image", "image"),
    "video": ("video",),
    "audio": ("audio",),
}
# Content-part type per media kind, as the OpenAI/vLLM chat API names them.
PART_TYPES: dict[str, str] = {"image": "image_url", "audio": "audio_url", "video": "video_url"}
# Generated media (kvshelf.bench.media names) per type; multi-image uses other images than
# single-image so the two prompts share no prefix.
BUILTIN_MEDIA: dict[str, tuple[str, ...]] = {
    "text-only": (),
    "single-image": ("image_a",),
    "multi-image": ("image_c", "image_d"),
    "video": ("video_a",),
    "audio": ("audio_a",),
}
QUESTION = "Describe this."


@dataclass(frozen=True)
class Media:
    """One medium, ready to send."""

    kind: str  # "image", "audio" or "video"
    url: str  # data:, file:// or http(s):// URL
    label: str  # what to show the user: a file name or a shortened URL

    def part(self) -> dict[str, Any]:
        part_type = PART_TYPES[self.kind]
        return {"type": part_type, part_type: {"url": self.url}}


def load_media(source: str | os.PathLike[str], *, as_file_url: bool = False) -> Media:
    """A path or URL as :class:`Media`; local files are read now (raises :class:`MediaError`)."""
    text = os.fspath(source)
    scheme = urlparse(text).scheme.lower() if "://" in text or text.startswith("data:") else ""
    if scheme in ("http", "https"):
        return Media(_kind(urlparse(text).path, text), text, _short(text))
    if scheme == "data":
        mime = text[len("data:") :].split(";", 1)[0].split(",", 1)[0]
        return Media(_kind_of_mime(mime, text), text, f"data:{mime}")
    if scheme == "file":
        path = Path(unquote(urlparse(text).path))
        _check_readable(path, text)
        return Media(_kind(path.name, text), text, f"{path.name} (file://)")
    if scheme:
        raise MediaError(
            f"media {text!r}: unsupported URL scheme {scheme!r}; use a path, "
            "http(s)://, file:// or data:"
        )
    path = Path(text).expanduser()
    kind = _kind(path.name, text)
    if as_file_url:
        _check_readable(path, text)
        return Media(kind, path.resolve().as_uri(), f"{path.name} (file://)")
    data = _read(path, text)
    encoded = base64.b64encode(data).decode("ascii")
    return Media(kind, f"data:{mime_of(path.name)};base64,{encoded}", path.name)


def builtin_media(out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Generate the built-in test media into ``out_dir`` (idempotent): name -> path."""
    try:
        return make_media(out_dir)
    except (ImportError, RuntimeError, OSError) as exc:
        raise MediaError(
            f"cannot generate the built-in media in {out_dir}: {exc}; pass --media instead"
        ) from None


def pick_media(request_type: str, given: Sequence[Media], builtin: dict[str, Media]) -> list[Media]:
    """The media for ``request_type``: the user's of the right kind, else the built-in ones.

    multi-image takes the first two given images (one given image is sent twice).
    """
    kinds = TYPE_MEDIA[request_type]
    if not kinds:
        return []
    mine = [m for m in given if m.kind == kinds[0]]
    if mine:
        return [mine[i % len(mine)] for i in range(len(kinds))]
    return [builtin[name] for name in BUILTIN_MEDIA[request_type]]


def user_content(
    parts: Sequence[dict[str, Any]], text: str, filler_words: int = 0, filler_seed: int = 0
) -> list[dict[str, Any]]:
    """A user message's content: the media parts first, then (filler and) the text."""
    if filler_words > 0:
        text = f"{filler_text(filler_words, filler_seed)}\n{text}"
    return [*parts, {"type": "text", "text": text}]


def chat_request(
    model: str,
    messages: list[dict[str, Any]],
    *,
    max_tokens: int = 4,
    temperature: float = 0.0,
    **extra: Any,
) -> dict[str, Any]:
    """A ``/v1/chat/completions`` body; ``extra`` adds fields such as ``cache_salt``."""
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        **extra,
    }


def chat_body(
    model: str,
    media: Sequence[Media],
    *,
    filler_words: int = 0,
    filler_seed: int = 0,
    max_tokens: int = 8,
    cache_salt: str | None = None,
    question: str = QUESTION,
) -> dict[str, Any]:
    """One user message about ``media``, greedy decoding."""
    content = user_content([m.part() for m in media], question, filler_words, filler_seed)
    # cache_salt keeps this run's prompts apart from others' in vLLM and kvshelf.
    extra: dict[str, Any] = {"cache_salt": cache_salt} if cache_salt else {}
    return chat_request(
        model, [{"role": "user", "content": content}], max_tokens=max_tokens, **extra
    )


def fit_filler(
    client: httpx.Client, url: str, model: str, media: Sequence[Media], prompt_tokens: int
) -> tuple[int, bool]:
    """Filler words that bring the prompt to about ``prompt_tokens``; (words, exact).

    Counts with vLLM's ``POST /tokenize`` (which expands media placeholders as a request
    would). A server without it gets an estimate of 1.3 tokens per word and ``exact=False``.
    """

    def messages(words: int) -> list[dict[str, Any]]:
        return chat_body(model, media, filler_words=words)["messages"]

    return fit_words(client, url, model, messages, prompt_tokens)


def fit_words(
    client: httpx.Client,
    url: str,
    model: str,
    messages_for: Callable[[int], list[dict[str, Any]]],
    prompt_tokens: int,
) -> tuple[int, bool]:
    """As :func:`fit_filler`, for any messages: ``messages_for(words)`` gives them padded
    with that many filler words."""
    base = _count(client, url, model, messages_for(0))
    if base is None:
        return max(0, round(prompt_tokens / 1.3)), False
    if base >= prompt_tokens:
        return 0, True
    probe_words = 200
    probe = _count(client, url, model, messages_for(probe_words))
    per_word = max((probe or base) - base, 1) / probe_words
    words = round((prompt_tokens - base) / per_word)
    for _ in range(3):  # a few corrections: the words drawn differ in token counts
        got = _count(client, url, model, messages_for(words))
        step = 0 if got is None else round((prompt_tokens - got) / per_word)
        if step == 0:
            break
        words = max(0, words + step)
    return words, True


def _count(
    client: httpx.Client, url: str, model: str, messages: list[dict[str, Any]]
) -> int | None:
    tokenize = {"model": model, "messages": messages, "add_generation_prompt": True}
    try:
        response = client.post(f"{base_url(url)}/tokenize", json=tokenize)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    count = response.json().get("count")
    return count if isinstance(count, int) else None


def _kind(name: str, source: str) -> str:
    return _kind_of_mime(mime_of(name), source)


def _kind_of_mime(mime: str, source: str) -> str:
    kind = mime.split("/", 1)[0]
    if kind not in PART_TYPES:
        raise MediaError(
            f"media {_short(source)!r}: cannot tell whether it is an image, audio or video "
            f"(type {mime or 'unknown'}); use a file name ending in .png/.jpg, .wav/.mp3 or "
            ".mp4/.webm"
        )
    return kind


def _check_readable(path: Path, source: str) -> None:
    _read(path, source, num_bytes=1)


def _read(path: Path, source: str, num_bytes: int = -1) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read(num_bytes)
    except OSError as exc:
        raise MediaError(f"cannot read media {source!r}: {exc.strerror or exc}") from None


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
