"""Zero-shot classifier from class names and templates (template ensembling), cached on disk."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip import OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier

from .loader import ClipBundle

from ..atomic import torch_save_atomic
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
        torch_save_atomic(weights.cpu(), path)
    return weights


@torch.no_grad()
def encode_texts(bundle: ClipBundle, texts: Sequence[str], batch_size: int = 256,
                 cache_dir: str | Path | None = "default") -> tuple[torch.Tensor, int]:
    """(N, D) L2-normalised text embeddings of `texts` (float32, on the CPU) and how many were truncated to the
    context length (tokenised with truncation, as CuPL's `clip.tokenize(..., truncate=True)`). Cached per
    (model, texts)."""
    texts = [str(t) for t in texts]
    if not texts:
        return torch.empty(0, bundle.embed_dim), 0
    if cache_dir == "default":
        cache_dir = cache_root() / "texts"
    key = hashlib.sha256(json.dumps([bundle.checkpoint_id, texts]).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{bundle.arch}-{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        hit = torch.load(path, map_location="cpu", weights_only=True)
        return hit["emb"], int(hit["truncated"])
    was_training = bundle.model.training
    bundle.model.eval()
    out, truncated = [], 0
    for i in range(0, len(texts), batch_size):
        ids = bundle.tokenizer(texts[i:i + batch_size])
        truncated += int((ids[:, -1] != 0).sum())   # the last position holds a real token (EOT) only if cut
        out.append(F.normalize(bundle.model.encode_text(ids.to(bundle.device)).float(), dim=-1).cpu())
    bundle.model.train(was_training)
    emb = torch.cat(out)
    if path is not None:
        torch_save_atomic({"emb": emb, "truncated": truncated}, path)
    return emb, truncated


def pooled_classifier(bundle: ClipBundle, texts_per_class: Sequence[Sequence[str]], **kw) -> torch.Tensor:
    """(K, D) class embeddings from a list of texts per class (lists may differ across classes): the mean of the
    L2-normalised embeddings of a class's texts, renormalised. With the same templates for every class this is
    `zeroshot_classifier`; with per-class sentences it is CuPL's classifier."""
    if not texts_per_class or any(len(t) == 0 for t in texts_per_class):
        raise ValueError("pooled_classifier needs at least one text for every class")
    flat = [t for ts in texts_per_class for t in ts]
    owner = torch.repeat_interleave(torch.arange(len(texts_per_class)),
                                    torch.tensor([len(t) for t in texts_per_class]))
    emb, _ = encode_texts(bundle, flat, **kw)
    sums = torch.zeros(len(texts_per_class), emb.shape[1]).index_add_(0, owner, emb)
    return F.normalize(sums, dim=-1)


def logit_scale(bundle: ClipBundle) -> float:
    """CLIP's learned temperature exp(logit_scale) (100 for OpenAI weights)."""
    return float(bundle.model.logit_scale.exp().item())
