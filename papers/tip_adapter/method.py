"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022) on cached, frozen CLIP features.

Cache model (no training): keys = the few-shot training features averaged over augmented views and
L2-normalised (N*K, D); values = their one-hot labels (N*K, C). For a normalised test feature f:

    logits = clip_scale * f W^T + alpha * exp(-beta * (1 - f keys^T)) values

with W the normalised text classifier and clip_scale = 100 (a constant in the official code, in place of
CLIP's learned temperature). alpha = 0 is zero-shot CLIP exactly. alpha ("residual ratio") and beta
("sharpness") are searched on a grid over validation features (`search_alpha_beta`).

Tip-Adapter-F turns the keys into a learnable (N*K, D) matrix initialised to the cache keys (not
re-normalised during training), trains them with cross-entropy on the same logits at the initial
alpha/beta (AdamW, cosine over all iterations), keeps the epoch with the best validation accuracy and
searches alpha/beta again with the tuned keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engine import TrainConfig, Trainer, index_batches
from common.engine.threads import torch_threads


def build_cache(view_features: Sequence[torch.Tensor], labels: torch.Tensor, num_classes: int):
    """Keys (M, D): raw features averaged over the augmented views, then L2-normalised (as the official
    `build_cache_model`); values (M, C): one-hot labels."""
    if len(view_features) == 0:
        raise ValueError("build_cache needs at least one view of the training features")
    shapes = {tuple(v.shape) for v in view_features}
    if len(shapes) != 1:
        raise ValueError(f"every view must hold the same images; got feature shapes {sorted(shapes)}")
    if len(labels) != view_features[0].shape[0]:
        raise ValueError(f"{len(labels)} labels for {view_features[0].shape[0]} cached features")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    keys = F.normalize(torch.stack([v.float() for v in view_features]).mean(0), dim=-1)
    values = F.one_hot(labels.long(), num_classes).float()
    return keys, values


def cache_logits(affinity: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(-beta (1 - affinity)) @ values: cosine affinities mapped into (0, 1], summed per class."""
    return torch.exp(-beta * (1.0 - affinity)) @ values


def tip_logits(features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, clip_weights: torch.Tensor,
               alpha: float, beta: float, clip_scale: float = 100.0) -> torch.Tensor:
    """Tip-Adapter logits for normalised `features` (B, D); `clip_weights` (C, D) normalised."""
    zs = clip_scale * features @ clip_weights.t()
    return zs + alpha * cache_logits(features @ keys.t(), values, beta)


def grid_values(scale: float, steps: int) -> torch.Tensor:
    """The official grid: 0.1 + i * (scale - 0.1) / steps, i = 0 .. steps - 1 (the scale itself excluded)."""
    if steps < 1 or scale <= 0.1:
        raise ValueError(f"search grid needs steps >= 1 and scale > 0.1, got scale={scale}, steps={steps}")
    return 0.1 + torch.arange(steps, dtype=torch.float64) * (scale - 0.1) / steps


@dataclass
class Search:
    betas: torch.Tensor    # (nb,)
    alphas: torch.Tensor   # (na,)
    acc: torch.Tensor      # (nb, na) validation top-1 in percent
    beta: float
    alpha: float
    best: float

    def as_dict(self) -> dict:
        return {"betas": self.betas.tolist(), "alphas": self.alphas.tolist(), "acc": self.acc.tolist(),
                "beta": self.beta, "alpha": self.alpha, "best": self.best}


@torch.no_grad()
def search_alpha_beta(features: torch.Tensor, labels: torch.Tensor, affinity: torch.Tensor, values: torch.Tensor,
                      clip_weights: torch.Tensor, scale: Sequence[float], steps: Sequence[int] = (200, 20),
                      clip_scale: float = 100.0, max_elems: int = 2 ** 25) -> Search:
    """Accuracy of every (beta, alpha) on the grid (scale = [S_beta, S_alpha], steps = [n_beta, n_alpha]);
    the best pair is the first maximum in beta-major order, as the official loop with its strict `>`.
    `affinity` = features @ keys^T (plain or fine-tuned keys), computed once by the caller."""
    if len(features) == 0:
        raise ValueError("alpha/beta search needs validation features (never the test split)")
    betas, alphas = grid_values(scale[0], steps[0]), grid_values(scale[1], steps[1])
    zs = clip_scale * features @ clip_weights.t()
    n, c = zs.shape
    b = betas.to(device=zs.device, dtype=zs.dtype)
    a = alphas.to(device=zs.device, dtype=zs.dtype)
    dist = 1.0 - affinity
    # batched over betas and alphas (chunks of at most ~max_elems values) instead of a loop per grid point
    nb = max(1, max_elems // max(1, len(a) * n * max(c, dist.shape[1])))
    na = max(1, max_elems // max(1, nb * n * c))
    acc = torch.empty(len(betas), len(alphas), dtype=torch.float64)
    for i in range(0, len(b), nb):
        cl = (torch.exp(-b[i:i + nb, None, None] * dist) @ values).unsqueeze(1)         # (nb, 1, n, c)
        for j in range(0, len(a), na):
            logits = zs + a[None, j:j + na, None, None] * cl                             # (nb, na, n, c)
            hit = logits.argmax(-1) == labels
            acc[i:i + nb, j:j + na] = (hit.double().mean(-1) * 100).cpu()
    flat = int(torch.argmax(acc.flatten()))   # first maximum = the official tie-breaking
    bi, ai = divmod(flat, len(alphas))
    return Search(betas, alphas, acc, float(betas[bi]), float(alphas[ai]), float(acc[bi, ai]))


class TipAdapterF(nn.Module):
    """Tip-Adapter-F: the cache keys are the only trainable parameter (a bias-free Linear(D -> M) in the
    official code). Values and the text classifier are frozen buffers. `best_keys`/`best_val` keep the
    epoch with the best validation accuracy, so a resumed run keeps its best epoch too."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, clip_weights: torch.Tensor, alpha: float,
                 beta: float, clip_scale: float = 100.0):
        super().__init__()
        self.keys = nn.Parameter(keys.detach().clone().float())
        self.register_buffer("values", values.detach().clone().float())
        self.register_buffer("clip_weights", clip_weights.detach().clone().float())
        self.register_buffer("best_keys", keys.detach().clone().float())
        # float64, as `top1` returns a Python float: in float32 a tie such as 200/3 would be stored as 66.6666641,
        # below the next epoch's 66.6666667, and count as an improvement
        self.register_buffer("best_val", torch.tensor(-1.0, dtype=torch.float64))
        self.alpha, self.beta, self.clip_scale = float(alpha), float(beta), float(clip_scale)

    def forward(self, features: torch.Tensor, alpha: float | None = None, beta: float | None = None) -> torch.Tensor:
        alpha = self.alpha if alpha is None else alpha
        beta = self.beta if beta is None else beta
        zs = self.clip_scale * features @ self.clip_weights.t()
        return zs + alpha * cache_logits(features @ self.keys.t(), self.values, beta)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).double().mean() * 100) if len(labels) else float("nan")


def train_tip_f(model: TipAdapterF, views: Sequence[torch.Tensor], labels: torch.Tensor, val_features: torch.Tensor,
                val_labels: torch.Tensor, tcfg: TrainConfig, batch_size: int = 256, adam_eps: float = 1e-4,
                out_dir=None, desc: str = "tip_f", threads: int | None = None) -> list[dict]:
    """Fine-tune the keys. Epoch e trains on augmented view e % len(views) (normalised, as the official code
    normalises the fresh features of every batch). After every epoch the keys are scored on the validation
    features at the initial alpha/beta; the best epoch (first on ties) is restored at the end. The official
    code picks this epoch on the test set; we never do."""
    if not views:
        raise ValueError("train_tip_f needs at least one cached view of the training features")
    if len(val_labels) == 0:
        raise ValueError("Tip-Adapter-F selects its epoch on validation features; got none (never the test split)")
    views = [F.normalize(v.float(), dim=-1) for v in views]
    trainer = Trainer(model, tcfg, out_dir, params=[model.keys], desc=desc)
    # The official optimiser is AdamW with eps 1e-4 (TrainConfig has no eps): same parameters, same state.
    trainer.optimizer = torch.optim.AdamW([model.keys], lr=tcfg.lr, eps=adam_eps, weight_decay=tcfg.weight_decay)
    n = len(labels)

    def batches(epoch: int):
        x = views[epoch % len(views)]
        return [(x[idx], labels[idx]) for idx in index_batches(n, batch_size, tcfg.seed, epoch)]

    def step(batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def on_epoch_end(epoch: int) -> dict:
        acc = top1(model(val_features), val_labels)
        # strict > in one precision (the official `if acc > best_acc`): the first best epoch keeps ties
        if acc > model.best_val.item():
            model.best_val.fill_(acc)
            model.best_keys.copy_(model.keys)
        return {"val_top1": acc}

    with torch_threads(threads):
        history = trainer.fit(step, batches, on_epoch_end)
    with torch.no_grad():
        model.keys.copy_(model.best_keys)
    return history
