"""Connections of the remote tier: opening it from ``remote_url`` (standalone, TLS, unix
socket or cluster) and reading values straight into the buffers they belong in
(:func:`get_into`); a call's tasks spread over threads (:class:`CallThreads`). Whether
and where to ask is :mod:`kvshelf.storage.redis_nodes`."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote

import redis
from redis import exceptions as rx
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from kvshelf.config import KVShelfConfig, redact_url
from kvshelf.storage.base import BufferSource

if TYPE_CHECKING:  # the store imports this module for its reads
    from kvshelf.storage.redis import Client, RedisStore

T = TypeVar("T")
R = TypeVar("R")

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
RECV_BYTES = 64 * 2**10  # one read of reply lines; values go straight to their buffer


def open_remote(config: KVShelfConfig, buffers: BufferSource | None = None) -> RedisStore:
    """The remote tier ``config.remote_url`` names; connects on first use.

    ``redis://[user:password@]host:port/db``, ``rediss://`` (TLS: ``remote_ca_certs``,
    ``remote_certfile``, ``remote_keyfile``), ``unix:///path.sock?db=N`` and
    ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` for TLS). The
    password from ``config.password()`` overrides the URL's. Raises ``ValueError`` for
    a URL or setting that cannot work.
    """
    from kvshelf.storage.redis import RedisStore

    url = config.remote_url
    if not url:
        raise ValueError("remote_url is not set; e.g. remote_url: redis://cache:6379/0")
    password = config.password()
    if password is None and config.remote_password_env:
        raise ValueError(
            f"remote_password_env names {config.remote_password_env}, which is not set; "
            "export it or remove the setting"
        )
    scheme = url.partition("://")[0].lower()
    options: dict = {
        "socket_timeout": config.remote_timeout_s,
        "socket_connect_timeout": config.remote_timeout_s,
        "client_name": "kvshelf",
    }
    if scheme.startswith("rediss"):
        options.update(_tls_options(config))
    if scheme in CLUSTER_SCHEMES:
        connect = _cluster_connector(url, password, options)
    elif scheme in ("redis", "rediss", "unix"):
        connect = _standalone_connector(url, password, options)
    else:
        raise ValueError(
            f"remote_url {redact_url(url)!r}: unknown scheme {scheme!r}; use redis://, "
            "rediss://, unix:// or redis+cluster://"
        )
    secrets = [password or "", _url_password(url) or ""]
    return RedisStore(
        connect,
        url,
        part_bytes=int(config.remote_part_bytes),
        ttl_s=config.remote_ttl_s,
        connections=config.remote_connections,
        buffers=buffers,
        secrets=secrets,
    )


def _tls_options(config: KVShelfConfig) -> dict:
    files = {
        "ssl_ca_certs": config.remote_ca_certs,
        "ssl_certfile": config.remote_certfile,
        "ssl_keyfile": config.remote_keyfile,
    }
    for name, path in files.items():
        if path is not None and not path.is_file():
            raise ValueError(f"remote TLS file {path} ({name}) does not exist")
    return {name: str(path) for name, path in files.items() if path is not None}


def _standalone_connector(url: str, password: str | None, options: dict) -> Callable[[], Client]:
    kwargs = {**redis.connection.parse_url(url), **options}
    if password is not None:
        kwargs["password"] = password
    if kwargs.get("connection_class") is redis.UnixDomainSocketConnection:
        del kwargs["socket_connect_timeout"]  # a unix connect does not wait on a network
    # No retries: a failure is a miss at once, and the tier's backoff decides when to retry.
    pool = redis.ConnectionPool(retry=Retry(NoBackoff(), 0), **kwargs)
    return lambda: redis.Redis(connection_pool=pool)


def _cluster_connector(url: str, password: str | None, options: dict) -> Callable[[], Client]:
    scheme, _, rest = url.partition("://")
    creds, _, hosts = rest.rpartition("@")
    hosts, _, db = hosts.partition("/")
    if db not in ("", "0") or "?" in hosts:
        raise ValueError(f"remote_url {redact_url(url)!r}: a cluster has only db 0 and no options")
    nodes = []
    for host_port in hosts.split(","):
        host, sep, port = host_port.strip().rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"remote_url {redact_url(url)!r}: write cluster nodes as host:port")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    user, _, url_password = creds.partition(":") if creds else ("", "", "")
    kwargs = dict(options)
    if user:
        kwargs["username"] = unquote(user)
    if password is not None or url_password:
        kwargs["password"] = password if password is not None else unquote(url_password)
    if scheme.lower() == "rediss+cluster":
        kwargs["ssl"] = True
    return lambda: RedisCluster(startup_nodes=nodes, retry=Retry(NoBackoff(), 0), **kwargs)


def _url_password(url: str) -> str | None:
    creds = url.partition("://")[2].rpartition("@")[0]
    return unquote(creds.partition(":")[2]) if ":" in creds else None


# -- a call's threads ----------------------------------------------------------
class CallThreads:
    """Runs one call's tasks on the calling thread and up to ``count - 1`` helper threads
    that every call shares (started on first use). The calling thread works through the
    tasks too, so a call moves on even while other calls keep every helper busy."""

    def __init__(self, count: int, name: str) -> None:
        self.count = count
        self._name = name
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def run(self, task: Callable[[T], R], tasks: Sequence[T]) -> list[R | None]:
        """``task`` over ``tasks``, results in order."""
        if len(tasks) <= 1 or self.count == 1:
            return [task(t) for t in tasks]
        results: list[R | None] = [None] * len(tasks)
        todo = iter(range(len(tasks)))  # next() on it is atomic: a C iterator, under the GIL

        def work() -> None:
            for i in todo:
                results[i] = task(tasks[i])

        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.count - 1, self._name)
            helpers = [self._pool.submit(work) for _ in range(min(self.count, len(tasks)) - 1)]
        work()
        for helper in helpers:
            helper.result()
        return results

    def shutdown(self) -> None:
        """Stop the helpers once their tasks in flight end (within the tier's timeout)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()


def batches(items: Sequence[T], size: Callable[[T], int], limit: int) -> Iterator[list[T]]:
    """Consecutive runs of ``items`` of at most ``limit`` total size (at least one each)."""
    batch: list[T] = []
    total = 0
    for item in items:
        if batch and total + size(item) > limit:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size(item)
    if batch:
        yield batch


# -- reading values into place ------------------------------------------------------------
ValueReply = int | None | rx.ResponseError


def get_into(
    connection: redis.Connection, keys: Sequence[bytes], views: Sequence[memoryview]
) -> list[ValueReply]:
    """``GET`` every key in one round trip on ``connection``, each value landing straight in
    its view; per key, the value's length (its bytes are in the view only where that
    equals the view's size), ``None`` (no such key), or the server's error.

    redis-py builds a ``bytes`` per value and copies it several times holding the GIL,
    which caps a load at about one core however many connections run; here the kernel
    copies each value once, into place, with the GIL released. Raises redis-py's
    ``ConnectionError`` or ``TimeoutError``, having closed the connection.
    """
    try:
        connection.send_packed_command(
            connection.pack_commands([("GET", key) for key in keys]), check_health=False
        )
        # redis-py has no call that reads a reply into a given buffer. A connection the
        # pool hands out has nothing buffered, and this reads exactly its replies.
        replies = _Replies(getattr(connection, "_sock", None))
        answers = [replies.value_into(view) for view in views]
        replies.check_drained()
        return answers
    except BaseException as exc:
        connection.disconnect()  # a reply may be half read: never reuse the connection
        if isinstance(exc, TimeoutError):  # socket.timeout
            raise rx.TimeoutError("Timeout reading a value") from exc
        if isinstance(exc, OSError):
            raise rx.ConnectionError(f"Error reading a value: {exc}") from exc
        raise


# The errors a cluster node answers with, as redis-py's parser names them.
_CLUSTER_ERRORS: dict[str, type[rx.ResponseError]] = {
    "MOVED": rx.MovedError,
    "ASK": rx.AskError,
    "TRYAGAIN": rx.TryAgainError,
    "CLUSTERDOWN": rx.ClusterDownError,
    "MASTERDOWN": rx.MasterDownError,
}


def server_error(text: str) -> rx.ResponseError:
    """An error reply as redis-py's own parser would raise it: ``MOVED 12 h:p`` is a
    ``MovedError``, so that a cluster's answers mean the same on either read path."""
    code, _, rest = text.partition(" ")
    kind = _CLUSTER_ERRORS.get(code)
    try:
        return kind(rest) if kind is not None else rx.ResponseError(text)
    except ValueError:  # a MOVED or ASK without its slot and address
        return rx.ResponseError(text)


class _Replies:
    """RESP replies read off one socket: lines through a small buffer, values into place."""

    def __init__(self, sock: socket.socket | None):
        if sock is None:
            raise rx.ConnectionError("not connected")
        self._sock = sock
        self._pending = bytearray()  # received, not yet consumed

    def value_into(self, view: memoryview) -> ValueReply:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"-":
            return server_error(rest.decode(errors="replace"))
        if kind == b"_":  # RESP3 null
            return None
        if kind != b"$" or not rest.lstrip(b"-").isdigit():
            raise rx.ConnectionError(f"unexpected reply {line[:32]!r} to GET")
        length = int(rest)
        if length < 0:
            return None
        self._take(view if length == view.nbytes else None, length)
        if self._line():
            raise rx.ConnectionError("value not followed by CRLF")
        return length

    def check_drained(self) -> None:
        if self._pending:
            raise rx.ConnectionError(f"{len(self._pending)} bytes past the last reply")

    def _line(self) -> bytes:
        while (end := self._pending.find(b"\r\n")) < 0:
            self._recv()
        line = bytes(self._pending[:end])
        del self._pending[: end + 2]
        return line

    def _take(self, target: memoryview | None, nbytes: int) -> None:
        """Consume ``nbytes`` into ``target``, or discard them where it is ``None``."""
        held = min(nbytes, len(self._pending))
        if target is not None:
            with memoryview(self._pending) as pending:
                target[:held] = pending[:held]
        del self._pending[:held]
        if target is None:
            left = nbytes - held
            while left:  # never past this value: what follows is another reply
                left -= len(self._received(self._sock.recv(min(left, RECV_BYTES))))
            return
        rest = target[held:]
        while rest.nbytes:
            rest = rest[self._received(self._sock.recv_into(rest)) :]

    def _recv(self) -> None:
        self._pending += self._received(self._sock.recv(RECV_BYTES))

    @staticmethod
    def _received(got):
        """``got`` (bytes or a count) unless it says the server closed the connection."""
        if not got:
            raise rx.ConnectionError("connection closed by server")
        return got
