"""CALIP (Guo et al., AAAI 2023): zero-shot enhancement of CLIP with parameter-free attention.

Inputs, all L2-normalised per token as in the official `run_imagenet.py`: the global image embedding
f_v (N, C), the spatial embeddings F_s (N, HW, C) (the final pooling run on every token, see
`common.engine.dense`) and the text classifier F_t (K, C).

Parameter-free bidirectional attention, per image (batched here, the official code loops per image)::

    A      = s * F_s F_t^T                       (HW, K), s = 2 in the official code
    F_s^a  = softmax_K(A) F_t                    each location becomes a mixture of class texts
    F_t^a  = softmax_HW(A^T) F_s                 each class becomes a mixture of image locations
    f_v^a  = mean_HW(F_s^a) + max_HW(F_s^a)
    logits = ls * (b1 f_v F_t^T + b2 f_v F_t^a^T + b3 f_v^a F_t^T),  b1 = 1

The updated features are not re-normalised (official; `normalize_updated` gives the SuS-X variant).
CALIP-FS adds learnable query/key/value pre-projections (shared by both modalities, which live in one
joint space) and an output projection to the same attention; they are initialised to the identity, so
CALIP-FS starts exactly at CALIP.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

TEXT_SOFTMAX = ("positions", "classes")


class Terms(NamedTuple):
    """The three logit terms (N, K), each already multiplied by the logit scale."""
    zero_shot: torch.Tensor      # b1: f_v . F_t
    visual_text: torch.Tensor    # b2: f_v . F_t^a   (visual-guided text)
    text_visual: torch.Tensor    # b3: f_v^a . F_t   (text-aware visual)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def cross_modal_attention(F_s: torch.Tensor, F_t: torch.Tensor, scale: float = 2.0,
                          q: Callable = _identity, k: Callable = _identity, v: Callable = _identity,
                          o: Callable = _identity, text_softmax: str = "positions"):
    """CALIP's bidirectional attention. F_s (N, HW, C), F_t (K, C) -> F_s^a (N, HW, C), F_t^a (N, K, C).

    With identity q/k/v/o (the default) it is the parameter-free attention, A = s F_s F_t^T used in both
    directions; CALIP-FS passes its linear layers. `text_softmax="classes"` normalises the text->image
    weights over classes instead of positions (an ablation of the softmax axis, not the method)."""
    if F_s.dim() != 3 or F_t.dim() != 2 or F_s.shape[-1] != F_t.shape[-1]:
        raise ValueError(f"expected F_s (N, HW, C) and F_t (K, C), got {tuple(F_s.shape)} and {tuple(F_t.shape)}")
    if text_softmax not in TEXT_SOFTMAX:
        raise ValueError(f"text_softmax must be one of {TEXT_SOFTMAX}, got {text_softmax!r}")
    q_s, k_s, v_s = q(F_s), k(F_s), v(F_s)
    q_t, k_t, v_t = q(F_t), k(F_t), v(F_t)
    a_st = scale * torch.einsum("njc,kc->njk", q_s, k_t)            # image locations query the texts
    a_ts = scale * torch.einsum("kc,njc->nkj", q_t, k_s)            # texts query the image locations
    F_s_a = o(a_st.softmax(dim=-1) @ v_t)                            # softmax over classes
    w_ts = a_ts.softmax(dim=-1 if text_softmax == "positions" else 1)
    F_t_a = o(w_ts @ v_s)                                            # softmax over positions
    return F_s_a, F_t_a


def pool_mean_max(F_s_a: torch.Tensor) -> torch.Tensor:
    """Official pooling of the text-aware visual features: average pool + max pool over locations."""
    return F_s_a.mean(dim=1) + F_s_a.amax(dim=1)


def terms_from_attention(f_v: torch.Tensor, F_t: torch.Tensor, F_s_a: torch.Tensor, F_t_a: torch.Tensor,
                         logit_scale: float, normalize_updated: bool = False) -> Terms:
    f_v_a = pool_mean_max(F_s_a)
    if normalize_updated:
        F_t_a, f_v_a = F.normalize(F_t_a, dim=-1), F.normalize(f_v_a, dim=-1)
    return Terms(logit_scale * f_v @ F_t.t(),
                 logit_scale * torch.einsum("nc,nkc->nk", f_v, F_t_a),
                 logit_scale * f_v_a @ F_t.t())


def normalize_inputs(f_v: torch.Tensor, F_s: torch.Tensor, F_t: torch.Tensor):
    return F.normalize(f_v, dim=-1), F.normalize(F_s, dim=-1), F.normalize(F_t, dim=-1)


@torch.no_grad()
def calip_terms(f_v: torch.Tensor, F_s: torch.Tensor, F_t: torch.Tensor, logit_scale: float, scale: float = 2.0,
                normalize_updated: bool = False, text_softmax: str = "positions",
                max_elements: int = 1 << 25) -> Terms:
    """The three CALIP logit terms for every image, in chunks of images so (chunk, K, C) stays bounded."""
    if len(f_v) != len(F_s):
        raise ValueError(f"{len(f_v)} global features but {len(F_s)} dense feature sets")
    f_v, F_s, F_t = normalize_inputs(f_v, F_s, F_t)
    K, C = F_t.shape
    chunk = max(1, max_elements // (K * C + F_s.shape[1] * max(C, K)))
    parts = []
    for i in range(0, len(f_v), chunk):
        F_s_a, F_t_a = cross_modal_attention(F_s[i:i + chunk], F_t, scale, text_softmax=text_softmax)
        parts.append(terms_from_attention(f_v[i:i + chunk], F_t, F_s_a, F_t_a, logit_scale, normalize_updated))
    return Terms(*(torch.cat(p) for p in zip(*parts)))


def fuse(terms: Terms, beta2: float, beta3: float, beta1: float = 1.0) -> torch.Tensor:
    return beta1 * terms.zero_shot + beta2 * terms.visual_text + beta3 * terms.text_visual


def beta_grid(max_value: float, steps: int, start: float = 0.001) -> list[float]:
    """The official search grid: `steps` values from `start` up to (not including) `max_value`."""
    if steps < 1 or max_value <= start:
        raise ValueError(f"beta grid needs steps >= 1 and max > {start}, got steps={steps}, max={max_value}")
    return [i * (max_value - start) / steps + start for i in range(steps)]


@torch.no_grad()
def search_betas(terms: Terms, labels: torch.Tensor, grid2: Sequence[float], grid3: Sequence[float],
                 max_elements: int = 1 << 24) -> tuple[float, float, float]:
    """Exhaustive (beta2, beta3) search by top-1 on (terms, labels), as the official script (which runs it
    on the test set; we pass the validation split). Ties go to the first setting in beta2-major order,
    i.e. the smallest beta2, then the smallest beta3 (the official strict '>' rule). Returns (b2, b3, acc%)."""
    if len(labels) == 0:
        raise ValueError("cannot search the fusion weights on an empty split")
    g2 = torch.as_tensor(list(grid2), dtype=terms.zero_shot.dtype, device=labels.device)
    g3 = torch.as_tensor(list(grid3), dtype=terms.zero_shot.dtype, device=labels.device)
    if g2.numel() == 0 or g3.numel() == 0:
        raise ValueError("empty beta grid")
    l1, l2, l3, labels = _candidate_classes(terms, labels, g2, g3)
    n, K = l1.shape
    chunk = max(1, max_elements // (len(g3) * K))
    correct = torch.zeros(len(g2), len(g3), dtype=torch.long)
    for i, b2 in enumerate(g2):
        base = l1 + b2 * l2
        for j in range(0, n, chunk):
            logits = torch.addcmul(base[None, j:j + chunk], g3[:, None, None], l3[None, j:j + chunk])
            correct[i] += (logits.argmax(-1) == labels[None, j:j + chunk]).sum(-1).cpu()
    flat = correct.flatten()
    best = int(torch.nonzero(flat == flat.max())[0])
    return float(g2[best // len(g3)]), float(g3[best % len(g3)]), 100.0 * float(flat[best]) / n


def _candidate_classes(terms: Terms, labels: torch.Tensor, g2: torch.Tensor, g3: torch.Tensor):
    """Exact pruning for the grid search: a class can be an argmax somewhere on the grid only if its best
    logit over the grid reaches the best worst-case logit of the image (logits are linear in the betas, so
    the extremes sit at the grid's corners). Returns the terms restricted to each image's candidates, kept
    in ascending class order (so argmax ties resolve as on all classes; padding is -inf), and the labels'
    positions among them (-1: the label can never win)."""
    l1, l2, l3 = terms
    corners = torch.stack([l1 + b2 * l2 + b3 * l3 for b2 in (g2.min(), g2.max()) for b3 in (g3.min(), g3.max())])
    hi, lo = corners.amax(0), corners.amin(0)
    keep = hi >= lo.amax(dim=-1, keepdim=True)                        # (n, K)
    m = int(keep.sum(-1).max())
    K = l1.shape[1]
    order = torch.argsort((~keep).long() * K + torch.arange(K, device=l1.device), dim=-1)[:, :m]
    valid = keep.gather(-1, order)
    pick = lambda t, fill: t.gather(-1, order).masked_fill(~valid, fill)  # noqa: E731
    pos = (order == labels[:, None]) & valid
    new_labels = torch.where(pos.any(-1), pos.float().argmax(-1), torch.full_like(labels, -1))
    return pick(l1, float("-inf")), pick(l2, 0.0), pick(l3, 0.0), new_labels


class Calip(nn.Module):
    """Zero-shot CALIP as a module: the text classifier is a buffer, the fusion weights are constants.
    It has no parameters at all (nothing to train), and its output depends only on its inputs."""

    def __init__(self, text_features: torch.Tensor, beta2: float, beta3: float, logit_scale: float,
                 scale: float = 2.0, normalize_updated: bool = False):
        super().__init__()
        self.register_buffer("text_features", F.normalize(text_features.detach().float(), dim=-1))
        self.beta2, self.beta3 = float(beta2), float(beta3)
        self.logit_scale, self.scale, self.normalize_updated = float(logit_scale), float(scale), normalize_updated

    def forward(self, f_v: torch.Tensor, F_s: torch.Tensor) -> torch.Tensor:
        terms = calip_terms(f_v, F_s, self.text_features, self.logit_scale, self.scale, self.normalize_updated)
        return fuse(terms, self.beta2, self.beta3)


def _identity_linear(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim))
        layer.bias.zero_()
    return layer


class CalipFS(nn.Module):
    """CALIP-FS: CALIP's attention with learnable q/k/v pre-projections and an output projection.

    The frozen text classifier is a buffer; the fusion weights are fixed. Trainable: q, k, v, o only."""

    def __init__(self, text_features: torch.Tensor, beta2: float, beta3: float, logit_scale: float,
                 scale: float = 2.0, normalize_updated: bool = False):
        super().__init__()
        if text_features.dim() != 2:
            raise ValueError(f"text_features must be (K, C), got {tuple(text_features.shape)}")
        dim = text_features.shape[1]
        self.register_buffer("text_features", F.normalize(text_features.detach().float(), dim=-1))
        self.q, self.k, self.v, self.o = (_identity_linear(dim) for _ in range(4))
        self.beta2, self.beta3 = float(beta2), float(beta3)
        self.logit_scale, self.scale, self.normalize_updated = float(logit_scale), float(scale), normalize_updated

    def terms(self, f_v: torch.Tensor, F_s: torch.Tensor) -> Terms:
        f_v, F_s = F.normalize(f_v, dim=-1), F.normalize(F_s, dim=-1)
        F_s_a, F_t_a = cross_modal_attention(F_s, self.text_features, self.scale, self.q, self.k, self.v, self.o)
        return terms_from_attention(f_v, self.text_features, F_s_a, F_t_a, self.logit_scale, self.normalize_updated)

    def forward(self, f_v: torch.Tensor, F_s: torch.Tensor) -> torch.Tensor:
        return fuse(self.terms(f_v, F_s), self.beta2, self.beta3)
