"""`python -m kvshelf.testing build --out DIR [--size m] [--families ...] [--dtype ...]`."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kvshelf.bench.media import make_media
from kvshelf.testing.models import DTYPES, FAMILIES, SIZES, build_model, serve_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvshelf.testing", description="Build offline tiny models and test media."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build", help="build model dirs (DIR/models/) and media (DIR/media/)"
    )
    build.add_argument("--out", required=True, type=Path, help="output directory")
    build.add_argument("--size", default="m", choices=sorted(SIZES))
    build.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    build.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    build.add_argument(
        "--dummy-weights",
        action="store_true",
        help="config-only dirs served with --load-format dummy (outputs ignore "
        "the prompt; fine for timing, useless for output comparisons)",
    )
    args = parser.parse_args(argv)

    media = make_media(args.out / "media")
    print(f"media: {args.out / 'media'} ({', '.join(sorted(media))})")
    for family in args.families:
        began = time.monotonic()
        suffix = "-dummy" if args.dummy_weights else ""
        model_dir = build_model(
            family,
            args.out / "models" / f"{family}-{args.size}{suffix}",
            args.size,
            dtype=args.dtype,
            dummy_weights=args.dummy_weights,
        )
        print(f"{family}: {model_dir} ({time.monotonic() - began:.1f} s)")
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            *serve_args(family, dummy_weights=args.dummy_weights),
        ]
        print(f"  serve: {shlex.join(command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
