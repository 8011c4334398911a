"""Helpers for tests that drive a real vLLM (CPU build) server with KVShelfConnector."""

from __future__ import annotations

import ast
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kvshelf.testing import VllmServer, build_messages, chat_request, serve_args

MODEL_NAME = "m"
CHUNK_SIZE = 256
_HIT = re.compile(
    r"Reqid: (?P<id>\S+), Total tokens (?P<total>\d+), kvshelf hit tokens: (?P<hit>\d+), "
    r"need to load: (?P<load>\d+)"
)
_MEDIA = re.compile(r"Reqid: (?P<id>\S+), media \(modality, offset, length\): (?P<media>\[.*\])")


@dataclass
class Reply:
    status: int
    text: str
    prompt_tokens: int
    first_logprobs: dict[str, float]  # top logprobs of the first generated token
    hit_tokens: int | None  # from kvshelf's log line; None if it logged none
    media: list[tuple[str, int, int]]  # (modality, offset, length) from the debug line
    error: str = ""

    def same_answer(self, other: Reply, tolerance: float = 1e-3) -> bool:
        """Same greedy text and first-token top logprobs within ``tolerance``."""
        if self.text != other.text or self.first_logprobs.keys() != other.first_logprobs.keys():
            return False
        return all(
            math.isclose(v, other.first_logprobs[k], abs_tol=tolerance)
            for k, v in self.first_logprobs.items()
        )


def connector_args(extra: dict[str, Any], module_path: bool = False, **transfer: Any) -> list[str]:
    """``--kv-transfer-config`` for kvshelf; ``transfer`` adds top-level keys."""
    kv: dict[str, Any] = {
        "kv_connector": "KVShelfConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"chunk_size": CHUNK_SIZE, "log_level": "DEBUG", **extra},
        **transfer,
    }
    if module_path:
        kv["kv_connector_module_path"] = "kvshelf.vllm.connector"
    return ["--kv-transfer-config", json.dumps(kv)]


def server_args(
    family: str, kv_extra: dict[str, Any], *more: str, module_path: bool = False, **transfer: Any
) -> list[str]:
    return [
        *serve_args(family, dtype="float32"),
        "--served-model-name",
        MODEL_NAME,
        "--enforce-eager",
        "--max-model-len",
        "4096",
        *more,
        *connector_args(kv_extra, module_path, **transfer),
    ]


class Client:
    """Sends chat requests to one server and pairs each with kvshelf's log line."""

    def __init__(self, server: VllmServer):
        self.server = server
        self._seen = 0  # log characters already read

    def restart(self) -> None:
        self.server.restart()
        self._seen = 0

    def chat(self, messages: list[dict], max_tokens: int = 3, **extra: Any) -> Reply:
        body = chat_request(
            MODEL_NAME,
            messages,
            max_tokens=max_tokens,
            logprobs=True,
            top_logprobs=5,
            ignore_eos=True,
            **extra,
        )
        response = httpx.post(f"{self.server.url}/v1/chat/completions", json=body, timeout=300)
        hit, media = self._logged()
        if response.status_code != 200:
            return Reply(response.status_code, "", 0, {}, hit, media, response.text)
        data = response.json()
        choice = data["choices"][0]
        first = choice["logprobs"]["content"][0]["top_logprobs"]
        return Reply(
            200,
            choice["message"]["content"] or "",
            data["usage"]["prompt_tokens"],
            {entry["token"]: entry["logprob"] for entry in first},
            hit,
            media,
        )

    def ask(self, request_type: str, media: dict, **content: Any) -> Reply:
        return self.chat(build_messages(request_type, media, **content))

    def log(self) -> str:
        return self.server.log_text(since_start=True)

    def _logged(self) -> tuple[int | None, list]:
        """kvshelf's lines for the request just answered (read from the log)."""
        deadline = time.monotonic() + 5
        while True:
            text = self.log()
            new = text[self._seen :]
            hits = list(_HIT.finditer(new))
            if hits or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self._seen = len(text)
        media = []
        for line in new.splitlines():
            match = _MEDIA.search(line)
            if match:
                media = [tuple(m) for m in ast.literal_eval(match["media"])]
        return (int(hits[-1]["hit"]) if hits else None), media


def entry_files(disk: Path) -> set[Path]:
    return set(disk.rglob("*.kv"))


def settled_files(disk: Path, quiet_s: float = 1.0, timeout_s: float = 60.0) -> set[Path]:
    """The entry files once background saves have stopped adding any."""
    deadline = time.monotonic() + timeout_s
    files = entry_files(disk)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = entry_files(disk)
        if now != files:
            files, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return files
    return files


def corrupt(path: Path) -> None:
    """Flip one byte in the middle of the payload (the header stays valid)."""
    data = bytearray(path.read_bytes())
    middle = 256 + (len(data) - 256) // 2
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))


def scrape(server: VllmServer) -> dict[tuple[str, str], float]:
    """kvshelf's samples from the server's /metrics: (name, tier) -> value, summed over
    the other labels. Counters appear under their ``_total`` name."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("kvshelf_") and not sample.name.endswith("_created"):
                key = (sample.name, sample.labels.get("tier", ""))
                values[key] = values.get(key, 0.0) + sample.value
    return values


def wait_for_metric(
    server: VllmServer, name: str, tier: str = "", at_least: float = 1, timeout_s: float = 20
) -> dict[tuple[str, str], float]:
    """Scrape until ``name`` reaches ``at_least`` (vLLM publishes stats each step)."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = scrape(server)
        if values.get((name, tier), 0) >= at_least or time.monotonic() > deadline:
            return values
        time.sleep(0.5)
