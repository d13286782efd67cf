"""Evaluation helpers: batched prediction and classification metrics on logits."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import metrics


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Apply `fn` to `x` in batches (rows) and concatenate."""
    return torch.cat([fn(chunk) for chunk in x.split(batch_size)]) if len(x) else x


def cosine_logits(image_features: torch.Tensor, class_weights: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * cos(image, class): CLIP's classification head. class_weights is (K, D)."""
    return scale * F.normalize(image_features, dim=-1) @ F.normalize(class_weights, dim=-1).t()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and mean per-class accuracy in percent."""
    pred = logits.argmax(dim=-1)
    num_classes = logits.shape[-1]
    return {"top1": metrics.accuracy(pred, labels),
            "mean_per_class": metrics.mean_per_class_accuracy(pred, labels, num_classes)}
