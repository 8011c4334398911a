"""TTFT on a GPU host: kvshelf against vLLM's own prefix caching and CPU offloading.

For one model directory (see models.py) and prompts of an image plus ~8K and ~32K tokens
of text, each setup runs in its own vLLM server, one after another:

  none            no connector, prefix caching off: every request is cold (the reference
                  for requests kvshelf has no hit for, and for throughput)
  baseline        no connector, prefix caching on: each prompt's first request is cold,
                  its repeats hit vLLM's own GPU cache (the floor)
  simple_offload  vLLM's SimpleCPUOffloadConnector, GPU cache forced small so a prompt
                  is evicted to CPU memory before it comes again
  kvshelf         KVShelfConnector, prefix caching off: cold requests save to kvshelf's
                  memory tier (pinned host memory) and, in the background, its disk
                  tier; repeats load from memory
  kvshelf_mem     the same without the disk tier
  kvshelf_fp8     kvshelf_mem storing entries as fp8 (kv_storage_dtype: fp8_e4m3)
  kvshelf_buffered
                  kvshelf with disk_fsync off: buffered writes, which fill the page cache
                  at memory speed and are written back later
  kvshelf_disk    the kvshelf server restarted with the page cache dropped: repeats of
                  the 8K prompts load from kvshelf's disk tier
  lmcache         LMCache's LMCacheConnectorV1 (CPU tier), prefix caching off

It prints a table (median TTFT per setup and size, warm speedup, kvshelf's load GB/s vs
the pinned host->device copy measured here) and where each phase's time went by vLLM's
own request metrics (before the engine, waiting in the scheduler, from being scheduled
to the first token), writes OUT/ttft.json and OUT/ttft.png. Throughput is the median of
5 bursts of 16 simultaneous requests, run before the prompts so their saves cannot evict
them, with the bursts' mean prefill, decode and inter-token times from the same metrics.
With --profile, the none, baseline and kvshelf servers also record one cold and one warm
request of each size in vLLM's torch profiler: OUT/profile/<model>_<setup>/*.json.gz
(kvshelf's hooks are the kvshelf.* ranges; benchmarks/gpu/trace.py summarises them).

usage: python benchmarks/gpu/ttft.py MODEL_DIR --out OUT [--setups ...] [--sizes 8k,32k]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from kvshelf.bench.client import stream_chat
from kvshelf.testing.server import VllmServer, free_port

SIZES = {"8k": 7500, "32k": 28500}  # words of text -> ~8.5K / ~32.5K prompt tokens
SMOKE_SIZES = {"8k": 300, "32k": 600}  # --smoke: a CPU dry run of the whole flow
_LOADED = re.compile(r"loaded (\d+) bytes in ([\d.]+) ms")
_LOOKED_UP = re.compile(r"Total tokens (\d+), kvshelf hit tokens: (\d+)")
SERVING: dict = {}  # the model dir's bench.json: text_only, serve_args, offload_blocks
DISK_SETUPS = ("kvshelf", "kvshelf_buffered")  # kvshelf servers with a disk tier (a fresh one)
# Setups whose bursts are measured; --no-throughput empties it (TTFT only, a short run).
THROUGHPUT = {"none", "baseline", "kvshelf_mem", *DISK_SETUPS}
SPANS = {  # vLLM histogram -> the part of a request's TTFT it times
    "server": "vllm:time_to_first_token_seconds",  # the API server's arrival to the first token
    "queue": "vllm:request_queue_time_seconds",  # waiting in the scheduler (lookups included)
    "prefill": "vllm:request_prefill_time_seconds",  # first scheduled to the first token
}
BURST_SPANS = {  # the same for throughput bursts: where a slower burst lost its time
    "prefill": "vllm:request_prefill_time_seconds",
    "decode": "vllm:request_decode_time_seconds",  # first token to the last
    "itl": "vllm:inter_token_latency_seconds",  # between two output tokens
}


@dataclass
class Sample:
    setup: str
    size: str
    phase: str  # "cold", "warm"
    prompt: int
    ttft_s: float
    prompt_tokens: int | None


@dataclass
class Results:
    model: str
    device: str = ""
    h2d_gbps: float = 0.0
    d2h_gbps: float = 0.0
    tp: int = 1  # ranks: each holds 1/tp of the KV and copies it over its own link
    samples: list[Sample] = field(default_factory=list)
    load_gbps: dict[str, list[float]] = field(default_factory=dict)
    hits: dict[str, list[list[int]]] = field(default_factory=dict)  # [prompt, hit] per lookup
    throughput: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    spans: list[dict] = field(default_factory=list)  # per setup, size and phase: mean ms

    @classmethod
    def read(cls, path: Path) -> Results:
        """Results written by an earlier call (``--resume``), to add more setups to."""
        data = json.loads(path.read_text())
        data.pop("rows", None)
        data["samples"] = [Sample(**s) for s in data["samples"]]
        return cls(**data)


# -- prompts -----------------------------------------------------------------
def image_url(seed: int) -> str:
    pixels = (np.random.RandomState(seed).rand(336, 336, 3) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(model: str, words: list[str], size: str, prompt: int, max_tokens: int = 2) -> dict:
    rng = random.Random(f"{size}-{prompt}")
    text = " ".join(rng.choice(words) for _ in range(SIZES[size]))
    content = [
        {"type": "image_url", "image_url": {"url": image_url(1000 * prompt + len(size))}},
        {"type": "text", "text": text},
    ]
    if SERVING.get("text_only"):
        content = content[1:]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


# -- copies ------------------------------------------------------------------------------
def pinned_copy_gbps() -> tuple[float, float]:
    """Host->device and device->host GB/s of a 1 GiB pinned copy (median of 10)."""
    import torch

    nbytes = 1 << 30
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rates = {"h2d": [], "d2h": []}
    for _ in range(12):
        for kind, dst, src in (("h2d", device, host), ("d2h", host, device)):
            torch.cuda.synchronize()
            began = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            rates[kind].append(nbytes / (time.perf_counter() - began) / 1e9)
    del host, device
    torch.cuda.empty_cache()
    return statistics.median(rates["h2d"][2:]), statistics.median(rates["d2h"][2:])


# -- servers -----------------------------------------------------------------------------
def kv_transfer(connector: str, extra: dict | None = None, **more) -> list[str]:
    config = {"kv_connector": connector, "kv_role": "kv_both", **more}
    if extra is not None:
        config["kv_connector_extra_config"] = extra
    return ["--kv-transfer-config", json.dumps(config)]


PROFILED = ("none", "baseline", "kvshelf", "kvshelf_mem")


def disk_dir(work: Path, setup: str) -> Path:
    """kvshelf's disk tier for a setup: kvshelf_disk restarts kvshelf's server on kvshelf's."""
    return work / ("kvshelf_buffered-disk" if setup == "kvshelf_buffered" else "kvshelf-disk")


def trace_dir(work: Path, setup: str) -> Path:
    """Where a profiled server writes its torch-profiler traces."""
    return work / "profile" / setup


def setup_args(
    setup: str, work: Path, max_len: int, tp: int = 1, profile: bool = False
) -> tuple[list[str], dict[str, str]]:
    common = [
        "--load-format",
        "dummy",
        "--max-model-len",
        str(max_len),
        "--gpu-memory-utilization",
        "0.85",
        "--served-model-name",
        "m",
        "--tensor-parallel-size",
        str(tp),
        *SERVING.get("serve_args", []),
    ]
    if profile and setup in PROFILED:
        traces = trace_dir(work, setup)
        shutil.rmtree(traces, ignore_errors=True)  # only this server's trace in there
        common += [
            "--profiler-config",
            json.dumps(
                {
                    "profiler": "torch",
                    "torch_profiler_dir": str(traces.resolve()),
                    "torch_profiler_with_stack": False,
                    "ignore_frontend": True,
                }
            ),
        ]
    env: dict[str, str] = {}
    if tp > 1:  # vLLM's own all-reduce kernels need NVLink multicast, off on some hosts:
        env["VLLM_ALLREDUCE_USE_SYMM_MEM"] = "0"  # NCCL's all-reduce instead, unfused
        common += [
            "--disable-custom-all-reduce",
            "--compilation-config",
            json.dumps(
                {
                    "pass_config": {
                        "fuse_allreduce_rms": False,
                        "enable_sp": False,
                        "fuse_gemm_comms": False,
                    }
                }
            ),
        ]
    if setup == "none":
        return common + ["--no-enable-prefix-caching"], env
    if setup == "baseline":
        return common, env
    if setup == "simple_offload":  # 1400 blocks of 16 tokens: two 8K prompts fit, not five
        common[common.index("--max-model-len") + 1] = "20000"
        blocks = str(SERVING.get("offload_blocks", 1400))
        return common + ["--num-gpu-blocks-override", blocks] + kv_transfer(
            "SimpleCPUOffloadConnector", {"cpu_bytes_to_use": 40_000_000_000}
        ), env
    if setup in ("kvshelf_mem", "kvshelf_fp8", "kvshelf_disk", *DISK_SETUPS):
        # Queued saves stay pinned in memory until written: the queue takes five 8K llava7b
        # prompts (22.5 GB) whole, and memory still has room for one 32K prompt (16.2 GB).
        extra = {"cpu_bytes": "48GB", "save_queue_bytes": "24GB", "log_level": "DEBUG"}
        if setup == "kvshelf_fp8":
            extra["kv_storage_dtype"] = "fp8_e4m3"
        if setup != "kvshelf_mem":
            extra.update(
                disk_path=str(disk_dir(work, setup)),
                disk_bytes="40GB",
                disk_fsync=setup != "kvshelf_buffered",
            )
        return common + ["--no-enable-prefix-caching"] + kv_transfer("KVShelfConnector", extra), env
    if setup == "lmcache":
        env.update(
            LMCACHE_CHUNK_SIZE="256", LMCACHE_LOCAL_CPU="True", LMCACHE_MAX_LOCAL_CPU_SIZE="40"
        )
        return common + ["--no-enable-prefix-caching"] + kv_transfer("LMCacheConnectorV1"), env
    raise ValueError(setup)


def wait_for_log(server: VllmServer, needle: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in server.log_text(since_start=True):
            return True
        time.sleep(1)
    return False


# -- measuring ---------------------------------------------------------------------------
def ttft(client: httpx.Client, server: VllmServer, body: dict) -> tuple[float, int | None]:
    result = stream_chat(client, server.url, body)
    return result.ttft_s, result.prompt_tokens


def measure(client, server, results, setup, words, size, prompts, phase, repeats=1):
    before, seconds_list = histogram_sums(client, server), []
    for prompt in prompts:
        for _ in range(repeats):
            seconds, tokens = ttft(client, server, chat_body("m", words, size, prompt))
            seconds_list.append(seconds)
            results.samples.append(Sample(setup, size, phase, prompt, seconds, tokens))
            print(
                f"  {setup:15s} {size:4s} {phase:5s} prompt {prompt}: "
                f"{seconds * 1e3:8.1f} ms ({tokens} tokens)",
                flush=True,
            )
    means = histogram_means(client, server, before)
    if means:
        results.spans.append(
            {
                "setup": setup,
                "size": size,
                "phase": phase,
                "client": statistics.mean(seconds_list) * 1e3,
                **means,
            }
        )


def histogram_sums(
    client: httpx.Client, server: VllmServer, spans: dict[str, str] = SPANS
) -> dict[str, tuple[float, float]]:
    """(sum, count) of each of vLLM's ``spans`` histograms, over all their label sets."""
    try:
        families = metric_families(client, server)
    except httpx.HTTPError:
        return {}
    wanted = {metric: name for name, metric in spans.items()}
    sums: dict[str, list[float]] = {}
    for family in families:
        name = wanted.get(family.name)
        if name is None:
            continue
        total = sums.setdefault(name, [0.0, 0.0])
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total[0] += sample.value
            elif sample.name.endswith("_count"):
                total[1] += sample.value
    return {name: (total[0], total[1]) for name, total in sums.items()}


def metric_total(client: httpx.Client, server: VllmServer, family_name: str) -> float:
    """Sum of a counter family's ``_total`` samples in vLLM's /metrics; 0 when it has none
    (kvshelf's counters get their series at their first increment)."""
    return sum(
        sample.value
        for family in metric_families(client, server)
        if family.name == family_name
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def metric_families(client: httpx.Client, server: VllmServer) -> list:
    """vLLM's /metrics, parsed (prometheus_client metric families)."""
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(client.get(f"{server.url}/metrics").text))


def histogram_means(
    client: httpx.Client, server: VllmServer, before: dict, spans: dict[str, str] = SPANS
) -> dict[str, float]:
    """Mean ms per observation of each of ``spans`` since ``before`` (``histogram_sums``)."""
    time.sleep(0.5)  # finished requests reach the metrics a moment after their last chunk
    after = histogram_sums(client, server, spans)
    return {
        name: (after[name][0] - before[name][0]) / (after[name][1] - before[name][1]) * 1e3
        for name in after
        if name in before and after[name][1] > before[name][1]
    }


def throughput(client: httpx.Client, server: VllmServer, words: list[str], bursts: int = 5) -> dict:
    """Median output tokens/s over ``bursts`` bursts of simultaneous cold requests, and
    the bursts' mean BURST_SPANS."""
    before = histogram_sums(client, server, BURST_SPANS)
    runs = [burst(server, words) for _ in range(bursts)]
    spans = histogram_means(client, server, before, BURST_SPANS)
    rates = [r["tokens_per_s"] for r in runs]
    return {**runs[rates.index(statistics.median_high(rates))], "bursts": rates, "spans_ms": spans}


def burst(
    server: VllmServer, words: list[str], concurrency: int = 16, max_tokens: int = 128
) -> dict:
    """Output tokens/s for ``concurrency`` simultaneous ~1K-token requests (cold)."""
    results: list[tuple[float, int]] = []

    def one(i: int) -> None:
        rng = random.Random(f"tput-{i}-{time.time()}")
        body = {
            "model": "m",
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "messages": [
                {"role": "user", "content": " ".join(rng.choice(words) for _ in range(900))}
            ],
        }
        with httpx.Client(timeout=600) as client:
            began = time.perf_counter()
            reply = client.post(f"{server.url}/v1/chat/completions", json=body).json()
            results.append((time.perf_counter() - began, reply["usage"]["completion_tokens"]))

    began = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    tokens = sum(n for _, n in results)
    return {"output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def drop_page_cache() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def profile_requests(
    client,
    server,
    work: Path,
    out: Path,
    setup: str,
    model: str,
    words: list[str],
    sizes: list[str],
) -> None:
    """Per size, one cold and one warm request (prompt 98, never measured) under the
    profiler; the trace goes to OUT/profile/<model>_<setup>/."""
    traces = trace_dir(work, setup)
    client.post(f"{server.url}/start_profile").raise_for_status()
    for size in sizes:
        for phase in ("cold", "warm"):
            seconds, _ = ttft(client, server, chat_body("m", words, size, 98))
            print(
                f"  {setup:15s} {size:4s} {phase:5s} profiled: {seconds * 1e3:8.1f} ms", flush=True
            )
    client.post(f"{server.url}/stop_profile").raise_for_status()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(traces.rglob("*.json*")):
        time.sleep(1)  # the worker writes its trace after stop_profile returns
    time.sleep(5)
    keep = out / "profile" / f"{model}_{setup}"
    keep.mkdir(parents=True, exist_ok=True)
    for path in traces.rglob("*.json*"):
        shutil.copy(path, keep / path.name)


def run_setup(
    setup,
    model_dir,
    work,
    results,
    words,
    sizes,
    cold_prompts,
    warm_repeats,
    server_box,
    log_dir,
    tp=1,
    profile=False,
):
    max_len = 4096 if SIZES["8k"] == SMOKE_SIZES["8k"] else 34000
    args, env = setup_args(setup, work, max_len, tp, profile)
    env = {**os.environ, **env}
    if setup == "kvshelf_disk":
        server = server_box.get("kvshelf")
        if server is None:
            raise RuntimeError("kvshelf_disk needs the kvshelf server first")
    else:
        if setup in DISK_SETUPS:  # cold requests must not find an earlier run's entries
            shutil.rmtree(disk_dir(work, setup), ignore_errors=True)
        server = VllmServer(
            model_dir,
            port=free_port(),
            args=args,
            env=env,
            log_path=work / f"serve_{setup}.log",
            startup_timeout_s=900,
        )
        server_box[setup] = server
    try:  # the server's log is kept whatever happens, a failed start included
        measure_setup(
            setup,
            server,
            model_dir,
            work,
            results,
            words,
            sizes,
            cold_prompts,
            warm_repeats,
            log_dir,
            profile,
        )
    finally:
        keep_log_lines(server, log_dir / f"serve_{setup}.log")


def measure_setup(
    setup,
    server,
    model_dir,
    work,
    results,
    words,
    sizes,
    cold_prompts,
    warm_repeats,
    log_dir,
    profile,
):
    if setup == "kvshelf_disk":
        server.stop()
        results.notes.append(f"page cache dropped before kvshelf_disk: {drop_page_cache()}")
    server.start()
    print(f"== {setup}: up in {server.startup_s:.0f} s", flush=True)
    if "pinning up to" in server.log_text(since_start=True):
        wait_for_log(server, "memory tier ready", 180)  # pinned memory is grown at start
    # With the disk tier on, each phase starts once the earlier saves are on disk: a full
    # save queue drops saves (the restart must find every 8K prompt there), and the
    # background writes would share host memory bandwidth with the phase's own copies.
    settle = (
        (lambda: settle_disk(disk_dir(work, setup))) if setup in DISK_SETUPS else (lambda: None)
    )
    with httpx.Client(timeout=900) as client:
        # Warm-up (first-request costs), not measured; prompt 99 is never measured.
        ttft(client, server, chat_body("m", words, sizes[-1], 99))
        if setup in THROUGHPUT:  # first, so the bursts' saves cannot evict the prompts measured
            results.throughput[setup] = throughput(client, server, words)
        for size in sizes:
            prompts = list(range(cold_prompts[size]))
            if setup == "kvshelf_disk":
                measure(client, server, results, setup, words, size, prompts, "warm")
                continue
            settle()
            measure(client, server, results, setup, words, size, prompts, "cold")
            if setup == "none":  # nothing is cached: repeats would be cold again
                continue
            settle()
            if setup == "simple_offload":  # revisit in order: each was evicted by later ones
                measure(client, server, results, setup, words, size, prompts, "warm")
            else:
                measure(
                    client, server, results, setup, words, size, prompts[-1:], "warm", warm_repeats
                )
        if profile and setup in PROFILED:
            profile_requests(client, server, work, log_dir, setup, model_dir.name, words, sizes)
        if setup.startswith("kvshelf"):
            saved, dropped = (
                metric_total(client, server, f"kvshelf_{name}")
                for name in ("saved_chunks", "dropped_saves")
            )
            results.notes.append(
                f"{setup}: {saved:.0f} chunks saved, {dropped:.0f} not written"
                " to disk (save queue full)"
            )
    log = server.log_text(since_start=True)
    loads = [
        int(b) / float(ms) / 1e6 for b, ms in _LOADED.findall(log) if float(ms) > 0 and int(b) > 1e8
    ]
    if loads:
        results.load_gbps[setup] = loads
    if lookups := [[int(total), int(hit)] for total, hit in _LOOKED_UP.findall(log)]:
        results.hits[setup] = lookups
    if setup == "kvshelf":  # kept for kvshelf_disk
        settle_disk(disk_dir(work, setup))
    else:
        server.stop()
    if setup == "kvshelf_buffered":  # room on the disk for the next setup
        shutil.rmtree(disk_dir(work, setup), ignore_errors=True)


def keep_log_lines(server: VllmServer, path: Path) -> None:
    """What matters of a server log: kvshelf's lines, errors, and the tail."""
    lines = server.log_text(since_start=False).splitlines()
    wanted = [line for line in lines if "kvshelf" in line or "ERROR" in line or "Error" in line]
    path.write_text("\n".join(wanted[-3000:] + ["--- tail ---"] + lines[-60:]) + "\n")


def settle_disk(path: Path, quiet_s: float = 3.0, timeout_s: float = 300.0) -> None:
    """Wait until kvshelf's background disk writes stop: no entry being written (a
    ``.tmp`` file) and no new entry for ``quiet_s``."""
    deadline, last, quiet_since = time.monotonic() + timeout_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        files = list(path.rglob("*.kv*")) if path.exists() else []
        writing = any(f.name.endswith(".tmp") for f in files)
        size = -2 if writing else sum(_size(f) for f in files if f.suffix == ".kv")
        if size != last or writing:
            last, quiet_since = size, time.monotonic()
        elif time.monotonic() - quiet_since > quiet_s:
            return
        time.sleep(0.5)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # evicted meanwhile
        return 0


# -- report ------------------------------------------------------------------------------
def median_ttft(results: Results, setup: str, size: str, phase: str) -> float | None:
    values = [
        s.ttft_s
        for s in results.samples
        if s.setup == setup and s.size == size and s.phase == phase
    ]
    return statistics.median(values) if values else None


def table(results: Results, kv_bytes_per_token: int) -> list[dict]:
    rows = []
    sizes = sorted({s.size for s in results.samples}, key=lambda s: int(s[:-1]))
    for size in sizes:
        # Cold reference: no connector with prefix caching off where it ran, else with it on.
        cold = median_ttft(results, "none", size, "cold") or median_ttft(
            results, "baseline", size, "cold"
        )
        floor = median_ttft(results, "baseline", size, "warm")
        tokens = next(
            (s.prompt_tokens for s in results.samples if s.size == size and s.prompt_tokens), 0
        )
        rank_bytes = tokens * kv_bytes_per_token / results.tp
        copy_s = rank_bytes / (results.h2d_gbps * 1e9) if results.h2d_gbps else None
        for setup in (
            "none",
            "baseline",
            "simple_offload",
            "kvshelf",
            "kvshelf_mem",
            "kvshelf_fp8",
            "kvshelf_buffered",
            "kvshelf_fsync",
            "kvshelf_disk",
            "lmcache",
        ):  # kvshelf_fsync: run 10's kvshelf
            for phase in ("cold", "warm"):
                value = median_ttft(results, setup, size, phase)
                if value is None:
                    continue
                rows.append(
                    {
                        "size": size,
                        "prompt_tokens": tokens,
                        "setup": setup,
                        "phase": phase,
                        "ttft_ms": round(value * 1e3, 1),
                        "speedup_vs_cold": round(cold / value, 2) if cold else None,
                        "target_ms": round((floor + 1.1 * copy_s) * 1e3, 1)
                        if setup.startswith("kvshelf") and phase == "warm" and floor and copy_s
                        else None,
                    }
                )
    return rows


def print_table(rows: list[dict], results: Results) -> None:
    print(
        f"\n{results.model} on {results.device}: pinned H2D {results.h2d_gbps:.1f} GB/s, "
        f"D2H {results.d2h_gbps:.1f} GB/s"
    )
    print(
        f"{'size':5s} {'tokens':>7s} {'setup':15s} {'phase':5s} {'TTFT ms':>9s} {'x cold':>7s} {'target ms':>9s}"
    )
    for r in rows:
        print(
            f"{r['size']:5s} {r['prompt_tokens']:7d} {r['setup']:15s} {r['phase']:5s} "
            f"{r['ttft_ms']:9.1f} {r['speedup_vs_cold'] or '':>7} {r['target_ms'] or '':>9}"
        )
    if results.spans:
        print(
            "\nwhere TTFT went, means in ms (vLLM's request metrics): before the engine ="
            " client TTFT - server TTFT; the rest of server TTFT is queue + prefill + hand-offs"
        )
        print(
            f"{'size':5s} {'setup':15s} {'phase':5s} {'client':>8s} {'before':>8s} {'queue':>8s}"
            f" {'prefill':>8s} {'hand-offs':>9s}"
        )
        for r in sorted(results.spans, key=lambda r: (int(r["size"][:-1]), r["setup"], r["phase"])):
            server, queue, prefill = (r.get(name, float("nan")) for name in SPANS)
            print(
                f"{r['size']:5s} {r['setup']:15s} {r['phase']:5s} {r['client']:8.1f} "
                f"{r['client'] - server:8.1f} {queue:8.1f} {prefill:8.1f} "
                f"{server - queue - prefill:9.1f}"
            )
    for setup, rates in results.load_gbps.items():
        print(f"{setup} load: median {statistics.median(rates):.1f} GB/s over {len(rates)} loads")
    for setup, lookups in results.hits.items():
        full = sum(hit == total for total, hit in lookups)
        some = sum(0 < hit < total for total, hit in lookups)
        print(
            f"{setup} lookups: {full} full hits, {some} partial, {len(lookups) - full - some} misses"
        )
    for setup, t in results.throughput.items():
        print(
            f"{setup} throughput: {t['tokens_per_s']:.0f} output tokens/s (median of "
            f"{' '.join(f'{r:.0f}' for r in t.get('bursts', []))}); per request, mean ms: "
            + ", ".join(f"{k} {v:.2f}" for k, v in t.get("spans_ms", {}).items())
        )
    for setup, error in results.errors.items():
        print(f"{setup} FAILED: {error}")


def plot(rows: list[dict], results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in rows}, key=lambda s: int(s[:-1]))
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 5.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        chosen = [r for r in rows if r["size"] == size]
        labels = [f"{r['setup']} {r['phase']}" for r in chosen]
        ax.bar(
            labels,
            [r["ttft_ms"] for r in chosen],
            color=["#888" if r["phase"] == "cold" else "#2a7" for r in chosen],
        )
        ax.set_title(f"{results.model}, {size} prompt ({chosen[0]['prompt_tokens']} tokens)")
        ax.set_ylabel("TTFT, median (ms)")
        ax.tick_params(axis="x", labelsize=8, labelrotation=50)
        ax.set_yscale("log")  # disk and LMCache rows are seconds, the rest tens of ms
    fig.suptitle(f"TTFT on {results.device} (grey: cold, green: warm)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kvbench"))
    parser.add_argument(
        "--setups", default="none,baseline,kvshelf,kvshelf_disk,simple_offload,lmcache"
    )
    parser.add_argument("--sizes", default="8k,32k")
    parser.add_argument("--kv-bytes-per-token", type=int, required=True)
    parser.add_argument("--warm-repeats", type=int, default=5)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (GPUs)")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run with short prompts")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="add to OUT's results from an earlier call on the same machine",
    )
    parser.add_argument("--no-throughput", action="store_true", help="skip the bursts")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="trace one cold and one warm request per none/baseline/kvshelf server",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    earlier = args.out / f"ttft_{args.model_dir.name}.json"
    if (args.model_dir / "bench.json").exists():
        SERVING.update(json.loads((args.model_dir / "bench.json").read_text()))
    if args.smoke:
        SIZES.update(SMOKE_SIZES)
    if args.no_throughput:
        THROUGHPUT.clear()
    if args.resume and earlier.exists():
        results = Results.read(earlier)
    elif args.smoke:
        results = Results(args.model_dir.name, "cpu (smoke)")
    else:
        import torch

        results = Results(args.model_dir.name, torch.cuda.get_device_name())
        if args.tp > 1:
            results.device += f" x{args.tp} (TP={args.tp})"
            results.tp = args.tp
        results.h2d_gbps, results.d2h_gbps = pinned_copy_gbps()
    words = (args.model_dir / "words.txt").read_text().split()
    sizes = args.sizes.split(",")
    servers: dict[str, VllmServer] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: stop servers, keep logs
    try:
        for setup in args.setups.split(","):
            # vLLM's offloading and LMCache run at 8K only (their GPU/CPU sizing); kvshelf
            # does 32K before 8K so the 8K prompts are the ones its disk budget keeps.
            chosen = {
                "simple_offload": ["8k"],
                "lmcache": ["8k"],
                "kvshelf_disk": ["8k"],
                **dict.fromkeys(
                    ("kvshelf_mem", *DISK_SETUPS), sorted(sizes, key=lambda s: -int(s[:-1]))
                ),
            }.get(setup, sizes)
            chosen = [s for s in chosen if s in sizes]
            try:
                run_setup(
                    setup,
                    args.model_dir,
                    args.work,
                    results,
                    words,
                    chosen,
                    {"8k": 5, "32k": 5},
                    args.warm_repeats,
                    servers,
                    args.out,
                    args.tp,
                    args.profile,
                )
            except Exception as exc:  # noqa: BLE001 - one broken setup must not lose the rest
                results.errors[setup] = f"{type(exc).__name__}: {exc}"[-2000:]
                print(f"!! {setup} failed: {exc}", flush=True)
            write(results, args)  # after every setup: a run cut short keeps what it measured
    finally:
        for server in servers.values():
            server.stop()
    print_table(write(results, args), results)
    return 0


def write(results: Results, args: argparse.Namespace) -> list[dict]:
    rows = table(results, args.kv_bytes_per_token)
    payload = {**asdict(results), "rows": rows}
    (args.out / f"ttft_{results.model}.json").write_text(json.dumps(payload, indent=1))
    if rows:
        plot(rows, results, args.out / f"ttft_{results.model}.png")
    return rows


if __name__ == "__main__":
    sys.exit(main())
