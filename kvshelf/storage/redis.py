"""The remote tier: Redis or Valkey, standalone or cluster, through redis-py.

Entries are laid out as a head and payload parts (:mod:`kvshelf.storage.redis_layout`).
A writer stores its parts under a fresh nonce and then the head with ``SET NX``: a
reader that sees a head finds whole parts, and of two writers racing on one key the
loser removes its parts. :func:`kvshelf.storage.redis_connect.open_remote` opens one
from a URL.

Failure is a miss. A connection error or timeout marks the server down: calls answer
at once (miss, or save dropped and counted) until a backoff deadline (0.5 s doubling to
30 s), when one call tries again. One WARNING when the server goes, one INFO when it is
back. In a cluster that server is one master (:mod:`kvshelf.storage.redis_nodes`): only
the keys in its slots miss, and they hit again once a replica takes over. A write the
server refuses (``maxmemory`` with ``noeviction``, a read-only replica) is dropped and
counted. Every read is checked (header, key, sizes, payload checksum); a bad entry is
removed and counted as ``corrupt``.

The timeout bounds connecting, each wait for a reply, and each part's send as a whole
(Python's ``sendall``): keep ``part_bytes`` well under bandwidth x timeout.

One call moves its parts over ``connections`` connections at once, from a thread pool
the store's calls share: a load GETs each part straight into its entry's buffer
(:func:`kvshelf.storage.redis_connect.get_into`), a save SETs them, and the thread that
lands an entry's last part checks the entry, or computes its head, while the others
move bytes; then a save sends the heads. Socket waits, the kernel's copies into place
and checksums release the GIL, so the threads run in parallel.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
from redis import exceptions as rx
from redis.cluster import RedisCluster

from kvshelf.codec import CorruptEntry, Entry, check_payload, entry_from
from kvshelf.config import redact_url
from kvshelf.keys import StoreKey
from kvshelf.storage.base import BufferSource, Counters, HeapMemory, HostBlock, Store, StoreStats
from kvshelf.storage.redis_connect import CallThreads, batches, get_into
from kvshelf.storage.redis_layout import (
    MAX_PART_BYTES,
    NONCE_BYTES,
    RemoteHead,
    decode_head,
    decode_or_none,
    head_command,
    head_key,
    key_tag,
    part_commands,
    part_spans,
)
from kvshelf.storage.redis_nodes import CLUSTER_ANSWERS, DOWN, UNREACHABLE, Halt, NodeRoute, Nodes

logger = logging.getLogger(__name__)

# Payload in flight per call, over all its connections. Redis counts its output buffers
# against maxmemory, and redis-py buffers a pipeline's whole reply: this bounds both.
PIPELINE_BYTES = 32 * 2**20
CONNECTIONS = 4  # per call; see benchmarks/redis_tier.py
BACKOFF_S = (0.5, 30.0)  # first and longest wait before retrying a server that is down


Client = redis.Redis | RedisCluster


@dataclass(slots=True)
class _Read:
    """One entry being loaded. Parts land from several threads; the one that counts the
    last part down checks the entry (see :meth:`RedisStore._part_read`)."""

    key: StoreKey
    head: RemoteHead
    block: HostBlock
    parts_left: int
    missing: bool = False  # a part was gone: evicted or expired by the server
    problem: str | None = None  # why the bytes are corrupt
    failed: bool = False  # a part did not come: server error, unreachable, call stopped
    finished: bool = False
    entry: Entry | None = None  # once finished: the checked entry, or None (a miss)


@dataclass(slots=True)
class _Save:
    """One entry being stored. Parts go from several threads; the one that counts the
    last part down makes the head (see :meth:`RedisStore._part_saved`)."""

    entry: Entry
    nonce: bytes
    parts_left: int = 0
    landed: bool = True  # no part failed so far
    head: tuple | None = None  # SET NX of the head, made once every part landed


class RedisStore(Store):
    """Thread-safe: redis-py's pool gives each round trip its own connection.

    ``connect`` builds the client on first use (see :func:`open_remote`); it must set
    bounded timeouts and no retries, since a failure here is a miss, not a wait. One
    ``get`` or ``put`` uses up to ``connections`` connections at once: its own thread
    and helpers from a pool that all calls share (1: its own thread only). ``url`` is
    only for logs and ``repr`` and is redacted. Gauges (``used_bytes``, ``entries``)
    stay 0: the server is shared and counting it would cost a round trip.
    """

    name = "remote"

    def __init__(
        self,
        connect: Callable[[], Client],
        url: str,
        *,
        part_bytes: int = 32 * 2**20,
        ttl_s: int | None = None,
        connections: int = CONNECTIONS,
        buffers: BufferSource | None = None,
        backoff_s: tuple[float, float] = BACKOFF_S,
        secrets: Sequence[str] = (),
    ):
        if not 0 < part_bytes <= MAX_PART_BYTES:
            raise ValueError(
                f"remote part size {part_bytes} out of range; use at most {MAX_PART_BYTES} "
                "(Redis' proto-max-bulk-len), e.g. 32 MiB"
            )
        if connections < 1:
            raise ValueError(f"remote connections {connections}: use at least 1, e.g. 4")
        self.url = redact_url(url)
        self.part_bytes = part_bytes
        self.ttl_s = ttl_s
        self.connections = connections
        self.buffers = buffers
        self._connect = connect
        self._client: Client | None = None
        self._threads = CallThreads(connections, "kvshelf-remote")
        # Each task of a call moves at most this much: the call's total stays PIPELINE_BYTES.
        self._task_bytes = max(1, PIPELINE_BYTES // connections)
        self._secrets = tuple(s for s in secrets if s)
        self._heap = HeapMemory()
        self._lock = threading.Lock()
        self._parts_lock = threading.Lock()  # parts left to count, of every call
        self._counters = Counters(self.name)
        self._nodes = Nodes(self.url, backoff_s, self.client, self._threads, self._count_lost)
        self._warned: set[str] = set()  # kinds of server error already logged
        self._refusing = False  # the server refused writes last time we tried

    def __repr__(self) -> str:
        return (
            f"RedisStore(url={self.url!r}, part_bytes={self.part_bytes}, ttl_s={self.ttl_s}, "
            f"connections={self.connections})"
        )

    # -- Store -------------------------------------------------------------------
    def contains(self, keys: Sequence[StoreKey]) -> list[bool]:
        found = [False] * len(keys)
        if keys:
            results = self._nodes.round_trip([("EXISTS", head_key(k)) for k in keys])
            for i, result in enumerate(results):
                found[i] = self._answer(result, "lookup") == 1
        self._counters.add(lookups=len(keys), lookup_hits=sum(found))
        return found

    def get(self, keys: Sequence[StoreKey]) -> list[Entry | None]:
        out: list[Entry | None] = [None] * len(keys)
        if keys:
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
        results = self._nodes.round_trip([("EXISTS", head_key(e.key)) for e in entries])
        found = [self._answer(r, "lookup") for r in results]
        absent = [e for e, n in zip(entries, found) if n == 0]
        present = sum(n == 1 for n in found)
        # Where the server is down or answered with an error, nothing is sent.
        self._counters.add(write_skips=present, write_failures=len(entries) - present - len(absent))
        return present + self._write(absent)

    def delete(self, keys: Sequence[StoreKey]) -> int:
        if not keys:
            return 0
        raw_heads = self._nodes.round_trip([("GET", head_key(k)) for k in keys])
        victims: list[tuple[StoreKey, RemoteHead | None]] = []
        for key, raw in zip(keys, raw_heads):
            raw = self._answer(raw, "read")
            if raw is not None:
                victims.append((key, decode_or_none(raw)))
        return self._remove(victims)

    def stats(self) -> StoreStats:
        return self._counters.snapshot()

    def close(self) -> None:
        self._nodes.close()
        with self._lock:
            client, self._client = self._client, None
        self._threads.shutdown()
        if client is not None:
            client.close()

    # -- reading -----------------------------------------------------------------
    def _read_heads(self, keys: Sequence[StoreKey]) -> list[tuple[int, _Read]]:
        """Fetch and check the heads; allocate a buffer for each good one."""
        raw_heads = self._nodes.round_trip([("GET", head_key(k)) for k in keys])
        reads, bad = [], []
        for i, (key, raw) in enumerate(zip(keys, raw_heads)):
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
            block = self._buffer(head.header.payload_bytes, key)
            reads.append((i, _Read(key, head, block, parts_left=len(head.parts()))))
        self._remove(bad)
        return reads

    def _read_payloads(self, reads: list[tuple[int, _Read]], out: list[Entry | None]) -> None:
        """Fetch every part straight into its entry's buffer, spread over the connections;
        each entry is checked as soon as its last part is in."""
        jobs = [(read, *part) for _, read in reads for part in read.head.parts()]
        halt = Halt()
        groups, unsent = self._nodes.group(jobs, lambda job: job[1], halt)
        for read, *_ in unsent:  # its server is down: never checked, a miss
            read.failed = True
        tasks = [
            (route, batch, halt)
            for route, group in groups
            for batch in batches(group, lambda job: job[3], self._task_bytes)
        ]
        self._threads.run(self._fetch, tasks)
        bad: list[tuple[StoreKey, RemoteHead | None]] = []
        for i, read in reads:
            if not read.finished:  # no parts, or parts never sent for
                read.entry = self._finish(read)
            out[i] = read.entry
            if read.entry is None:
                self._give_back(read.block)
                if read.missing or read.problem:  # broken on the server, not just not read
                    bad.append((read.key, read.head))
        self._remove(bad)

    def _fetch(self, task: tuple[NodeRoute, list, Halt]) -> None:
        """One round trip of part GETs, each landing in its entry's buffer."""
        route, jobs, halt = task
        lost = halt.stopped or halt.lost(route.link)
        answers = None if lost else self._get_into(route, jobs, halt)
        for n, (read, _, offset, nbytes) in enumerate(jobs):
            if answers is None:
                read.failed = True
            elif isinstance(answers[n], Exception):  # e.g. MOVED while a failover settles
                read.failed = self._answer(answers[n], "read") is None
            else:
                _land(read, offset, nbytes, answers[n])
            self._part_read(read)

    def _get_into(self, route: NodeRoute, jobs: list, halt: Halt) -> list | None:
        """:func:`get_into` on one of the node's connections; ``None`` where the node is
        unreachable (counted)."""
        pool = route.client.connection_pool
        try:
            connection = pool.get_connection()
            try:
                views = [read.block.view[offset : offset + n] for read, _, offset, n in jobs]
                answers = get_into(connection, [job[1] for job in jobs], views)
            finally:
                pool.release(connection)
        except UNREACHABLE as exc:
            self._nodes.lost(exc, route.link, halt)
            return None
        route.link.succeeded()
        return answers

    def _part_read(self, read: _Read) -> None:
        with self._parts_lock:
            read.parts_left -= 1
            last = read.parts_left == 0
        if last:  # checked here, while other threads still fetch: the sums overlap the I/O
            read.entry = self._finish(read)

    def _finish(self, read: _Read) -> Entry | None:
        read.finished = True
        if read.missing:
            # The server evicted or expired part of it; the remnants go too.
            self._counters.add(evictions=1)
            return None
        try:
            if read.problem:
                raise CorruptEntry(read.problem)
            if read.failed:
                return None
            check_payload(read.head.header, read.block.view)
        except CorruptEntry as exc:
            read.problem = str(exc)
            self._corrupt(read.key, exc)
            return None
        return entry_from(read.head.header, read.block.view, read.block)

    def _buffer(self, nbytes: int, key: StoreKey) -> HostBlock:
        # The key tells a shared memory tier whose memory (pinned KV, heap encoder) to use.
        block = self.buffers.allocate(nbytes, key) if self.buffers is not None else None
        return block if block is not None else self._heap.alloc(nbytes)

    def _give_back(self, block: HostBlock) -> None:
        if block.memory is self._heap:
            self._heap.free(block)
        elif self.buffers is not None:
            self.buffers.discard(block)

    # -- writing -----------------------------------------------------------------
    def _write(self, entries: list[Entry]) -> int:
        """Store entries known to be absent; returns how many are now present. Parts
        first, spread over the connections, then the heads of entries whose parts all
        landed: a visible head has its parts."""
        saves = [_Save(entry, os.urandom(NONCE_BYTES)) for entry in entries]
        jobs = [(save, command) for save in saves for command in self._part_commands(save)]
        halt = Halt()
        groups, unsent = self._nodes.group(jobs, lambda job: job[1][1], halt)
        for save, _ in unsent:  # its server is down
            self._part_saved(save, False)
        tasks = [
            (route, batch, halt)
            for route, group in groups
            for batch in batches(group, _part_bytes, self._task_bytes)
        ]
        self._threads.run(self._send_parts, tasks)
        for save in saves:
            if save.landed and save.head is None:  # an entry of no parts
                save.head = self._head_command(save)
        complete = [(save, save.head) for save in saves if save.head is not None]
        answers = self._nodes.round_trip([head for _, head in complete], halt) if complete else []
        stored = skipped = 0
        leftovers = [save for save in saves if save.head is None]
        for (save, _), answer in zip(complete, answers):
            if answer is True:
                stored += 1
                self._counters.add(bytes_written=save.entry.nbytes)
                continue
            leftovers.append(save)
            if answer is None:  # another writer's head won: the entry is there
                skipped += 1
            elif isinstance(answer, CLUSTER_ANSWERS):
                self._answer(answer, "write")
            elif answer is not DOWN:
                self._refused(answer)
        if leftovers:  # remove our parts, where their server is still up
            self._nodes.round_trip([("DEL", *self._part_keys(s)) for s in leftovers], halt)
        with self._lock:
            recovered = bool(stored) and self._refusing
            self._refusing = self._refusing and not stored
        if recovered:
            logger.info("remote tier: %s accepts writes again", self.url)
        failed = len(saves) - stored - skipped
        self._counters.add(writes=stored, write_skips=skipped, write_failures=failed)
        return stored + skipped

    def _send_parts(self, task: tuple[NodeRoute, list, Halt]) -> None:
        """One round trip of part SETs to one node."""
        route, jobs, halt = task
        if halt.stopped or halt.lost(route.link):
            results = [DOWN] * len(jobs)
        else:
            results = self._nodes.send(route, [job[1] for job in jobs], halt)
        errors = [r for r in results if isinstance(r, Exception)]
        refusal = next((r for r in errors if not isinstance(r, CLUSTER_ANSWERS)), None)
        if refusal is not None:  # full or read-only: send no more bytes this call
            halt.stop()
            self._refused(refusal)
        for error in errors:
            if isinstance(error, CLUSTER_ANSWERS):  # e.g. CLUSTERDOWN: a miss, not a refusal
                self._answer(error, "write")
        for n, (save, _) in enumerate(jobs):
            self._part_saved(save, results[n] is True)

    def _part_saved(self, save: _Save, landed: bool) -> None:
        with self._parts_lock:
            save.landed &= landed
            save.parts_left -= 1
            last = save.parts_left == 0 and save.landed
        if last:  # its checksum runs here, while other threads still send
            save.head = self._head_command(save)

    def _part_commands(self, save: _Save) -> list[tuple]:
        commands = part_commands(save.entry, save.nonce, self.part_bytes, self.ttl_s)
        save.parts_left = len(commands)
        return commands

    def _head_command(self, save: _Save) -> tuple:
        return head_command(save.entry, save.nonce, self.part_bytes, self.ttl_s)

    def _part_keys(self, save: _Save) -> list[bytes]:
        spans = part_spans(save.entry.key, save.nonce, save.entry.nbytes, self.part_bytes)
        return [key for key, _, _ in spans]

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
        results = self._nodes.round_trip(commands)
        return sum(self._answer(r, "delete") == 1 for r in results[: len(victims)])

    def _scan_parts(self, key: StoreKey) -> list[bytes]:
        try:
            found = self.client().scan_iter(match=f"{key_tag(key)}:*", count=1000)
            return [k for k in found if not k.endswith(b":h")]
        except UNREACHABLE as exc:
            # A cluster's SCAN asks every master: one lost says nothing of the others.
            cluster = isinstance(self._client, RedisCluster)
            self._nodes.lost(exc, None if cluster else self._nodes.main)
            return []

    # -- failures ----------------------------------------------------------------
    def client(self) -> Client:
        """The redis-py client (made on first use); for admin tools that scan keys."""
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _answer(self, result, what: str):
        """``result``, or ``None`` (counted and logged once) if the server rejected it;
        ``None`` (counted where it was lost) if its server is down."""
        if result is DOWN:
            return None
        if not isinstance(result, Exception):
            return result
        if isinstance(result, rx.MovedError):  # the slot map is stale: a miss this time
            self._nodes.ask_refresh()
        self._counters.add(errors=1)
        with self._lock:
            first = what not in self._warned
            self._warned.add(what)
        if first:
            logger.warning("remote tier: %s rejected a %s: %s", self.url, what, self._scrub(result))
        return None

    def _count_lost(self, exc: Exception) -> str:
        """Count a round trip that did not come back; its cause, for the log."""
        self._counters.add(errors=1, timeouts=int(isinstance(exc, rx.TimeoutError)))
        return self._scrub(exc)

    def _refused(self, exc: Exception) -> None:
        self._counters.add(errors=1)
        with self._lock:
            first, self._refusing = not self._refusing, True
        if first:
            logger.warning(
                "remote tier: %s refuses writes (%s); saves are dropped until it accepts them",
                self.url,
                self._scrub(exc),
            )

    def _corrupt(self, key: StoreKey, exc: CorruptEntry) -> None:
        self._counters.add(corrupt=1)
        logger.warning("remote tier: removing corrupt entry %s: %s", head_key(key).decode(), exc)

    def _scrub(self, exc: Exception) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _land(read: _Read, offset: int, nbytes: int, found: int | None) -> None:
    """Note a part that did not land whole: ``found`` is the value's length or ``None``."""
    if found is None:
        read.missing = True
    elif found != nbytes:
        read.problem = f"part at {offset} is {found} bytes, expected {nbytes}"


def _part_bytes(job: tuple[_Save, tuple]) -> int:
    return job[1][2].nbytes  # ("SET", key, view, ...)
