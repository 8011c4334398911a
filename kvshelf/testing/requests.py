"""OpenAI chat-completion request bodies for the project's five request types.

Pure functions: they read media files and return plain dicts; nothing touches the network.
Media go in as `data:` URLs by default. With `use_file_urls=True` they go in as `file://` URLs,
which vLLM only accepts under a directory given with `--allowed-local-media-path`.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvshelf.bench.media import mime_of
from kvshelf.bench.payloads import REQUEST_TYPES, load_media, user_content

# Media (names from kvshelf.bench.media.make_media) each request type sends by default.
DEFAULT_MEDIA: dict[str, tuple[str, ...]] = {
    "text-only": (),
    "single-image": ("image_a",),
    "multi-image": ("image_a", "image_b"),
    "video": ("video_a",),
    "audio": ("audio_a",),
}


def file_url(path: str | os.PathLike[str]) -> str:
    """An absolute `file://` URL (needs `--allowed-local-media-path` on the server)."""
    return Path(path).resolve().as_uri()


def media_part(path: str | os.PathLike[str], *, use_file_url: bool = False) -> dict[str, Any]:
    """A content part (`image_url`, `audio_url` or `video_url`) chosen by the file's MIME type:
    the file inline as a `data:` URL, or by `file://` URL."""
    return load_media(path, as_file_url=use_file_url).part()


def input_audio_part(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A WAV file as an OpenAI `input_audio` part (raw base64, no URL)."""
    if mime_of(path) != "audio/wav":
        raise ValueError(f"input_audio parts here are WAV only, got {path}")
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def build_content(
    request_type: str,
    media: Mapping[str, str | os.PathLike[str]],
    *,
    text: str = "Describe this.",
    filler_tokens: int = 0,
    filler_seed: int = 0,
    media_names: Sequence[str] | None = None,
    use_file_urls: bool = False,
) -> list[dict[str, Any]]:
    """The user message content: media parts first, then (filler and) the text.

    `media` maps names to files (as `make_media` returns); `media_names` overrides the
    request type's default media, e.g. ("image_c", "image_d") for another multi-image pair.
    """
    if request_type not in DEFAULT_MEDIA:
        raise ValueError(f"unknown request type {request_type!r}; choose one of {REQUEST_TYPES}")
    names = DEFAULT_MEDIA[request_type] if media_names is None else tuple(media_names)
    missing = [name for name in names if name not in media]
    if missing:
        raise KeyError(f"media {missing} not given; have {sorted(media)}")
    parts = [media_part(media[name], use_file_url=use_file_urls) for name in names]
    return user_content(parts, text, filler_tokens, filler_seed)


def build_messages(
    request_type: str, media: Mapping[str, str | os.PathLike[str]], **content_kwargs: Any
) -> list[dict[str, Any]]:
    """A one-turn conversation: a single user message built by `build_content`."""
    return [{"role": "user", "content": build_content(request_type, media, **content_kwargs)}]
