"""open_tiers: the tiers a config turns on, in lookup order."""

from __future__ import annotations

import json

from kvshelf.codec import FORMAT_VERSION
from kvshelf.config import load_config
from kvshelf.keys import Namespace
from kvshelf.storage.build import open_tiers
from kvshelf.storage.disk import DiskStore
from kvshelf.storage.memory import MemoryStore

NAMESPACE = Namespace("test-model", "L1xH1xD4:float16", 0, 1, 16, FORMAT_VERSION)


def config(**settings):
    return load_config({"chunk_size": 16, "save_threads": 1} | settings, environ={})


def test_memory_then_disk_then_the_remote_given(tmp_path):
    remote = DiskStore(tmp_path / "remote", 10**6)  # any Store stands in for Redis
    store = open_tiers(
        config(cpu_bytes=10**6, disk_path=str(tmp_path / "disk")), NAMESPACE, remote=remote
    )
    assert isinstance(store.memory, MemoryStore)
    assert isinstance(store.lower[0], DiskStore)
    assert store.lower[1] is remote
    # The disk tier records the namespace for `kvshelf stats`.
    described = tmp_path / "disk" / NAMESPACE.id().hex() / "NAMESPACE.json"
    assert json.loads(described.read_text())["model"] == "test-model"
    store.close()


def test_no_memory_tier_without_cpu_bytes(tmp_path):
    store = open_tiers(config(cpu_bytes=0, disk_path=str(tmp_path / "disk")), NAMESPACE)
    assert store.memory is None
    assert [tier.name for tier in store.tiers] == ["disk"]
    store.close()
