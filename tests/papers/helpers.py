"""Helpers for paper smoke tests: a saved tiny random CLIP and a toy data root, as --set overrides."""
from __future__ import annotations

from pathlib import Path

from common.clip import save_clip_checkpoint
from tests.fixtures.toy import write_toy


def toy_overrides(tmp_path: Path, bundle, extra: dict | None = None) -> list[str]:
    """`--set` overrides that point an entry point at a toy data root and a saved tiny checkpoint."""
    data = tmp_path / "data"
    if not (data / "toy").exists():
        write_toy(data, "toy")
        write_toy(data, "toy_shift", seed=1)
    ckpt = tmp_path / f"{bundle.arch}.pt"
    if not ckpt.exists():
        save_clip_checkpoint(bundle.model, ckpt)
    sets = {"arch": bundle.arch, "pretrained": str(ckpt), "data_root": str(data), "datasets": "[toy]",
            "dg_source": "toy", "dg_targets": "[toy_shift]", "xd_source": "toy", "shots": "[1, 2]", "seeds": "[1]"}
    sets.update(extra or {})
    out = []
    for k, v in sets.items():
        if v is not None:  # None: leave the option out (a paper may refuse options it does not use)
            out += ["--set", f"{k}={v}"]
    return out
