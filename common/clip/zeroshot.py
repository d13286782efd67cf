"""Zero-shot classifier from class names and templates (template ensembling), cached on disk."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from open_clip import OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier

from .loader import ClipBundle

from ..atomic import atomic_write
from ..paths import cache_root

# open_clip's templates are callables; keep them as format strings so they hash and print.
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def _as_format(template) -> str:
    s = template("{}") if callable(template) else str(template)
    if "{}" not in s:
        raise ValueError(f"template {s!r} has no '{{}}' slot for the class name")
    return s


@torch.no_grad()
def zeroshot_classifier(bundle: ClipBundle, classnames: Sequence[str], templates: Sequence[str] | str,
                        cache_dir: str | Path | None = "default", batch_classes: int = 64) -> torch.Tensor:
    """Normalised class embeddings (K, D): per class, the mean of the normalised template embeddings,
    renormalised (CLIP's prompt ensembling). Cached per (model, classnames, templates)."""
    templates = [_as_format(t) for t in ([templates] if isinstance(templates, str) else templates)]
    if not classnames:
        raise ValueError("zeroshot_classifier needs at least one class name")
    if cache_dir == "default":
        cache_dir = cache_root() / "zeroshot"
    key = hashlib.sha256(json.dumps([bundle.checkpoint_id, list(classnames), templates]).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{bundle.arch}-{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        return torch.load(path, map_location=bundle.device)
    was_training = bundle.model.training
    bundle.model.eval()
    weights = build_zero_shot_classifier(bundle.model, bundle.tokenizer, list(classnames), templates,
                                         num_classes_per_batch=batch_classes, device=bundle.device,
                                         use_tqdm=len(classnames) * len(templates) > 2000)
    bundle.model.train(was_training)
    weights = weights.T.contiguous().float()  # (K, D)
    if path is not None:
        atomic_write(path, lambda tmp: torch.save(weights.cpu(), tmp))
    return weights


def logit_scale(bundle: ClipBundle) -> float:
    """CLIP's learned temperature exp(logit_scale) (100 for OpenAI weights)."""
    return float(bundle.model.logit_scale.exp().item())
