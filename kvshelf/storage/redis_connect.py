"""Opening the remote tier from ``remote_url``: standalone, TLS, unix socket or cluster."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from kvshelf.config import KVShelfConfig, redact_url
from kvshelf.storage.base import BufferSource
from kvshelf.storage.redis import Client, RedisStore

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def open_remote(config: KVShelfConfig, buffers: BufferSource | None = None) -> RedisStore:
    """The remote tier ``config.remote_url`` names; connects on first use.

    ``redis://[user:password@]host:port/db``, ``rediss://`` (TLS: ``remote_ca_certs``,
    ``remote_certfile``, ``remote_keyfile``), ``unix:///path.sock?db=N`` and
    ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` for TLS). The
    password from ``config.password()`` overrides the URL's. Raises ``ValueError`` for
    a URL or setting that cannot work.
    """
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
