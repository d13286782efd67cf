"""Shared fixtures: tiny randomly initialised open_clip models (no downloads) and isolated caches."""
from __future__ import annotations

import logging

import pytest
import torch

from common.clip import load_clip
from common.engine.threads import torch_threads

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns on every explicitly random model
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def isolated_paths(tmp_path, monkeypatch):
    """Every test gets its own cache/runs folders: nothing touches the repository's data/ or runs/."""
    monkeypatch.setenv("VLMT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VLMT_RUNS", str(tmp_path / "runs"))
    yield


@pytest.fixture
def one_thread():
    """Tiny models on shared cores: one intra-op thread is several times faster than two (a test module opts in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_rn():
    torch.manual_seed(0)
    return load_clip("tiny-rn", "random")


@pytest.fixture(scope="session")
def tiny_vit():
    torch.manual_seed(0)
    return load_clip("tiny-vit", "random")


@pytest.fixture(scope="session", params=["tiny-rn", "tiny-vit"])
def tiny_clip(request, tiny_rn, tiny_vit):
    return tiny_rn if request.param == "tiny-rn" else tiny_vit
