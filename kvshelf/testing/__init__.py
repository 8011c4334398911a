"""Offline tiny multimodal models, test media (made by :mod:`kvshelf.bench.media`) and a vLLM
server launcher for tests and demos.

Names load on first use: importing one submodule (say the media) does not pull in
transformers, which only the model builders need. kvshelf.testing imports kvshelf.bench,
never the reverse.
"""

from importlib import import_module

_WHERE = {
    "MEDIA": "kvshelf.bench.media",
    "make_media": "kvshelf.bench.media",
    "make_page_media": "kvshelf.bench.media",
    "mime_of": "kvshelf.bench.media",
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
    "chat_request": "kvshelf.bench.payloads",
    "file_url": "requests",
    "filler_text": "kvshelf.bench.words",
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
    where = _WHERE[name]
    module = where if where.startswith("kvshelf.") else f"kvshelf.testing.{where}"
    return getattr(import_module(module), name)
