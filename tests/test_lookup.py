"""Scheduler -> worker lookups over the Unix socket (the multi-process path)."""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest

from kvshelf import lookup
from kvshelf.config import load_config
from kvshelf.engine import CacheEngine
from kvshelf.keys import MediaSpan, Namespace
from kvshelf.lookup import PENDING, LookupClient, LookupServer, WorkerLookup


def SPEC(n: int) -> tuple[str, tuple[int, ...]]:
    return "uint8", (n, 4)


def make_engine(tmp_path, **settings) -> CacheEngine:
    settings = {"chunk_size": 16, "disk_path": str(tmp_path / "disk"), **settings}
    config = load_config(settings, environ={})
    return CacheEngine(config, Namespace("m", "layout", 0, 1, 16, 1), SPEC)


def fill(engine: CacheEngine, plan) -> None:
    entries = []
    for chunk in plan.all_chunks():
        entry = engine.new_entry(chunk, *SPEC(chunk.num_tokens))
        np.frombuffer(entry.payload, dtype=np.uint8)[:] = chunk.start % 251
        entries.append(entry)
    engine.save(entries)
    assert engine.flush(10)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A worker served on a socket; the in-process shortcut is removed so the client
    really goes through the socket, as it does when the worker is another process."""
    engine = make_engine(tmp_path)
    worker = WorkerLookup(engine, prefetch=True)
    address = str(tmp_path / "w.sock")
    server = LookupServer(worker, address)
    monkeypatch.delitem(lookup._LOCAL, address)
    yield engine, address
    server.close()
    worker.close()
    engine.close()


def test_a_hit_over_the_socket_is_the_engines_hit(served):
    engine, address = served
    plan = engine.plan(list(range(70)), [MediaSpan("ab" * 32, 5, 20)])
    fill(engine, plan)
    client = LookupClient(address, timeout_s=2)
    assert client.lookup("r1", plan, wait_s=1.0) == 70
    assert len(engine.hold("r1").items) == 5  # 4 full chunks, then the cut at the prompt end
    other = engine.plan(list(range(1, 71)))
    assert client.lookup("r2", other, wait_s=1.0) == 0


def test_a_slow_read_is_pending_then_ready(tmp_path, monkeypatch):
    # The memory tier is off, so the hit is read from disk in the background.
    engine = make_engine(tmp_path, cpu_bytes=0)
    plan = engine.plan(list(range(64)))
    fill(engine, plan)
    worker = WorkerLookup(engine, prefetch=True)
    gate = []
    real_fetch = engine.fetch_plan
    monkeypatch.setattr(
        engine, "fetch_plan", lambda p, o, *a: gate.append(1) or real_fetch(p, o, *a)
    )
    first = worker.lookup("r", plan, wait_s=0.0)
    assert first in (PENDING, 64)
    assert worker.lookup("r", plan, wait_s=5.0) == 64
    assert gate == [1]  # one read, however often vLLM asks
    worker.close()
    engine.close()


def test_no_worker_is_a_miss_logged_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="kvshelf")
    plan = make_engine(tmp_path).plan(list(range(32)))
    client = LookupClient(str(tmp_path / "nobody.sock"), timeout_s=0.5)
    assert client.lookup("r", plan, 0.1) == 0
    assert client.lookup("r", plan, 0.1) == 0
    assert sum("lookup at" in r.message for r in caplog.records) == 1


def test_a_garbage_frame_drops_that_connection_only(served):
    engine, address = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(address)
        raw.sendall(b"\xff\xff\xff\x7f" + b"junk")  # claims a 2 GiB frame
        try:
            assert raw.recv(16) == b""  # the server hung up on it...
        except ConnectionResetError:
            pass  # ...or reset it, having left the junk unread
    plan = engine.plan(list(range(40)))
    fill(engine, plan)
    assert LookupClient(address, timeout_s=2).lookup("r", plan, 1.0) == 40
