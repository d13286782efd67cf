"""Embedded tiny CLIP architectures, registered as ordinary open_clip model configs."""
from __future__ import annotations

from pathlib import Path

import open_clip

CONFIG_DIR = Path(__file__).parent / "model_configs"
EMBEDDED_ARCHS = frozenset(p.stem for p in CONFIG_DIR.glob("*.json"))
_registered = False


def register_embedded_configs() -> None:
    """Make `tiny-rn` / `tiny-vit` known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
