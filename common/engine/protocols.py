"""The evaluation protocols every paper runs, in one place: few-shot, base-to-novel, cross-dataset,
domain generalisation. A method plugs in one function; the protocol builds the data, loops over
datasets x shots x seeds with a progress bar, skips runs whose record already exists (so an
interrupted `reproduce` continues where it stopped), and writes one run record per result.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .. import metrics
from ..clip.loader import ClipBundle, load_clip
from ..data import Dataset, build_dataset, fewshot_split, subsample_classes
from ..paths import runs_root
from .cache import cached_features
from .runs import print_record, run_dir, write_record
from .seed import seed_everything
from .train import take_resumed_seconds

_BUNDLES: dict[tuple, ClipBundle] = {}


def bundle_for(cfg: dict) -> ClipBundle:
    """The CLIP of this config (memoised: one load per process)."""
    key = (cfg["arch"], str(cfg["pretrained"]), cfg.get("device", "cpu"), cfg.get("precision", "fp32"))
    if key not in _BUNDLES:
        _BUNDLES[key] = load_clip(cfg["arch"], cfg["pretrained"], device=cfg.get("device", "cpu"),
                                  precision=cfg.get("precision", "fp32"))
    return _BUNDLES[key]


@dataclass
class Task:
    """Everything a method needs for one run."""

    cfg: dict
    bundle: ClipBundle
    dataset: Dataset            # few-shot train/val already applied (and class subset for base2novel)
    shots: int | None
    seed: int
    out_dir: Any                # folder for this run's checkpoints
    extra: dict = field(default_factory=dict)

    def features(self, split: str, transform: str = "test", view: int = 0, items=None) -> dict:
        """Cached frozen features of a split of this task's dataset."""
        items = self.dataset.split(split) if items is None else items
        return cached_features(self.bundle, self.dataset.name, split, items, transform=transform, view=view)


def _record(cfg: dict, paper: str, method: str, variant: str, protocol: str, dataset: str, source: str,
            shots: int | None, seed: int, values: dict, wall: float, n_classes: int | None = None,
            train: Dataset | None = None) -> dict:
    """A run record. `wall_s` is the whole run's time, training done before a resume included; `shots_used` appears
    when some class had fewer than `shots` training images (`fewshot_split` keeps all of them)."""
    rec = {"paper": paper, "method": method, "variant": variant, "profile": cfg["profile"], "protocol": protocol,
           "dataset": dataset, "source": source, "backbone": cfg["arch"], "shots": shots, "seed": seed,
           "n_classes": n_classes,
           "metrics": {k: round(float(v), 4) for k, v in values.items()}, "config": cfg, "wall_s": round(wall, 2)}
    if train is not None and train.meta.get("shots_used"):
        rec["shots_used"] = train.meta["shots_used"]
    return rec


def _exists(cfg, paper, protocol, dataset, method, shots, seed, variant, source=None) -> bool:
    """Whether the run's record exists (and `force` is off); an existing record's metrics are printed."""
    path = run_dir(paper, protocol, cfg["profile"], dataset, cfg["arch"], method, shots, seed, variant, source) \
        / "metrics.json"
    if cfg.get("force", False) or not path.is_file():
        return False
    print_record(json.loads(path.read_text()), existing=True)
    return True


def checkpoint_dir(cfg, paper, protocol, dataset, method, shots, seed, variant):
    """Training checkpoints of one run, inside the paper's runs folder (so a pipeline rerun clears them)."""
    return run_dir("_checkpoints", protocol, cfg["profile"], dataset, cfg["arch"], method, shots, seed, variant,
                   root=runs_root() / paper)


def _finish(rec: dict, out_dir) -> dict:
    """Write the record (and print its metrics), then drop the run's resume checkpoint: it exists only to survive
    interruption, and a stale one must never be 'resumed' by a later run with changed code."""
    write_record(rec)
    print_record(rec)
    if out_dir is not None:
        ckpt = Path(out_dir) / "checkpoint.pt"
        ckpt.unlink(missing_ok=True)
    return rec


def run_fewshot(cfg: dict, paper: str, method: str, fit_eval: Callable[[Task], dict[str, float]],
                variant: str = "", datasets: list[str] | None = None, shots: list[int] | None = None,
                seeds: list[int] | None = None) -> list[dict]:
    """K-shot training on each dataset's train split, top-1 on its full test split."""
    datasets = datasets or cfg["datasets"]
    jobs = [(d, k, s) for d in datasets for k in (shots or cfg["shots"]) for s in (seeds or cfg["seeds"])]
    bundle = bundle_for(cfg)
    out = []
    for name, k, seed in tqdm(jobs, desc=f"{paper}/{method} few-shot"):
        if _exists(cfg, paper, "fewshot", name, method, k, seed, variant):
            continue
        t0, _ = time.time(), take_resumed_seconds()
        full = build_dataset(name, cfg["data_root"])
        task = Task(cfg, bundle, fewshot_split(full, k, seed), k, seed,
                    checkpoint_dir(cfg, paper, "fewshot", name, method, k, seed, variant))
        seed_everything(seed)
        values = fit_eval(task)
        rec = _record(cfg, paper, method, variant, "fewshot", name, name, k, seed, values,
                      time.time() - t0 + take_resumed_seconds(), full.num_classes, task.dataset)
        out.append(_finish(rec, task.out_dir))
    return out


def run_base2novel(cfg: dict, paper: str, method: str, fit: Callable[[Task], Any],
                   evaluate: Callable[[Any, Task], dict[str, float]], variant: str = "",
                   datasets: list[str] | None = None, shots: int = 16, seeds: list[int] | None = None) -> list[dict]:
    """CoCoOp's protocol: train on K-shot base classes, test on base and novel classes; HM."""
    datasets = datasets or cfg["datasets"]
    bundle = bundle_for(cfg)
    out = []
    for name, seed in tqdm([(d, s) for d in datasets for s in (seeds or cfg["seeds"])],
                           desc=f"{paper}/{method} base2novel"):
        if _exists(cfg, paper, "base2novel", name, method, shots, seed, variant):
            continue
        t0, _ = time.time(), take_resumed_seconds()
        full = fewshot_split(build_dataset(name, cfg["data_root"]), shots, seed)
        ckpt = checkpoint_dir(cfg, paper, "base2novel", name, method, shots, seed, variant)
        base = Task(cfg, bundle, subsample_classes(full, "base"), shots, seed, ckpt)
        novel = Task(cfg, bundle, subsample_classes(full, "new"), shots, seed, ckpt)
        seed_everything(seed)
        state = fit(base)
        resumed = take_resumed_seconds()
        b = evaluate(state, base)["top1"]
        n = evaluate(state, novel)["top1"]
        rec = _record(cfg, paper, method, variant, "base2novel", name, name, shots, seed,
                      {"base": b, "novel": n, "hm": metrics.harmonic_mean(b, n)},
                      time.time() - t0 + resumed, full.num_classes, full)
        out.append(_finish(rec, ckpt))
    return out


def run_transfer(cfg: dict, paper: str, method: str, protocol: str, fit: Callable[[Task], Any],
                 evaluate: Callable[[Any, Task], dict[str, float]], source: str, targets: list[str],
                 variant: str = "", shots: int | None = 16, seeds: list[int] | None = None) -> list[dict]:
    """Train once on `source` (K-shot, all classes), evaluate on the source and every target with the
    target's own class names: cross-dataset (`cross_dataset`) or domain generalisation (`domain_generalization`)."""
    if protocol not in ("cross_dataset", "domain_generalization"):
        raise ValueError(f"run_transfer protocol must be cross_dataset or domain_generalization, got {protocol!r}")
    bundle = bundle_for(cfg)
    out = []
    for seed in tqdm(seeds or cfg["seeds"], desc=f"{paper}/{method} {protocol}"):
        names = [source] + [t for t in targets if t != source]
        if all(_exists(cfg, paper, protocol, t, method, shots, seed, variant, source) for t in names):
            continue
        t0, _ = time.time(), take_resumed_seconds()
        full = build_dataset(source, cfg["data_root"])
        src = fewshot_split(full, shots, seed) if shots else full
        task = Task(cfg, bundle, src, shots, seed, checkpoint_dir(cfg, paper, protocol, source, method, shots, seed,
                                                                   variant))
        seed_everything(seed)
        state = fit(task)
        resumed = take_resumed_seconds()
        for name in names:
            ds = src if name == source else build_dataset(name, cfg["data_root"])
            values = evaluate(state, Task(cfg, bundle, ds, shots, seed, task.out_dir))
            rec = _record(cfg, paper, method, variant, protocol, name, source, shots, seed, values,
                          time.time() - t0 + resumed, ds.num_classes, src)
            out.append(_finish(rec, task.out_dir if name == names[-1] else None))
    return out


@torch.no_grad()
def eval_classifier(task: Task, class_weights: torch.Tensor, scale: float | None = None,
                    split: str = "test") -> dict[str, float]:
    """Top-1 of a fixed (K, D) text classifier on cached test features of `task`."""
    from .evaluate import classification_metrics, cosine_logits
    feats = task.features(split)
    scale = scale if scale is not None else float(task.bundle.model.logit_scale.exp())
    weights = class_weights.detach().to(feats["features"].device, torch.float32)  # cached features live on the CPU
    return classification_metrics(cosine_logits(feats["features"], weights, scale), feats["labels"])
