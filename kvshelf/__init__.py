"""kvshelf: content-addressed KV-cache tiers for vLLM, multimodal-aware."""

from kvshelf.codec import FORMAT_VERSION, CorruptEntry, Entry
from kvshelf.config import ConfigError, KVShelfConfig, load_config
from kvshelf.engine import CacheEngine
from kvshelf.keys import (
    Chunk,
    ChunkPlan,
    MediaSpan,
    Namespace,
    UncacheableRequest,
    plan_chunks,
)

__all__ = [
    "FORMAT_VERSION",
    "CacheEngine",
    "Chunk",
    "ChunkPlan",
    "ConfigError",
    "CorruptEntry",
    "Entry",
    "KVShelfConfig",
    "MediaSpan",
    "Namespace",
    "UncacheableRequest",
    "load_config",
    "plan_chunks",
]
