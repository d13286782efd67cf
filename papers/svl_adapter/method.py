"""SVL-Adapter (Pantazis et al., BMVC 2022): a classifier on a self-supervised encoder's features,
blended with zero-shot CLIP.

    p(y | x) = lambda * p_clip(y | x) + (1 - lambda) * p_ssl(y | x)

p_clip = softmax(exp(logit_scale) * cos(f_clip(x), w_y)) with one hand-written template per dataset;
p_ssl = softmax(A(h(x))), A = Linear-ReLU-Linear (hidden 256) trained with cross-entropy on the K-shot
labelled features of the frozen SSL encoder h (`ssl.py`). lambda is chosen
- on the few labelled validation images (SVL-Adapter): grid 0, 0.05, ..., 1, first strict maximiser
  scanning from the CLIP side, so ties keep more CLIP (the official loop over alpha = 1 - lambda);
- without labels (SVL-Adapter*): lambda = mean over the unlabelled test images of CLIP's max class
  probability, i.e. the official alpha = 1 - mean confidence on the SSL branch.
`space="logit"` blends logits instead (what the official script computes: alpha * adapter logits +
(1 - alpha) * 100-scaled CLIP logits).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engine import TrainConfig, Trainer, index_batches
from common.engine.convergence import keep_history

SPACES = ("prob", "logit")


class AdapterMLP(nn.Module):
    """A(h) = W2 ReLU(W1 h + b1) + b2 (the official `AdapterMLP`); hidden=0 gives a linear classifier."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.net = (nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
                    if hidden else nn.Linear(in_dim, num_classes))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def all_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """One epoch's shuffled index batches, the last partial one included: the official loaders are
    `DataLoader(shuffle=True)` with drop_last False (the adapter's, and SimCLR's `drop_last=False`), where the
    engine's `index_batches` drops a partial batch. The same shuffle as `index_batches` (one batch of n, split)."""
    return list(index_batches(n, n, seed, epoch)[0].split(batch_size))


def fit_adapter(features: torch.Tensor, labels: torch.Tensor, num_classes: int, opts: dict, seed: int,
                out_dir=None, desc: str = "svl adapter", val_score=None) -> AdapterMLP:
    """Cross-entropy on frozen SSL features with Adam (official: lr 1e-3, 50 epochs, batch 32, no schedule).
    `val_score(adapter) -> float`: a convergence study's validation, logged after every epoch."""
    if len(features) != len(labels) or len(features) == 0:
        raise ValueError(f"adapter needs matching non-empty features/labels, got {len(features)} and {len(labels)}")
    torch.manual_seed(seed)  # the initial weights
    adapter = AdapterMLP(features.shape[1], num_classes, int(opts["hidden"]))
    x, y = features.float(), labels.long()
    bs = int(opts["batch_size"])
    cfg = TrainConfig(epochs=int(opts["epochs"]), lr=float(opts["lr"]), optimizer="adam",
                      weight_decay=float(opts.get("weight_decay", 0.0)), warmup_epochs=0, schedule="constant",
                      seed=seed)

    def step(idx):
        return F.cross_entropy(adapter(x[idx]), y[idx])

    def validate(epoch):
        adapter.eval()
        with torch.no_grad():
            out = {"val": float(val_score(adapter))}
        adapter.train()
        return out

    history = Trainer(adapter, cfg, out_dir, desc=desc).fit(step, lambda epoch: all_batches(len(x), bs, seed, epoch),
                                                            validate if val_score is not None else None)
    for p in adapter.parameters():
        p.requires_grad_(False)
    return keep_history(adapter.eval(), history)


def clip_logits(image_features: torch.Tensor, class_weights: torch.Tensor, scale: float) -> torch.Tensor:
    """Zero-shot CLIP: scale * cos(image, class text)."""
    w = F.normalize(class_weights.float().to(image_features.device), dim=-1)
    return scale * F.normalize(image_features.float(), dim=-1) @ w.t()


def fuse(clip: torch.Tensor, ssl: torch.Tensor, lam: float, space: str = "prob") -> torch.Tensor:
    """lambda * CLIP + (1 - lambda) * SSL, on probabilities (the paper) or on logits (official script)."""
    if space not in SPACES:
        raise ValueError(f"fusion space must be one of {SPACES}, got {space!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    if clip.shape != ssl.shape:
        raise ValueError(f"CLIP scores {tuple(clip.shape)} and SSL scores {tuple(ssl.shape)} differ in shape")
    if space == "prob":
        clip, ssl = clip.softmax(-1), ssl.softmax(-1)
    return lam * clip + (1.0 - lam) * ssl


def confidence_lambda(clip: torch.Tensor) -> float:
    """SVL-Adapter*'s label-free lambda: mean over images of the largest CLIP class probability."""
    if clip.dim() != 2 or len(clip) == 0:
        raise ValueError(f"need (N, K) CLIP logits of the unlabelled images, got shape {tuple(clip.shape)}")
    return float(clip.float().softmax(-1).max(-1).values.mean())


def lambda_grid(step: float = 0.05) -> list[float]:
    """1, 1 - step, ..., 0: CLIP side first (the official loop runs alpha = 1 - lambda upward from 0)."""
    n = round(1 / step)
    if n < 1 or abs(n * step - 1) > 1e-9:
        raise ValueError(f"lambda step {step} does not divide [0, 1] evenly")
    return [1.0 - i / n for i in range(n + 1)]


def tune_lambda(clip: torch.Tensor, ssl: torch.Tensor, labels: torch.Tensor, step: float = 0.05,
                space: str = "prob") -> float:
    """lambda with the best accuracy on the labelled validation images; a value replaces the current
    best only if strictly better, so ties keep the larger lambda (and all-wrong keeps lambda = 1)."""
    if len(labels) == 0:
        raise ValueError("tuning lambda needs labelled validation images (use the confidence rule without them)")
    best, best_acc = 1.0, 0.0
    for lam in lambda_grid(step):
        acc = float((fuse(clip, ssl, lam, space).argmax(-1) == labels).float().mean())
        if acc > best_acc:
            best, best_acc = lam, acc
    return best


def pseudo_labels(clip: torch.Tensor, per_class: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-shot variant, the official `generate_clip_pseudolabels.py` rule: the `per_class` most confident
    images of each CLIP-predicted class, labelled with that class; then each class CLIP never predicts takes
    the image most probable for it among all images not taken by an earlier such class, even one of another
    class's picks, which that class then loses (`pseudo_full` drops the rows `rare_df` takes, without a
    replacement). Never-predicted classes go in index order (official: Python set order of the label
    strings, which varies between processes). Returns (image indices in increasing order, pseudo labels)."""
    probs = clip.float().softmax(-1)
    conf, pred = probs.max(-1)
    label = torch.full((len(probs),), -1, dtype=torch.long)   # -1: not pseudo-labelled
    for c in pred.unique().tolist():
        members = (pred == c).nonzero().flatten()
        label[members[conf[members].argsort(descending=True)[:per_class]]] = c
    rare_taken = torch.zeros(len(probs), dtype=torch.bool)
    for c in sorted(set(range(probs.shape[1])) - set(pred.tolist())):
        if rare_taken.all():
            break  # fewer images than classes: nothing left to give this class
        i = int(probs[:, c].masked_fill(rare_taken, -1.0).argmax())
        rare_taken[i] = True
        label[i] = c
    idx = (label >= 0).nonzero().flatten()
    return idx, label[idx]
