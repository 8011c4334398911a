"""open_tiers: the tiers a config turns on, in lookup order, shared within a process."""

from __future__ import annotations

import json
import threading

import pytest

from kvshelf.codec import FORMAT_VERSION, Entry
from kvshelf.config import load_config
from kvshelf.keys import CheckDigest, Namespace, StoreKey
from kvshelf.storage.base import HeapMemory, HostBlock
from kvshelf.storage.build import open_tiers, shared_users
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


# -- tiers shared within a process --------------------------------------------------------
OTHER = Namespace("test-model", "encoder-output/v1 {}", 0, 1, 1, FORMAT_VERSION)
NBYTES = 1000


def entry(namespace: Namespace, index: int, fill: int | None = None) -> Entry:
    key = StoreKey(namespace.id() + index.to_bytes(32, "big"))
    data = memoryview(bytearray(bytes([index if fill is None else fill]) * NBYTES))
    return Entry(key, CheckDigest(bytes(32)), 1, "uint8", (NBYTES,), data)


class CountingHeap(HeapMemory):
    """Heap memory that counts its buffers: where a namespace's buffers came from."""

    def __init__(self):
        self.blocks = 0

    def alloc(self, nbytes: int) -> HostBlock:
        self.blocks += 1
        return super().alloc(nbytes)


def test_the_same_tier_settings_share_one_memory_tier_and_one_disk_index(tmp_path):
    """The KV and encoder engines of one worker: one budget, one index, keys apart."""
    # 1. Two stores for two namespaces; settings that are not tier settings differ.
    settings = {"cpu_bytes": 5 * NBYTES, "disk_path": str(tmp_path / "disk")}
    kv = open_tiers(config(**settings), NAMESPACE)
    enc = open_tiers(config(**settings, chunk_size=1, save_threads=2), OTHER)
    assert kv.memory is enc.memory and kv.lower[0] is enc.lower[0]
    assert shared_users(config(**settings)) == 2
    # 2. Each saves; both see one memory tier holding both entries, counted once.
    kv.put([entry(NAMESPACE, 1)])
    enc.put([entry(OTHER, 1, fill=0xEE)])
    assert kv.flush(10) and enc.flush(10)
    (memory, disk) = kv.stats()
    assert memory == enc.stats()[0]
    assert (memory.entries, memory.used_bytes, disk.entries) == (2, 2 * NBYTES, 2)
    # 3. One budget: the encoder's saves evict the KV entry (least recently used).
    enc.put([entry(OTHER, i) for i in range(2, 6)])
    assert kv.memory is not None and kv.memory.contains([entry(NAMESPACE, 1).key]) == [False]
    assert kv.memory.stats().used_bytes <= 5 * NBYTES
    # 4. Closing the encoder's store leaves the KV one working: a read from the disk.
    enc.close()
    enc.close()  # a second close lets go of nothing more
    assert shared_users(config(**settings)) == 1
    (found,) = kv.get([entry(NAMESPACE, 1).key])
    assert found is not None and bytes(found.payload) == bytes([1]) * NBYTES
    # 5. The last close closes the tiers; the next store opens new ones.
    kv.close()
    assert shared_users(config(**settings)) == 0
    again = open_tiers(config(**settings), NAMESPACE)
    assert again.memory is not memory and again.stats()[1].entries == 6  # index rebuilt
    again.close()


@pytest.mark.parametrize(
    "change",
    [{"cpu_bytes": 6 * NBYTES}, {"disk_path": "other"}, {"disk_bytes": 10**8}],
    ids=["cpu_bytes", "disk_path", "disk_bytes"],
)
def test_other_tier_settings_open_other_tiers(tmp_path, change):
    settings = {"cpu_bytes": 5 * NBYTES, "disk_path": str(tmp_path / "disk")}
    changed = settings | change
    if "disk_path" in change:
        changed["disk_path"] = str(tmp_path / change["disk_path"])
    a = open_tiers(config(**settings), NAMESPACE)
    b = open_tiers(config(**changed), OTHER)
    assert a.memory is not b.memory and a.lower[0] is not b.lower[0]
    a.close()
    b.close()


def test_the_same_directory_named_two_ways_is_one_disk_tier(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = open_tiers(config(disk_path="disk"), NAMESPACE)
    b = open_tiers(config(disk_path=str(tmp_path / "disk")), OTHER)
    assert a.lower[0] is b.lower[0]
    a.close()
    b.close()


def test_a_remote_store_given_by_the_caller_is_not_shared(tmp_path):
    settings = {"cpu_bytes": 5 * NBYTES}
    a = open_tiers(config(**settings), NAMESPACE, remote=DiskStore(tmp_path / "r", 10**6))
    b = open_tiers(config(**settings), OTHER)
    assert a.memory is not b.memory and shared_users(config(**settings)) == 1
    a.close()
    b.close()


def test_each_namespace_takes_buffers_from_its_own_host_memory(tmp_path):
    """The KV side brings pinned memory (here a counting heap), after the encoder side
    opened the tier without any: KV buffers come from it, encoder buffers from the heap,
    both charged to one budget."""
    settings = {"cpu_bytes": 5 * NBYTES, "disk_path": str(tmp_path / "disk")}
    pinned = CountingHeap()
    enc = open_tiers(config(**settings), OTHER)
    kv = open_tiers(config(**settings), NAMESPACE, host=pinned)
    memory = kv.memory
    assert memory is not None and memory.host is pinned
    enc.put([entry(OTHER, 1)])
    assert pinned.blocks == 0  # copied into a heap buffer
    kv.put([entry(NAMESPACE, 1)])
    assert pinned.blocks == 1
    assert memory.stats().used_bytes == 2 * NBYTES
    # A read of the encoder entry from the disk lands in a heap buffer too.
    assert enc.flush(10)
    memory.delete([entry(OTHER, 1).key])
    (found,) = enc.get([entry(OTHER, 1).key])
    assert found is not None and memory.owns(found) and pinned.blocks == 1
    memory.delete([entry(NAMESPACE, 1).key, entry(OTHER, 1).key])
    assert memory.stats().used_bytes == 0  # every buffer given back to its own host
    kv.close()
    enc.close()


def test_stores_opened_and_closed_from_many_threads_share_and_release(tmp_path):
    settings = {"cpu_bytes": 5 * NBYTES, "disk_path": str(tmp_path / "disk")}
    stores: list = []
    lock = threading.Lock()

    def open_one(i: int) -> None:
        store = open_tiers(config(**settings), NAMESPACE if i % 2 else OTHER)
        with lock:
            stores.append(store)

    threads = [threading.Thread(target=open_one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s.memory) for s in stores}) == 1
    assert shared_users(config(**settings)) == 8
    closers = [threading.Thread(target=s.close) for s in stores]
    for t in closers:
        t.start()
    for t in closers:
        t.join()
    assert shared_users(config(**settings)) == 0
