"""CLIP-Adapter (Gao et al., IJCV 2023): a bottleneck MLP on the frozen CLIP feature, blended residually.

    A(x) = ReLU(ReLU(x W1) W2),  W1: D x D/r, W2: D/r x D, no biases (official `Adapter`, r = 4; the output
           ReLU is in the code, not in the paper's formula)
    x*   = ratio * A(x) + (1 - ratio) * x

on the image feature (visual adapter, the paper's default and the only one in the released code), on the
class text features (text adapter) or on both. Logits = logit_scale * cos(f*, W*_k), with the CLIP text
classifier from one hand-crafted template. ratio = 0 is zero-shot CLIP exactly whatever the adapter
weights. Only the adapter(s) train; the image features come from the feature cache.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import ClipBundle, tokenize
from common.engine import TrainConfig
from common.engine.batched import fit_modules
from common.engine.threads import torch_threads

BRANCHES = ("visual", "text", "both")


@torch.no_grad()
def raw_text_features(bundle: ClipBundle, classnames: Sequence[str], templates: Sequence[str],
                      batch: int = 1024) -> torch.Tensor:
    """(C, D) class text features WITHOUT normalisation: per class, the plain mean over templates of the
    unnormalised text-encoder outputs (CLIP-Adapter's and TaskRes's `TextEncoder`; with one template it is
    just that template's feature)."""
    if not classnames or not templates:
        raise ValueError("raw_text_features needs class names and at least one template")
    texts = [t.format(c) for c in classnames for t in templates]
    ids = tokenize(bundle, texts)
    model = bundle.model
    was_training = model.training
    model.eval()
    out = torch.cat([model.encode_text(chunk.to(bundle.device)).float().cpu() for chunk in ids.split(batch)])
    model.train(was_training)
    return out.view(len(classnames), len(templates), -1).mean(1)


class Adapter(nn.Module):
    """Linear(D, D/r) - ReLU - Linear(D/r, D) - ReLU, bias-free (the official `Adapter`)."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        if reduction < 1 or dim // reduction < 1:
            raise ValueError(f"reduction must be in [1, dim={dim}], got {reduction}")
        self.fc = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
                                nn.Linear(dim // reduction, dim, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def stacked_adapter(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """`Adapter` of R runs at once: x (R, N, D), weights state[prefix.fc.0.weight] (R, D/r, D), [.fc.2] (R, D, D/r)."""
    h = torch.relu(torch.einsum("rnd,rhd->rnh", x, state[f"{prefix}.fc.0.weight"]))
    return torch.relu(torch.einsum("rnh,rdh->rnd", h, state[f"{prefix}.fc.2.weight"]))


def blend(x: torch.Tensor, adapter: nn.Module, ratio: float) -> torch.Tensor:
    """ratio * A(x) + (1 - ratio) * x (the residual ratio alpha of the paper)."""
    return ratio * adapter(x) + (1.0 - ratio) * x


class ClipAdapter(nn.Module):
    """Adapters over cached (unnormalised) image features and a frozen (C, D) text feature matrix."""

    def __init__(self, text_features: torch.Tensor, logit_scale: float, branch: str = "visual", ratio: float = 0.2,
                 text_ratio: float | None = None, reduction: int = 4):
        super().__init__()
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        for r in (ratio, text_ratio):
            if r is not None and not 0.0 <= r <= 1.0:
                raise ValueError(f"residual ratio must be in [0, 1], got {r}")
        dim = text_features.shape[1]
        self.register_buffer("text_features", text_features.detach().clone().float())
        self.visual = Adapter(dim, reduction) if branch in ("visual", "both") else None
        self.text = Adapter(dim, reduction) if branch in ("text", "both") else None
        self.ratio = float(ratio)
        self.text_ratio = float(ratio if text_ratio is None else text_ratio)
        self.logit_scale = float(logit_scale)

    def classifier(self, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised (C, D) class weights (text adapter applied if present). Another class set's features
        (a shifted target) can be passed in."""
        w = self.text_features if text_features is None else text_features.float()
        if self.text is not None:
            w = blend(w, self.text, self.text_ratio)
        return F.normalize(w, dim=-1)

    def image(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        if self.visual is not None:
            f = blend(f, self.visual, self.ratio)
        return F.normalize(f, dim=-1)

    def forward(self, features: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        return self.logit_scale * self.image(features) @ self.classifier(text_features).t()

    def stacked_forward(self, state: dict, x: torch.Tensor) -> torch.Tensor:
        """`forward` of R runs of this configuration whose tensors are stacked in `state`: x (R, B, D) -> (R, B, C)."""
        f, w = x.float(), state["text_features"]
        if self.visual is not None:
            f = self.ratio * stacked_adapter(state, "visual", f) + (1.0 - self.ratio) * f
        if self.text is not None:
            w = self.text_ratio * stacked_adapter(state, "text", w) + (1.0 - self.text_ratio) * w
        return self.logit_scale * torch.einsum("rbd,rcd->rbc", F.normalize(f, dim=-1), F.normalize(w, dim=-1))


def train_on_views(module: nn.Module, views: Sequence[torch.Tensor], labels: torch.Tensor, tcfg: TrainConfig,
                   batch_size: int, out_dir=None, desc: str = "train", threads: int | None = None) -> list[dict]:
    """Cross-entropy training of `module(features) -> logits` on cached augmented views: epoch e uses view
    e % len(views) (the encoder is frozen, so this replaces re-encoding freshly augmented images).
    One run of `train_on_views_many`."""
    return train_on_views_many([module], [views], [labels], [tcfg], batch_size, out_dir, desc, threads)[0]


def train_on_views_many(modules: Sequence[nn.Module], views: Sequence[Sequence[torch.Tensor]],
                        labels: Sequence[torch.Tensor], tcfgs: Sequence[TrainConfig], batch_size: int, out_dir=None,
                        desc: str = "train", threads: int | None = None, eval_fn=None, eval_every: int = 0
                        ) -> list[list[dict]]:
    """`train_on_views` for R modules of one architecture at once (seeds, shot counts): one batched model
    (common.engine.batched.fit_modules), each run exactly as it would train alone. Returns each run's history."""
    for v, y in zip(views, labels):
        if not v:
            raise ValueError("train_on_views needs at least one cached view of the training features")
        if any(len(x) != len(y) for x in v):
            raise ValueError(f"every view must hold {len(y)} features, got {[len(x) for x in v]}")
    with torch_threads(threads):
        trainer = fit_modules(modules, [[x.float() for x in v] for v in views], labels, tcfgs, batch_size, out_dir,
                              desc, eval_fn, eval_every)
    for m, ev in zip(modules, trainer.evals):
        m.val_history = ev
    return trainer.history
