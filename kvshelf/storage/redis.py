"""The remote tier: Redis or Valkey, standalone or cluster, through redis-py.

Entries are laid out as a head and payload parts (:mod:`kvshelf.storage.redis_layout`).
A writer stores its parts under a fresh nonce and then the head with ``SET NX``: a
reader that sees a head finds whole parts, and of two writers racing on one key the
loser removes its parts. With a TTL, parts live a minute longer than their head, so a
visible head has its parts. :func:`kvshelf.storage.redis_connect.open_remote` opens one
from a URL.

Failure is a miss. A connection error or timeout marks the tier down: calls answer at
once (miss, or save dropped and counted) until a backoff deadline (0.5 s doubling to
30 s), when one call tries again. One WARNING when the server goes, one INFO when it is
back. A write the server refuses (``maxmemory`` with ``noeviction``, a read-only
replica) is dropped and counted. Every read is checked (header, key, sizes, payload
checksum); a bad entry is removed and counted as ``corrupt``.

The timeout bounds connecting, each wait for a reply, and each part's send as a whole
(Python's ``sendall``): keep ``part_bytes`` well under bandwidth x timeout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import redis
from redis import exceptions as rx
from redis.cluster import RedisCluster

from kvshelf.codec import (
    CorruptEntry,
    Entry,
    check_payload,
    entry_from,
)
from kvshelf.config import redact_url
from kvshelf.keys import StoreKey
from kvshelf.storage.base import (
    BufferSource,
    Counters,
    HeapMemory,
    HostBlock,
    Store,
    StoreStats,
)
from kvshelf.storage.redis_layout import (
    MAX_PART_BYTES,
    NONCE_BYTES,
    RemoteHead,
    decode_head,
    decode_or_none,
    encode_head,
    head_key,
    key_tag,
    part_spans,
)

logger = logging.getLogger(__name__)

# Payload per round trip. redis-py buffers a pipeline's whole reply, and Redis counts its
# output buffers against maxmemory: this bounds both.
PIPELINE_BYTES = 32 * 2**20
PART_TTL_SLACK_S = 60
BACKOFF_S = (0.5, 30.0)  # first and longest wait before retrying a server that is down


Client = redis.Redis | RedisCluster
# A server that cannot be reached or has no quorum: the whole call is a miss.
_UNREACHABLE = (rx.ConnectionError, rx.TimeoutError, rx.ClusterError, rx.RedisClusterException)


# -- up/down -----------------------------------------------------------------------
class _Link:
    """Whether the server is worth asking: up, or down until a backoff deadline.

    Thread-safe. While down, :meth:`ready` lets one caller through per deadline to probe.
    """

    def __init__(self, url: str, backoff_s: tuple[float, float]):
        self.url = url
        self._first_s, self._max_s = backoff_s
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._wait_s = 0.0

    def ready(self) -> bool:
        with self._lock:
            if self._down_since is None:
                return True
            now = time.monotonic()
            if now < self._retry_at:
                return False
            self._retry_at = now + self._wait_s  # the others keep missing while we probe
            return True

    def failed(self, cause: str) -> None:
        with self._lock:
            now = time.monotonic()
            went_down = self._down_since is None
            if went_down:
                self._down_since, self._wait_s = now, self._first_s
            else:
                self._wait_s = min(self._wait_s * 2, self._max_s)
            self._retry_at = now + self._wait_s
        if went_down:
            logger.warning(
                "remote tier: %s unreachable (%s); lookups miss and saves are "
                "dropped until it is back",
                self.url,
                cause,
            )

    def succeeded(self) -> None:
        with self._lock:
            if self._down_since is None:
                return
            down_s, self._down_since = time.monotonic() - self._down_since, None
        logger.info("remote tier: %s is back after %.1f s", self.url, down_s)


@dataclass(slots=True)
class _Read:
    key: StoreKey
    head: RemoteHead
    block: HostBlock
    missing: bool = False  # a part was gone: evicted or expired by the server
    problem: str | None = None  # why the bytes are corrupt
    failed: bool = False  # the server answered a part with an error


class RedisStore(Store):
    """Thread-safe: redis-py's pool gives each call its own connection.

    ``connect`` builds the client on first use (see :func:`open_remote`); it must set
    bounded timeouts and no retries, since a failure here is a miss, not a wait.
    ``url`` is only for logs and ``repr`` and is redacted. Gauges (``used_bytes``,
    ``entries``) stay 0: the server is shared and counting it would cost a round trip.
    """

    name = "remote"

    def __init__(
        self,
        connect: Callable[[], Client],
        url: str,
        *,
        part_bytes: int = 32 * 2**20,
        ttl_s: int | None = None,
        buffers: BufferSource | None = None,
        backoff_s: tuple[float, float] = BACKOFF_S,
        secrets: Sequence[str] = (),
    ):
        if not 0 < part_bytes <= MAX_PART_BYTES:
            raise ValueError(
                f"remote part size {part_bytes} out of range; use at most {MAX_PART_BYTES} "
                "(Redis' proto-max-bulk-len), e.g. 32 MiB"
            )
        self.url = redact_url(url)
        self.part_bytes = part_bytes
        self.ttl_s = ttl_s
        self.buffers = buffers
        self._connect = connect
        self._client: Client | None = None
        self._secrets = tuple(s for s in secrets if s)
        self._heap = HeapMemory()
        self._lock = threading.Lock()
        self._counters = Counters(self.name)
        self._link = _Link(self.url, backoff_s)
        self._warned: set[str] = set()  # kinds of server error already logged
        self._refusing = False  # the server refused writes last time we tried

    def __repr__(self) -> str:
        return f"RedisStore(url={self.url!r}, part_bytes={self.part_bytes}, ttl_s={self.ttl_s})"

    # -- Store -------------------------------------------------------------------
    def contains(self, keys: Sequence[StoreKey]) -> list[bool]:
        found = [False] * len(keys)
        if keys and self._link.ready():
            results = self._round_trip([("EXISTS", head_key(k)) for k in keys])
            for i, result in enumerate(results or ()):
                found[i] = self._answer(result, "lookup") == 1
        self._counters.add(lookups=len(keys), lookup_hits=sum(found))
        return found

    def get(self, keys: Sequence[StoreKey]) -> list[Entry | None]:
        out: list[Entry | None] = [None] * len(keys)
        if keys and self._link.ready():
            reads = self._read_heads(keys)
            if reads:
                self._read_payloads(reads, out)
        hits = [e for e in out if e is not None]
        self._counters.add(
            hits=len(hits), misses=len(out) - len(hits), bytes_read=sum(e.nbytes for e in hits)
        )
        return out

    def put(self, entries: Sequence[Entry]) -> int:
        if not entries:
            return 0
        if not self._link.ready():
            self._counters.add(write_failures=len(entries))
            return 0
        results = self._round_trip([("EXISTS", head_key(e.key)) for e in entries])
        if results is None:
            self._counters.add(write_failures=len(entries))
            return 0
        present = [self._answer(r, "lookup") == 1 for r in results]
        self._counters.add(write_skips=sum(present))
        return sum(present) + self._write([e for e, p in zip(entries, present) if not p])

    def delete(self, keys: Sequence[StoreKey]) -> int:
        if not keys or not self._link.ready():
            return 0
        raw_heads = self._round_trip([("GET", head_key(k)) for k in keys])
        victims: list[tuple[StoreKey, RemoteHead | None]] = []
        for key, raw in zip(keys, raw_heads or ()):
            raw = self._answer(raw, "read")
            if raw is not None:
                victims.append((key, decode_or_none(raw)))
        return self._remove(victims)

    def stats(self) -> StoreStats:
        return self._counters.snapshot()

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- reading -----------------------------------------------------------------
    def _read_heads(self, keys: Sequence[StoreKey]) -> list[tuple[int, _Read]]:
        """Fetch and check the heads; allocate a buffer for each good one."""
        raw_heads = self._round_trip([("GET", head_key(k)) for k in keys])
        reads, bad = [], []
        for i, (key, raw) in enumerate(zip(keys, raw_heads or ())):
            raw = self._answer(raw, "read")
            if raw is None:
                continue
            try:
                head = decode_head(raw)
                if head.header.key != key:
                    raise CorruptEntry("entry is filed under another key")
            except CorruptEntry as exc:
                self._corrupt(key, exc)
                bad.append((key, None))
                continue
            reads.append((i, _Read(key, head, self._buffer(head.header.payload_bytes))))
        self._remove(bad)
        return reads

    def _read_payloads(self, reads: list[tuple[int, _Read]], out: list[Entry | None]) -> None:
        jobs = [(read, *part) for _, read in reads for part in read.head.parts()]
        reached = True
        for batch in _batches(jobs, lambda job: job[3], PIPELINE_BYTES):
            results = self._round_trip([("GET", job[1]) for job in batch])
            if results is None:
                reached = False
                break
            for (read, _, offset, nbytes), data in zip(batch, results):
                if isinstance(data, Exception):
                    read.failed = self._answer(data, "read") is None
                else:
                    _land(read, offset, nbytes, data)
        bad: list[tuple[StoreKey, RemoteHead | None]] = []
        for i, read in reads:
            out[i] = self._finish(read) if reached else None
            if out[i] is None:
                self._give_back(read.block)
                if reached and (read.missing or read.problem):
                    bad.append((read.key, read.head))
        self._remove(bad)

    def _finish(self, read: _Read) -> Entry | None:
        if read.failed:
            return None
        if read.missing:
            # The server evicted or expired part of it; the remnants go too.
            self._counters.add(evictions=1)
            return None
        try:
            if read.problem:
                raise CorruptEntry(read.problem)
            check_payload(read.head.header, read.block.view)
        except CorruptEntry as exc:
            read.problem = str(exc)
            self._corrupt(read.key, exc)
            return None
        return entry_from(read.head.header, read.block.view, read.block)

    def _buffer(self, nbytes: int) -> HostBlock:
        block = self.buffers.allocate(nbytes) if self.buffers is not None else None
        return block if block is not None else self._heap.alloc(nbytes)

    def _give_back(self, block: HostBlock) -> None:
        if block.memory is self._heap:
            self._heap.free(block)
        elif self.buffers is not None:
            self.buffers.discard(block)

    # -- writing -----------------------------------------------------------------
    def _write(self, entries: list[Entry]) -> int:
        """Store entries known to be absent; returns how many are now present."""
        stored = skipped = failed = 0
        stop = False  # unreachable or full: send no more bytes this call
        for batch in _batches(entries, lambda e: e.nbytes, PIPELINE_BYTES):
            plans = [] if stop else [self._write_commands(entry) for entry in batch]
            results = self._round_trip([cmd for plan in plans for cmd in plan]) if plans else None
            if results is None:
                failed += len(batch)
                stop = True
                continue
            cleanup: list[tuple] = []
            for entry, plan in zip(batch, plans):
                answers, results = results[: len(plan)], results[len(plan) :]
                if not any(isinstance(a, Exception) for a in answers) and answers[-1]:
                    stored += 1
                    self._counters.add(bytes_written=entry.nbytes)
                    continue
                # Remove our parts (and our head, if it got in before a part failed).
                cleanup.append(("DEL", *(cmd[1] for cmd in plan[:-1])))
                refusal = next((a for a in answers if isinstance(a, Exception)), None)
                if refusal is None:  # another writer's head won: the entry is there
                    skipped += 1
                    continue
                self._refused(refusal)
                failed += 1
                stop = True
                if answers[-1] is True:
                    cleanup.append(("DEL", plan[-1][1]))
            if cleanup:
                self._round_trip(cleanup)
        with self._lock:
            recovered = bool(stored) and self._refusing
            self._refusing = self._refusing and not stored
        if recovered:
            logger.info("remote tier: %s accepts writes again", self.url)
        self._counters.add(writes=stored, write_skips=skipped, write_failures=failed)
        return stored + skipped

    def _write_commands(self, entry: Entry) -> list[tuple]:
        """Parts first, then the head with NX: a visible head has its parts."""
        nonce = os.urandom(NONCE_BYTES)
        payload = entry.payload.cast("B") if entry.payload.format != "B" else entry.payload
        part_ttl = () if self.ttl_s is None else ("EX", self.ttl_s + PART_TTL_SLACK_S)
        head_ttl = () if self.ttl_s is None else ("EX", self.ttl_s)
        commands: list[tuple] = [
            ("SET", key, payload[offset : offset + nbytes], *part_ttl)
            for key, offset, nbytes in part_spans(entry.key, nonce, entry.nbytes, self.part_bytes)
        ]
        commands.append(
            (
                "SET",
                head_key(entry.key),
                encode_head(entry, self.part_bytes, nonce),
                "NX",
                *head_ttl,
            )
        )
        return commands

    # -- removing ----------------------------------------------------------------
    def _remove(self, victims: Sequence[tuple[StoreKey, RemoteHead | None]]) -> int:
        """Delete heads and their parts (found by SCAN where the head is unreadable).
        Returns how many heads were deleted."""
        if not victims:
            return 0
        commands: list[tuple] = [("DEL", head_key(key)) for key, _ in victims]
        for key, head in victims:
            parts = [p[0] for p in head.parts()] if head is not None else self._scan_parts(key)
            if parts:
                commands.append(("DEL", *parts))
        results = self._round_trip(commands) or []
        return sum(self._answer(r, "delete") == 1 for r in results[: len(victims)])

    def _scan_parts(self, key: StoreKey) -> list[bytes]:
        try:
            found = self.client().scan_iter(match=f"{key_tag(key)}:*", count=1000)
            return [k for k in found if not k.endswith(b":h")]
        except _UNREACHABLE as exc:
            self._unreachable(exc)
            return []

    # -- failures ----------------------------------------------------------------
    def _round_trip(self, commands: Sequence[tuple]) -> list | None:
        """One pipelined round trip; ``None`` when the server is unreachable (counted).
        A command the server rejected answers with its exception instance."""
        try:
            pipe = self.client().pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            results = pipe.execute(raise_on_error=False)
        except _UNREACHABLE as exc:
            self._unreachable(exc)
            return None
        except rx.ResponseError as exc:  # the pipeline as a whole was refused
            self._answer(exc, "pipeline")
            return None
        lost = next((r for r in results if isinstance(r, _UNREACHABLE)), None)
        if lost is not None:  # the cluster pipeline reports some per command
            self._unreachable(lost)
            return None
        self._link.succeeded()
        return results

    def client(self) -> Client:
        """The redis-py client (made on first use); for admin tools that scan keys."""
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _answer(self, result, what: str):
        """``result``, or ``None`` (counted and logged once) if the server rejected it."""
        if not isinstance(result, Exception):
            return result
        self._counters.add(errors=1)
        with self._lock:
            first = what not in self._warned
            self._warned.add(what)
        if first:
            logger.warning(
                "remote tier: %s rejected a %s: %s", self.url, what, self._scrub(result)
            )
        return None

    def _unreachable(self, exc: Exception) -> None:
        timeout = isinstance(exc, rx.TimeoutError)
        self._counters.add(errors=1, timeouts=int(timeout))
        self._link.failed(self._scrub(exc))

    def _refused(self, exc: Exception) -> None:
        self._counters.add(errors=1)
        with self._lock:
            first, self._refusing = not self._refusing, True
        if first:
            logger.warning(
                "remote tier: %s refuses writes (%s); saves are dropped until it "
                "accepts them",
                self.url,
                self._scrub(exc),
            )

    def _corrupt(self, key: StoreKey, exc: CorruptEntry) -> None:
        self._counters.add(corrupt=1)
        logger.warning(
            "remote tier: removing corrupt entry %s: %s", head_key(key).decode(), exc
        )

    def _scrub(self, exc: Exception) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _land(read: _Read, offset: int, nbytes: int, data: bytes | None) -> None:
    """Copy one part into the entry's buffer, or note why it cannot be."""
    if read.missing or read.problem or read.failed:
        return
    if data is None:
        read.missing = True
    elif len(data) != nbytes:
        read.problem = f"part at {offset} is {len(data)} bytes, expected {nbytes}"
    else:
        read.block.view[offset : offset + nbytes] = data


def _batches(items: Sequence, size: Callable, limit: int) -> Iterator[list]:
    """Consecutive runs of ``items`` of at most ``limit`` total size (at least one each)."""
    batch: list = []
    total = 0
    for item in items:
        if batch and total + size(item) > limit:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size(item)
    if batch:
        yield batch
