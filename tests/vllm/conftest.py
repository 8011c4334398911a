"""Fixtures for tests that start real vLLM servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvshelf.testing import build_model, make_media


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """The test media (images, audio, video), made once."""
    return make_media(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="session")
def idefics3(tmp_path_factory):
    """A tiny float32 Idefics3 (images): outputs comparable across hits and recomputes."""
    return build_model("idefics3", tmp_path_factory.mktemp("idefics3"), size="xs", dtype="float32")


@pytest.fixture(scope="session")
def torchvision_env() -> dict[str, str]:
    """The environment that makes torchvision importable beside CPU torch (see
    scripts/torchvision-cpu.sh), for models whose vLLM module imports it."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "torchvision-cpu.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(script)], check=True, env=env)
    line = subprocess.run(
        [str(script), "--env"], check=True, env=env, capture_output=True, text=True
    ).stdout.split()
    found = dict(item.split("=", 1) for item in line)
    return {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [found["PYTHONPATH"], os.environ.get("PYTHONPATH")])
        ),
        "LD_LIBRARY_PATH": os.pathsep.join(
            filter(None, [found["LD_LIBRARY_PATH"], os.environ.get("LD_LIBRARY_PATH")])
        ),
    }
