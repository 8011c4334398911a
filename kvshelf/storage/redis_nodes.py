"""Whether and where the remote tier asks, and its commands' round trips: a standalone
server is one :class:`Link`; a Redis Cluster has a link per master, so that a dead
master costs only the keys in its slots while the other masters keep serving theirs.

Keys are routed with redis-py's own slot map (``RedisCluster.get_node_from_key``). While
a master is down, a background thread reads the map again (``NodesManager.initialize``)
every first backoff step: once a replica takes over, its slots route to the promoted
node and their keys hit again; the dead master's link is dropped. A ``MOVED`` answer
asks for the same refresh. No caller ever waits on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import redis
from redis import exceptions as rx
from redis.cluster import RedisCluster

if TYPE_CHECKING:
    from kvshelf.storage.redis import Client
    from kvshelf.storage.redis_connect import CallThreads

logger = logging.getLogger("kvshelf.storage.redis")  # the tier's one logger

J = TypeVar("J")
# A server that cannot be reached, or a cluster without a usable slot map: its keys miss.
UNREACHABLE = (rx.ConnectionError, rx.TimeoutError, rx.ClusterError, rx.RedisClusterException)

# Answers about the cluster's state, not the command (the cluster is down, a slot is
# moving or has moved): a miss, counted, never a refusal to write.
CLUSTER_ANSWERS = (rx.ClusterError, rx.AskError, rx.TryAgainError)


class _Down:
    def __repr__(self) -> str:
        return "DOWN"


DOWN = _Down()  # the answer of a command not sent, or lost: its server is down


class Link:
    """Whether one server (or one cluster master) is worth asking: up, or down until a
    backoff deadline. Thread-safe. While down, :meth:`ready` lets one caller through
    per deadline to probe.

    ``node`` names a cluster master (``host:port``) of the cluster at ``url``.
    """

    def __init__(self, url: str, backoff_s: tuple[float, float], node: str | None = None):
        self.url = url
        self.node = node
        self._first_s, self._max_s = backoff_s
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._wait_s = 0.0

    @property
    def name(self) -> str:
        return self.url if self.node is None else f"cluster node {self.node} of {self.url}"

    def ready(self) -> bool:
        with self._lock:
            if self._down_since is None:
                return True
            now = time.monotonic()
            if now < self._retry_at:
                return False
            self._retry_at = now + self._wait_s  # the others keep missing while we probe
            return True

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def down_for_s(self) -> float | None:
        """How long it has been down; ``None`` while up."""
        since = self._down_since
        return None if since is None else time.monotonic() - since

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
            lost = (
                "lookups miss and saves are dropped until it is back"
                if self.node is None
                else "keys in its slots miss and their saves are dropped until it is back "
                "or a replica takes over; the other masters keep serving"
            )
            logger.warning("remote tier: %s unreachable (%s); %s", self.name, cause, lost)

    def succeeded(self) -> None:
        with self._lock:
            if self._down_since is None:
                return
            down_s, self._down_since = time.monotonic() - self._down_since, None
        logger.info("remote tier: %s is back after %.1f s", self.name, down_s)


class Halt:
    """One call's stop signs, shared by its parallel tasks: once a server refused a
    write, tasks not yet started send nothing; once a server (a cluster master) could
    not be reached, nothing more of the call goes to it. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stopped = False
        self._lost: set[Link] = set()

    def stop(self) -> None:
        self.stopped = True

    def lose(self, link: Link) -> bool:
        """Note ``link``'s server unreachable; ``True`` for the call's first report of
        it, the one that the link hears (several would each double the backoff)."""
        with self._lock:
            first = link not in self._lost
            self._lost.add(link)
            return first

    def lost(self, link: Link) -> bool:
        with self._lock:
            return link in self._lost


class NodeRoute(NamedTuple):
    """Some of a call's keys, all held by one server."""

    link: Link  # that server's liveness
    client: redis.Redis  # talks to that server only (a cluster node's own client)
    indices: list[int]  # where its keys are in the call's keys


class Nodes:
    """Liveness per server, the routes of a call's keys, and their round trips.
    Thread-safe.

    :attr:`main` is the standalone server, or for a cluster, reaching the cluster at
    all (making the client, which reads the slot map). ``client_of`` makes or returns
    the client; ``threads`` run a call's round trips to several servers at once;
    ``on_lost`` counts a round trip that did not come back and says why, for the log.
    ``close()`` stops the refresher.
    """

    def __init__(
        self,
        url: str,
        backoff_s: tuple[float, float],
        client_of: Callable[[], Client],
        threads: CallThreads,
        on_lost: Callable[[Exception], str],
    ):
        self.url = url
        self.backoff_s = backoff_s
        self.main = Link(url, backoff_s)
        self._client_of = client_of
        self._threads = threads
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._links: dict[str, Link] = {}  # per master's name, host:port
        self._cluster: RedisCluster | None = None
        self._refresher: threading.Thread | None = None
        self._refresh_asked = False
        self._closed = threading.Event()

    def round_trip(self, commands: Sequence[tuple], halt: Halt | None = None) -> list:
        """One pipelined round trip to each server holding the commands' keys (each
        command's first argument), the servers in parallel. Per command: its reply, the
        server's error, or ``DOWN`` where its server is down or unreachable (counted,
        ``halt`` told)."""
        answers: list = [DOWN] * len(commands)

        def trip(route: NodeRoute) -> None:
            replies = self.send(route, [commands[i] for i in route.indices], halt)
            for i, reply in zip(route.indices, replies):
                answers[i] = reply

        self._threads.run(trip, self.routes([command[1] for command in commands], halt))
        return answers

    def send(self, route: NodeRoute, commands: list, halt: Halt | None = None) -> list:
        """One pipelined round trip to one server: its replies, or all ``DOWN``."""
        try:
            pipe = route.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies = pipe.execute(raise_on_error=False)
        except UNREACHABLE as exc:
            self.lost(exc, route.link, halt)
            return [DOWN] * len(commands)
        except rx.ResponseError as exc:  # the pipeline as a whole was refused
            return [exc] * len(commands)
        route.link.succeeded()
        return replies

    def group(
        self, jobs: list[J], key_of: Callable[[J], bytes], halt: Halt
    ) -> tuple[list[tuple[NodeRoute, list[J]]], list[J]]:
        """The jobs grouped by the server holding their key, and the jobs whose server
        is down."""
        routes = self.routes([key_of(job) for job in jobs], halt)
        groups = [(route, [jobs[i] for i in route.indices]) for route in routes]
        routed = {i for route in routes for i in route.indices}
        return groups, [job for i, job in enumerate(jobs) if i not in routed]

    def routes(self, keys: Sequence[bytes], halt: Halt | None = None) -> list[NodeRoute]:
        """The servers to send ``keys`` to now, each with the indices of its keys. A key
        whose server is down (backing off, or lost earlier in the call) is in none, and
        so is every key where the client cannot be made (counted)."""
        try:
            return self._routes(keys, halt)
        except UNREACHABLE as exc:  # e.g. no node answered, or a slot no node serves
            self.lost(exc, self.main, halt)
            return []

    def lost(self, exc: Exception, link: Link | None, halt: Halt | None = None) -> None:
        """Count a round trip that did not come back; back off ``link``'s server (once
        per call), and for a master, refresh the slot map until it is back or its
        slots have moved."""
        cause = self._on_lost(exc)
        if link is None or (halt is not None and not halt.lose(link)):
            return
        link.failed(cause)
        if link is not self.main:
            self._start_refresher()

    def ask_refresh(self) -> None:
        """Read the slot map again soon (a node answered ``MOVED``)."""
        with self._lock:
            self._refresh_asked = True
        self._start_refresher()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            refresher = self._refresher
        if refresher is not None:
            refresher.join()  # within the timeouts of one refresh

    def _routes(self, keys: Sequence[bytes], halt: Halt | None) -> list[NodeRoute]:
        if (halt is not None and halt.lost(self.main)) or not self.main.ready():
            return []
        client = self._client_of()
        if not isinstance(client, RedisCluster):
            return [NodeRoute(self.main, client, list(range(len(keys))))]
        self._cluster = client
        by_node: dict[str, NodeRoute | None] = {}
        for i, key in enumerate(keys):
            node = client.get_node_from_key(key)
            if node.name not in by_node:  # ready() once per call: it may hand out a probe
                link = self._link(node.name)
                usable = (halt is None or not halt.lost(link)) and link.ready()
                by_node[node.name] = (
                    NodeRoute(link, client.get_redis_connection(node), []) if usable else None
                )
            if (route := by_node[node.name]) is not None:
                route.indices.append(i)
        self.main.succeeded()
        return [route for route in by_node.values() if route is not None]

    def _link(self, name: str) -> Link:
        with self._lock:
            link = self._links.get(name)
            if link is None:
                link = self._links[name] = Link(self.url, self.backoff_s, node=name)
            return link

    # -- the slot map ----------------------------------------------------------------
    def _start_refresher(self) -> None:
        with self._lock:
            if self._refresher is not None or self._cluster is None or self._closed.is_set():
                return
            self._refresher = threading.Thread(
                target=self._refresh_loop, name="kvshelf-remote-slots", daemon=True
            )
            self._refresher.start()

    def _refresh_loop(self) -> None:
        """Refresh every first backoff step while a master is down or a refresh is asked
        for; a refresh that reaches no node backs off like a link."""
        first_s, max_s = self.backoff_s
        wait_s = first_s
        try:
            while not self._closed.is_set():
                with self._lock:  # as where lost() starts one: no failure goes unseen
                    down = [name for name, link in self._links.items() if link.down]
                    if not (down or self._refresh_asked):
                        self._refresher = None
                        return
                    self._refresh_asked = False
                wait_s = first_s if self._refresh(down) else min(2 * wait_s, max_s)
                self._closed.wait(wait_s)
        finally:
            with self._lock:
                if self._refresher is threading.current_thread():
                    self._refresher = None

    def _refresh(self, down: list[str]) -> bool:
        """Read the slot map again, asking a down master last (as redis-py does after a
        failure); drop the links of nodes that are no longer masters. ``False`` when no
        node answered."""
        cluster = self._cluster
        if cluster is None:
            return True
        manager = cluster.nodes_manager
        for name in down:
            manager.move_node_to_end_of_cached_nodes(name)
        try:
            manager.initialize(last_failed_node_name=down[0] if down else None)
        except (rx.RedisError, rx.RedisClusterException) as exc:
            logger.debug("remote tier: %s: slot map not refreshed: %s", self.url, exc)
            return False
        masters = {node.name for node in cluster.get_primaries()}
        with self._lock:
            gone = [self._links.pop(name) for name in list(self._links) if name not in masters]
        for link in gone:
            down_s = link.down_for_s()
            if down_s is not None:
                logger.info(
                    "remote tier: %s failed over after %.1f s; other nodes serve its slots",
                    link.name,
                    down_s,
                )
        return True
