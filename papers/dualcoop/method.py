"""DualCoOp (Sun et al., NeurIPS 2022): a positive and a negative learnable prompt per class, class-specific
region aggregation over CLIP's dense features, the asymmetric loss (ASL) over the observed labels only.

- Prompts: two CoOp prompt learners (papers.coop.method.PromptLearner, imported): `[SOS] p_1..p_M+ CLASS .`
  and `[SOS] n_1..n_M- CLASS .`; class-specific (CSC, partial-label) or unified (zero-shot) contexts, random
  N(0, 0.02) init. Only these contexts are trained; CLIP stays frozen.
- Regions (`encode_regions`): ModifiedResNet map F -> tokens [mean(F); F_1..F_hw] + positions (bicubically
  resized when the map is larger than the pool's), each through v_proj then c_proj only (the official
  "conv projection"; no attention mixing), the mean token kept at index 0. ViT (not in the paper): the
  CLS output followed by the patch tokens, each through ln_post and proj (`encode_image_hooked`).
- Aggregation (`region_logits`): s± = cos(region, t±) * 20; w = softmax over regions of s+; S± = 5 * sum w s±
  (the official constants; = 100 * sum w cos±); the negative branch shares the positive weights (official).
- Prediction: p = softmax([S-, S+])[1] (`positive_probability`).
- Loss (`asl_loss`): ASL on the 2-way probabilities, unknown labels (-1) dropped, focusing weights without
  gradient, summed, times `loss_w` (official `utils/asymmetric_loss.py`, `utils/trainers.py`).

Ablations (the paper's Sec. 4.4 questions): `single` = one positive prompt compared against a learned scalar
threshold (p = sigmoid(S+ - b)); `global` = the dual prompts on the global (attention-pooled) embedding
instead of the region aggregation (S± = 100 cos(global, t±)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import ClipBundle
from common.clip.loader import ClipBundle as _Bundle
from common.clip.text import encode_prompts
from common.clip.visual import encode_image_hooked, is_resnet, resnet_dense_features, resnet_feature_map

from papers.coop.method import PromptLearner

AGGREGATIONS = ("region", "global")
REGION_TAU = 20.0      # official: similarities x 20 feed the spatial softmax and the weighted sum
REGION_OUT = 5.0       # official: the weighted sum x 5 (so S = 100 * sum w cos)
GLOBAL_SCALE = 100.0   # the `global` ablation: CLIP's logit scale on the pooled embedding


# ------------------------------------------------------------------------------------------- image side
@dataclass
class ResizedBundle(_Bundle):
    """A ClipBundle whose images are encoded at `size` pixels (the paper: 448 = 2 x CLIP's 224); the feature
    cache keys on `image_size`, so features at another size never mix with the model's own."""

    size: int = 0

    @property
    def image_size(self) -> int:   # type: ignore[override]
        return int(self.size)


def resized(bundle: ClipBundle, scale: float) -> ClipBundle:
    size = int(round(bundle.image_size * float(scale)))
    if size == bundle.image_size:
        return bundle
    return ResizedBundle(bundle.model, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer, bundle.arch,
                         bundle.pretrained, bundle.checkpoint_id, size=size)


def encode_regions(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(n, 1+hw, D) region embeddings (not normalised): index 0 the mean token, then one per location."""
    if is_resnet(model):
        pool = model.visual.attnpool
        fmap = resnet_feature_map(model, images)
        dense = resnet_dense_features(pool, fmap, with_position=True)       # c_proj(v_proj(F_j + pos_j))
        mean = fmap.mean(dim=(2, 3)) + pool.positional_embedding[0].to(fmap.dtype)
        return torch.cat([pool.c_proj(pool.v_proj(mean)).unsqueeze(1), dense], dim=1)
    pooled, dense = encode_image_hooked(model, images, return_dense=True)
    return torch.cat([pooled.unsqueeze(1), dense], dim=1)


# ------------------------------------------------------------------------------------------- heads
def region_logits(regions: torch.Tensor, t_pos: torch.Tensor, t_neg: torch.Tensor, tau: float = REGION_TAU,
                  out_scale: float = REGION_OUT) -> torch.Tensor:
    """(B, 2, C) logits [negative, positive] of regions (B, R, D) against normalised text features (C, D)."""
    r = F.normalize(regions, dim=-1)
    s_pos = tau * r @ t_pos.t()                       # (B, R, C)
    s_neg = tau * r @ t_neg.t()
    w = s_pos.softmax(dim=1)                          # spatial weights from the positive map only
    return out_scale * torch.stack([(w * s_neg).sum(1), (w * s_pos).sum(1)], dim=1)


def global_logits(pooled: torch.Tensor, t_pos: torch.Tensor, t_neg: torch.Tensor,
                  scale: float = GLOBAL_SCALE) -> torch.Tensor:
    """(B, 2, C) logits of the pooled embedding (B, D): the `global` ablation (no region aggregation)."""
    g = F.normalize(pooled, dim=-1)
    return scale * torch.stack([g @ t_neg.t(), g @ t_pos.t()], dim=1)


def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """p_i = softmax([S-, S+])[1] per class: (B, 2, C) -> (B, C)."""
    return logits.softmax(dim=1)[:, 1]


def asl_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 2.0, gamma_pos: float = 1.0,
             clip: float = 0.05, eps: float = 1e-6) -> torch.Tensor:
    """Asymmetric loss of (B, 2, C) logits against targets (B, C) in {1, 0, -1 (unknown)}, summed over the
    observed entries: -[y (1-p)^g+ log p + (1-y) p_m^g- log(1-p_m)], p_m = max(p - clip, 0); the focusing
    weights carry no gradient (official `disable_torch_grad_focal_loss`)."""
    prob = logits.softmax(dim=1)
    keep = targets.reshape(-1) != -1
    xs_pos = prob[:, 1].reshape(-1)[keep]
    xs_neg = prob[:, 0].reshape(-1)[keep]
    y = targets.reshape(-1)[keep].to(prob.dtype)
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.no_grad():
            pt = xs_pos * y + xs_neg * (1 - y)
            w = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
        loss = loss * w
    return -loss.sum()


# ------------------------------------------------------------------------------------------- model
class DualPrompt(nn.Module):
    """Positive and negative CoOp prompt learners over the same class names (or, `single`, the positive one and
    a learned threshold), scoring region features (`aggregation` region) or pooled ones (global)."""

    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], n_ctx_pos: int = 16, n_ctx_neg: int = 16,
                 csc: bool = False, single: bool = False, aggregation: str = "region", init_std: float = 0.02):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.bundle = bundle
        self.init_kwargs = dict(n_ctx_pos=n_ctx_pos, n_ctx_neg=n_ctx_neg, csc=csc, single=single,
                                aggregation=aggregation, init_std=init_std)
        self.pos = PromptLearner(bundle, classnames, n_ctx=n_ctx_pos, csc=csc, init_std=init_std)
        self.single, self.aggregation, self.csc = single, aggregation, csc
        if single:
            self.neg = None
            self.threshold = nn.Parameter(torch.zeros(()))
        else:
            self.neg = PromptLearner(bundle, classnames, n_ctx=n_ctx_neg, csc=csc, init_std=init_std)
        self.classnames = self.pos.classnames

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, ctx_pos: torch.Tensor | None = None, ctx_neg: torch.Tensor | None = None) -> torch.Tensor:
        """(2C, L, d) [positive; negative] prompt embeddings ((C, L, d) for `single`)."""
        p = self.pos.construct_prompts(self.pos.ctx if ctx_pos is None else ctx_pos)
        if self.single:
            return p
        return torch.cat([p, self.neg.construct_prompts(self.neg.ctx if ctx_neg is None else ctx_neg)])

    def token_ids(self) -> torch.Tensor:
        ids = self.pos.token_ids
        return ids if self.single else torch.cat([ids, self.neg.token_ids])

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised (t_pos, t_neg) of shape (C, D); t_neg is None for `single`."""
        feats = F.normalize(encode_prompts(self.pos.encoder, self.prompts(), self.token_ids()), dim=-1)
        C = self.num_classes
        return feats[:C], (None if self.single else feats[C:])

    def logits(self, feats: torch.Tensor, t_pos: torch.Tensor, t_neg: torch.Tensor | None,
               threshold: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 2, C) from image features: regions (B, R, D) for `region`, (B, D) pooled for `global`."""
        if self.single:
            b = self.threshold if threshold is None else threshold
            if self.aggregation == "region":
                s = region_logits(feats, t_pos, t_pos)[:, 1]
            else:
                s = GLOBAL_SCALE * F.normalize(feats, dim=-1) @ t_pos.t()
            return torch.stack([b.expand_as(s), s], dim=1)
        if self.aggregation == "region":
            return region_logits(feats, t_pos, t_neg)
        return global_logits(feats, t_pos, t_neg)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        t_pos, t_neg = self.text_features()
        return self.logits(feats, t_pos, t_neg)

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def with_classnames(self, classnames: Sequence[str]) -> "DualPrompt":
        """The same learned prompts for other class names (zero-shot: unseen classes); unified contexts only."""
        names = [c.replace("_", " ") for c in classnames]
        if names == self.classnames:
            return self
        if self.csc:
            raise ValueError("class-specific contexts cannot move to other classes; zero-shot DualCoOp uses "
                             "unified contexts (csc=false), as the official train_zsl.py")
        with torch.random.fork_rng():
            new = DualPrompt(self.bundle, names, **self.init_kwargs)
        new.load_state_dict(self.trained_state(), strict=False)
        return new


def trainable_names(model: DualPrompt) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def predict(model: DualPrompt, feats: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, C) positive probabilities of cached features (regions or pooled), prompts encoded once."""
    t_pos, t_neg = model.text_features()
    out = [positive_probability(model.logits(f.to(t_pos.device), t_pos, t_neg)).float().cpu()
           for f in feats.split(batch_size)]
    return torch.cat(out)


# ------------------------------------------------------------------------------------------- labels
def multi_hot(items, num_classes: int) -> torch.Tensor:
    """(N, C) 0/1 targets from `Datum.targets`."""
    y = torch.zeros(len(items), num_classes)
    for i, d in enumerate(items):
        t = getattr(d, "targets", None)
        if t is None:
            raise ValueError(f"{d.impath} has no multi-label targets: DualCoOp needs a multi-label dataset")
        if t:
            y[i, list(t)] = 1.0
    return y


def partial_labels(targets: torch.Tensor, proportion: float, seed: int) -> torch.Tensor:
    """Targets with each (image, class) entry kept with probability `proportion`, else -1 (unknown). One uniform
    draw per entry and seed, so the kept sets are nested across proportions (10% within 20% ... within 90%)."""
    if not 0 < proportion <= 1:
        raise ValueError(f"label proportion must be in (0, 1], got {proportion}")
    u = torch.rand(targets.shape, generator=torch.Generator().manual_seed(10_007 * int(seed) + 17))
    return torch.where(u < proportion, targets, torch.full_like(targets, -1.0))
