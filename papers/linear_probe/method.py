"""Linear-probe CLIP as CoOp's `lpclip` baseline: L2-regularised multinomial logistic regression on
frozen image features, the inverse regularisation strength C chosen on the validation split.

sklearn's objective `C * sum_i CE_i + ||W||^2 / 2` is minimised here as the equivalent
`mean_i CE_i + ||W||^2 / (2 C N)` with full-batch L-BFGS in torch (no extra dependency, fast on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

COARSE_C = tuple(10.0 ** e for e in range(-6, 7, 2))


@dataclass
class LinearProbe:
    weight: torch.Tensor  # (K, D)
    bias: torch.Tensor    # (K,)
    C: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float(), dim=-1) @ self.weight.t() + self.bias


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, C: float,
                            max_iter: int = 500) -> LinearProbe:
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    x = F.normalize(features.float(), dim=-1)
    n, d = x.shape
    w = torch.zeros(num_classes, d, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.t() + b, labels) + (w * w).sum() / (2 * C * n)
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(w.detach(), b.detach(), C)


def accuracy(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probe.logits(features).argmax(-1) == labels).float().mean() * 100)


def search_C(train_x, train_y, val_x, val_y, num_classes: int, refine_steps: int = 4) -> float:
    """Coarse log-grid then bisection in log space towards the better neighbour (CoOp lpclip's search).
    Ties go to the smaller C (stronger regularisation)."""
    def score(c: float) -> float:
        return accuracy(fit_logistic_regression(train_x, train_y, num_classes, c), val_x, val_y)

    scores = {c: score(c) for c in COARSE_C}
    best = max(COARSE_C, key=lambda c: (scores[c], -c))
    step = 2.0  # half the coarse spacing in log10
    for _ in range(refine_steps):
        step /= 2
        for cand in (best * 10 ** -step, best * 10 ** step):
            if cand not in scores:
                scores[cand] = score(cand)
        best = max(scores, key=lambda c: (scores[c], -c))
    return float(best)


def train_probe(train_x, train_y, val_x, val_y, num_classes: int) -> LinearProbe:
    """Search C on val, then refit on train with the chosen C."""
    if len(val_x) == 0:
        raise ValueError("linear probe needs a validation split to choose C (never the test split)")
    C = search_C(train_x, train_y, val_x, val_y, num_classes)
    return fit_logistic_regression(train_x, train_y, num_classes, C)
