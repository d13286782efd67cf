"""Zero-shot CLIP: the class embedding of each class name under one template, or the normalised mean
over CLIP's 80 ImageNet templates (prompt ensembling)."""
from __future__ import annotations

import torch

from common.clip import IMAGENET_TEMPLATES, ClipBundle, zeroshot_classifier
from common.data import Dataset

VARIANTS = ("single", "ensemble")


def templates_for(dataset: Dataset, variant: str) -> list[str]:
    """`single`: the dataset's hand-crafted CoOp template; `ensemble`: its template set (CLIP's 80 by default)."""
    if variant == "single":
        return [dataset.template]
    if variant == "ensemble":
        return list(dataset.meta.get("templates") or IMAGENET_TEMPLATES)
    raise ValueError(f"zero-shot variant must be one of {VARIANTS}, got {variant!r}")


def zeroshot_weights(bundle: ClipBundle, dataset: Dataset, variant: str = "single") -> torch.Tensor:
    """(K, D) normalised text classifier for the dataset's classes."""
    return zeroshot_classifier(bundle, dataset.classnames, templates_for(dataset, variant))
