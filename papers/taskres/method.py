"""TaskRes: Task Residual for Tuning Vision-Language Models (Yu et al., CVPR 2023).

The frozen base classifier t (C, D) is CLIP's text features of the class prompts, averaged over templates
WITHOUT per-template normalisation (official `_get_base_text_features`). A learnable residual x of the same
shape, initialised to zeros, is added:  t' = t + alpha * x;  logits = logit_scale * cos(f, t'_k). At
initialisation the model is exactly zero-shot CLIP; only x trains.

Paper variants (ablations) also here: the residual on the image feature instead (TaskRes-I, one 1 x D
vector added to the raw image feature, the official commented-out code), the adapter-style classifier
t + alpha * phi(t) and the directly adapted phi(t) with phi = CLIP-Adapter's bottleneck MLP.

Enhanced base (TaskRes*): the text projection is first fine-tuned on the few-shot data, t is recomputed
with it and frozen, then the residual is trained on top (`train_text_projection`, `load_text_projection`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import ClipBundle, PromptTextEncoder, tokenize
from common.engine import TrainConfig
from papers.clip_adapter.method import Adapter, stacked_adapter, train_on_views

RESIDUALS = ("text", "image")
FORMS = ("residual", "adapter", "direct")


class TaskRes(nn.Module):
    def __init__(self, base: torch.Tensor, logit_scale: float, alpha: float = 0.5, residual: str = "text",
                 form: str = "residual", reduction: int = 4):
        super().__init__()
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if form != "residual" and residual != "text":
            raise ValueError("the adapter-style forms act on the text classifier only (residual='text')")
        self.register_buffer("base", base.detach().clone().float())
        self.alpha, self.residual_on, self.form = float(alpha), residual, form
        self.logit_scale = float(logit_scale)
        if form == "residual":
            shape = base.shape if residual == "text" else (1, base.shape[1])
            self.residual = nn.Parameter(torch.zeros(shape, device=base.device))
        else:
            self.phi = Adapter(base.shape[1], reduction)

    def classifier(self) -> torch.Tensor:
        """The unnormalised (C, D) classifier t'."""
        if self.form == "adapter":
            return self.base + self.alpha * self.phi(self.base)
        if self.form == "direct":
            return self.phi(self.base)
        if self.residual_on == "text":
            return self.base + self.alpha * self.residual
        return self.base

    def forward(self, features: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over all classes, or over the class indices `classes` (a target holding a subset)."""
        f = features.float()
        if self.form == "residual" and self.residual_on == "image":
            f = f + self.alpha * self.residual
        w = self.classifier()
        if classes is not None:
            w = w[classes]
        return self.logit_scale * F.normalize(f, dim=-1) @ F.normalize(w, dim=-1).t()

    def stacked_forward(self, state: dict, x: torch.Tensor) -> torch.Tensor:
        """`forward` (all classes) of R runs of this configuration stacked in `state`: x (R, B, D) -> (R, B, C)."""
        f, base = x.float(), state["base"]
        if self.form == "adapter":
            w = base + self.alpha * stacked_adapter(state, "phi", base)
        elif self.form == "direct":
            w = stacked_adapter(state, "phi", base)
        elif self.residual_on == "text":
            w = base + self.alpha * state["residual"]
        else:
            w = base
            f = f + self.alpha * state["residual"]
        return self.logit_scale * torch.einsum("rbd,rcd->rbc", F.normalize(f, dim=-1), F.normalize(w, dim=-1))

    @torch.no_grad()
    def residual_scale(self) -> float:
        """Mean over classes of ||alpha x_k|| / ||t_k|| in percent (how far the task moved the classifier)."""
        delta = self.classifier() - self.base if self.form != "direct" else self.classifier()
        if self.form == "residual" and self.residual_on == "image":
            delta = self.alpha * self.residual.expand_as(self.base)
        return float((delta.norm(dim=-1) / self.base.norm(dim=-1)).mean() * 100)


# ---- text-side pieces: pooled text states and the (enhanced) projection ------------------------------

@torch.no_grad()
def pooled_text_states(bundle: ClipBundle, classnames: Sequence[str], templates: Sequence[str],
                       batch: int = 1024) -> torch.Tensor:
    """(C, T, W) text-transformer states at the EOT token, before the text projection."""
    if not classnames or not templates:
        raise ValueError("pooled_text_states needs class names and at least one template")
    if not isinstance(bundle.model.text_projection, torch.Tensor):
        raise TypeError("the enhanced base needs a CLIP whose text_projection is a (width, D) matrix "
                        f"(open_clip CLIP); got {type(bundle.model.text_projection).__name__}")
    enc = PromptTextEncoder(bundle.model)
    enc.text_projection = None   # stop before the projection: the enhanced base re-learns it
    ids = tokenize(bundle, [t.format(c) for c in classnames for t in templates])
    was_training = bundle.model.training
    bundle.model.eval()
    h = torch.cat([enc(enc.embed(chunk.to(bundle.device)), chunk.to(bundle.device)).float().cpu()
                   for chunk in ids.split(batch)])
    bundle.model.train(was_training)
    return h.view(len(classnames), len(templates), -1)


def project(states: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Base classifier from pooled states (C, T, W) and a projection (W, D): mean over templates of the
    unnormalised projected features (the official base)."""
    return (states @ projection).mean(1)


class TextProjection(nn.Module):
    """Fine-tunes CLIP's text projection on few-shot data: logits = scale * cos(f, mean_T(h @ P))."""

    def __init__(self, states: torch.Tensor, projection: torch.Tensor, logit_scale: float):
        super().__init__()
        self.register_buffer("states", states.detach().clone().float())
        self.projection = nn.Parameter(projection.detach().clone().float())
        self.logit_scale = float(logit_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        w = project(self.states, self.projection)
        return self.logit_scale * F.normalize(features.float(), dim=-1) @ F.normalize(w, dim=-1).t()


def train_text_projection(bundle: ClipBundle, states: torch.Tensor, views: Sequence[torch.Tensor],
                          labels: torch.Tensor, tcfg: TrainConfig, batch_size: int, out_dir=None,
                          desc: str = "enhanced base", threads: int | None = None) -> torch.Tensor:
    """The enhanced base of TaskRes*: fine-tune only the text projection (cross-entropy, cached views),
    return the new (C, D) base. The official recipe is not released (only its checkpoints)."""
    dev = views[0].device
    model = TextProjection(states, bundle.model.text_projection.detach(), float(bundle.model.logit_scale.exp())).to(dev)
    train_on_views(model, views, labels, tcfg, batch_size, out_dir, desc=desc, threads=threads)
    with torch.no_grad():
        return project(model.states, model.projection)


def load_text_projection(path) -> torch.Tensor:
    """An official enhanced-base checkpoint (`strong_base/<Dataset>/rn50_<k>shots/model.pth.tar`): a Dassl
    checkpoint whose state_dict['weight'] is the projection as a Linear weight (D, W); returns (W, D)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    try:
        weight = ckpt["state_dict"]["weight"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not an enhanced-base checkpoint: expected state_dict['weight']") from err
    return weight.float().t().contiguous()
