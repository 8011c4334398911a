"""Scheduler -> worker lookups.

vLLM asks the scheduler how many prompt tokens the connector can supply, but the bytes
(and the memory tier) live with the workers, possibly in other processes. So the
scheduler asks each worker. A worker answers with the longest prefix it has *read and
verified* into memory and pinned for the coming load (prefetch mode), or the longest
prefix that exists (prefetch off). A lookup that needs disk or remote reads runs in the
background; until it finishes the answer is "pending" and vLLM asks again next step.

Transport: a worker in this process is called directly; otherwise a Unix socket with
length-prefixed msgpack frames (no pickle). Any transport failure is a miss.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Protocol

import msgpack

from kvshelf.engine import CacheEngine
from kvshelf.keys import CheckDigest, Chunk, ChunkKey, ChunkPlan

logger = logging.getLogger(__name__)

PENDING = -1  # a lookup answer: still reading, ask again
_FRAME = struct.Struct("<I")
_MAX_FRAME = 64 * 2**20
_LOCAL: dict[str, Answerer] = {}  # address -> worker endpoint in this process
_LOCAL_LOCK = threading.Lock()


def socket_path(engine_id: str, rank: int) -> str:
    """Where rank ``rank`` of engine ``engine_id`` listens."""
    return os.path.join(tempfile.gettempdir(), f"kvshelf-{engine_id}-r{rank}.sock")


class Answerer(Protocol):
    """What a :class:`LookupServer` serves: :class:`WorkerLookup`, or the encoder
    cache's lookup (:class:`kvshelf.encoder_cache.EncoderLookup`)."""

    def lookup(
        self, req_id: str, plan: ChunkPlan, wait_s: float, seconds_per_token: float | None = None
    ) -> int: ...


@dataclass
class _Job:
    keys: tuple[bytes, ...]
    future: Future
    released: bool = False


class WorkerLookup:
    """The worker's side: answers lookups from its engine. Thread-safe."""

    def __init__(
        self, engine: CacheEngine, prefetch: bool, threads: int = 2, needs_state: bool = False
    ):
        self.engine = engine
        self.prefetch = prefetch
        self.needs_state = needs_state  # a hit must end where a recurrent state was stored
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvshelf-prefetch")
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()

    def lookup(
        self, req_id: str, plan: ChunkPlan, wait_s: float, seconds_per_token: float | None = None
    ) -> int:
        """Hit length in tokens, or :data:`PENDING`. Idempotent per request. With the
        model's prefill speed, only what loads faster than it recomputes is a hit."""
        if not self.prefetch:
            located = self.engine.paced_hit(plan, self.needs_state, seconds_per_token)
            return located[-1].end if located else 0
        keys = tuple(c.key for c in plan.full) + tuple(c.key for c in plan.cuts)
        with self._lock:
            job = self._jobs.get(req_id)
            if job is None or job.keys != keys:
                job = _Job(keys, self._pool.submit(self._fetch, req_id, plan, seconds_per_token))
                self._jobs[req_id] = job
        try:
            return job.future.result(timeout=wait_s)
        except FutureTimeout:
            return PENDING

    def _fetch(self, req_id: str, plan: ChunkPlan, seconds_per_token: float | None) -> int:
        hold = self.engine.fetch_plan(plan, req_id, self.needs_state, seconds_per_token)
        with self._lock:
            job = self._jobs.get(req_id)
            orphan = job is None or job.released
        if orphan:  # released while we were reading: drop the pins at once
            hold.release()
        return hold.num_tokens

    def release(self, req_id: str) -> None:
        """Forget a request's lookup and unpin what it held."""
        with self._lock:
            job = self._jobs.pop(req_id, None)
            if job is not None:
                job.released = True
        self.engine.release(req_id)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class LookupServer:
    """Serves a :class:`WorkerLookup` on a Unix socket (and to this process directly)."""

    def __init__(self, worker: Answerer, address: str):
        self.worker = worker
        self.address = address
        with _LOCAL_LOCK:
            _LOCAL[address] = worker
        if os.path.exists(address):
            os.unlink(address)  # left by a dead process of the same engine id
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(address)
        self._sock.listen(16)
        self._closed = False
        threading.Thread(target=self._accept, name="kvshelf-lookup", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    request = _recv(conn)
                except (OSError, ValueError):
                    return
                if request is None:
                    return
                try:
                    _send(conn, self._answer(request))
                except OSError:
                    return

    def _answer(self, request: dict) -> dict:
        # Releases reach the worker through vLLM's connector metadata, not this socket.
        if request.get("op") != "lookup":
            return {"error": f"unknown op {request.get('op')!r}"}
        plan = _plan_from_wire(request)
        spt = request.get("spt")
        spt = float(spt) if isinstance(spt, (int, float)) and spt > 0 else None
        return {"tokens": self.worker.lookup(request["req"], plan, request["wait"], spt)}

    def close(self) -> None:
        self._closed = True
        with _LOCAL_LOCK:
            _LOCAL.pop(self.address, None)
        self._sock.close()
        try:
            os.unlink(self.address)
        except FileNotFoundError:
            pass


class LookupClient:
    """The scheduler's side: asks one worker. Failures are misses, logged once."""

    def __init__(self, address: str, timeout_s: float):
        self.address = address
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    def lookup(
        self, req_id: str, plan: ChunkPlan, wait_s: float, seconds_per_token: float | None = None
    ) -> int:
        local = _LOCAL.get(self.address)
        if local is not None:
            return local.lookup(req_id, plan, wait_s, seconds_per_token)
        request = {"op": "lookup", "req": req_id, "wait": wait_s, "spt": seconds_per_token}
        reply = self._call({**request, **_plan_to_wire(plan)})
        return int(reply.get("tokens", 0)) if reply else 0

    def _call(self, request: dict) -> dict | None:
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self._sock.settimeout(self.timeout_s)
                    self._sock.connect(self.address)
                self._sock.settimeout(self.timeout_s + float(request.get("wait", 0)))
                _send(self._sock, request)
                reply = _recv(self._sock)
            except (OSError, ValueError) as exc:
                self._drop(exc)
                return None
        if reply is None:
            self._drop(ConnectionError("worker closed the lookup connection"))
        return reply

    def _drop(self, exc: Exception) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if not self._warned:
            self._warned = True
            logger.warning("lookup at %s failed (%s); counting misses", self.address, exc)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _plan_to_wire(plan: ChunkPlan) -> dict:
    def rows(chunks):
        return [[c.start, c.end, c.key, c.check] for c in chunks]

    return {
        "n": plan.num_tokens,
        "cs": plan.chunk_size,
        "full": rows(plan.full),
        "cuts": rows(plan.cuts),
    }


def _plan_from_wire(message: dict) -> ChunkPlan:
    def chunks(rows):
        return tuple(
            Chunk(int(start), int(end), ChunkKey(bytes(key)), CheckDigest(bytes(check)))
            for start, end, key, check in rows
        )

    return ChunkPlan(
        int(message["n"]), int(message["cs"]), chunks(message["full"]), chunks(message["cuts"])
    )


def _send(conn: socket.socket, message: dict) -> None:
    body = msgpack.packb(message, use_bin_type=True)
    conn.sendall(_FRAME.pack(len(body)) + body)


def _recv(conn: socket.socket) -> dict | None:
    head = _recv_exact(conn, _FRAME.size)
    if head is None:
        return None
    (size,) = _FRAME.unpack(head)
    if size > _MAX_FRAME:
        raise ValueError(f"lookup frame of {size} bytes")
    body = _recv_exact(conn, size)
    if body is None:
        raise ValueError("lookup frame cut short")
    message = msgpack.unpackb(body, raw=False)
    if not isinstance(message, dict):
        raise ValueError("lookup frame is not a map")  # noqa: TRY004 - a bad frame
    return message


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    parts, got = [], 0
    while got < size:
        part = conn.recv(size - got)
        if not part:
            return None
        parts.append(part)
        got += len(part)
    return b"".join(parts)
