"""UPL: prompt learning without labels (Huang, Chu, Wei, arXiv 2204.03649).

1. **Pseudo-labels.** Zero-shot CLIP scores every image of the target's unlabelled training pool with the
   dataset's hand-crafted template: logits l = s * cos(f(x), t_c) (s = CLIP's logit scale, 100 for OpenAI CLIP).
   UPL* averages the logits of several CLIP models before the next step (`pool_logits`).
2. **Class-balanced top-K (K = 16).** yhat(x) = argmax_c l_c(x); for each class c, of the images with yhat = c
   the K with the highest confidence are kept with label c (`select_top_k`). An image is only a candidate for
   its own argmax class, so it is used at most once; a class with fewer than K candidates keeps them all.
   Confidence = the max logit (the official `is_softmax=False`) or the max softmax probability (`rank_by`).
3. **Prompt learning.** CoOp's prompt learner (16 unified context vectors, random init, class token at the end,
   frozen CLIP) trained with cross-entropy on the pseudo-labelled images (papers.coop.method, batched).
4. **Prompt ensemble.** N prompts trained on the same pseudo-labels with different seeds; at test the official
   `upl_test.py` averages their logits. With normalised image feature f and the normalised class embeddings
   w_n of prompt n, (1/N) sum_n s f.w_n = s f.(1/N sum_n w_n): the logit average IS the classifier whose class
   features are the mean of the N prompts' text features (not renormalised), which `ensemble_weights` builds.

Nothing here reads a label of the pool: `unlabeled_pool` gives label-free items, the pseudo-labelled train set
is built from them and the pseudo-labels only (`pseudo_dataset`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from common.clip import ClipBundle, logit_scale, zeroshot_classifier
from common.data import Dataset, Datum
from common.engine.cache import cached_features

RANK_BY = ("logit", "prob")
POOL_SPLIT = "unlabeled"   # cache name of the pool's features


def unlabeled_pool(dataset: Dataset) -> list[Datum]:
    """The target's unlabelled training images: the dataset's `unlabeled` meta when it has one (the embedded
    world's), else its train split with every label dropped (real CoOp sets: UPL's pool is the train split)."""
    pool = dataset.meta.get("unlabeled")
    items = pool if pool is not None else dataset.train
    return [Datum(d.impath, -1, "") for d in items]


def pool_logits(bundles: Sequence[ClipBundle], dataset: Dataset, pool: Sequence[Datum]) -> torch.Tensor:
    """(N, K) zero-shot logits of the pool under the dataset's hand-crafted template, averaged over `bundles`
    (one model: UPL; several: UPL*). Image features are cached (test transform: resize + centre crop)."""
    if not bundles:
        raise ValueError("pool_logits needs at least one CLIP model")
    total = None
    for b in bundles:
        feats = cached_features(b, dataset.name, POOL_SPLIT, list(pool))["features"].float()
        weights = zeroshot_classifier(b, dataset.classnames, [dataset.template]).float().cpu()
        logits = logit_scale(b) * F.normalize(feats, dim=-1) @ weights.t()
        total = logits if total is None else total + logits
    return total / len(bundles)


def select_top_k(logits: torch.Tensor, k: int, rank_by: str = "logit") -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced pseudo-labels: (indices into the pool, pseudo-labels), ordered by class, then by falling
    confidence (ties: lower index first). Each class keeps the <= k images whose argmax it is, most confident
    first; confidence is the argmax logit (`logit`, the official code) or its softmax probability (`prob`)."""
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    if k < 1:
        raise ValueError(f"k (pseudo-labels per class) must be >= 1, got {k}")
    if logits.dim() != 2:
        raise ValueError(f"need (N, K) logits, got shape {tuple(logits.shape)}")
    scores = logits.softmax(-1) if rank_by == "prob" else logits
    conf, pred = scores.max(-1)
    # one stable sort by (class, -confidence): rank within a class = position - the class's first position
    order = torch.argsort(-conf.double(), stable=True)
    order = order[torch.argsort(pred[order], stable=True)]
    cls = pred[order]
    counts = torch.bincount(cls, minlength=logits.shape[1])
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order)) - starts[cls]
    keep = rank < k
    return order[keep], cls[keep]


def pseudo_dataset(dataset: Dataset, pool: Sequence[Datum], idx: torch.Tensor, labels: torch.Tensor) -> Dataset:
    """The dataset whose train split is the pseudo-labelled images (label = pseudo-label); val/test unchanged."""
    names = dataset.classnames
    train = [Datum(pool[i].impath, int(c), names[int(c)]) for i, c in zip(idx.tolist(), labels.tolist())]
    meta = {**dataset.meta, "pseudo_labels": True}
    return replace(dataset, train=train, meta=meta)


@dataclass
class PseudoLabels:
    pool: list[Datum]
    logits: torch.Tensor        # (N, K) averaged zero-shot logits of the pool
    idx: torch.Tensor           # selected pool indices
    labels: torch.Tensor        # their pseudo-labels
    dataset: Dataset            # the target with train = the pseudo-labelled images


def pseudo_label(bundles: Sequence[ClipBundle], dataset: Dataset, k: int, rank_by: str = "logit") -> PseudoLabels:
    """Steps 1-2 on `dataset`'s unlabelled pool."""
    pool = unlabeled_pool(dataset)
    if not pool:
        raise ValueError(f"dataset {dataset.name} has no unlabelled training images")
    logits = pool_logits(bundles, dataset, pool)
    idx, labels = select_top_k(logits, k, rank_by)
    return PseudoLabels(pool, logits, idx, labels, pseudo_dataset(dataset, pool, idx, labels))


def pseudo_label_quality(dataset: Dataset, pl: PseudoLabels) -> dict[str, float]:
    """Evaluation only (after training, never fed back): accuracy of the selected pseudo-labels and zero-shot
    accuracy over the whole pool, against the true train labels matched by image path."""
    truth = {d.impath: d.label for d in dataset.train}
    if not all(d.impath in truth for d in pl.pool):
        return {}
    y = torch.tensor([truth[d.impath] for d in pl.pool])
    sel = y[pl.idx]
    return {"pseudo_acc": float((sel == pl.labels).float().mean() * 100) if len(sel) else 0.0,
            "pool_acc": float((pl.logits.argmax(-1) == y).float().mean() * 100),
            "n_pseudo": float(len(pl.idx)),
            "classes_covered": float(pl.labels.unique().numel())}


def ensemble_weights(class_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """(K, D) classifier of a prompt ensemble: the mean of the prompts' normalised class features, not
    renormalised, so its logits are exactly the mean of the prompts' logits (the official `upl_test.py`)."""
    if not class_features:
        raise ValueError("an ensemble needs at least one prompt")
    shapes = {tuple(w.shape) for w in class_features}
    if len(shapes) != 1:
        raise ValueError(f"prompts of an ensemble must give class features of one shape, got {sorted(shapes)}")
    return torch.stack([w.float() for w in class_features]).mean(0)


def member_seeds(seed: int, n_prompts: int) -> list[int]:
    """Training seeds of the N prompts of run `seed`: N*(seed-1)+1 .. N*seed (run 1 = the official seeds 1..N)."""
    return [n_prompts * (seed - 1) + n + 1 for n in range(n_prompts)]
