"""Offline tiny multimodal models, test media and a vLLM server launcher for tests and demos.

Names load on first use: importing one submodule (say the media) does not pull in
transformers, which only the model builders need.
"""

from importlib import import_module

_WHERE = {
    "MEDIA": "media",
    "make_media": "media",
    "make_page_media": "media",
    "mime_type": "media",
    "FAMILIES": "models",
    "FAMILY_MODALITIES": "models",
    "FAMILY_REQUEST_TYPES": "models",
    "SIZES": "models",
    "SizePreset": "models",
    "build_model": "models",
    "read_build_info": "models",
    "serve_args": "models",
    "REQUEST_TYPES": "requests",
    "build_content": "requests",
    "build_messages": "requests",
    "chat_request": "requests",
    "data_url": "requests",
    "file_url": "requests",
    "filler_text": "requests",
    "input_audio_part": "requests",
    "media_part": "requests",
    "ServerStartError": "server",
    "VllmServer": "server",
    "free_port": "server",
    "build_tokenizer": "tokenizer",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'kvshelf.testing' has no attribute {name!r}")
    return getattr(import_module(f"kvshelf.testing.{_WHERE[name]}"), name)
