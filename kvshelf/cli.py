"""The `kvshelf` command: bench, stats, clear.

kvshelf bench --url http://localhost:8000 --chat-type all --prompt-tokens 2048 --plot out.png
kvshelf stats /var/cache/kvshelf            (or redis://host:6379/0)
kvshelf clear /var/cache/kvshelf [--namespace 3f2a]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvshelf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "bench",
        help="time TTFT of text/image/video/audio chat requests, cold and warm",
        description="Streamed chat completions against an OpenAI-compatible server: TTFT per "
        "request type, cold (first sending) and warm (repeats).",
    )
    from kvshelf.bench.command import add_arguments  # argparse only; heavy imports come later

    add_arguments(bench)

    stats = commands.add_parser("stats", help="entries, bytes and namespaces of a cache tier")
    stats.add_argument(
        "target",
        metavar="PATH_OR_URL",
        help="a disk tier directory, or redis:// rediss:// unix:// redis+cluster:// URL",
    )
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")

    clear = commands.add_parser("clear", help="remove cached entries from a cache tier")
    clear.add_argument("target", metavar="PATH_OR_URL", help="as for stats")
    clear.add_argument(
        "--namespace",
        action="append",
        default=[],
        metavar="HEX",
        help="only this namespace (its hex id or its start, as stats shows); repeat for several",
    )

    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            try:
                from kvshelf.bench.command import main as bench_main
            except ImportError as exc:
                print(
                    f"kvshelf bench needs its extra ({exc.name} is missing): "
                    "pip install 'kvshelf[bench]'",
                    file=sys.stderr,
                )
                return 2
            return bench_main(args)
        return _admin(args)
    except KeyboardInterrupt:
        print(f"kvshelf {args.command}: interrupted", file=sys.stderr)
        return 130


def _admin(args: argparse.Namespace) -> int:
    from kvshelf import admin

    try:
        if args.command == "stats":
            result = admin.stats(args.target)
            if args.json:
                print(json.dumps(result.as_dict(), indent=1))
            else:
                _print_stats(result)
        else:
            done = admin.clear(args.target, args.namespace)
            which = ", ".join(n[:12] for n in done.namespaces) or "none"
            print(
                f"removed {done.entries} entries ({done.keys} files/keys) from "
                f"{done.target}; namespaces: {which}"
            )
    except admin.AdminError as exc:
        print(f"kvshelf {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


_STATS_COLUMNS = ("namespace", "model", "entries", "bytes", "oldest", "newest")


def _print_stats(result) -> None:
    """A table: rich's where the bench extra is installed, plain text otherwise."""
    rows = [
        (
            ns.namespace[:12],
            _model(ns.description),
            f"{ns.entries:,}",
            _size(ns.bytes),
            _when(ns.oldest),
            _when(ns.newest),
        )
        for ns in result.namespaces
    ]
    total = ("total", "", f"{result.entries:,}", _size(result.bytes), "", "")
    title = f"kvshelf {result.tier} tier: {result.target}"
    notes = ["oldest/newest: least/most recent write or read"]
    if result.stray:
        what = "unfinished temp files" if result.tier == "disk" else "parts without a head"
        notes.append(f"{result.stray} {what} (a writer at work, or one that died)")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [_STATS_COLUMNS, *rows, total]) for i in range(6)]
        print(title)
        for row in [_STATS_COLUMNS, *rows, total]:
            print(
                "  ".join(
                    cell.rjust(w) if i in (2, 3) else cell.ljust(w)
                    for i, (cell, w) in enumerate(zip(row, widths))
                )
            )
        print("; ".join(notes))
        return
    table = Table(title=title, title_justify="left", caption="; ".join(notes))
    for name in _STATS_COLUMNS:
        table.add_column(name, justify="right" if name in ("entries", "bytes") else "left")
    for row in rows:
        table.add_row(*row)
    table.add_section()
    table.add_row(*total)
    Console(width=None if sys.stdout.isatty() else 150).print(table)  # piped: no wrapping


def _model(description: dict | None) -> str:
    """The model of a namespace as its last path part (NAMESPACE.json: "path|revision|...")."""
    model = str((description or {}).get("model") or "-").split("|")[0].rstrip("/")
    return model.rsplit("/", 1)[-1] or model


def _size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def _when(unix_s: float | None) -> str:
    if unix_s is None:
        return "-"
    return time.strftime("%m-%d %H:%M:%S", time.localtime(unix_s))


if __name__ == "__main__":
    sys.exit(main())
