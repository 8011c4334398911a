"""The `kvshelf bench` command: options, progress lines, table, JSON and plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvshelf.bench.client import BenchError, base_url
from kvshelf.bench.logs import request_lines
from kvshelf.bench.payloads import REQUEST_TYPES
from kvshelf.bench.reference import CHAT_TYPES, MAX_COMPLETION_TOKENS, run_reference, run_totals
from kvshelf.bench.report import (
    TTFT_DEFINITION,
    format_seconds,
    make_console,
    plot_ttft,
    requests_table,
    runs_table,
    summarise,
    summary_table,
    write_json,
)
from kvshelf.bench.run import BenchSettings, Measurement, attach_log_lines, run_bench, settings_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default="http://localhost:8000",
        help="the server's base URL (default: %(default)s)",
    )
    parser.add_argument("--model", help="model name to request (default: the server's first)")
    parser.add_argument(
        "--chat-type",
        default="all",
        choices=[*REQUEST_TYPES, "multi-audio", "all"],
        help="request type to send (default: all five; multi-audio only with --reference-client)",
    )
    parser.add_argument(
        "--reference-client",
        action="store_true",
        help="send exactly the requests of the multimodal chat client that "
        "LMCache's multimodal page runs (vLLM's example client) for the "
        "chat type, --repeat times (default 2: the page's 'run it "
        "twice'): URL, base64 and input_audio forms; its own public "
        "media unless --media gives files or URLs",
    )
    parser.add_argument(
        "--media-host",
        default="127.0.0.1",
        metavar="HOST",
        help="with --reference-client: the address the server reaches this "
        "machine at, to fetch local --media files by URL (default: "
        "%(default)s)",
    )
    parser.add_argument(
        "--media",
        action="append",
        default=[],
        metavar="PATH_OR_URL",
        help="image/audio/video file or http(s)://, file://, data: URL; repeat "
        "for several. Types without a medium of their kind use generated "
        "media",
    )
    parser.add_argument(
        "--file-urls",
        action="store_true",
        help="send local files as file:// URLs (the server needs "
        "--allowed-local-media-path) instead of data: URLs",
    )
    parser.add_argument(
        "--repeat",
        type=_positive,
        default=2,
        help="times each prompt is sent: the first is cold, the rest warm (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive,
        default=1,
        help="distinct prompts in flight at once per type (default: 1)",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        metavar="N",
        help="pad the text so the prompt has about N tokens (counted with the "
        "server's /tokenize when it has one)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        metavar="N",
        help="untimed text-only requests sent first (default: 1; 0 with "
        "--reference-client): a fresh vLLM server's first request is "
        "seconds slower whatever the cache",
    )
    parser.add_argument(
        "--max-tokens",
        type=_positive,
        default=None,
        help="tokens to generate per request (default: 8; with "
        "--reference-client the client's 128)",
    )
    salt = parser.add_mutually_exclusive_group()
    salt.add_argument(
        "--cache-salt",
        help="vLLM cache_salt for this run's prompts (default: a "
        "random one, so the first round is really cold)",
    )
    salt.add_argument(
        "--no-cache-salt",
        action="store_true",
        help="send no cache_salt (for servers that reject the field)",
    )
    parser.add_argument(
        "--server-log",
        type=Path,
        metavar="PATH",
        help="the server's log: read kvshelf's hit tokens per request from it",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write results as JSON")
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="OUT.png",
        help="plot TTFT per request, cold vs warm, one panel per type",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to wait for a response (default: %(default)s)",
    )


def main(args: argparse.Namespace) -> int:
    console = make_console()
    if args.chat_type == "multi-audio" and not args.reference_client:
        print(
            "kvshelf bench: error: --chat-type multi-audio needs --reference-client",
            file=sys.stderr,
        )
        return 2
    reference = args.reference_client
    all_types = CHAT_TYPES if reference else REQUEST_TYPES
    settings = BenchSettings(
        url=base_url(args.url),
        model=args.model,
        chat_types=all_types if args.chat_type == "all" else (args.chat_type,),
        media=args.media,
        file_urls=args.file_urls,
        repeat=args.repeat,
        concurrency=args.concurrency,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens or (MAX_COMPLETION_TOKENS if reference else 8),
        timeout_s=args.timeout,
        warmup=args.warmup if args.warmup is not None else (0 if reference else 1),
        # "all" runs what the model takes; a type asked for by name must work
        skip_rejected=args.chat_type == "all",
    )
    if args.no_cache_salt or (reference and not args.cache_salt):
        settings.cache_salt = None  # the client sends none
    elif args.cache_salt:
        settings.cache_salt = args.cache_salt
    if reference:
        return _reference(args, settings, console)

    def progress(m: Measurement) -> None:
        console.print(
            f"  {m.request_type:<13} {m.phase:<5} round {m.round} stream {m.stream}: "
            f"TTFT {format_seconds(m.ttft_s)}, {m.prompt_tokens} prompt tokens"
        )

    console.print(
        f"kvshelf bench: {settings.url}, cache_salt {settings.cache_salt!r}, "
        f"{settings.warmup} untimed warm-up request(s) first"
    )
    try:
        model, measurements, warmups, skipped = run_bench(settings, on_result=progress)
        if args.server_log is not None:
            attach_log_lines(measurements, request_lines(_read_log(args.server_log)))
    except BenchError as exc:
        print(f"kvshelf bench: error: {exc}", file=sys.stderr)
        return 1
    for request_type, why in skipped:
        console.print(f"[yellow]skipped {request_type}[/]: {why}", highlight=False)
    if not measurements:
        print("kvshelf bench: error: the model took none of the request types", file=sys.stderr)
        return 1
    if any(s.num_cold > 1 or s.num_warm > 1 for s in summarise(measurements)):
        console.print(requests_table(measurements, f"Requests ({model})"))
    console.print(summary_table(summarise(measurements), f"TTFT at {settings.url} ({model})"))
    console.print(f"TTFT: {TTFT_DEFINITION}.", style="dim")
    _write_outputs(
        args,
        measurements,
        {
            "kind": "kvshelf-bench",
            "model": model,
            "settings": settings_dict(settings),
            "warmups": [vars(m) for m in warmups],
            "skipped": [{"request_type": t, "why": why} for t, why in skipped],
        },
        model,
        settings,
    )
    return 0


def _reference(args: argparse.Namespace, settings: BenchSettings, console) -> int:
    """--reference-client: the client's sequence per chat type, run --repeat times."""

    def progress(m: Measurement) -> None:
        console.print(
            f"  run {m.round + 1}  {m.request_type:<28} TTFT {format_seconds(m.ttft_s)}"
            f", total {format_seconds(m.total_s)}, {m.prompt_tokens} prompt tokens",
            highlight=False,
        )

    console.print(
        f"kvshelf bench: the reference client's requests at {settings.url}, "
        f"{settings.repeat} run(s), chat type(s) {', '.join(settings.chat_types)}"
        + (f", cache_salt {settings.cache_salt!r}" if settings.cache_salt else ""),
        highlight=False,
    )
    try:
        model, measurements, warmups, skipped = run_reference(
            settings, args.media_host, on_result=progress
        )
        if args.server_log is not None:
            attach_log_lines(measurements, request_lines(_read_log(args.server_log)))
    except BenchError as exc:
        print(f"kvshelf bench: error: {exc}", file=sys.stderr)
        return 1
    for chat_type, why in skipped:
        console.print(f"[yellow]skipped {chat_type}[/]: {why}", highlight=False)
    if not measurements:
        print("kvshelf bench: error: the model took none of the chat types", file=sys.stderr)
        return 1
    console.print(runs_table(measurements, f"The reference client at {settings.url} ({model})"))
    console.print(
        f"TTFT: {TTFT_DEFINITION}. Run 1 is cold only on a server that has not "
        "seen these requests (vLLM's prefix cache, kvshelf's tiers).",
        style="dim",
    )
    _write_outputs(
        args,
        measurements,
        {
            "kind": "kvshelf-bench-reference",
            "model": model,
            "settings": settings_dict(settings),
            "run_totals_s": run_totals(measurements),
            "warmups": [vars(m) for m in warmups],
            "skipped": [{"request_type": t, "why": why} for t, why in skipped],
        },
        model,
        settings,
    )
    return 0


def _write_outputs(
    args: argparse.Namespace,
    measurements: list[Measurement],
    meta: dict,
    model: str,
    settings: BenchSettings,
) -> None:
    console = make_console()
    if args.json:
        console.print(f"wrote {write_json(args.json, measurements, meta)}")
    if args.plot:
        title = f"kvshelf bench: TTFT per request, {model} at {settings.url}"
        console.print(f"wrote {plot_ttft(args.plot, measurements, title)}")


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        raise BenchError(f"cannot read --server-log {path}: {exc.strerror or exc}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


if __name__ == "__main__":  # python -m kvshelf.bench.command ...
    parser = argparse.ArgumentParser(prog="kvshelf bench")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
