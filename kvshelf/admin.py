"""`kvshelf stats` and `kvshelf clear` over a disk tier directory or a Redis/Valkey URL.

Both read the tiers' own layouts (:mod:`kvshelf.storage.disk`, :mod:`kvshelf.storage.redis`)
and touch nothing else: in a directory only ``<namespace>/<xx>/<key>.kv`` entries and their
``NAMESPACE.json``; in Redis only ``kvshelf:{...}`` keys, found with SCAN (never KEYS, which
blocks the server). "Oldest/newest" is least/most recent use: a disk entry's mtime (reads
refresh it) or a Redis head's OBJECT IDLETIME.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvshelf.keys import NAMESPACE_ID_BYTES

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
_NAMESPACE_HEX = 2 * NAMESPACE_ID_BYTES
_BATCH = 1000  # keys per SCAN page and per pipelined round trip
_NAMESPACE_DIR = re.compile(rf"[0-9a-f]{{{_NAMESPACE_HEX}}}")


class AdminError(RuntimeError):
    """A target that cannot be inspected; the message says why."""


@dataclass
class NamespaceStats:
    namespace: str  # namespace id, hex
    description: dict | None = None  # NAMESPACE.json (disk tier only): model, layout, ...
    entries: int = 0
    bytes: int = 0  # disk: file sizes; Redis: head + payload bytes
    oldest: float | None = None  # unix time of the least recently used entry
    newest: float | None = None

    def add(self, num_bytes: int, used_at: float | None) -> None:
        self.entries += 1
        self.bytes += num_bytes
        if used_at is not None:
            self.oldest = used_at if self.oldest is None else min(self.oldest, used_at)
            self.newest = used_at if self.newest is None else max(self.newest, used_at)


@dataclass
class TierStats:
    target: str  # the directory, or the URL without its password
    tier: str  # "disk" or "redis"
    namespaces: list[NamespaceStats] = field(default_factory=list)
    stray: int = 0  # disk: temp files of unfinished writes; Redis: parts without a head

    @property
    def entries(self) -> int:
        return sum(n.entries for n in self.namespaces)

    @property
    def bytes(self) -> int:
        return sum(n.bytes for n in self.namespaces)

    def as_dict(self) -> dict:
        return {
            "target": self.target,
            "tier": self.tier,
            "entries": self.entries,
            "bytes": self.bytes,
            "stray": self.stray,
            "namespaces": [vars(n) for n in self.namespaces],
        }


@dataclass
class Cleared:
    target: str
    namespaces: list[str]  # the namespaces touched
    entries: int  # entries removed
    keys: int  # files or Redis keys removed (entries, parts, descriptions)


def is_url(target: str) -> bool:
    return target.partition("://")[0].lower() in REDIS_SCHEMES and "://" in target


def stats(target: str) -> TierStats:
    """Entries, bytes and use times per namespace of a disk dir or Redis URL."""
    return _redis_stats(target) if is_url(target) else _disk_stats(Path(target))


def clear(target: str, namespaces: Sequence[str] = ()) -> Cleared:
    """Remove every entry, or those of the namespaces whose ids start with the given hex."""
    if is_url(target):
        return _redis_clear(target, namespaces)
    return _disk_clear(Path(target), namespaces)


def match_namespaces(prefixes: Sequence[str], present: Sequence[str], target: str) -> list[str]:
    """The present namespace ids the prefixes name; each prefix must name exactly one."""
    chosen = []
    for prefix in prefixes:
        wanted = prefix.lower()
        if not re.fullmatch(rf"[0-9a-f]{{1,{_NAMESPACE_HEX}}}", wanted):
            raise AdminError(f"--namespace {prefix!r} is not a hex namespace id (or its start)")
        found = [ns for ns in present if ns.startswith(wanted)]
        if len(found) != 1:
            have = ", ".join(sorted(present)) or "none"
            how = "no" if not found else f"{len(found)}"
            raise AdminError(
                f"--namespace {prefix!r} matches {how} namespaces in {target} "
                f"(have: {have}); give more of the id"
            )
        chosen.append(found[0])
    return list(dict.fromkeys(chosen))


# -- disk ------------------------------------------------------------------------------------
def _disk_stats(root: Path) -> TierStats:
    from kvshelf.storage.disk import NAMESPACE_FILE

    _check_dir(root)
    out = TierStats(str(root), "disk")
    for ns_dir in _namespace_dirs(root):
        ns = NamespaceStats(ns_dir.name, _description(ns_dir / NAMESPACE_FILE))
        for _, info in _entry_files(ns_dir):
            ns.add(info.st_size, info.st_mtime)
        out.stray += sum(1 for _ in _temp_files(ns_dir))
        out.namespaces.append(ns)
    return out


def _disk_clear(root: Path, prefixes: Sequence[str]) -> Cleared:
    from kvshelf.engine import PACE_FILE
    from kvshelf.storage.disk import NAMESPACE_FILE

    _check_dir(root)
    dirs = {d.name: d for d in _namespace_dirs(root)}
    chosen = match_namespaces(prefixes, list(dirs), str(root)) if prefixes else sorted(dirs)
    entries = files = 0
    for name in chosen:
        for path, _ in _entry_files(dirs[name]):
            if _unlink(path):
                entries += 1
        files += _unlink(dirs[name] / NAMESPACE_FILE) + _unlink(dirs[name] / PACE_FILE)
        for fan in _subdirs(dirs[name]):
            _rmdir(fan)  # only when empty: a temp file of a live writer keeps it
        _rmdir(dirs[name])
    return Cleared(str(root), chosen, entries, entries + files)


def _check_dir(root: Path) -> None:
    if not root.is_dir():
        raise AdminError(f"{root} is not a directory (a disk tier path, or a redis:// URL)")


def _namespace_dirs(root: Path) -> list[Path]:
    return sorted(d for d in _subdirs(root) if _NAMESPACE_DIR.fullmatch(d.name))


def _entry_files(ns_dir: Path) -> Iterator[tuple[Path, os.stat_result]]:
    # The tier's own parser decides what an entry file is.
    from kvshelf.storage.disk import key_from_name

    for fan in _subdirs(ns_dir):
        for item in os.scandir(fan):
            if key_from_name(ns_dir.name, item.name) is None:
                continue
            try:
                yield Path(item.path), item.stat()
            except FileNotFoundError:  # evicted meanwhile
                continue


def _temp_files(ns_dir: Path) -> Iterator[Path]:
    for fan in _subdirs(ns_dir):
        yield from (Path(i.path) for i in os.scandir(fan) if i.name.endswith(".tmp"))


def _subdirs(path: Path) -> list[Path]:
    try:
        return [Path(d.path) for d in os.scandir(path) if d.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _description(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _unlink(path: Path) -> int:
    try:
        path.unlink()
        return 1
    except FileNotFoundError:
        return 0


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty


# -- Redis -----------------------------------------------------------------------------------
# kvshelf.storage.redis writes kvshelf:{<namespace hex>:<chunk hex>}:h and ...:<nonce>:<i>.
_REDIS_KEY = re.compile(
    rb"kvshelf:\{(?P<ns>[0-9a-f]{%d}):(?P<chunk>[0-9a-f]+)\}:(?P<rest>h|[0-9a-f]+:\d+)"
    % _NAMESPACE_HEX
)


def _redis_stats(url: str) -> TierStats:
    from kvshelf.storage.redis_layout import HEAD_BYTES, decode_head

    client, shown = _redis_client(url)
    heads: list[tuple[bytes, bytes, bytes]] = []  # (namespace, entry tag, key)
    parts: set[bytes] = set()  # tags of entries that have parts
    for key in _scan(client, url, b"kvshelf:{*"):
        match = _REDIS_KEY.fullmatch(key)
        if match is None:
            continue
        tag = match["ns"] + b":" + match["chunk"]
        if match["rest"] == b"h":
            heads.append((match["ns"], tag, key))
        else:
            parts.add(tag)
    out = TierStats(shown, "redis")
    by_ns: dict[bytes, NamespaceStats] = {}
    now = time.time()
    for batch in _batches(heads):
        replies = _pipeline(
            client, url, [c for _, _, k in batch for c in (("GET", k), ("OBJECT", "IDLETIME", k))]
        )
        for (ns, _, _), raw, idle in zip(batch, replies[0::2], replies[1::2]):
            if not isinstance(raw, bytes):
                continue  # gone meanwhile
            try:
                payload = decode_head(raw).header.payload_bytes
            except ValueError:  # CorruptEntry: counted, its size unknown
                payload = 0
            used_at = now - idle if isinstance(idle, int) else None  # LFU policy: no idletime
            stats = by_ns.setdefault(ns, NamespaceStats(ns.decode()))
            stats.add(HEAD_BYTES + payload, used_at)
    out.namespaces = sorted(by_ns.values(), key=lambda n: n.namespace)
    out.stray = len(parts - {tag for _, tag, _ in heads})
    return out


def _redis_clear(url: str, prefixes: Sequence[str]) -> Cleared:
    client, shown = _redis_client(url)
    patterns = [b"kvshelf:{*"]
    chosen: list[str] = []
    if prefixes:
        present = sorted(
            {
                m["ns"].decode()
                for k in _scan(client, url, b"kvshelf:{*")
                if (m := _REDIS_KEY.fullmatch(k)) is not None
            }
        )
        chosen = match_namespaces(prefixes, present, shown)
        patterns = [b"kvshelf:{" + ns.encode() + b":*" for ns in chosen]
    entries = keys = 0
    seen: set[str] = set()
    for pattern in patterns:
        found = {k: m for k in _scan(client, url, pattern) if (m := _REDIS_KEY.fullmatch(k))}
        for batch in _batches(list(found)):
            # One key per UNLINK: a cluster cannot take keys of several slots in one command.
            replies = _pipeline(client, url, [("UNLINK", k) for k in batch])
            for key, removed in zip(batch, replies):
                if removed == 1:
                    keys += 1
                    match = found[key]
                    entries += match["rest"] == b"h"
                    seen.add(match["ns"].decode())
    return Cleared(shown, chosen or sorted(seen), entries, keys)


def _redis_client(url: str):
    import redis

    from kvshelf.config import ConfigError, load_config, redact_url
    from kvshelf.storage.redis_connect import open_remote

    try:
        # The connector's own URL handling (TLS, cluster, KVSHELF_REMOTE_PASSWORD...), with a
        # longer timeout: a SCAN page of a big database can take a moment.
        config = load_config({"remote_url": url, "remote_timeout_s": 10.0})
        store = open_remote(config)
        client = store.client()
    except (ConfigError, ValueError) as exc:
        raise AdminError(str(exc)) from None
    except redis.exceptions.RedisError as exc:
        raise AdminError(f"cannot connect to {redact_url(url)}: {exc}") from None
    return client, redact_url(url)


def _scan(client, url: str, pattern: bytes) -> Iterator[bytes]:
    import redis

    try:
        yield from client.scan_iter(match=pattern, count=_BATCH)
    except redis.exceptions.RedisError as exc:
        raise AdminError(_redis_problem(url, exc)) from None


def _pipeline(client, url: str, commands: Sequence[tuple]) -> list:
    import redis

    try:
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute(raise_on_error=False)
    except redis.exceptions.RedisError as exc:
        raise AdminError(_redis_problem(url, exc)) from None


def _redis_problem(url: str, exc: Exception) -> str:
    from kvshelf.config import redact_url

    return f"{redact_url(url)}: {type(exc).__name__}: {exc}"


def _batches(items: Sequence, size: int = _BATCH) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
