"""What a user's install pulls in: serving stays lean, tooling sits in the bench extra."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLING = ("rich", "httpx", "matplotlib")


def test_tooling_is_an_extra_not_a_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = " ".join(project["dependencies"])
    assert not [name for name in TOOLING if name in required]
    bench = " ".join(project["optional-dependencies"]["bench"])
    assert all(name in bench for name in TOOLING)


@pytest.mark.timeout(120)
def test_serving_imports_no_tooling():
    """What vLLM's processes import to run the connector (and its plugin)."""
    probe = (
        "import sys\n"
        "import kvshelf.vllm.plugin, kvshelf.vllm.connector, kvshelf.vllm.worker\n"
        "print(' '.join(m for m in sys.modules if m.split('.')[0] in "
        f"{TOOLING!r} or m.startswith(('kvshelf.bench', 'kvshelf.testing', 'kvshelf.demo'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == ""


@pytest.mark.timeout(120)
def test_bench_does_not_import_testing():
    """kvshelf.testing builds on kvshelf.bench (media, words, payloads), never the reverse:
    `kvshelf bench` runs without the model builders and their transformers import."""
    probe = (
        "import sys, tempfile\n"
        "import kvshelf.bench.command, kvshelf.bench.run, kvshelf.bench.payloads as p\n"
        "p.builtin_media(tempfile.mkdtemp())\n"
        "print(' '.join(m for m in sys.modules if m.startswith(('kvshelf.testing', 'transformers'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == ""
