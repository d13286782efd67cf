"""One training loop for every method: optimiser, warmup + cosine, AMP on CUDA, clipping,
a checkpoint every epoch and exact resume, tqdm progress, a JSON log.

A method supplies the module that holds its trainable state, a `step_fn(batch) -> loss` (or
`(loss, logs)`), and `batches(epoch) -> iterable`. Batches must be a function of the epoch (use
`index_batches`) so a resumed run sees exactly the batches the uninterrupted one would have.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .seed import rng_state, seed_everything, set_rng_state

OPTIMIZERS = ("sgd", "adamw", "adam")


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
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_epochs < self.epochs + 1:
            raise ValueError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        for name, allowed in (("warmup_type", ("constant", "linear")), ("schedule", ("cosine", "constant")),
                              ("schedule_unit", ("epoch", "iter"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}; known: {sorted(known)}")
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
        if self.checkpoint_path is None:
            return
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save({"epoch": epoch, "module": trainable_state(self.module), "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None, "rng": rng_state(),
                    "history": self.history, "config": asdict(self.cfg)}, tmp)
        tmp.replace(self.checkpoint_path)

    def maybe_resume(self) -> bool:
        """Resume from `out_dir/checkpoint.pt` if present (config must match)."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if ckpt["config"] != asdict(self.cfg):
            diff = {k: (ckpt["config"].get(k), v) for k, v in asdict(self.cfg).items() if ckpt["config"].get(k) != v}
            raise ValueError(f"checkpoint {path} was written with another config {diff}; delete it to restart")
        load_trainable_state(self.module, ckpt["module"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.history = ckpt["history"]
        self.start_epoch = ckpt["epoch"] + 1
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
                    raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {i}")
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
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + float(v)
                bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{lr:.2e}")
            record = {"epoch": epoch + 1, "loss": total / max(count, 1), "lr": lr_at(self.cfg, epoch),
                      "wall_s": round(time.time() - t0, 3), **{k: v / max(count, 1) for k, v in logs_sum.items()}}
            if on_epoch_end is not None:
                record.update(on_epoch_end(epoch) or {})
            self.history.append(record)
            if (epoch + 1) % self.cfg.checkpoint_every == 0 or epoch + 1 == self.cfg.epochs:
                self._save(epoch)
            self.start_epoch = epoch + 1
        if self.out_dir is not None:
            (self.out_dir / "train_log.json").write_text(json.dumps(self.history, indent=1))
        self.module.eval()
        return self.history
