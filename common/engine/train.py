"""One training loop for every method: optimiser, warmup + cosine, AMP on CUDA, clipping,
a checkpoint every epoch and exact resume, tqdm progress, a JSON log.

A method supplies the module that holds its trainable state, a `step_fn(batch) -> loss` (or
`(loss, logs)`), and `batches(epoch) -> iterable`. Batches must be a function of the epoch (use
`index_batches`) so a resumed run sees exactly the batches the uninterrupted one would have.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..atomic import torch_save_atomic, write_text_atomic
from ..errors import ConfigError, TrainingDiverged
from . import distributed
from .seed import rng_state, seed_everything, set_rng_state

OPTIMIZERS = ("sgd", "adamw", "adam")
CHOICES = {"optimizer": OPTIMIZERS, "warmup_type": ("constant", "linear"), "schedule": ("cosine", "constant"),
           "schedule_unit": ("epoch", "iter")}  # also checked by common.validate before a run starts
_RESTART: contextvars.ContextVar[bool] = contextvars.ContextVar("restart", default=False)
_RESUMED = {"seconds": 0.0}  # training time that resumed runs had spent before their interruption


@contextlib.contextmanager
def restarting(enabled: bool = True):
    """Within this block trainers delete an existing resume checkpoint instead of resuming it (`--set force=true`:
    after a diverged run or changed options, restart without deleting files by hand)."""
    token = _RESTART.set(bool(enabled))
    try:
        yield
    finally:
        _RESTART.reset(token)


def resume_checkpoint(path: Path | None, desc: str) -> dict | None:
    """The resume checkpoint at `path`, or None when there is none or `--set force=true` (`restarting()`)
    discards it (said on stderr): the single-run and the batched trainers resume through this. Under torchrun
    whether there is one is rank 0's answer."""
    if path is None or not distributed.agree(path.is_file()):
        return None
    if _RESTART.get():
        path.unlink(missing_ok=True)     # torchrun: every rank discards it
        tqdm.write(f"{desc}: force=true, so {path} was discarded and training starts from scratch", file=sys.stderr)
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def take_resumed_seconds() -> float:
    """Training time that the runs resumed since the last call had spent before their interruption (and reset it):
    a protocol adds it to a run's wall time, so `wall_s` covers the whole run."""
    seconds, _RESUMED["seconds"] = _RESUMED["seconds"], 0.0
    return seconds


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 2e-3
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: float = 1e-8               # Adam/AdamW epsilon (Tip-Adapter-F uses 1e-4)
    warmup_epochs: int = 1          # Dassl's ConstantWarmupScheduler: warmup_lr for these epochs
    warmup_lr: float = 1e-5
    warmup_type: str = "constant"   # constant | linear
    schedule: str = "cosine"        # cosine | constant
    schedule_unit: str = "epoch"    # epoch (Dassl steps once per epoch) | iter
    grad_clip: float | None = None
    amp: bool = False               # mixed precision, CUDA only
    seed: int = 1
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_epochs < self.epochs + 1:
            raise ConfigError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown training options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def lr_at(cfg: TrainConfig, epoch: float) -> float:
    """Learning rate at (fractional) epoch: warmup, then cosine over `epochs` as Dassl (never reaching 0)."""
    w = cfg.warmup_epochs
    if epoch < w:
        return cfg.warmup_lr if cfg.warmup_type == "constant" else cfg.lr * (epoch + 1e-8) / w
    if cfg.schedule == "constant":
        return cfg.lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - w) / cfg.epochs))


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)


def index_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[torch.Tensor]:
    """Index batches for one epoch, a pure function of (seed, epoch). Drops the last partial batch only
    when there is at least one full batch (Dassl's rule, so a 1-shot 10-class set still trains)."""
    if n <= 0:
        raise ValueError("cannot batch an empty training set")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)) if shuffle \
        else torch.arange(n)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches = batches[:-1]
    return batches


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The part of a state dict a checkpoint must hold: trainable parameters and buffers."""
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k not in frozen}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the module: missing {missing[:5]}, unexpected {unexpected[:5]}")


class Trainer:
    """Trains the `requires_grad` parameters of `module`; checkpoints to `out_dir/checkpoint.pt`."""

    def __init__(self, module: nn.Module, cfg: TrainConfig, out_dir: str | Path | None = None,
                 params: Iterable[nn.Parameter] | None = None, desc: str = "train"):
        self.module, self.cfg, self.desc = module, cfg, desc
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.optimizer = build_optimizer(params if params is not None else module.parameters(), cfg)
        self.device = next(iter(self.optimizer.param_groups[0]["params"])).device
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir is not None else None

    def _save(self, epoch: int) -> None:
        if self.checkpoint_path is None or not distributed.is_main():   # torchrun: rank 0 writes
            return
        state = {"epoch": epoch, "module": trainable_state(self.module), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler else None, "rng": rng_state(),
                 "history": self.history, "config": asdict(self.cfg)}
        torch_save_atomic(state, self.checkpoint_path)

    def maybe_resume(self) -> bool:
        """Resume from `out_dir/checkpoint.pt` if present (config must match), and say so. Inside `restarting()`
        (`--set force=true`) an existing checkpoint is deleted instead and training starts from scratch."""
        path = self.checkpoint_path
        ckpt = resume_checkpoint(path, self.desc)
        if ckpt is None:
            return False
        if ckpt["config"] != asdict(self.cfg):
            diff = {k: (ckpt["config"].get(k), v) for k, v in asdict(self.cfg).items() if ckpt["config"].get(k) != v}
            raise ConfigError(f"checkpoint {path} of an interrupted run was written with another config of "
                              f"training options (old, new): {diff}; rerun with the old options to resume it, or add "
                              f"--set force=true to start from scratch")
        load_trainable_state(self.module, ckpt["module"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.history = ckpt["history"]
        self.start_epoch = ckpt["epoch"] + 1
        before = sum(h.get("wall_s", 0.0) for h in self.history)
        _RESUMED["seconds"] += before
        tqdm.write(f"{self.desc}: resumed from {path} at epoch {self.start_epoch}/{self.cfg.epochs} "
                   f"({before:.1f} s of training before the interruption)", file=sys.stderr)
        return True

    def _set_lr(self, epoch: float) -> float:
        lr = lr_at(self.cfg, epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def fit(self, step_fn: Callable[[Any], Any], batches: Callable[[int], Iterable[Any]],
            on_epoch_end: Callable[[int], dict[str, Any] | None] | None = None,
            max_epochs: int | None = None) -> list[dict[str, Any]]:
        """Train to `cfg.epochs` (or stop after `max_epochs` epochs of this call: used to test resume)."""
        if self.start_epoch == 0 and not self.maybe_resume():
            seed_everything(self.cfg.seed)
        stop = self.cfg.epochs if max_epochs is None else min(self.cfg.epochs, self.start_epoch + max_epochs)
        steps = int(self.history[-1].get("step", 0)) if self.history else 0   # optimiser steps so far
        for epoch in range(self.start_epoch, stop):
            t0 = time.time()
            self.module.train()
            epoch_batches = list(batches(epoch))
            total, count, logs_sum = 0.0, 0, {}
            bar = tqdm(epoch_batches, desc=f"{self.desc} ep{epoch + 1}/{self.cfg.epochs}", leave=False,
                       disable=len(epoch_batches) < 5)
            for i, batch in enumerate(bar):
                frac = epoch if self.cfg.schedule_unit == "epoch" else epoch + i / max(1, len(epoch_batches))
                lr = self._set_lr(frac)
                with torch.autocast("cuda", enabled=self.use_amp):
                    out = step_fn(batch)
                loss, logs = (out if isinstance(out, tuple) else (out, {}))
                if not torch.isfinite(loss):
                    ckpt = self.checkpoint_path
                    kept = (f"the checkpoint of the last good epoch is kept in {ckpt}"
                            if ckpt is not None and ckpt.is_file() else "nothing was kept")
                    raise TrainingDiverged(f"{self.desc}: loss is {loss.item()} at epoch {epoch + 1}, step {i}; "
                                           f"{kept}. Lower the learning rate (e.g. --set train.lr=...) and rerun "
                                           f"with --set force=true to restart from scratch")
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler:
                    self.scaler.scale(loss).backward()
                    self.scaler.unscale_(self.optimizer)
                else:
                    loss.backward()
                if self.cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.grad_clip)
                if self.scaler:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                total += float(loss.detach())
                count += 1
                steps += 1
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + float(v)
                bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{lr:.2e}")
            record = {"epoch": epoch + 1, "step": steps, "loss": total / max(count, 1), "lr": lr_at(self.cfg, epoch),
                      "wall_s": round(time.time() - t0, 3), **{k: v / max(count, 1) for k, v in logs_sum.items()}}
            if on_epoch_end is not None:
                record.update(on_epoch_end(epoch) or {})
            self.history.append(record)
            if (epoch + 1) % self.cfg.checkpoint_every == 0 or epoch + 1 == self.cfg.epochs:
                self._save(epoch)
            self.start_epoch = epoch + 1
        if self.out_dir is not None and distributed.is_main():
            write_text_atomic(self.out_dir / "train_log.json", json.dumps(self.history, indent=1))
        self.module.eval()
        return self.history
