"""build_model: a family's writer into a temporary sibling directory, seeded random weights,
then a marker file written last and a rename into place."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvshelf.testing.checkpoints import INIT_STD, SIZES, write_json, write_random_checkpoint
from kvshelf.testing.models.families import (
    FAMILIES,
    FAMILY_INIT_STD,
    FAMILY_MODALITIES,
    SERVE_ARGS,
    WRITERS,
)

MARKER_NAME = "kvshelf_build.json"
# Bump when the files a builder writes change, so old directories get rebuilt.
BUILD_FORMAT_VERSION = 3

DTYPES: tuple[str, ...] = ("bfloat16", "float32")  # both verified on the CPU backend

WEIGHTS_FILE = "model.safetensors"


def serve_args(family: str, *, dtype: str | None = None, dummy_weights: bool = False) -> list[str]:
    """Extra `vllm serve` arguments a model dir of `family` needs (model path not included).

    `dummy_weights` must match the build. With `dtype`, adds `--dtype`; without it vLLM uses
    the dtype written in config.json.
    """
    _check_family(family)
    args = list(SERVE_ARGS[family])
    if dummy_weights:
        args += ["--load-format", "dummy"]
    if dtype is not None:
        _check_dtype(dtype)
        args += ["--dtype", dtype]
    return args


def build_model(
    family: str,
    out_dir: str | os.PathLike[str],
    size: str = "m",
    *,
    dtype: str = "bfloat16",
    dummy_weights: bool = False,
) -> Path:
    """Build (or reuse) a tiny random-weight `family` model in `out_dir`; returns its path.

    `dtype` is the default serving dtype written to config.json (weights are stored as
    bfloat16 either way, so a dir serves the same values in any dtype). Fast when `out_dir`
    already holds a complete build with the same parameters. A directory with another build's
    marker is rebuilt; one without a marker is replaced only if it holds no subdirectories.
    """
    _check_family(family)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    _check_dtype(dtype)
    out = Path(out_dir).resolve()
    params = _build_params(family, size, dtype, dummy_weights)
    if _read_marker(out) == params:
        return out
    if out.exists():
        _check_replaceable(out)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        checkpoint_shapes = WRITERS[family](tmp, SIZES[size], dtype)
        if not dummy_weights:
            std = FAMILY_INIT_STD.get(family, INIT_STD)
            write_random_checkpoint(tmp / WEIGHTS_FILE, checkpoint_shapes, std)
        write_json(tmp / MARKER_NAME, params)
        _move_into_place(tmp, out, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_build_info(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of a complete build (family, size, dtype, serve_args, ...), else None."""
    return _read_marker(Path(model_dir))


def _check_family(family: str) -> None:
    if family not in FAMILY_MODALITIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {list(FAMILIES)}")


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")


def _build_params(family: str, size: str, dtype: str, dummy_weights: bool) -> dict[str, Any]:
    return {
        "format_version": BUILD_FORMAT_VERSION,
        "family": family,
        "size": size,
        "dtype": dtype,
        "dummy_weights": dummy_weights,
        "preset": asdict(SIZES[size]),
        "serve_args": serve_args(family, dummy_weights=dummy_weights),
    }


def _read_marker(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MARKER_NAME).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _check_replaceable(out: Path) -> None:
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; pick another output path")
    if (out / MARKER_NAME).exists():
        return
    subdirs = [p.name for p in out.iterdir() if p.is_dir()]
    if subdirs:
        raise FileExistsError(
            f"{out} has no {MARKER_NAME} and contains directories {subdirs[:3]}; it does not "
            "look like a model dir built here. Remove it or pick another output path."
        )


def _move_into_place(tmp: Path, out: Path, params: dict[str, Any]) -> None:
    if out.exists():
        # Another process may have finished the same build meanwhile; keep its copy.
        if _read_marker(out) == params:
            return
        shutil.rmtree(out)
    os.replace(tmp, out)
