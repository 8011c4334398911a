"""LMCache's multimodal page end to end on the GPU host: its four serve commands, each with
kvshelf by name, at the real models' shapes (``--load-format dummy``), and the page's
client run twice, then once more after a server restart.

For each model: build the dir (kvshelf.testing.reference_models.write_real_shape), start
vLLM with the page's flags and ``KVShelfConnector`` (memory tier and a disk tier under
OUT_DIR), send the client's requests for the model's chat type (``kvshelf bench
--reference-client``: URL, base64 and input_audio forms; the host has no internet, so the
media are generated stand-ins of the client's, served from a local HTTP server) two runs,
restart, one more run. Prints a table per model (per request: TTFT and kvshelf's hit tokens
from the log line in each run; each run's total time) and writes
``OUT_DIR/reference_<family>.json`` and ``.md`` and the server log.

usage: python benchmarks/gpu/reference.py MODELS_DIR OUT_DIR [FAMILY ...]
       (FAMILY: llava, phi3_v, llava_onevision, ultravox; default all four)
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import sys
from pathlib import Path

from kvshelf.bench.logs import line_for, request_lines
from kvshelf.bench.reference import run_reference, run_totals
from kvshelf.bench.report import format_seconds, make_console, runs_table, write_json
from kvshelf.bench.run import BenchSettings, Measurement
from kvshelf.testing import VllmServer, make_page_media
from kvshelf.testing.reference_models import (
    PAGE_CHAT_TYPE,
    REFERENCE_MODELS,
    SERVE_ARGS,
    write_real_shape,
)

# The page media each model's chat type sends (kvshelf.bench.media.PAGE_MEDIA names).
MEDIA = {
    "llava": ("boardwalk",),
    "phi3_v": ("duck", "lion"),
    "llava_onevision": ("video",),
    "ultravox": ("audio", "audio_2"),
}
RUN_LABELS = {0: "run 1", 1: "run 2", 2: "run 3 (after restart)"}


def measure(family: str, models: Path, out: Path) -> list[Measurement]:
    model_dir = models / f"page_{family}"
    if not (model_dir / "config.json").exists():
        write_real_shape(family, model_dir)
    media = make_page_media(out / "media")
    kv = {
        "kv_connector": "KVShelfConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"disk_path": str(out / f"cache-{family}")},
    }
    args = [
        *SERVE_ARGS[family],
        "--load-format",
        "dummy",
        "--served-model-name",
        REFERENCE_MODELS[family],
        "--kv-transfer-config",
        json.dumps(kv),
    ]
    settings = BenchSettings(
        url="",
        chat_types=[PAGE_CHAT_TYPE[family]],
        media=[str(media[name]) for name in MEDIA[family]],
        repeat=2,
        max_tokens=128,
        warmup=0,
        cache_salt=None,
        timeout_s=900,
    )
    server = VllmServer(
        model_dir, args=args, log_path=out / f"{family}_serve.log", startup_timeout_s=1800
    )
    with server:
        settings.url = server.url
        first = run_reference(settings).measurements  # runs 1 and 2
        _attach(first, server.log_text(since_start=True))
        server.restart()
        again = run_reference(dataclasses.replace(settings, repeat=1)).measurements
        _attach(again, server.log_text(since_start=True))
    for m in again:
        m.round, m.phase = 2, "after-restart"
    return first + again


def _attach(measurements: list[Measurement], log_text: str) -> None:
    lines = request_lines(log_text)
    for m in measurements:
        m.attach(line_for(lines, m.request_id))


def markdown(family: str, measurements: list[Measurement]) -> str:
    """The table for results/README.md: one row per request, TTFT and hit tokens per run."""
    rounds = sorted({m.round for m in measurements})
    head = ["request", "prompt tokens"] + [f"{RUN_LABELS[r]} TTFT / hit" for r in rounds]
    rows = [
        f"### {REFERENCE_MODELS[family]} ({PAGE_CHAT_TYPE[family]})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    by_request: dict[str, dict[int, Measurement]] = {}
    for m in measurements:
        by_request.setdefault(m.request_type, {})[m.round] = m
    for request, runs in by_request.items():
        first = next(iter(runs.values()))
        cells = [request, f"{first.prompt_tokens or 0:,}"]
        for r in rounds:
            m = runs.get(r)
            hit = "-" if m is None or m.hit_tokens is None else f"{m.hit_tokens:,}"
            cells.append("-" if m is None else f"{format_seconds(m.ttft_s)} / {hit}")
        rows.append("| " + " | ".join(cells) + " |")
    totals = run_totals(measurements)
    rows.append("| total time | | " + " | ".join(format_seconds(totals[r]) for r in rounds) + " |")
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    models, out = Path(argv[0]), Path(argv[1])
    families = argv[2:] or list(PAGE_CHAT_TYPE)
    unknown = [f for f in families if f not in PAGE_CHAT_TYPE]
    if unknown:
        print(f"unknown family {unknown}; choose from {list(PAGE_CHAT_TYPE)}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    console = make_console()
    for family in families:
        console.print(f"== {REFERENCE_MODELS[family]}: {PAGE_CHAT_TYPE[family]}", highlight=False)
        measurements = measure(family, models, out)
        console.print(
            runs_table(measurements, f"{REFERENCE_MODELS[family]} with kvshelf", RUN_LABELS)
        )
        meta = {
            "kind": "kvshelf-page-reference",
            "family": family,
            "model": REFERENCE_MODELS[family],
            "serve_args": list(SERVE_ARGS[family]),
            "run_totals_s": run_totals(measurements),
            "gpu": _gpu(),
            "python": platform.python_version(),
        }
        console.print(f"wrote {write_json(out / f'reference_{family}.json', measurements, meta)}")
        (out / f"reference_{family}.md").write_text(markdown(family, measurements))
    return 0


def _gpu() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
