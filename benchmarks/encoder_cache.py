"""Same media, new prefix: TTFT with and without kvshelf's encoder cache, on this CPU.

For each family (image: Idefics3, audio: Qwen2-Audio, video: Ovis2.5) it builds the tiny
offline model, serves it with ``KVShelfECConnector`` (disk tier; vLLM's prefix cache off,
so no KV is reused) and stores the media's encoder output once. Then, ``--rounds`` times,
each with a chat history never sent before, it times two requests for the same media:

- *encoder runs*: under a fresh ``cache_salt`` kvshelf holds nothing for it;
- *encoder cache*: under the salt it was stored with: the output comes from kvshelf.

Both run on one server (the same threads and core binding), and vLLM's own encoder cache
is emptied before each (``/reset_encoder_cache``, with ``VLLM_SERVER_DEV_MODE=1``), so the
two differ only in where the encoder output comes from. The difference is the encoder's
share of the prefill. It prints a table and writes JSON and a PNG.

    python benchmarks/encoder_cache.py                      # all three, size xs
    python benchmarks/encoder_cache.py --families ovis2_5 --size m --rounds 12
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from kvshelf.bench.client import stream_chat
from kvshelf.testing import (
    VllmServer,
    build_content,
    build_model,
    chat_request,
    filler_text,
    free_port,
    make_media,
    serve_args,
)

CASES = {  # family -> (request type, media item)
    "idefics3": ("single-image", "image_a"),
    "qwen2_audio": ("audio", "audio_a"),
    "ovis2_5": ("video", "video_a"),
}
STORED_SALT = "stored"


@dataclass
class Row:
    family: str
    modality: str
    prompt_tokens: int
    runs_ms: list[float]  # TTFT, encoder runs
    cached_ms: list[float]  # TTFT, encoder output from kvshelf
    hits_logged: int  # kvshelf's "encoder hit" lines: one per cached request expected

    @property
    def runs_median_ms(self) -> float:
        return statistics.median(self.runs_ms)

    @property
    def cached_median_ms(self) -> float:
        return statistics.median(self.cached_ms)

    @property
    def saving(self) -> float:
        return 1 - self.cached_median_ms / self.runs_median_ms


def main() -> None:
    args = _parse_args()
    media = make_media(args.work / "media")
    rows = [measure(family, args, media) for family in args.families]
    _print(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "cpu": platform.processor() or platform.machine(),
        "size": args.size,
        "dtype": args.dtype,
        "rounds": args.rounds,
        "rows": [asdict(r) | {"saving": round(r.saving, 3)} for r in rows],
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def measure(family: str, args: argparse.Namespace, media: dict) -> Row:
    request_type, name = CASES[family]
    model = build_model(
        family, args.work / f"{family}-{args.size}", size=args.size, dtype=args.dtype
    )
    disk = args.work / f"cache-{family}"
    shutil.rmtree(disk, ignore_errors=True)
    ec = {
        "ec_connector": "KVShelfECConnector",
        "ec_role": "ec_both",
        "ec_connector_extra_config": {"disk_path": str(disk)},
    }
    server = VllmServer(
        model,
        port=free_port(),
        args=[
            *serve_args(family),
            "--served-model-name",
            "m",
            "--enforce-eager",
            "--max-model-len",
            "4096",
            "--no-enable-prefix-caching",
            "--ec-transfer-config",
            json.dumps(ec),
        ],
        env={"VLLM_SERVER_DEV_MODE": "1"},
        log_path=args.work / f"server-{family}.log",
    )
    seeds = iter(range(10**6))

    def ask(client: httpx.Client, salt: str) -> tuple[float, int]:
        client.post(f"{server.url}/reset_encoder_cache").raise_for_status()
        seed = next(seeds)
        history = [
            {"role": "user", "content": filler_text(args.history_words, seed)},
            {"role": "assistant", "content": filler_text(8, seed + 10**6)},
            {"role": "user", "content": build_content(request_type, media, media_names=[name])},
        ]
        body = chat_request("m", history, max_tokens=1, cache_salt=salt)
        result = stream_chat(client, server.url, body)
        return round(result.ttft_s * 1000, 2), result.prompt_tokens or 0

    with server, httpx.Client(timeout=300) as client:
        ask(client, "warm-up")  # vLLM's first-request cost
        ask(client, STORED_SALT)  # the encoder runs; its output is stored
        time.sleep(1)  # written to disk; later hits come from memory
        runs, cached, tokens = [], [], 0
        for i in range(args.rounds):
            runs.append(ask(client, f"fresh-{i}")[0])
            ms, tokens = ask(client, STORED_SALT)
            cached.append(ms)
        hits = server.log_text(since_start=True).count("kvshelf encoder hit")
    modality = request_type.split("-")[-1]
    return Row(family, modality, tokens, runs, cached, hits)


def _print(rows: list[Row], args: argparse.Namespace) -> None:
    print(
        f"\nsame media, new prefix: TTFT median of {args.rounds} "
        f"(size {args.size}, {args.dtype}, {platform.processor() or platform.machine()})"
    )
    print(
        f"{'family':<12} {'modality':<8} {'prompt':>7} {'encoder runs':>13} "
        f"{'encoder cache':>14} {'saving':>7} {'hits logged':>12}"
    )
    for r in rows:
        print(
            f"{r.family:<12} {r.modality:<8} {r.prompt_tokens:>7} {r.runs_median_ms:>10.1f} ms"
            f" {r.cached_median_ms:>11.1f} ms {r.saving:>7.0%} {r.hits_logged:>7}/{args.rounds}"
        )


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(rows):
        for k, (label, values) in enumerate(
            [("encoder runs", r.runs_ms), ("encoder cache", r.cached_ms)]
        ):
            x = i + (k - 0.5) * 0.35
            ax.bar(
                x, statistics.median(values), 0.35, color=f"C{k}", label=label if i == 0 else None
            )
            ax.scatter([x] * len(values), values, color="k", s=6, zorder=3)
    ax.set_xticks(range(len(rows)), [f"{r.family}\n{r.modality}" for r in rows])
    ax.set_ylabel("TTFT, ms (bars: median; dots: rounds)")
    ax.set_title("same media after a new chat history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--size", default="xs", help="model size preset (kvshelf.testing)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--history-words",
        type=int,
        default=300,
        help="words of chat history before the media (about one token each)",
    )
    parser.add_argument("--work", type=Path, default=Path(".work/bench-encoder-cache"))
    parser.add_argument("--out", type=Path, default=Path("out/encoder_cache.json"))
    return parser.parse_args()


if __name__ == "__main__":
    main()
