"""PLOT: N local prompts per class matched to M local visual features by entropic optimal transport.

Prompts (CoOp's learner, `papers.coop.method.PromptLearner`, with its unified context widened to N sets):
prompt (n, k) = [SOS] ctx_n [CLASS_k] . [EOS], ctx of shape (N, L, d) shared by all classes (CSC off, class
token at the end, random N(0, 0.02) init); the N*K prompts go through the frozen text encoder in one pass and
give text features G (N, K, D). Visual side: the frozen image tower's local features F (M, D) of each image,
cached once: ResNet = every output of the attention pool run on [mean token; HW tokens] (the official
modified `AttentionPool2d`), ViT = ln_post + proj on every patch token (common/engine/dense.py, mode
"attnpool"). All L2-normalised.

For image b and class k: sim[m, n] = <F_m(b), G_n(k)>, cost C = 1 - sim, and the plan T (M x N) with
uniform marginals a = 1/M, b = 1/N solves entropic OT with weight eps = 0.1 by Sinkhorn-Knopp scaling
(the official `Sinkhorn`: r = a / K c, c = b / K^T r from r = c = 1, at most 100 iterations, stop when the
mean |r - r_prev| over the whole batch is below 1e-2), computed WITHOUT gradient. The logit is
logit_scale * sum_mn T_mn sim_mn (= logit_scale * (1 - d_OT), T sums to 1); cross-entropy trains the
prompts, the gradient reaching them through sim only (the paper's two-stage optimisation: inner Sinkhorn,
outer prompt update). Inference uses the same OT logit.

Exact reductions (tests/papers/test_plot.py): with N = 1 the column marginal forces T = 1/M, so the logit is
the mean local cosine; with N = 1 and one local feature equal to the global image feature it is CoOp's
cosine logit. `plan="uniform"` replaces T by 1/(MN) (the ablation of official issue #6).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import ClipBundle, logit_scale
from common.clip.text import encode_prompts, encode_shared_prefix, shared_prefix_supported
from common.engine.dense import dense_features, dense_train_views, train_pool
from common.engine.evaluate import classification_metrics
from common.engine.protocols import Task
from common.engine.threads import torch_threads
from papers.coop.method import Fitter, PromptLearner, option, train_coop_many

EPS, MAX_ITER, THRESH = 0.1, 100, 1e-2      # hard-coded in the official CustomCLIP.__init__ / Sinkhorn
PLANS = ("sinkhorn", "uniform")
DENSE_MODE = "attnpool"                     # ResNet: all attention-pool outputs; ViT: every patch token


# ------------------------------------------------------------------------------------------ optimal transport

@torch.no_grad()
def sinkhorn(cost: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None, eps: float = EPS,
             max_iter: int = MAX_ITER, thresh: float = THRESH) -> tuple[torch.Tensor, int]:
    """Entropic OT plans of a batch of problems, cost (..., M, N) -> (plans (..., M, N), iterations run).

    Sinkhorn-Knopp matrix scaling as the official `Sinkhorn`: K = exp(-C / eps), r = c = 1, then r = a / (K c),
    c = b / (K^T r) until the mean absolute change of r over the whole batch is below `thresh` (at most
    `max_iter` iterations), plan = diag(r) K diag(c). The column (prompt) marginal b is met exactly, the row one
    up to the stopping tolerance. a (..., M) and b (..., N) default to uniform."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    M, N = cost.shape[-2:]
    a = cost.new_full(cost.shape[:-1], 1.0 / M) if a is None else a.to(cost)
    b = cost.new_full((*cost.shape[:-2], N), 1.0 / N) if b is None else b.to(cost)
    K = torch.exp(-cost / eps)
    r, c = torch.ones_like(a), torch.ones_like(b)
    it = 0
    for it in range(1, max_iter + 1):
        r_prev = r
        r = a / (K @ c.unsqueeze(-1)).squeeze(-1)
        c = b / (K.transpose(-2, -1) @ r.unsqueeze(-1)).squeeze(-1)
        if float((r - r_prev).abs().mean()) < thresh:
            break
    return r.unsqueeze(-1) * K * c.unsqueeze(-2), it


def ot_scores(sim: torch.Tensor, eps: float = EPS, max_iter: int = MAX_ITER, thresh: float = THRESH,
              plan: str = "sinkhorn") -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (...,), plans (..., M, N)) of similarity matrices sim (..., M, N): score = sum T * sim with T the
    entropic OT plan of cost 1 - sim (a constant: the gradient reaches sim only, d score / d sim = T), or the
    uniform plan 1/(MN) with `plan="uniform"`."""
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    with torch.no_grad():
        if plan == "uniform":
            T = torch.full_like(sim, 1.0 / (sim.shape[-2] * sim.shape[-1]))
        else:
            T, _ = sinkhorn(1.0 - sim.detach().float(), eps=eps, max_iter=max_iter, thresh=thresh)
    T = T.to(sim.dtype)
    return (T * sim).sum(dim=(-2, -1)), T


def plot_logits(local: torch.Tensor, text: torch.Tensor, scale: float, **ot: Any) -> torch.Tensor:
    """(B, K) PLOT logits of local visual features (B, M, D) against text features (N, K, D) of N prompts per
    class: scale * sum_mn T_mn <F_m, G_n>, both sides L2-normalised here; `ot` = eps, max_iter, thresh, plan.
    The B*K transport problems of the batch are solved together (one stopping test, as the official code)."""
    if local.dim() != 3 or text.dim() != 3 or local.shape[-1] != text.shape[-1]:
        raise ValueError(f"local features (B, M, D) and text features (N, K, D) expected, got "
                         f"{tuple(local.shape)} and {tuple(text.shape)}")
    sim = torch.einsum("bmd,nkd->bkmn", F.normalize(local, dim=-1), F.normalize(text, dim=-1))
    return scale * ot_scores(sim, **ot)[0]


# ------------------------------------------------------------------------------------------ prompt learner

class PlotPromptLearner(PromptLearner):
    """CoOp's prompt learner with N unified contexts instead of one: `ctx` (N, L, d), N(0, std) init, shared by
    every class; `class_embeddings()` gives (N, K, D). Only `ctx` trains (N * L * d parameters)."""

    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], n_prompts: int = 4, n_ctx: int = 16,
                 init_std: float = 0.02):
        if int(n_prompts) < 1:
            raise ValueError(f"n_prompts (PLOT's N) must be >= 1, got {n_prompts}")
        super().__init__(bundle, classnames, n_ctx=n_ctx, ctx_init=None, csc=False, class_token_position="end",
                         init_std=init_std)
        ctx = torch.empty(int(n_prompts), self.n_ctx, self.encoder.width).normal_(0, init_std)  # drawn on the CPU
        self.ctx = nn.Parameter(ctx.to(self.ctx.device, self.ctx.dtype))
        self.n_prompts = int(n_prompts)
        self.init_kwargs = dict(n_prompts=int(n_prompts), n_ctx=n_ctx, init_std=init_std)

    def class_embeddings(self, ctx: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
        """Normalised text features (N, K, D) of the N x K prompts; gradients flow to the context."""
        return prompt_features(self, (self.ctx if ctx is None else ctx).unsqueeze(0), chunk)[0]


def prompt_features(learner: PlotPromptLearner, ctx: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Normalised text features (R, N, K, D) of R stacked contexts (R, N, L, d) with `learner`'s class names.

    The prompts of one context set share [SOS] ctx_n before the class name, so the causal text transformer
    encodes each prefix once (`encode_shared_prefix`, all R*N prefixes in one pass); an encoder that does not
    support it gets the full prompts."""
    R, N, L, d = ctx.shape
    K = learner.num_classes
    if shared_prefix_supported(learner.encoder):
        P = 1 + L
        eot = learner.token_ids.argmax(-1) - P
        S = int(eot.max()) + 1
        prefix = torch.cat([learner.token_prefix[:1].expand(R * N, -1, -1),
                            ctx.reshape(R * N, L, d).to(learner.token_prefix.dtype)], dim=1)
        suffix = learner.token_suffix[:, :S].unsqueeze(0).expand(R * N, -1, -1, -1)
        feats = encode_shared_prefix(learner.encoder, prefix, suffix, eot)
    else:
        prompts = learner._assemble(ctx.unsqueeze(2).expand(R, N, K, L, d).reshape(R * N, K, L, d))
        feats = encode_prompts(learner.encoder, prompts.reshape(R * N * K, *prompts.shape[-2:]),
                               learner.token_ids.repeat(R * N, 1), chunk)
    return F.normalize(feats.reshape(R, N, K, -1), dim=-1)


def build_learner(bundle: ClipBundle, classnames: Sequence[str], cfg: dict) -> PlotPromptLearner:
    return PlotPromptLearner(bundle, classnames, n_prompts=int(cfg["n_prompts"]), n_ctx=int(cfg["n_ctx"]))


def ot_options(cfg: dict) -> dict:
    return {"eps": float(cfg["eps"]), "max_iter": int(cfg["max_iter"]), "thresh": float(cfg["thresh"]),
            "plan": cfg["plan"]}


def variant_name(cfg: dict) -> str:
    """Run-record variant: n{N}_m{L}[_uniform] (N prompts of L context tokens; uniform plan ablation)."""
    return f"n{int(cfg['n_prompts'])}_m{int(cfg['n_ctx'])}" + ("_uniform" if cfg["plan"] == "uniform" else "")


# ------------------------------------------------------------------------------------------ features

def local_features(task: Task, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached local features (N, M, D), normalised, and labels of a split (test transform)."""
    f = dense_features(task.bundle, task.dataset.name, split, task.dataset.split(split), mode=DENSE_MODE,
                       batch_size=int(task.cfg["eval_batch_size"]))
    return F.normalize(f["dense"].float(), dim=-1), f["labels"]


def train_local_views(task: Task, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached local features of the augmented training views, normalised: (V, N, M, D) and labels (N,).
    `train_pool: full` encodes each view of the dataset's whole train split once for every shot count and seed."""
    pool = train_pool(task.dataset.name, cfg["data_root"], cfg["train_pool"])
    views = dense_train_views(task.bundle, task.dataset.name, task.dataset.train, DENSE_MODE,
                              views=int(option(cfg, "cache_views")), pool=pool,
                              batch_size=int(cfg["eval_batch_size"]))
    return torch.stack([F.normalize(v["dense"].float(), dim=-1) for v in views]), views[0]["labels"]


# ------------------------------------------------------------------------------------------ train / evaluate

def plot_logits_many(cfg: dict):
    """`logits_many` for `train_coop_many`: every run's N x K prompts encoded in one pass, then each run's OT
    logits on its own batch (each run's Sinkhorn stops on its own batch, as it would alone)."""
    ot = ot_options(cfg)

    def logits_many(learners: Sequence[PlotPromptLearner], xs: Sequence[torch.Tensor], scale: float) -> list[tuple]:
        first = learners[0]
        if all(l.classnames == first.classnames and l.encoder.transformer is first.encoder.transformer
               for l in learners):
            texts = list(prompt_features(first, torch.stack([l.ctx for l in learners])))
        else:
            texts = [l.class_embeddings() for l in learners]
        return [(plot_logits(x, text, scale, **ot), text) for x, text in zip(xs, texts)]
    return logits_many


def train_plot_many(tasks: Sequence[Task], cfg: dict, out_dir=None) -> list[PlotPromptLearner]:
    """Train PLOT on several tasks as one batched model (CoOp's `train_coop_many` with PLOT's learner, local
    feature views and OT logits); each run keeps its own data, seed and schedule."""
    return train_coop_many(list(tasks), cfg, build=build_learner, logits_many=plot_logits_many(cfg),
                           views=train_local_views, out_dir=out_dir, evaluate_fn=evaluate,
                           desc=f"plot x{len(tasks)} {tasks[0].dataset.name}")


@torch.no_grad()
def predict(learner: PlotPromptLearner, local: torch.Tensor, cfg: dict, scale: float | None = None) -> torch.Tensor:
    """(n, K) OT logits of cached local features (n, M, D), in batches of `test_batch_size` (the official test
    batch: the Sinkhorn stopping test is taken over a batch)."""
    scale = logit_scale(learner.bundle) if scale is None else scale
    was = learner.training
    learner.eval()
    text = learner.class_embeddings(chunk=int(option(cfg, "eval_chunk"))).float()
    learner.train(was)
    device = text.device
    ot = ot_options(cfg)
    out = [plot_logits(x.to(device), text, scale, **ot).cpu() for x in local.split(int(cfg["test_batch_size"]))]
    return torch.cat(out)


def evaluate(learner: PlotPromptLearner, task: Task, split: str = "test") -> dict[str, float]:
    """Top-1 and mean per-class accuracy of the learned prompts on `task`'s split (its own class names)."""
    with torch_threads(option(task.cfg, "threads")):
        target = learner.with_classnames(task.dataset.classnames)
        local, labels = local_features(task, split)
        return classification_metrics(predict(target, local, task.cfg), labels)


def make_fitter(cfg: dict) -> Fitter:
    """CoOp's Fitter (memo, `prompt.pt` per run, batched protocols) with PLOT's training."""
    return Fitter(cfg, train_fn=lambda task, c: train_plot_many([task], c, out_dir=task.out_dir)[0],
                  train_many=lambda tasks, c: train_plot_many(tasks, c, out_dir=tasks[0].extra.get("group_dir")))
