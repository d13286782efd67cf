"""Training DualCoOp on cached frozen image features: several runs (label proportions, seeds, learning rates,
budgets) over the same class names trained as one batched model (common.engine.batched), their 2C prompts
each encoded in one pass of the frozen text encoder per step.

Each run keeps its own initial contexts (built after seeding with its seed), partial targets, batches, schedule
and learning rate, and ends where it would end alone (BatchedTrainer: the runs share no trainable tensor and
the loss is the sum of the runs' own losses).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from common.clip.text import encode_prompts
from common.engine import TrainConfig
from common.engine.batched import RunSchedule, curve_every, fit_stacked, run_scores, scatter_runs, stack_trainable
from common.engine.seed import seed_everything

from .method import DualPrompt, asl_loss, positive_probability


def build_models(build: Callable[[], DualPrompt], seeds: Sequence[int]) -> list[DualPrompt]:
    out = []
    for s in seeds:
        seed_everything(int(s))     # each run's random context init depends on its seed only
        out.append(build())
    return out


def _run_text(template: DualPrompt, stacked: dict, runs: Sequence[int]) -> list[tuple]:
    """(t_pos, t_neg, threshold) of the given runs, all their prompts encoded in one pass."""
    prompts = [template.prompts(stacked["pos.ctx"][r], None if template.single else stacked["neg.ctx"][r])
               for r in runs]
    ids = template.token_ids().repeat(len(runs), 1)
    feats = F.normalize(encode_prompts(template.pos.encoder, torch.cat(prompts), ids), dim=-1)
    per = feats.shape[0] // len(runs)
    C = template.num_classes
    out = []
    for j, r in enumerate(runs):
        f = feats[j * per:(j + 1) * per]
        out.append((f[:C], None if template.single else f[C:],
                    stacked["threshold"][r] if template.single else None))
    return out


@torch.no_grad()
def init_thresholds(template: DualPrompt, stacked: dict, feats: torch.Tensor, n: int = 256) -> None:
    """`single` ablation: each run's threshold starts at the mean of its initial positive logits S+ over (up to)
    the first `n` training images, so p = sigmoid(S+ - b) starts near 0.5 as the dual prompts' 2-way softmax does
    (S+ = 100 x cosine is ~50 on CLIP features: a threshold at 0 saturates p at 1 and ASL's eps clamp then
    passes no gradient)."""
    runs = list(range(stacked["threshold"].shape[0]))
    for (t_pos, _, _), r in zip(_run_text(template, stacked, runs), runs):
        s = template.logits(feats[:n], t_pos, None, threshold=torch.zeros((), device=feats.device))[:, 1]
        stacked["threshold"][r] = s.mean()


def train_many(models: Sequence[DualPrompt], feats: torch.Tensor, targets: Sequence[torch.Tensor],
               tcfgs: Sequence[TrainConfig], batch_size: int, loss: dict, out_dir=None, desc: str = "dualcoop",
               threads: int | None = 1, val: tuple | None = None, val_runs: Sequence[int] = (),
               eval_every: int = 0) -> list[DualPrompt]:
    """Train `models` (same class names and options) on cached `feats` (N, R, D) or (N, D) against per-run
    `targets` (N, C) in {1, 0, -1}; ASL with `loss` = {gamma_neg, gamma_pos, clip, eps, loss_w}.
    `val` = (features, full targets): the validation mAP of `val_runs` every `eval_every` steps (a convergence
    record's curve, in `model.val_history`). Returns the models with the trained contexts written back."""
    from common.metrics import mean_average_precision
    if not models:
        return []
    template = models[0]
    stacked = stack_trainable(models)
    device = feats.device
    ys = [t.to(device) for t in targets]
    runs = [RunSchedule(c, feats.shape[0], batch_size, label=f"run{r}") for r, c in enumerate(tcfgs)]
    asl = {k: float(loss[k]) for k in ("gamma_neg", "gamma_pos", "clip", "eps")}
    w = float(loss["loss_w"])

    def step(batches):
        live = [r for r, b in enumerate(batches) if b is not None]
        texts = _run_text(template, stacked, live)
        vals = []
        for (t_pos, t_neg, thr), r in zip(texts, live):
            idx = batches[r].idx.to(device)
            logits = template.logits(feats[idx], t_pos, t_neg, threshold=thr)
            vals.append(w * asl_loss(logits, ys[r][idx], **asl))
        return scatter_runs(torch.stack(vals), live, len(models))

    if template.single:
        init_thresholds(template, stacked, feats)
    eval_fn = None
    if val is not None and val_runs:
        vx, vy = val
        eval_fn = run_scores(len(models), val_runs, lambda rs: _run_text(template, stacked, rs), lambda t: (
            mean_average_precision(torch.cat([positive_probability(template.logits(x.to(device), *t))
                                              for x in vx.split(512)]).float().cpu(), vy)))
    return fit_stacked(models, stacked, runs, step, eval_fn, eval_every or curve_every(runs),
                       out_dir, desc, threads)
