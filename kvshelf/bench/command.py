"""The `kvshelf bench` command: options, progress lines, table, JSON and plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvshelf.bench.client import BenchError, base_url
from kvshelf.bench.logs import request_lines
from kvshelf.bench.payloads import REQUEST_TYPES
from kvshelf.bench.report import (
    TTFT_DEFINITION,
    format_seconds,
    make_console,
    plot_ttft,
    requests_table,
    summarise,
    summary_table,
    write_json,
)
from kvshelf.bench.run import BenchSettings, Measurement, attach_log_lines, run_bench, settings_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://localhost:8000",
                        help="the server's base URL (default: %(default)s)")
    parser.add_argument("--model", help="model name to request (default: the server's first)")
    parser.add_argument("--chat-type", default="all", choices=[*REQUEST_TYPES, "all"],
                        help="request type to send (default: all five)")
    parser.add_argument("--media", action="append", default=[], metavar="PATH_OR_URL",
                        help="image/audio/video file or http(s)://, file://, data: URL; repeat "
                             "for several. Types without a medium of their kind use generated "
                             "media")
    parser.add_argument("--file-urls", action="store_true",
                        help="send local files as file:// URLs (the server needs "
                             "--allowed-local-media-path) instead of data: URLs")
    parser.add_argument("--repeat", type=_positive, default=2,
                        help="times each prompt is sent: the first is cold, the rest warm "
                             "(default: %(default)s)")
    parser.add_argument("--concurrency", type=_positive, default=1,
                        help="distinct prompts in flight at once per type (default: 1)")
    parser.add_argument("--prompt-tokens", type=int, default=0, metavar="N",
                        help="pad the text so the prompt has about N tokens (counted with the "
                             "server's /tokenize when it has one)")
    parser.add_argument("--warmup", type=int, default=1, metavar="N",
                        help="untimed text-only requests sent first (default: 1): a fresh vLLM "
                             "server's first request is seconds slower whatever the cache")
    parser.add_argument("--max-tokens", type=_positive, default=8,
                        help="tokens to generate per request (default: %(default)s)")
    salt = parser.add_mutually_exclusive_group()
    salt.add_argument("--cache-salt", help="vLLM cache_salt for this run's prompts (default: a "
                                           "random one, so the first round is really cold)")
    salt.add_argument("--no-cache-salt", action="store_true",
                      help="send no cache_salt (for servers that reject the field)")
    parser.add_argument("--server-log", type=Path, metavar="PATH",
                        help="the server's log: read kvshelf's hit tokens per request from it")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write results as JSON")
    parser.add_argument("--plot", type=Path, metavar="OUT.png",
                        help="plot TTFT per request, cold vs warm, one panel per type")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for a response (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    console = make_console()
    settings = BenchSettings(
        url=base_url(args.url),
        model=args.model,
        chat_types=REQUEST_TYPES if args.chat_type == "all" else (args.chat_type,),
        media=args.media,
        file_urls=args.file_urls,
        repeat=args.repeat,
        concurrency=args.concurrency,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        warmup=args.warmup,
        # "all" runs what the model takes; a type asked for by name must work
        skip_rejected=args.chat_type == "all",
    )
    if args.no_cache_salt:
        settings.cache_salt = None
    elif args.cache_salt:
        settings.cache_salt = args.cache_salt

    def progress(m: Measurement) -> None:
        console.print(f"  {m.request_type:<13} {m.phase:<5} round {m.round} stream {m.stream}: "
                      f"TTFT {format_seconds(m.ttft_s)}, {m.prompt_tokens} prompt tokens")

    console.print(f"kvshelf bench: {settings.url}, cache_salt {settings.cache_salt!r}, "
                  f"{settings.warmup} untimed warm-up request(s) first")
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
    if args.json:
        meta = {"kind": "kvshelf-bench", "model": model, "settings": settings_dict(settings),
                "warmups": [vars(m) for m in warmups],
                "skipped": [{"request_type": t, "why": why} for t, why in skipped]}
        console.print(f"wrote {write_json(args.json, measurements, meta)}")
    if args.plot:
        title = f"kvshelf bench: TTFT per request, {model} at {settings.url}"
        console.print(f"wrote {plot_ttft(args.plot, measurements, title)}")
    return 0


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
