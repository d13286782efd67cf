"""Independent runs trained as one batched model.

On a few CPU cores, training on cached features is bound by per-step overhead: one step of CoOp on a
16-shot run pushes a few kilobytes through dozens of small kernels. R independent runs (seeds, shot
counts, datasets, learning rates) whose trainable tensors are stacked on a leading axis go through the
same kernels once, with R times the data.

Why it is exact: the runs share no trainable tensor and the loss is the sum of the runs' own losses, so
the gradient of run r's slice is the gradient of run r's loss alone. SGD (momentum, weight decay), Adam
and AdamW update every element on its own, and gradient clipping is computed per run, so each run follows
the trajectory it would follow alone, up to float rounding (larger matmuls sum in another order). Each run
keeps its own schedule: epochs, batches per epoch, learning rate, warmup; a run that has finished is
frozen (its slice and optimiser state stop changing) while the others go on.

    runs = [RunSchedule(cfg_r, n_train_r, batch_size_r) for ...]
    trainer = BatchedTrainer([ctx], runs, out_dir)         # ctx: (R, M, d), one slice per run
    history = trainer.fit(step_fn)                          # step_fn(batches) -> per-run losses (R,)

``step_fn`` receives, for every run, its batch at this step as a :class:`Batch` (the run's epoch and the
index tensor into its training set; None when the run is not active) and returns the per-run losses,
shape (R,), and optional per-run logs {name: (R,)}.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import sys

from ..atomic import torch_save_atomic, write_text_atomic
from ..errors import ConfigError, TrainingDiverged
from . import distributed
from .threads import torch_threads
from .train import _RESUMED, TrainConfig, index_batches, lr_at, resume_checkpoint

StepFn = Callable[[list], Any]


@dataclass(frozen=True)
class Batch:
    epoch: int
    idx: torch.Tensor


@dataclass
class RunSchedule:
    """One run's schedule: its TrainConfig (epochs, lr, warmup, seed, ...), training-set size and batch size."""
    cfg: TrainConfig
    n_train: int
    batch_size: int
    label: str = ""
    _epoch_cache: dict = field(default_factory=dict, repr=False)

    @property
    def batches_per_epoch(self) -> int:
        return len(index_batches(self.n_train, self.batch_size, self.cfg.seed, 0, shuffle=False))

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.batches_per_epoch

    def position(self, t: int) -> tuple[int, int]:
        """(epoch, batch index) of global step t."""
        return divmod(t, self.batches_per_epoch)

    def lr(self, t: int) -> float:
        """The learning rate the single-run Trainer would set at this step (epoch or iteration schedule)."""
        epoch, i = self.position(t)
        frac = epoch if self.cfg.schedule_unit == "epoch" else epoch + i / max(1, self.batches_per_epoch)
        return lr_at(self.cfg, frac)

    def batch(self, t: int) -> Batch:
        """The batch the single-run Trainer would see at this step (`index_batches` of the run's epoch)."""
        epoch, i = self.position(t)
        if epoch not in self._epoch_cache:
            self._epoch_cache.clear()
            self._epoch_cache[epoch] = index_batches(self.n_train, self.batch_size, self.cfg.seed, epoch)
        return Batch(epoch, self._epoch_cache[epoch][i])


OPT_KEYS = ("optimizer", "momentum", "weight_decay", "eps")


class StackedOptimizer:
    """SGD / Adam / AdamW over parameters whose first axis indexes runs, with a learning rate per run and
    an active mask. The update rules are torch's (``torch.optim.SGD`` with dampening 0, ``Adam``,
    ``AdamW`` with betas (0.9, 0.999)), element by element."""

    def __init__(self, params: Sequence[nn.Parameter], cfgs: Sequence[TrainConfig]):
        self.params = list(params)
        if not self.params:
            raise ValueError("nothing to train: no stacked parameter given")
        R = len(cfgs)
        for p in self.params:
            if p.shape[0] != R:
                raise ValueError(f"a stacked parameter has {p.shape[0]} runs on its first axis, expected {R}")
        kinds = {tuple(getattr(c, k) for k in OPT_KEYS) for c in cfgs}
        if len(kinds) != 1:
            raise ValueError(f"runs trained together must share optimizer, momentum, weight decay and eps; got "
                             f"{sorted(kinds)}")
        self.kind, self.momentum, self.wd, self.eps = next(iter(kinds))
        self.betas = (0.9, 0.999)
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.steps = torch.zeros(R, dtype=torch.long)       # per-run optimiser steps taken

    def _view(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return x.view(-1, *([1] * (p.dim() - 1))).to(p.dtype)

    @torch.no_grad()
    def step(self, lrs: torch.Tensor, active: torch.Tensor) -> None:
        """Update the active runs' slices with their own learning rates (inactive slices stay as they are)."""
        self.steps += active.long()
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            lr = self._view(lrs, p)
            on = self._view(active.float(), p).bool()
            st = self.state.setdefault(i, {})
            if self.kind == "sgd":
                d = g + self.wd * p if self.wd else g
                if self.momentum:
                    buf = st.get("momentum_buffer")
                    # torch starts the buffer at the first gradient; every run starts at step 1 together
                    new = d.clone() if buf is None else self.momentum * buf + d
                    st["momentum_buffer"] = new if buf is None else torch.where(on, new, buf)
                    d = st["momentum_buffer"]
                p.copy_(torch.where(on, p - lr * d, p))
            else:
                b1, b2 = self.betas
                if self.kind == "adam" and self.wd:
                    g = g + self.wd * p
                m = st.setdefault("exp_avg", torch.zeros_like(p))
                v = st.setdefault("exp_avg_sq", torch.zeros_like(p))
                m_new = m.lerp(g, 1 - b1)
                v_new = v * b2 + (1 - b2) * g * g
                st["exp_avg"], st["exp_avg_sq"] = torch.where(on, m_new, m), torch.where(on, v_new, v)
                k = self._view(self.steps.double(), p).clamp(min=1)
                bc1 = 1 - b1 ** k
                bc2_sqrt = (1 - b2 ** k).sqrt()
                denom = st["exp_avg_sq"].sqrt() / bc2_sqrt.to(p.dtype) + self.eps
                base = p * (1 - lr * self.wd) if self.kind == "adamw" and self.wd else p
                new_p = base - (lr / bc1.to(p.dtype)) * st["exp_avg"] / denom
                p.copy_(torch.where(on, new_p, p))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in self.state.items()},
                "steps": self.steps.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.state = {int(i): dict(s) for i, s in sd["state"].items()}
        self.steps = sd["steps"].clone()


@torch.no_grad()
def clip_per_run(params: Sequence[nn.Parameter], max_norm: float, active: torch.Tensor) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` applied to each run's slices separately; returns the norms (R,)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(len(active))
    sq = sum(g.reshape(g.shape[0], -1).double().pow(2).sum(1) for g in grads)
    norms = sq.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    coef = torch.where(active, coef, torch.ones_like(coef))
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms.float()


class BatchedTrainer:
    """Trains R runs in lockstep on stacked parameters; checkpoints to ``out_dir/checkpoint.pt`` (exact resume)."""

    def __init__(self, params: Sequence[nn.Parameter], runs: Sequence[RunSchedule], out_dir: str | Path | None = None,
                 desc: str = "train", checkpoint_every: int = 0):
        self.params = [p for p in params if p.requires_grad]
        self.runs = list(runs)
        if not self.runs:
            raise ValueError("BatchedTrainer needs at least one run")
        clips = {r.cfg.grad_clip for r in self.runs}
        if len(clips) != 1:
            raise ValueError(f"runs trained together must share grad_clip, got {sorted(map(str, clips))}")
        self.grad_clip = next(iter(clips))
        self.opt = StackedOptimizer(self.params, [r.cfg for r in self.runs])
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.desc = desc
        self.total = max(r.total_steps for r in self.runs)
        self.checkpoint_every = checkpoint_every or max(1, math.ceil(self.total / 10))
        self.t = 0
        self.history: list[list[dict]] = [[] for _ in self.runs]
        self.evals: list[list[dict]] = [[] for _ in self.runs]
        self._acc: list[dict] = [{} for _ in self.runs]      # sums of the current epoch's losses/logs per run
        self._epoch_start = [time.time()] * len(self.runs)
        self._before, self._t_start = 0.0, time.time()
        self.resumed_at = 0

    # -- checkpoints ------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir is not None else None

    def _signature(self) -> list:
        return [[asdict(r.cfg), r.n_train, r.batch_size] for r in self.runs]

    def _save(self) -> None:
        path = self.checkpoint_path
        if path is None or not distributed.is_main():   # torchrun: rank 0 writes
            return
        state = {"t": self.t, "params": [p.detach().cpu().clone() for p in self.params],
                 "optimizer": self.opt.state_dict(), "history": self.history, "evals": self.evals,
                 "acc": self._acc, "runs": self._signature(), "elapsed": self.elapsed()}
        torch_save_atomic(state, path)

    def elapsed(self) -> float:
        """Training seconds so far, those before a resume included."""
        return self._before + time.time() - self._t_start

    def maybe_resume(self) -> bool:
        """Resume from `out_dir/checkpoint.pt` (same runs and settings) and say so; under `--set force=true`
        (`train.restarting`) an existing checkpoint is deleted and training starts from scratch."""
        path = self.checkpoint_path
        ck = resume_checkpoint(path, self.desc)
        if ck is None:
            return False
        if ck["runs"] != self._signature():
            raise ConfigError(f"checkpoint {path} of an interrupted run was written for other runs or training "
                              f"options; rerun with the old options to resume it, or add --set force=true to start "
                              f"from scratch")
        with torch.no_grad():
            for p, v in zip(self.params, ck["params"]):
                p.copy_(v.to(p.device))
        self.opt.load_state_dict(ck["optimizer"])
        self.t, self.history, self.evals, self._acc = ck["t"], ck["history"], ck["evals"], ck["acc"]
        self.resumed_at = self.t
        self._before = float(ck.get("elapsed", 0.0))
        _RESUMED["seconds"] += self._before
        tqdm.write(f"{self.desc}: resumed from {path} at step {self.t}/{self.total} ({self._before:.1f} s of "
                   f"training before the interruption)", file=sys.stderr)
        return True

    # -- training ---------------------------------------------------------------------------------
    def fit(self, step_fn: StepFn, eval_fn: Callable[[], torch.Tensor] | None = None, eval_every: int = 0,
            max_steps: int | None = None) -> list[list[dict]]:
        """Train every run to the end of its schedule (or stop after ``max_steps`` global steps of this call,
        used to test resume). ``eval_fn() -> (R,)`` is called every ``eval_every`` global steps and at the end
        (a convergence record: validation accuracy against each run's own optimiser steps)."""
        if self.t == 0:
            self.maybe_resume()
        stop = self.total if max_steps is None else min(self.total, self.t + max_steps)
        bar = tqdm(range(self.t, stop), desc=self.desc, leave=False, disable=stop - self.t < 50)
        for t in bar:
            active = torch.tensor([t < r.total_steps for r in self.runs])
            batches = [r.batch(t) if a else None for r, a in zip(self.runs, active.tolist())]
            out = step_fn(batches)
            losses, logs = out if isinstance(out, tuple) else (out, {})
            if losses.shape != (len(self.runs),):
                raise ValueError(f"step_fn must return per-run losses of shape ({len(self.runs)},), got {tuple(losses.shape)}")
            live = losses[active]
            if not torch.isfinite(live).all():
                bad = [self.runs[i].label or str(i) for i in torch.nonzero(active).flatten().tolist()
                       if not torch.isfinite(losses[i])]
                ckpt = self.checkpoint_path
                kept = (f"the last checkpoint is kept in {ckpt}" if ckpt is not None and ckpt.is_file()
                        else "nothing was kept")
                raise TrainingDiverged(f"{self.desc}: loss is not finite at step {t + 1} for run(s) {bad}; {kept}. "
                                       f"Lower the learning rate (e.g. --set train.lr=...) and rerun with --set "
                                       f"force=true to restart from scratch")
            self.opt.zero_grad()
            live.sum().backward()
            if self.grad_clip:
                clip_per_run(self.params, self.grad_clip, active)
            lrs = torch.tensor([r.lr(t) if a else 0.0 for r, a in zip(self.runs, active.tolist())], dtype=torch.float64)
            self.opt.step(lrs, active)
            self._log(t, active, losses.detach(), {k: v.detach() for k, v in logs.items()}, lrs)
            self.t = t + 1
            if eval_fn is not None and eval_every and self.t % eval_every == 0 and self.t < self.total:
                self._eval(eval_fn)
            if self.t % self.checkpoint_every == 0 and self.t < self.total:
                self._save()
            if self.t % 10 == 0:
                bar.set_postfix(loss=f"{float(live.detach().mean()):.4f}", active=int(active.sum()))
        if self.t >= self.total:
            if eval_fn is not None:
                self._eval(eval_fn)
            if self.out_dir is not None and distributed.is_main():
                self.out_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.out_dir / "train_log.json", json.dumps(
                    [{"run": r.label, "epochs": h, "evals": e} for r, h, e in zip(self.runs, self.history, self.evals)],
                    indent=1))
        return self.history

    def _log(self, t: int, active: torch.Tensor, losses: torch.Tensor, logs: dict, lrs: torch.Tensor) -> None:
        for r, run in enumerate(self.runs):
            if not active[r]:
                continue
            acc = self._acc[r]
            acc["n"] = acc.get("n", 0) + 1
            acc["loss"] = acc.get("loss", 0.0) + float(losses[r])
            for k, v in logs.items():
                acc[k] = acc.get(k, 0.0) + float(v[r])
            epoch, i = run.position(t)
            if i == run.batches_per_epoch - 1:     # the run's epoch ends: one history row, as the Trainer writes
                n = acc.pop("n")
                now = time.time()
                row = {"epoch": epoch + 1, "step": t + 1, "lr": lr_at(run.cfg, epoch),
                       "wall_s": round(now - self._epoch_start[r], 4)}   # shared with the runs trained alongside
                row.update({k: v / n for k, v in acc.items()})
                self._epoch_start[r] = now
                self.history[r].append(row)
                self._acc[r] = {}

    def _eval(self, eval_fn) -> None:
        vals = eval_fn()
        for r, run in enumerate(self.runs):
            self.evals[r].append({"step": min(self.t, run.total_steps), "val": float(vals[r])})


def stack_parameters(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    """One trainable (R, ...) parameter from R runs' initial tensors (copied)."""
    return nn.Parameter(torch.stack([t.detach().clone() for t in tensors]))


@torch.no_grad()
def unstack_parameters(modules: Sequence[nn.Module], stacked: dict[str, nn.Parameter]) -> None:
    """Copy run r's slice of every stacked parameter back into `modules[r]` (the inverse of stack_parameters)."""
    for r, m in enumerate(modules):
        for n, w in stacked.items():
            m.get_parameter(n).copy_(w[r])


def stack_trainable(modules: Sequence[nn.Module]) -> dict[str, nn.Parameter]:
    """Every trainable tensor of R modules of one architecture, stacked on a leading run axis (by name)."""
    names = [n for n, p in modules[0].named_parameters() if p.requires_grad]
    return {n: stack_parameters([m.get_parameter(n) for m in modules]) for n in names}


def fit_stacked(modules: Sequence[nn.Module], stacked: dict[str, nn.Parameter], runs: Sequence[RunSchedule],
                step: Callable, eval_fn: Callable[[], torch.Tensor] | None = None, eval_every: int = 0,
                out_dir: str | Path | None = None, desc: str = "train", threads: int | None = None) -> list[nn.Module]:
    """Train the stacked tensors with a `BatchedTrainer` (`step(batches) -> per-run losses`), write each run's
    slice back into its module and keep its histories (`train_history`, `val_history`: a convergence curve)."""
    trainer = BatchedTrainer(list(stacked.values()), runs, out_dir, desc=desc)
    with torch_threads(threads):     # tiny per-step ops: extra threads only synchronise
        trainer.fit(step, eval_fn, eval_every)
    unstack_parameters(modules, stacked)
    for m, hist, ev in zip(modules, trainer.history, trainer.evals):
        m.train_history, m.val_history = hist, ev
    return list(modules)


def run_scores(n_runs: int, val_runs: Sequence[int], inputs: Callable[[list[int]], Sequence],
               score: Callable[..., float]) -> Callable[[], torch.Tensor]:
    """An `eval_fn` for `fit_stacked`: (n_runs,) scores, `score(inputs_r)` for each run in `val_runs` (0 for the
    others), without gradients. `inputs(runs)` gives the runs' current inputs in their order (e.g. each run's text
    features from the stacked prompts: one batched pass for all of them)."""
    def eval_fn() -> torch.Tensor:
        out = torch.zeros(n_runs)
        with torch.no_grad():
            for x, r in zip(inputs(list(val_runs)), val_runs):
                out[r] = score(x)
        return out
    return eval_fn


def curve_every(runs: Sequence[RunSchedule]) -> int:
    """Evaluate a convergence curve about 20 times over the longest run."""
    return max(1, max(r.total_steps for r in runs) // 20)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-run mean of (R, B) values over the real (mask) entries of each row; rows without any give 0."""
    m = mask.to(values.dtype)
    return (values * m).sum(1) / m.sum(1).clamp(min=1)


def pad_batches(batches: Sequence[Batch | None]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Index batches of the active runs padded to one (A, B) tensor (pad index 0), their (A, B) mask and the
    active run numbers."""
    live = [i for i, b in enumerate(batches) if b is not None]
    width = max(len(batches[i].idx) for i in live)
    idx = torch.zeros(len(live), width, dtype=torch.long)
    mask = torch.zeros(len(live), width, dtype=torch.bool)
    for row, i in enumerate(live):
        n = len(batches[i].idx)
        idx[row, :n] = batches[i].idx
        mask[row, :n] = True
    return idx, mask, live


def scatter_runs(values: torch.Tensor, live: Sequence[int], n_runs: int) -> torch.Tensor:
    """(A,) values of the active runs placed into an (R,) vector (zeros for the others, gradients kept)."""
    return torch.zeros(n_runs, dtype=values.dtype, device=values.device).index_put(
        (torch.tensor(list(live), device=values.device),), values)


def fit_modules(modules: Sequence[nn.Module], views: Sequence[Sequence[torch.Tensor]], labels: Sequence[torch.Tensor],
                cfgs: Sequence[TrainConfig], batch_size: int, out_dir: str | Path | None = None, desc: str = "train",
                eval_fn: Callable[[Sequence[nn.Module]], torch.Tensor] | None = None, eval_every: int = 0
                ) -> BatchedTrainer:
    """Cross-entropy training of R modules of one architecture (trainable tensors of equal shapes, e.g. one
    adapter per seed and shot count) on their own cached feature views, as one batched model: the modules'
    trainable tensors and buffers are stacked and ``torch.func.vmap`` runs the first module's forward over
    them (or the module's own `stacked_forward(state, x)` when it has one). Epoch e of run r uses view
    e % len(views[r]) and `index_batches` of (seed, e), as the single-run `Trainer` does; the trained slices are
    written back into the modules."""
    from torch.func import functional_call, vmap

    R = len(modules)
    template = modules[0]
    names = [n for n, p in template.named_parameters() if p.requires_grad]
    shapes = {n: p.shape for n, p in template.named_parameters()}
    for m in modules[1:]:
        other = {n: p.shape for n, p in m.named_parameters()}
        if other != shapes:
            raise ValueError("fit_modules trains modules of one architecture: parameter shapes differ")
    stacked = {n: stack_parameters([m.get_parameter(n) for m in modules]) for n in names}
    frozen = {n: torch.stack([m.get_parameter(n).detach() for m in modules])
              for n, p in template.named_parameters() if not p.requires_grad}
    buffers = {n: torch.stack([m.get_buffer(n) for m in modules]) for n, _ in template.named_buffers()}
    runs = [RunSchedule(cfg, len(y), batch_size, label=str(i)) for i, (cfg, y) in enumerate(zip(cfgs, labels))]
    # a module may spell its forward over stacked tensors itself (a few einsums: far cheaper than vmap's tracing)
    forward = getattr(template, "stacked_forward", None) or vmap(lambda state, x: functional_call(template, state, (x,)))

    def step(batches):
        idx, mask, live = pad_batches(batches)
        xs = torch.stack([views[r][batches[r].epoch % len(views[r])][idx[i]] for i, r in enumerate(live)])
        ys = torch.stack([labels[r][idx[i]] for i, r in enumerate(live)])
        state = {**{n: w[live] for n, w in stacked.items()}, **{n: w[live] for n, w in frozen.items()},
                 **{n: b[live] for n, b in buffers.items()}}
        logits = forward(state, xs)                                              # (A, B, C)
        ce = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="none").view(len(live), -1)
        acc = ((logits.argmax(-1) == ys).float() * 100)
        return scatter_runs(masked_mean(ce, mask), live, R), {"acc": scatter_runs(masked_mean(acc, mask), live, R)}

    def evaluate():
        unstack_parameters(modules, stacked)
        return eval_fn(modules)

    for m in modules:
        m.train()
    trainer = BatchedTrainer(list(stacked.values()), runs, out_dir, desc=desc)
    trainer.fit(step, evaluate if eval_fn is not None else None, eval_every)
    unstack_parameters(modules, stacked)
    for m in modules:
        m.eval()
    return trainer
