"""One real vLLM (CPU build) server per test module, serving a tiny model with kvshelf."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvshelf.testing import VllmServer, build_model, make_media, serve_args

SIZE = "xs"  # the smallest model: TTFTs are only checked to exist, never compared


@dataclass
class Served:
    server: VllmServer
    model: str  # the served model name
    media: dict[str, Path]  # kvshelf.bench.media names -> files (allowed as file://)

    @property
    def url(self) -> str:
        return self.server.url


def serve(tmp_path_factory: pytest.TempPathFactory, family: str) -> Iterator[Served]:
    """Build ``family`` at SIZE and serve it with KVShelfConnector (disk tier) until exhausted."""
    work = tmp_path_factory.mktemp(f"bench-{family}")
    media = make_media(work / "media")
    model_dir = build_model(family, work / "model", SIZE)
    kv = {
        "kv_connector": "KVShelfConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"disk_path": str(work / "cache"), "cpu_bytes": 10**8},
    }
    args = [
        *serve_args(family),
        "--served-model-name",
        family,
        "--enforce-eager",
        "--max-model-len",
        "2048",
        "--max-num-batched-tokens",
        "2048",
        "--allowed-local-media-path",
        str(work / "media"),
        "--kv-transfer-config",
        json.dumps(kv),
    ]
    with VllmServer(model_dir, args=args, log_path=work / "server.log") as server:
        yield Served(server, family, media)
