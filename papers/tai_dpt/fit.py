"""Training TaI-DPT on cached caption features: several runs (seeds, caption subsets, learning rates, budgets) over
the same class names trained as one batched model (common.engine.batched); per step the 2C prompts of every live
run are encoded in one pass of the frozen text encoder, and the frozen caption features (EOT and per-token) are
computed once beforehand (the text encoder is frozen, so they never change).

Each run keeps its own initial contexts (drawn after seeding with its seed), caption subset, batches, schedule
and learning rate, and ends where it would end alone (the runs share no trainable tensor and the loss is the sum
of the runs' own losses).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from common.clip.text import encode_prompts
from common.engine import TrainConfig
from common.engine.batched import RunSchedule, curve_every, fit_stacked, run_scores, scatter_runs, stack_trainable
from common.engine.seed import seed_everything

from .method import (DoubleGrainedPrompt, gather_tokens, global_scores, local_scores, merged_scores, ranking_loss,
                     TAU_IMAGE, TAU_TEXT)


def build_models(build: Callable[[], DoubleGrainedPrompt], seeds: Sequence[int]) -> list[DoubleGrainedPrompt]:
    out = []
    for s in seeds:
        seed_everything(int(s))      # each run's random contexts depend on its seed only
        out.append(build())
    return out


def run_text(template: DoubleGrainedPrompt, stacked: dict, runs: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (t^g, t^l) of the given runs, all their 2C prompts encoded in one pass."""
    prompts = torch.cat([template.prompts(stacked["glob.ctx"][r], stacked["loc.ctx"][r]) for r in runs])
    ids = template.token_ids().repeat(len(runs), 1)
    feats = F.normalize(encode_prompts(template.encoder, prompts, ids), dim=-1)
    C = template.num_classes
    return [(feats[2 * C * j:2 * C * j + C], feats[2 * C * j + C:2 * C * (j + 1)]) for j in range(len(runs))]


def image_scores(t_g: torch.Tensor, t_l: torch.Tensor, feats: torch.Tensor, tau: float, merge_rate: float,
                 batch_size: int = 512) -> torch.Tensor:
    """Merged scores (N, C) of cached image features (N, 1+hw, D)."""
    out = []
    for f in feats.split(batch_size):
        f = f.to(t_g.device)
        out.append(merged_scores(global_scores(f[:, 0], t_g), local_scores(f[:, 1:], t_l, tau), merge_rate).float().cpu())
    return torch.cat(out)


def train_many(models: Sequence[DoubleGrainedPrompt], text: dict, targets: torch.Tensor,
               subsets: Sequence[torch.Tensor], tcfgs: Sequence[TrainConfig], batch_size: int,
               tau_text: float = TAU_TEXT, margin: float = 1.0, out_dir=None, desc: str = "tai_dpt",
               threads: int | None = 1, val: tuple | None = None, val_runs: Sequence[int] = (),
               tau_image: float = TAU_IMAGE, merge_rate: float = 0.5, eval_every: int = 0) -> list[DoubleGrainedPrompt]:
    """Train `models` (same class names) on the caption corpus: `text` from `encode_caption_tokens`, `targets`
    (N, C); run r sees the corpus rows `subsets[r]`. Loss = ranking(s^g) + ranking(s^l). `val` = (image features
    (N, 1+hw, D), targets): merged mAP of `val_runs` every `eval_every` steps (a convergence curve, in
    `model.val_history`). Returns the models with the trained contexts written back."""
    from common.metrics import mean_average_precision
    if not models:
        return []
    template = models[0]
    stacked = stack_trainable(models)
    device = template.encoder.token_embedding.weight.device
    eot = text["eot"].to(device)
    y = targets.to(device)
    subsets = [s.long() for s in subsets]
    runs = [RunSchedule(c, len(s), batch_size, label=f"run{r}") for r, (c, s) in enumerate(zip(tcfgs, subsets))]

    def step(batches):
        live = [r for r, b in enumerate(batches) if b is not None]
        vals = []
        for (t_g, t_l), r in zip(run_text(template, stacked, live), live):
            idx = subsets[r][batches[r].idx]
            toks, valid = gather_tokens(text, idx)
            idx = idx.to(device)
            s_g = global_scores(eot[idx], t_g)
            s_l = local_scores(toks.to(device), t_l, tau_text, valid.to(device))
            vals.append(ranking_loss(s_g, y[idx], margin) + ranking_loss(s_l, y[idx], margin))
        return scatter_runs(torch.stack(vals), live, len(models))

    eval_fn = None
    if val is not None and val_runs:
        vx, vy = val
        eval_fn = run_scores(len(models), val_runs, lambda rs: run_text(template, stacked, rs), lambda t: (
            mean_average_precision(image_scores(*t, vx, tau_image, merge_rate), vy)))
    return fit_stacked(models, stacked, runs, step, eval_fn, eval_every or curve_every(runs),
                       out_dir, desc, threads)
