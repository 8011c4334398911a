"""Fixtures for tests that start real vLLM servers."""

from __future__ import annotations

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
