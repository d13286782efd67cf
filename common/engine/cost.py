"""Cost probes: how long one training epoch takes on cached features of a given size (the `cost` commands)."""
from __future__ import annotations

import json
from typing import Any

import torch

from ..paths import runs_root


def random_features(cost: dict[str, Any], seed: int = 0):
    """Random stand-ins for cached features: ([views (n, dim)], labels (n,), n, generator) for
    `cost.classes` classes x `cost.shots` shots of `cost.dim`-d features."""
    g = torch.Generator().manual_seed(seed)
    classes, shots, dim = int(cost["classes"]), int(cost["shots"]), int(cost["dim"])
    n = classes * shots
    views = [torch.randn(n, dim, generator=g)]
    labels = torch.arange(classes).repeat_interleave(shots)
    return views, labels, n, g


def report_epoch_cost(cfg: dict, slug: str, what: str, n: int, history: list[dict], suffix: str = "") -> dict:
    """Median epoch wall time of a training history (the first epoch warms up), printed and written to
    runs/<slug>/cost/<profile><suffix>.json."""
    per_epoch = sorted(h["wall_s"] for h in history)[len(history) // 2]
    row = {"method": what, "profile": cfg["profile"], **cfg["cost"], "samples": n, "batch_size": cfg["batch_size"],
           "threads": cfg.get("threads"), "epoch_ms_median": round(per_epoch * 1000, 2)}
    out = runs_root() / slug / "cost" / f"{cfg['profile']}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    print("  ".join(f"{k} {v}" for k, v in row.items()))
    return row
