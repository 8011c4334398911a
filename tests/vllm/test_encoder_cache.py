"""KVShelfECConnector: in process with vLLM's own objects (seconds), and in a real vLLM
(CPU build) server: the same media after another chat history skips the encoder, across
a restart, and a corrupt entry is recomputed.

In the server test, per family: a server without any connector gives the reference
answers; then a server with the encoder cache (idefics3: beside KVShelfConnector, one
config) answers request A (history P1 + media), restarts, answers B (history P2 + the same
media: no KV hit, an encoder hit), and after its entry file is corrupted, C (history P3).
vLLM's prefix cache and kvshelf's memory tier are off, so every hit comes from the disk
tier; float32 makes answers comparable exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from vllm import SamplingParams
from vllm.config import ECTransferConfig
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole
from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import ECConnectorOutput
from vllm.v1.request import Request

from kvshelf.codec import FORMAT_VERSION, CorruptEntry, decode
from kvshelf.config import ConfigError, load_config
from kvshelf.encoder_cache import ENCODER_LAYOUT, EncoderItem
from kvshelf.engine import CacheEngine
from kvshelf.keys import Namespace
from kvshelf.testing import (
    VllmServer,
    build_content,
    build_model,
    filler_text,
    free_port,
    serve_args,
)
from kvshelf.vllm.ec_connector import encoder_config
from kvshelf.vllm.ec_metrics import KVShelfECStats
from kvshelf.vllm.plugin import register
from tests.vllm.support import MODEL_NAME, Client, Reply, corrupt, wait_for_metric

# family, request type, media item, whether KVShelfConnector runs too
CASES = [
    ("qwen2_audio", "audio", "audio_a", False),
    ("idefics3", "single-image", "image_a", True),
    ("ovis2_5", "video", "video_a", False),
]
HIT = "kvshelf encoder hit"
MISS = "kvshelf encoder miss"
UNREADABLE = "kvshelf encoder entry unreadable"


class _Client(Client):
    """Waits for KVShelfConnector's per-request line only where it runs."""

    def __init__(self, server: VllmServer, kv: bool):
        super().__init__(server)
        self.kv = kv
        self._mark = 0

    def restart(self) -> None:
        super().restart()
        self._mark = 0

    def new_log(self) -> str:
        """The log since the last call (within this start)."""
        text = self.log()
        new, self._mark = text[self._mark :], len(text)
        return new

    def _logged(self) -> tuple[int | None, list]:
        return super()._logged() if self.kv else (None, [])


def conversation(history_seed: int, request_type: str, media: dict, name: str) -> list[dict]:
    """Two turns of chat history (different per seed), then the media and a question."""
    turns: list[dict[str, Any]] = []
    for turn in range(2):
        turns.append({"role": "user", "content": filler_text(24, history_seed * 10 + turn)})
        turns.append({"role": "assistant", "content": filler_text(8, history_seed * 10 + turn + 5)})
    content = build_content(request_type, media, media_names=[name], text="Describe this.")
    return [*turns, {"role": "user", "content": content}]


def encoder_files(disk: Path) -> set[Path]:
    """Entry files of the encoder cache's namespaces (KV entries may share the directory)."""
    found: set[Path] = set()
    for described in disk.glob("*/NAMESPACE.json"):
        if json.loads(described.read_text())["layout"].startswith(ENCODER_LAYOUT):
            found |= set(described.parent.rglob("*.kv"))
    return found


def wait_for_files(disk: Path, timeout_s: float = 30.0) -> set[Path]:
    """The encoder entry files, once at least one is there and they decode."""
    deadline = time.monotonic() + timeout_s
    while True:
        files = encoder_files(disk)
        if (files and all(_decodes(p) for p in files)) or time.monotonic() > deadline:
            return files
        time.sleep(0.2)


@pytest.mark.vllm
@pytest.mark.parametrize(
    ("family", "request_type", "name", "with_kv"), CASES, ids=[c[0] for c in CASES]
)
def test_same_media_after_another_history_skips_the_encoder(
    family, request_type, name, with_kv, media, tmp_path
):
    model = build_model(family, tmp_path / "model", size="xs", dtype="float32")
    disk = tmp_path / "cache"
    base = [
        *serve_args(family, dtype="float32"),
        "--served-model-name",
        MODEL_NAME,
        "--enforce-eager",
        "--max-model-len",
        "4096",
        "--no-enable-prefix-caching",
    ]

    def ask(client: _Client, history_seed: int) -> Reply:
        reply = client.chat(conversation(history_seed, request_type, media, name))
        assert reply.status == 200, reply.error
        return reply

    # Reference answers from a server with no connector at all.
    plain = VllmServer(model, port=free_port(), args=base, log_path=tmp_path / "plain.log")
    with plain:
        reference = _Client(plain, kv=False)
        b_ref, c_ref = ask(reference, 2), ask(reference, 3)

    settings = {"local_disk": str(disk), "local_cpu": False}
    ec = {
        "ec_connector": "KVShelfECConnector",
        "ec_role": "ec_both",
        "ec_connector_extra_config": {} if with_kv else settings,
    }
    args = [*base, "--ec-transfer-config", json.dumps(ec)]
    if with_kv:  # one config: the encoder cache takes KVShelfConnector's settings
        kv = {
            "kv_connector": "KVShelfConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": settings,
        }
        args += ["--kv-transfer-config", json.dumps(kv)]
    server = VllmServer(
        model,
        port=free_port(),
        args=args,
        env={"VLLM_SERVER_DEV_MODE": "1"},
        log_path=tmp_path / "kvshelf.log",
    )
    with server:
        client = _Client(server, kv=with_kv)
        # 1. A: the encoder runs; its output is stored.
        ask(client, 1)
        assert MISS in client.new_log()
        files = wait_for_files(disk)
        assert len(files) == 1, files

        # 2. After a restart, B (another history, the same media): no KV hit, but the
        #    encoder output comes from kvshelf's disk tier, and B answers as without kvshelf.
        client.restart()
        b = ask(client, 2)
        assert HIT in client.new_log()
        assert b.same_answer(b_ref), (b, b_ref)
        if with_kv:
            assert b.hit_tokens == 0
        assert (
            wait_for_metric(server, "kvshelf_encoder_hits_total")[
                ("kvshelf_encoder_hits_total", "")
            ]
            >= 1
        )

        # 3. The entry is corrupted and vLLM's own encoder cache emptied: C finds the
        #    entry unreadable, counts it, runs the encoder, answers right and stores anew.
        (path,) = files
        corrupt(path)
        httpx.post(f"{server.url}/reset_encoder_cache", timeout=30).raise_for_status()
        c = ask(client, 3)
        assert UNREADABLE in client.new_log()
        assert c.same_answer(c_ref), (c, c_ref)
        counted = wait_for_metric(server, "kvshelf_encoder_corrupt_total")
        assert counted[("kvshelf_encoder_corrupt_total", "")] >= 1
        assert wait_for_files(disk) == files and _decodes(path)


def _decodes(path: Path) -> bool:
    try:
        decode(path.read_bytes())
    except (CorruptEntry, OSError):
        return False
    return True


# -- in process: both roles of the connector, vLLM's request and output objects ---------
CAT = hashlib.sha256(b"a photo of a cat").hexdigest()
WIDTH = 4
_ids = itertools.count()


def vllm_config(tmp_path, *, cache_off: bool = False, kv_extra: dict | None = None, **extra):
    """The fields of VllmConfig the connector reads, around a real ECTransferConfig."""
    ec = ECTransferConfig(
        ec_connector="KVShelfECConnector",
        ec_role="ec_both",
        engine_id=f"ec-test-{next(_ids)}",
        ec_connector_extra_config=extra or {"disk_path": str(tmp_path / "disk")},
    )
    ec.mm_encoder_output_widths = {"image": WIDTH}
    kv = None
    if kv_extra is not None:
        kv = SimpleNamespace(kv_connector="KVShelfConnector", kv_connector_extra_config=kv_extra)
    return SimpleNamespace(
        ec_transfer_config=ec,
        kv_transfer_config=kv,
        model_config=SimpleNamespace(
            model="m",
            revision=None,
            quantization=None,
            dtype=torch.float32,
            hf_overrides={},
            is_encoder_decoder=False,
            get_inputs_embeds_size=lambda: WIDTH,
            multimodal_config=SimpleNamespace(mm_processor_cache_gb=0 if cache_off else 4),
        ),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, data_parallel_rank=0),
        cache_config=SimpleNamespace(enable_prefix_caching=False),
    )


def image_request(identifier: str = CAT, salt: str | None = None) -> Request:
    feature = MultiModalFeatureSpec(None, "image", identifier, PlaceholderRange(2, 6))
    return Request(
        f"r{next(_ids)}",
        list(range(12)),
        SamplingParams(max_tokens=1),
        None,
        mm_features=[feature],
        cache_salt=salt,
    )


class Connectors:
    """Both roles, made by name as vLLM makes them; the worker answers the scheduler's
    lookups in process. ``schedule`` plays one step of vLLM's scheduler and model runner."""

    def __init__(self, config):
        register()
        self.scheduler = ECConnectorFactory.create_connector(config, ECConnectorRole.SCHEDULER)
        self.worker = ECConnectorFactory.create_connector(config, ECConnectorRole.WORKER)
        self.encoder_cache: dict[str, torch.Tensor] = {}
        self.encoded: list[str] = []

    def evict(self, identifier: str) -> None:
        """vLLM's encoder cache drops an item: the step that says so has nothing else."""
        self.encoder_cache.pop(identifier)
        step = SchedulerOutput.make_empty()
        step.free_encoder_mm_hashes = [identifier]
        self.worker.bind_connector_metadata(self.scheduler.build_connector_meta(step))
        self.worker.start_load_caches(self.encoder_cache)
        self.worker.clear_connector_metadata()

    def schedule(self, request: Request, output: torch.Tensor) -> None:
        sched = self.scheduler
        assert sched.ensure_cache_available(request, 0)
        to_encode = []
        for index, feature in enumerate(request.mm_features):
            if feature.identifier in self.encoder_cache:
                continue
            if not sched.has_cache_item(feature.identifier):
                to_encode.append(feature.identifier)
            sched.update_state_after_alloc(request, index)
        meta = sched.build_connector_meta(SchedulerOutput.make_empty())
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_caches(self.encoder_cache)
        for identifier in to_encode:  # the "encoder" runs
            self.encoder_cache[identifier] = output.clone()
            self.encoded.append(identifier)
            self.worker.save_caches(self.encoder_cache, identifier)
        meta = self.worker.build_connector_worker_meta()
        self.worker.clear_connector_metadata()
        sched.update_connector_output(ECConnectorOutput(ec_connector_worker_meta=meta))
        sched.request_finished(request)

    def counts(self) -> dict[str, int]:
        stats = self.scheduler.get_ec_connector_stats()
        return stats.data["counters"] if stats else {}

    def close(self) -> None:
        self.worker._worker.engine.flush(10)
        self.worker.shutdown()
        self.scheduler.shutdown()


def test_connector_stores_an_encoder_output_and_loads_it_for_another_request(tmp_path):
    output = torch.randn(6, WIDTH)
    first = Connectors(vllm_config(tmp_path))
    # 1. A: not stored yet: the encoder runs and the output is stored.
    first.schedule(image_request(), output)
    assert first.encoded == [CAT]
    assert first.counts() == {
        "kvshelf_encoder_lookups_total|image": 1,
        "kvshelf_encoder_misses_total|image": 1,
        "kvshelf_encoder_stored_total|image": 1,
    }
    # 2. vLLM's encoder cache drops it; B (another prompt) loads it from kvshelf's memory.
    first.evict(CAT)
    first.schedule(image_request(), output)
    assert first.encoded == [CAT]
    assert torch.equal(first.encoder_cache[CAT], output)
    assert first.counts()["kvshelf_encoder_hits_total|image"] == 1
    owner = EncoderItem(CAT, "image", 6, WIDTH, "float32").owner()
    assert first.worker._worker.engine.hold(owner) is None  # the load let the hold go
    first.close()
    # 3. A new pair (a restart) on the same disk: loaded from disk.
    second = Connectors(vllm_config(tmp_path))
    second.schedule(image_request(), output)
    assert second.encoded == [] and torch.equal(second.encoder_cache[CAT], output)
    # 4. Another tenant's salt: not shared.
    second.evict(CAT)
    second.schedule(image_request(salt="other"), output)
    assert second.encoded == [CAT]
    second.close()


def test_connector_stores_nothing_it_cannot_key_or_verify(tmp_path, caplog):
    # vLLM names media per request (processor cache and prefix caching off): not cached.
    scoped = Connectors(vllm_config(tmp_path, cache_off=True))
    scoped.schedule(image_request(), torch.randn(6, WIDTH))
    assert scoped.counts() == {"kvshelf_encoder_uncacheable_total|image": 1}
    scoped.close()
    # An output wider than the width vLLM measured: not stored (a load could not check it).
    wide = Connectors(vllm_config(tmp_path))
    wide.schedule(image_request(), torch.randn(6, WIDTH + 1))
    counts = wide.counts()
    assert counts["kvshelf_encoder_uncacheable_total|image"] == 1
    assert "kvshelf_encoder_stored_total|image" not in counts
    wide.close()
    assert not list((tmp_path / "disk").rglob("*.kv"))


def test_a_dead_redis_is_a_miss_and_the_encoder_runs(tmp_path):
    config = vllm_config(
        tmp_path, remote_url=f"redis://127.0.0.1:{free_port()}/0", remote_timeout_s=0.1, cpu_bytes=0
    )
    pair = Connectors(config)
    output = torch.randn(6, WIDTH)
    pair.schedule(image_request(), output)
    pair.evict(CAT)
    pair.schedule(image_request(), output)
    assert pair.encoded == [CAT, CAT]
    counts = pair.counts()
    assert counts["kvshelf_encoder_misses_total|image"] == 2
    pair.close()


def test_one_config_with_kvshelf_connector(tmp_path):
    """The encoder cache takes KVShelfConnector's settings; its own extra config wins."""
    kv = {"local_disk": str(tmp_path / "kv"), "chunk_size": 256, "cpu_bytes": "1GiB"}
    config = encoder_config(vllm_config(tmp_path, kv_extra=kv, cpu_bytes="2GiB"))
    assert config.disk_path == tmp_path / "kv"
    assert config.cpu_bytes == 2 * 2**30
    with pytest.raises(ConfigError, match="did you mean"):
        encoder_config(vllm_config(tmp_path, disk_pth="x"))


def test_stats_aggregate_and_reduce():
    a = KVShelfECStats(
        data={
            "counters": {
                "kvshelf_encoder_lookups_total|image": 2,
                "kvshelf_encoder_hits_total|image": 1,
            }
        }
    )
    b = KVShelfECStats(data={"counters": {"kvshelf_encoder_lookups_total|video": 2}})
    merged = a.aggregate(b)
    assert merged.data["counters"]["kvshelf_encoder_lookups_total|video"] == 2
    assert merged.reduce()["encoder_hit_rate"] == 0.25
    assert KVShelfECStats().is_empty() and not merged.is_empty()


def test_beside_kvshelf_connector_the_encoder_cache_shares_its_tiers(tmp_path):
    """One config: the encoder engine opens no tiers of its own next to the KV engine's
    (one memory budget, one disk index), and its shutdown leaves the KV engine working."""
    kv_extra = {"disk_path": str(tmp_path / "disk"), "cpu_bytes": "1MB", "chunk_size": 16}
    kv_config = load_config(kv_extra, environ={})
    kv_engine = CacheEngine(
        kv_config, Namespace("m", "kv-layout", 0, 1, 16, FORMAT_VERSION)
    )  # what KVShelfConnector's worker opens
    config = vllm_config(tmp_path, kv_extra=kv_extra)
    config.ec_transfer_config.ec_connector_extra_config = {}  # settings from the KV side only
    pair = Connectors(config)
    encoder_engine = pair.worker._worker.engine
    assert encoder_engine.store.memory is kv_engine.store.memory
    assert encoder_engine.store.lower == kv_engine.store.lower
    output = torch.randn(6, WIDTH)
    pair.schedule(image_request(), output)
    assert kv_engine.store.stats()[0].entries == 1  # the encoder's entry, in the one budget
    pair.close()
    plan = kv_engine.plan(list(range(16)))
    entry = kv_engine.new_entry(plan.full[0], "uint8", (64,))
    assert entry is not None
    kv_engine.save([entry])
    assert kv_engine.flush(10) and kv_engine.locate(plan) == [plan.full[0]]
    kv_engine.close()


def test_the_connector_imports_on_a_vllm_without_ec_connector_metrics():
    """vLLM 0.26 has no ``ec_connector.metrics``: the connector works, unexported."""
    code = (
        "import sys; sys.modules['vllm.distributed.ec_transfer.ec_connector.metrics'] = None\n"
        "from kvshelf.vllm import ec_connector as c\n"
        "assert c.KVShelfECStats is None and c.KVShelfECPromMetrics is None\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
