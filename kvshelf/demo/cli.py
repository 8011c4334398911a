"""The demo's command line: arguments, Ctrl-C and SIGTERM, the steps in order."""

from __future__ import annotations

import argparse
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from kvshelf.bench.client import BenchError
from kvshelf.bench.report import make_console
from kvshelf.demo.report import report
from kvshelf.demo.run import CHAT_TYPES, Demo


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    console = make_console()
    _on_interrupt(console)
    began = time.monotonic()
    try:
        demo = Demo(args, console)
        demo.build()
        demo.serve_all()
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: every server the demo started is stopped.")
        return 130
    except (BenchError, OSError, RuntimeError) as exc:  # ServerStartError is a RuntimeError
        console.print(f"[bold red]kvshelf demo failed:[/] {exc}", highlight=False)
        console.print("Every server the demo started is stopped.")
        return 1
    return report(demo, time.monotonic() - began)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    import kvshelf.demo
    from kvshelf.testing.models import DTYPES, SIZES

    parser = argparse.ArgumentParser(
        prog="python -m kvshelf.demo", description=kvshelf.demo.__doc__
    )
    parser.add_argument(
        "--size",
        default="l",
        choices=sorted(SIZES),
        help="language model size: l = hidden 1024, 12 layers (default)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="auto (default): bfloat16 where the CPU has AVX512-BF16 or AMX, float32 elsewhere",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=2048,
        help="pad every prompt to this many tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--types",
        nargs="+",
        choices=list(CHAT_TYPES),
        default=list(CHAT_TYPES),
        help="chat types to run (default: all five)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(".work/demo"),
        help="models, media, cache and server logs (default: %(default)s)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path("out"),
        help="where demo.json and demo.png go (default: %(default)s)",
    )
    parser.add_argument("--max-tokens", type=int, default=8)
    return parser.parse_args(argv)


def _on_interrupt(console: Console) -> None:
    """Ctrl-C and SIGTERM (e.g. from `timeout`) say what happens, then unwind as
    KeyboardInterrupt, which stops the server (a server still starting up may take its
    30 s grace period to go)."""

    def interrupt(signum: int, frame: Any) -> None:
        console.print(f"[bold red]{signal.Signals(signum).name}[/]: stopping the vLLM server...")
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when ignored (&)
        signal.signal(signal.SIGINT, interrupt)
