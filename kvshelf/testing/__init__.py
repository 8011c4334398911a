"""Offline tiny multimodal models, test media and a vLLM server launcher for tests and demos."""

from kvshelf.testing.media import MEDIA, make_media, mime_type
from kvshelf.testing.models import (
    FAMILIES,
    FAMILY_MODALITIES,
    FAMILY_REQUEST_TYPES,
    SIZES,
    SizePreset,
    build_model,
    read_build_info,
    serve_args,
)
from kvshelf.testing.requests import (
    REQUEST_TYPES,
    build_content,
    build_messages,
    chat_request,
    data_url,
    file_url,
    filler_text,
    input_audio_part,
    media_part,
)
from kvshelf.testing.server import ServerStartError, VllmServer, free_port
from kvshelf.testing.tokenizer import build_tokenizer

__all__ = [
    "FAMILIES",
    "FAMILY_MODALITIES",
    "FAMILY_REQUEST_TYPES",
    "MEDIA",
    "REQUEST_TYPES",
    "SIZES",
    "ServerStartError",
    "SizePreset",
    "VllmServer",
    "build_content",
    "build_messages",
    "build_model",
    "build_tokenizer",
    "chat_request",
    "data_url",
    "file_url",
    "filler_text",
    "free_port",
    "input_audio_part",
    "make_media",
    "media_part",
    "mime_type",
    "read_build_info",
    "serve_args",
]
