"""Where things live. Relative to the repository root; override with VLMT_DATA / VLMT_CACHE / VLMT_RUNS."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _path(env: str, default: str) -> Path:
    return Path(os.environ.get(env, REPO_ROOT / default))


def data_root() -> Path:
    """Embedded world and checkpoints (DVC outputs)."""
    return _path("VLMT_DATA", "data/embedded")


def cache_root() -> Path:
    """Feature / classifier caches."""
    return _path("VLMT_CACHE", "data/cache")


def runs_root() -> Path:
    """Run records (metrics.json) and training checkpoints."""
    return _path("VLMT_RUNS", "runs")
