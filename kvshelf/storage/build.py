"""Opening the tiers a config asks for, in lookup order: memory, disk, remote.

Within one process the tiers are opened once per tier settings and shared: vLLM runs
``KVShelfConnector`` and ``KVShelfECConnector`` in the same worker process, and with one
config their engines use one memory tier (one ``cpu_bytes`` budget), one disk index over
the directory and one Redis client, each under its own namespace (keys never collide).
Each engine keeps its own :class:`~kvshelf.storage.tiered.TieredStore` (save queue,
writer threads, ``write_lower``); the tiers close when the last engine using them does.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from functools import partial

from kvshelf.config import KVShelfConfig
from kvshelf.keys import Namespace
from kvshelf.storage.base import HostMemory, Store
from kvshelf.storage.disk import DiskStore
from kvshelf.storage.memory import MemoryStore
from kvshelf.storage.tiered import TieredStore

# The settings that make the tiers themselves; the rest (chunk size, save threads,
# lookups, logging) may differ between engines that share them.
TIER_FIELDS = ("cpu_bytes", "disk_bytes", "disk_fsync") + tuple(
    name
    for name in KVShelfConfig.model_fields
    if name.startswith("remote_") and name not in ("remote_password", "remote_password_env")
)
TierSettings = tuple[object, ...]


@dataclass
class _Tiers:
    """Tiers opened for one :data:`TierSettings`, and how many engines use them."""

    memory: MemoryStore | None
    disk: DiskStore | None
    remote: Store | None
    users: int = 0

    @property
    def lower(self) -> list[Store]:
        return [t for t in (self.disk, self.remote) if t is not None]

    def close(self) -> None:
        for tier in [t for t in (self.memory, self.disk, self.remote) if t is not None]:
            tier.close()


_OPEN: dict[TierSettings, _Tiers] = {}  # this process's shared tiers
_OPEN_LOCK = threading.Lock()


def open_tiers(
    config: KVShelfConfig,
    namespace: Namespace,
    host: HostMemory | None = None,
    remote: Store | None = None,
    write_lower: bool = True,
) -> TieredStore:
    """The tiers ``config`` turns on: memory (``cpu_bytes``; this namespace's buffers
    from ``host``, plain heap without it), disk (``disk_path``, which records
    ``namespace`` for ``kvshelf stats``) and remote (``remote`` if given, else the one
    ``remote_url`` names). Tiers already open in this process for the same
    :func:`tier_settings` are shared (not when ``remote`` is given: the caller's own
    store); closing the returned store lets go of them. Without ``write_lower`` saves
    stay in memory: another process writes the same entries to disk and the remote
    tier. Raises ``ValueError`` for a remote setting that cannot work."""
    if remote is not None:
        tiers = _open(config, host, remote)
        tiers.users = 1
        release = tiers.close
    else:
        key = tier_settings(config)
        with _OPEN_LOCK:  # a second engine waits for the first's tiers, not opens its own
            tiers = _OPEN.get(key) or _OPEN.setdefault(key, _open(config, host, None))
            tiers.users += 1
        release = partial(_release, key, tiers)
    if tiers.memory is not None:
        tiers.memory.use(namespace.id(), host)
    if tiers.disk is not None:
        tiers.disk.describe_namespace(namespace.id(), namespace.to_json())
    return TieredStore(
        tiers.memory,
        tiers.lower,
        config.save_queue_limit(),
        config.save_threads,
        write_lower,
        release=release,
    )


def tier_settings(config: KVShelfConfig) -> TierSettings:
    """What decides whether two configs open the same tiers. The remote password is
    kept as its digest, the disk directory as its absolute path."""
    disk = config.disk_path.expanduser().resolve() if config.disk_path is not None else None
    password = config.password()
    digest = hashlib.sha256(password.encode()).hexdigest() if password is not None else None
    return (disk, digest, *(getattr(config, name) for name in TIER_FIELDS))


def shared_users(config: KVShelfConfig) -> int:
    """How many open stores use the tiers of ``config``'s settings in this process."""
    with _OPEN_LOCK:
        tiers = _OPEN.get(tier_settings(config))
        return tiers.users if tiers is not None else 0


def _open(config: KVShelfConfig, host: HostMemory | None, remote: Store | None) -> _Tiers:
    memory = MemoryStore(config.cpu_bytes, host) if config.cpu_bytes > 0 else None
    disk = None
    if config.disk_path is not None:
        disk = DiskStore(config.disk_path, config.disk_bytes, config.disk_fsync, memory)
    if remote is None and config.remote_url:
        from kvshelf.storage.redis_connect import open_remote  # redis-py only when asked for

        remote = open_remote(config, memory)
    return _Tiers(memory, disk, remote)


def _release(key: TierSettings, tiers: _Tiers) -> None:
    """One store lets go of shared tiers; the last one closes them."""
    with _OPEN_LOCK:
        tiers.users -= 1
        last = tiers.users == 0
        if last and _OPEN.get(key) is tiers:
            del _OPEN[key]
    if last:
        tiers.close()
