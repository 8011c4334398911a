"""Start and stop a real ``redis-server`` (or ``valkey-server``) for tests and benchmarks.

The server listens on a free loopback port (and optionally a unix socket), keeps nothing
on disk, runs in a temporary directory and in its own session, so that stopping it
signals the whole process group. Its config file (mode 0600) holds any password, which
therefore never shows on a command line. ``start()`` after ``stop()`` or ``kill()``
starts it again on the same port; data does not survive, by design.

A cluster of several nodes (``RedisServer(cluster=True, masters=3, replicas=1)``) is one
such server per node, joined with ``CLUSTER MEET``, slots split evenly over the masters
and each replica attached with ``CLUSTER REPLICATE``: no ``redis-cli`` needed.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from kvshelf.testing.server import free_port
from kvshelf.testing.tls import make_tls_files

BINARIES = ("redis-server", "valkey-server")
LOG_TAIL_LINES = 20
CLUSTER_SLOTS = 16384


class RedisStartError(RuntimeError):
    """The server exited or did not answer PING in time; the message ends with its log."""


def find_server_binary() -> str | None:
    """Path of ``redis-server``, else ``valkey-server``, else ``None``."""
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


class RedisServer:
    """One throwaway server; a context manager. Not thread-safe.

    ``cluster=True`` starts a one-node cluster that owns every slot (enough for
    ``redis+cluster://`` URLs); with ``masters`` (at least 3, as Redis wants for
    failover) and ``replicas`` per master it starts one process per node, listed in
    :attr:`nodes`, and :meth:`client` talks to the first. ``cluster_node_timeout_ms``
    sets how soon a silent master is failed over; ``cluster_full_coverage=False`` lets the
    other masters serve their slots while a failed one has not been replaced yet
    (``cluster-require-full-coverage no``). ``unix_socket=True`` also listens on
    ``unix_path``. ``tls=True`` serves TLS only, with a throwaway CA (needs the
    ``openssl`` command) and requires a client certificate: see :attr:`tls_files`.
    ``io_threads`` > 1 lets the server write replies on that many threads.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        maxmemory: str | None = None,
        maxmemory_policy: str | None = None,
        requirepass: str | None = None,
        unix_socket: bool = False,
        cluster: bool = False,
        masters: int = 1,
        replicas: int = 0,
        cluster_node_timeout_ms: int | None = None,
        cluster_full_coverage: bool = True,
        io_threads: int = 1,
        tls: bool = False,
        binary: str | None = None,
        startup_timeout_s: float = 10.0,
    ):
        found = binary or find_server_binary()
        if found is None:
            raise FileNotFoundError("neither redis-server nor valkey-server is on PATH")
        num_nodes = masters * (1 + replicas)
        if num_nodes > 1 and not (cluster and masters >= 3 and not (tls or unix_socket)):
            raise ValueError(
                f"masters={masters}, replicas={replicas}: several nodes need cluster=True, "
                "at least 3 masters, and no tls or unix_socket"
            )
        self.binary = found
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port(self.host)
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.requirepass = requirepass
        self.cluster = cluster
        self.masters = masters
        self.cluster_node_timeout_ms = cluster_node_timeout_ms
        self.cluster_full_coverage = cluster_full_coverage
        self.io_threads = io_threads
        # The cluster bus defaults to port + 10000, which may be taken or past 65535.
        self.cluster_bus_port = free_port(self.host) if cluster else None
        self.startup_timeout_s = startup_timeout_s
        self._joins = False  # a node of a cluster that its parent forms: claims no slots
        self.nodes: list[RedisServer] = []
        for _ in range(num_nodes if num_nodes > 1 else 0):
            node = RedisServer(
                maxmemory=maxmemory,
                maxmemory_policy=maxmemory_policy,
                requirepass=requirepass,
                cluster=True,
                cluster_node_timeout_ms=cluster_node_timeout_ms,
                cluster_full_coverage=cluster_full_coverage,
                io_threads=io_threads,
                binary=found,
                startup_timeout_s=startup_timeout_s,
            )
            node._joins = True
            self.nodes.append(node)
        if self.nodes:  # the parent runs no process of its own
            self.port, self.cluster_bus_port = self.nodes[0].port, None
        self._formed = False
        self.dir = Path(tempfile.mkdtemp(prefix="kvshelf-redis-"))
        self.unix_path = self.dir / "redis.sock" if unix_socket else None
        self.tls_files = make_tls_files(self.dir) if tls else None
        self._proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)

    def __repr__(self) -> str:  # never the password
        return f"RedisServer(url={self.url!r}, running={self.is_running()})"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (no password even when one is required); a cluster
        of several nodes lists them all."""
        scheme = "rediss" if self.tls_files else "redis"
        scheme += "+cluster" if self.cluster else ""
        if self.nodes:
            return f"{scheme}://" + ",".join(f"{self.host}:{n.port}" for n in self.nodes)
        return f"{scheme}://{self.host}:{self.port}" + ("" if self.cluster else "/0")

    @property
    def unix_url(self) -> str:
        if self.unix_path is None:
            raise ValueError("started without unix_socket=True")
        return f"unix://{self.unix_path}?db=0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def client(self, **kwargs) -> redis.Redis:
        """A plain redis-py client for poking at the server (timeouts: 10 s)."""
        options = {"socket_timeout": 10.0, "password": self.requirepass, **kwargs}
        if self.tls_files is not None:
            files = self.tls_files
            options.update(
                ssl=True,
                ssl_ca_certs=str(files["ca"]),
                ssl_certfile=str(files["cert"]),
                ssl_keyfile=str(files["key"]),
            )
        return redis.Redis(host=self.host, port=self.port, **options)

    def is_running(self) -> bool:
        if self.nodes:
            return any(node.is_running() for node in self.nodes)
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Launch the server and wait until it answers PING (and, for a cluster, until
        the cluster is ok). Raises :class:`RedisStartError` if it does not."""
        if self.is_running():
            raise RuntimeError("server already running; call stop() first")
        if self.nodes:
            if self._formed:  # the nodes remember it: restart single nodes instead
                raise RuntimeError("a cluster of several nodes starts once")
            try:
                for node in self.nodes:
                    node.start()
                self._form_cluster(time.monotonic() + self.startup_timeout_s)
            except BaseException:
                self.kill()
                raise
            self._formed = True
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "redis.conf"
        config.touch(mode=0o600)
        config.write_text(self._config())
        with open(self.dir / "redis.log", "ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (one prctl call, bound before fork)
            )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()  # also on KeyboardInterrupt: never leave it half-started
            raise
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``. Idempotent."""
        for node in self.nodes:
            node.stop(grace_s)
        self._end(signal.SIGTERM, grace_s)

    def kill(self) -> None:
        """SIGKILL: the server (every node) vanishes as in a crash."""
        for node in self.nodes:
            node.kill()
        self._end(signal.SIGKILL, 5.0)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        for node in self.nodes:
            node.close()
        self.stop()
        atexit.unregister(self.close)
        shutil.rmtree(self.dir, ignore_errors=True)

    def master_nodes(self) -> list[RedisServer]:
        """The running nodes that are masters now (after a failover: the promoted)."""
        return [n for n in self.nodes if n.is_running() and _role(n) == b"master"]

    def wait_replicated(self, timeout_s: float = 10.0) -> None:
        """Wait until every running replica has all its master's writes, so that a
        failover loses none. Raises :class:`RedisStartError` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for node in self.master_nodes():
            with node.client() as client:
                while not _replicas_caught_up(client.info("replication")):
                    if time.monotonic() > deadline:
                        raise RedisStartError(node._failure("replicas did not catch up"))
                    time.sleep(0.02)

    def log_tail(self, num_lines: int = LOG_TAIL_LINES) -> str:
        if self.nodes:
            return "\n".join(f"-- node :{n.port}\n{n.log_tail(num_lines)}" for n in self.nodes)
        try:
            text = (self.dir / "redis.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-num_lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------
    def _config(self) -> str:
        lines = [
            f"port {0 if self.tls_files else self.port}",
            f"bind {self.host}",
            f"dir {self.dir}",
            'save ""',
            "appendonly no",
            "daemonize no",
            "enable-debug-command local",  # tests use DEBUG SLEEP for a slow server
        ]
        if self.tls_files is not None:
            lines += [
                f"tls-port {self.port}",
                f"tls-cert-file {self.dir / 'server.crt'}",
                f"tls-key-file {self.dir / 'server.key'}",
                f"tls-ca-cert-file {self.tls_files['ca']}",
                "tls-auth-clients yes",
            ]
        if self.unix_path is not None:
            lines += [f"unixsocket {self.unix_path}", "unixsocketperm 700"]
        if self.maxmemory is not None:
            lines.append(f"maxmemory {self.maxmemory}")
        if self.maxmemory_policy is not None:
            lines.append(f"maxmemory-policy {self.maxmemory_policy}")
        if self.requirepass is not None:
            lines.append(f"requirepass {self.requirepass}")
        if self.io_threads > 1:
            lines.append(f"io-threads {self.io_threads}")
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                f"cluster-config-file {self.dir / 'nodes.conf'}",
                f"cluster-port {self.cluster_bus_port}",
                "repl-diskless-sync-delay 0",  # a replica syncs at once, not after 5 s
            ]
        if self.cluster_node_timeout_ms is not None:
            lines.append(f"cluster-node-timeout {self.cluster_node_timeout_ms}")
        if self.cluster and not self.cluster_full_coverage:
            lines.append("cluster-require-full-coverage no")
        if self.requirepass is not None and self.cluster:
            lines.append(f"masterauth {self.requirepass}")  # replicas log in to masters
        return "\n".join(lines) + "\n"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        probe = self.client(socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while not self._answers(probe):
                if self._proc is None or self._proc.poll() is not None:
                    raise RedisStartError(self._failure("redis-server exited"))
                if time.monotonic() > deadline:
                    raise RedisStartError(self._failure("redis-server did not answer PING"))
                time.sleep(0.02)
            if self.cluster and not self._joins:
                self._claim_all_slots(probe, deadline)
        finally:
            probe.close()

    @staticmethod
    def _answers(probe: redis.Redis) -> bool:
        try:
            return bool(probe.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False
        except redis.ResponseError as exc:  # e.g. LOADING
            return "LOADING" not in str(exc)

    def _claim_all_slots(self, probe: redis.Redis, deadline: float) -> None:
        if int(probe.cluster("INFO")["cluster_slots_assigned"]) == 0:
            probe.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
        while probe.cluster("INFO")["cluster_state"] != "ok":
            if time.monotonic() > deadline:
                raise RedisStartError(self._failure("cluster state not ok"))
            time.sleep(0.02)

    def _form_cluster(self, deadline: float) -> None:
        """Masters share the slots; all meet; each replica follows a master."""
        clients = [node.client(socket_timeout=2.0) for node in self.nodes]
        try:
            masters = clients[: self.masters]
            for i, client in enumerate(masters):
                first, end = (CLUSTER_SLOTS * k // len(masters) for k in (i, i + 1))
                client.execute_command("CLUSTER ADDSLOTSRANGE", first, end - 1)
            for node in self.nodes[1:]:
                clients[0].execute_command(
                    "CLUSTER MEET", self.host, node.port, node.cluster_bus_port
                )
            self._wait(
                deadline,
                "nodes did not meet",
                lambda: all(_knows(c, len(clients)) for c in clients),
            )
            for i, client in enumerate(clients[self.masters :]):
                master_id = masters[i % len(masters)].execute_command("CLUSTER MYID")
                client.execute_command("CLUSTER REPLICATE", master_id)
            self._wait(
                deadline,
                "cluster state not ok",
                lambda: all(c.cluster("INFO")["cluster_state"] == "ok" for c in clients),
            )
            self._wait(
                deadline,
                "replicas did not sync",
                lambda: all(
                    c.info("replication").get("master_link_status") == "up"
                    for c in clients[self.masters :]
                ),
            )
        finally:
            for client in clients:
                client.close()

    def _wait(self, deadline: float, what: str, done) -> None:
        while not done():
            if time.monotonic() > deadline:
                raise RedisStartError(self._failure(what))
            time.sleep(0.05)

    def _failure(self, what: str) -> str:
        return f"{what} (dir {self.dir}, last {LOG_TAIL_LINES} log lines):\n{self.log_tail()}"

    def _end(self, sig: signal.Signals, grace_s: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _signal_group(proc.pid, sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()


def _role(node: RedisServer) -> bytes | None:
    try:
        with node.client(socket_timeout=1.0) as client:
            return client.execute_command("ROLE")[0]
    except (redis.ConnectionError, redis.TimeoutError):
        return None


def _knows(client: redis.Redis, num_nodes: int) -> bool:
    """Whether the node is linked to ``num_nodes`` nodes (itself included), none of
    them still in handshake."""
    nodes = client.cluster("NODES").values()
    return len(nodes) == num_nodes and all(
        n["connected"] and "handshake" not in n["flags"] for n in nodes
    )


def _replicas_caught_up(info: dict) -> bool:
    offset = info["master_repl_offset"]
    replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
    return all(r.get("state") == "online" and r.get("offset") == offset for r in replicas)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)  # start_new_session: the server leads its own group
    except ProcessLookupError:
        pass


# Looked up here, not in the forked child, which then only makes one libc call.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: Linux SIGKILLs the server when the thread that
    started it dies, so even a SIGKILLed test run leaves nothing behind."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
