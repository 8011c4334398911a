"""Opening the tiers a config asks for, in lookup order: memory, disk, remote."""

from __future__ import annotations

from kvshelf.config import KVShelfConfig
from kvshelf.keys import Namespace
from kvshelf.storage.base import HostMemory, Store
from kvshelf.storage.disk import DiskStore
from kvshelf.storage.memory import MemoryStore
from kvshelf.storage.tiered import TieredStore


def open_tiers(
    config: KVShelfConfig,
    namespace: Namespace,
    host: HostMemory | None = None,
    remote: Store | None = None,
    write_lower: bool = True,
) -> TieredStore:
    """The tiers ``config`` turns on: memory (``cpu_bytes``, buffers from ``host``, plain
    heap without it), disk (``disk_path``, which records ``namespace`` for ``kvshelf
    stats``) and remote (``remote`` if given, else the one ``remote_url`` names).
    Without ``write_lower`` saves stay in memory: another process writes the same
    entries to disk and the remote tier. Raises ``ValueError`` for a remote setting
    that cannot work."""
    memory = MemoryStore(config.cpu_bytes, host) if config.cpu_bytes > 0 else None
    lower: list[Store] = []
    if config.disk_path is not None:
        disk = DiskStore(config.disk_path, config.disk_bytes, config.disk_fsync, memory)
        disk.describe_namespace(namespace.id(), namespace.to_json())
        lower.append(disk)
    if remote is None and config.remote_url:
        from kvshelf.storage.redis_connect import open_remote  # redis-py only when asked for

        remote = open_remote(config, memory)
    if remote is not None:
        lower.append(remote)
    return TieredStore(memory, lower, config.save_queue_limit(), config.save_threads, write_lower)
