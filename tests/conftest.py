"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def redis_server() -> Iterator:
    """A real redis-server (or valkey-server) for the session, on a free loopback port."""
    from kvshelf.testing.redis_server import RedisServer, find_server_binary

    if find_server_binary() is None:
        pytest.skip("no redis-server or valkey-server on PATH (apt-get install redis-server)")
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session server's URL, its data flushed for this test."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url
