"""TPT: per test image, one AdamW step on CoOp's context that minimises the entropy of the averaged prediction
over the most confident augmented views; predict the original view with the tuned prompt; reset.

For a test image x with views x_0 (the plain test view) and x_1..x_63 (`views.py`):
  p_i = softmax(scale * cos(f(x_i), t_c(ctx)))           all 64 views, text features of the current context
  S   = the int(64 * rho) views of lowest entropy H(p_i)  (rho = 0.1: 6 views; fixed after the first step)
  L   = H(mean_{i in S} p_i)                             marginal entropy (tpt_classification.py `avg_entropy`)
  ctx <- AdamW step on L (lr 5e-3, fresh optimiser state), `steps` times; prediction = argmax p_0(ctx)
The prompt and the optimiser state are reset for every image: images are independent, so B images are tuned
together exactly: each has its own copy of the context (B, M, d), the loss is the sum of the B losses (each
copy gets its own image's gradient) and AdamW is elementwise, so one AdamW on the stacked copies is B fresh
per-image optimisers. Their prompts share SOS + context before every class name and go through the text
encoder together (`common.clip.text.encode_shared_prefix`). The image encoder runs on every augmented view
(the views of a chunk of images are one batch); view 0 is the test view the feature cache already holds.

`tpt_loop` is the straightforward implementation the batched one is checked and timed against: one image at a
time, the image encoder called once per view, the full prompts encoded (`PromptLearner.class_embeddings`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.clip.text import encode_prompts, encode_shared_prefix
from common.data.images import load_image
from papers.coop.method import PromptLearner, shares_prefix

from .views import ViewDraws, render_views


# ------------------------------------------------------------------------------------------------- the loss

def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def confident_views(logits: torch.Tensor, rho: float) -> torch.Tensor:
    """(B, int(N * rho)) indices of the lowest-entropy views of logits (B, N, K) (`select_confident_samples`)."""
    n = int(logits.shape[-2] * rho)
    if n < 1:
        raise ValueError(f"selection ratio {rho} keeps no view of {logits.shape[-2]}: int(N * rho) must be >= 1")
    return entropy(logits).argsort(-1)[..., :n]


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B,) entropy of the mean probability over the views of logits (B, n, K), from log-probabilities as the
    official `avg_entropy`: log p_bar = logsumexp_i log p_i - log n."""
    logp = logits.log_softmax(-1)
    avg = logp.logsumexp(-2) - math.log(logits.shape[-2])
    avg = avg.clamp(min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(-1)


# ------------------------------------------------------------------------------------------------- the text side

def class_features(learner: PromptLearner, ctx: torch.Tensor) -> torch.Tensor:
    """(B, K, D) normalised text features of the learner's prompts under B contexts (B, M, d); gradients reach
    `ctx`. CoOp's default layout goes through the shared-prefix encoder, other layouts encode full prompts."""
    B = ctx.shape[0]
    if shares_prefix(learner):
        P = 1 + learner.n_ctx
        eot = learner.token_ids.argmax(-1) - P
        S = int(eot.max()) + 1
        prefix = torch.cat([learner.token_prefix[:1].expand(B, -1, -1), ctx.to(learner.token_prefix.dtype)], 1)
        suffix = learner.token_suffix[:, :S].unsqueeze(0).expand(B, -1, -1, -1)
        return F.normalize(encode_shared_prefix(learner.encoder, prefix, suffix, eot), dim=-1)
    prompts = learner.construct_prompts_batched(ctx)                            # (B, K, L, d)
    K, L = prompts.shape[1:3]
    ids = learner.token_ids.repeat(B, 1)
    return F.normalize(encode_prompts(learner.encoder, prompts.reshape(B * K, L, -1), ids), dim=-1).view(B, K, -1)


def tpt_tune(learner: PromptLearner, ctx0: torch.Tensor, feats: torch.Tensor, scale: float, rho: float = 0.1,
             lr: float = 5e-3, steps: int = 1, weight_decay: float = 0.01,
             text_fn: Callable[[PromptLearner, torch.Tensor], torch.Tensor] = class_features) -> torch.Tensor:
    """The tuned contexts (B, M, d) of B test images: `steps` AdamW steps from `ctx0` (M, d) on each image's
    marginal entropy over its confident views. feats (B, N, D): normalised features of the N views of each
    image. AdamW has the official defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01), a fresh state."""
    B = feats.shape[0]
    ctx = ctx0.detach().to(feats.dtype).expand(B, *ctx0.shape).clone().requires_grad_(True)
    opt = torch.optim.AdamW([ctx], lr=lr, weight_decay=weight_decay)
    chosen = None
    for _ in range(steps):
        logits = scale * torch.einsum("bnd,bkd->bnk", feats, text_fn(learner, ctx))
        if chosen is None:                  # selected once, on the first step's logits, and kept (official)
            chosen = confident_views(logits.detach(), rho)
        picked = logits.gather(1, chosen.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        opt.zero_grad(set_to_none=True)
        marginal_entropy(picked).sum().backward()       # the sum: each image's copy gets its own image's gradient
        opt.step()
    return ctx.detach()


def tpt_predict(learner: PromptLearner, ctx0: torch.Tensor, feats: torch.Tensor, scale: float, rho: float = 0.1,
                lr: float = 5e-3, steps: int = 1, weight_decay: float = 0.01,
                text_fn: Callable[[PromptLearner, torch.Tensor], torch.Tensor] = class_features) -> torch.Tensor:
    """TPT on B test images at once: (B, K) logits of view 0 (the original test view) with each image's tuned
    prompt (`tpt_tune`); `feats[:, 0]` must be view 0."""
    ctx = tpt_tune(learner, ctx0, feats, scale, rho, lr, steps, weight_decay, text_fn)
    with torch.no_grad():
        return scale * torch.einsum("bd,bkd->bk", feats[:, 0], text_fn(learner, ctx))


# ------------------------------------------------------------------------------------------------- the image side

@torch.inference_mode()
def encode_views(model: torch.nn.Module, views: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Normalised image features (..., D) of views (..., C, S, S), the encoder run on batches of views where the
    model is (views are rendered on the CPU)."""
    device = next(model.parameters()).device
    flat = views.reshape(-1, *views.shape[-3:])
    out = torch.cat([model.encode_image(flat[i:i + batch_size].to(device)).float()
                     for i in range(0, len(flat), batch_size)])
    return F.normalize(out, dim=-1).view(*views.shape[:-3], -1)


def load_uint8(items) -> list[torch.Tensor]:
    """The images of `items` as uint8 tensors (C, H, W), decoded once."""
    return [torch.from_numpy(np.asarray(load_image(d.impath), dtype=np.uint8).copy()).permute(2, 0, 1)
            for d in items]


def size_chunks(images: Sequence[torch.Tensor], chunk: int) -> list[list[int]]:
    """Runs of at most `chunk` consecutive images of one size (views are rendered per same-size batch)."""
    out: list[list[int]] = []
    for i, im in enumerate(images):
        if out and len(out[-1]) < chunk and images[out[-1][0]].shape == im.shape:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def view_features(model: torch.nn.Module, images: Sequence[torch.Tensor], draws: ViewDraws, test_feats: torch.Tensor,
                  image_size: int, augmix: bool, mean, std, batch_size: int = 512) -> torch.Tensor:
    """(B, 1 + V, D) normalised features of B same-size images: view 0 = their cached test features, views
    1..V rendered from `draws` (rows = these images) and encoded as one batch of B * V views."""
    views = render_views(torch.stack(list(images)), draws, image_size, augmix, mean, std)
    aug = encode_views(model, views, batch_size)
    return torch.cat([F.normalize(test_feats.float(), dim=-1).to(aug.device).unsqueeze(1), aug], 1)


# ------------------------------------------------------------------------------------------------- the reference

def tpt_loop(learner: PromptLearner, ctx0: torch.Tensor, model: torch.nn.Module, test_feats: torch.Tensor,
             images: Sequence[torch.Tensor], draws: ViewDraws, image_size: int, augmix: bool, mean, std,
             scale: float, rho: float = 0.1, lr: float = 5e-3, steps: int = 1,
             weight_decay: float = 0.01) -> torch.Tensor:
    """The per-view loop: for each image, its views rendered alone and the image encoder called once per
    augmented view (view 0 = its cached test features, as in the batched path), then TPT on that image alone
    with the full prompts (as the official code: one image, its own optimiser). Returns (B, K) view-0 logits."""
    full = lambda l, ctx: l.class_embeddings(ctx[0]).unsqueeze(0)        # (1, K, D), normalised
    device = next(model.parameters()).device
    out = []
    for b, image in enumerate(images):
        views = render_views(image.unsqueeze(0), draws.take(slice(b, b + 1)), image_size, augmix, mean, std)[0]
        with torch.inference_mode():
            feats = torch.cat([test_feats[b:b + 1].float().to(device)] +
                              [model.encode_image(v.unsqueeze(0).to(device)).float() for v in views])
        feats = F.normalize(feats, dim=-1).unsqueeze(0).clone()
        out.append(tpt_predict(learner, ctx0, feats, scale, rho, lr, steps, weight_decay, text_fn=full).cpu())
    return torch.cat(out)
