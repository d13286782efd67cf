"""Convergence records: a paper's embedded budget is justified by a study, not by a time limit.

A study trains the paper's representative setting (its main variant at `shots` shots, seed 1) on
`STUDY_DATASETS`: the most expensive set (the generic objects, ImageNet's stand-in) and the out-of-domain
one (satellite, EuroSAT's), where a learning rate too small for the tiny towers shows first. Two steps,
every run of a dataset in one batched model:

1. **Learning rate** (the project's rule for the tiny CLIPs): at the official epoch count, the official
   learning rate times each factor of `LR_FACTORS`; the factor with the best validation accuracy averaged
   over the datasets is kept. The official rate is kept unless another is better by more than `TOLERANCE`.
   (Measured: official rates leave the adapters at zero-shot on the tiny towers, whose image features of an
   out-of-domain set lie in a narrow cone; see data/README.md.)
2. **Budget**: at that rate, the official epoch count and fractions of it, each a complete schedule (warmup +
   cosine over its own length). The budget it justifies is the smallest one whose mean validation accuracy
   is within `TOLERANCE` points of the official budget's (the plateau), or the official count.

It records per dataset the validation accuracy and training loss at the end of every run, and the validation
curve (accuracy against optimiser steps) of the official-budget run. A paper's embedded config must train
at least the justified budget at the chosen rate at the representative setting, which `common.report`
checks; a paper whose claims are about late training (overfitting, fine-tuning) trains the official
schedule instead.

    python -m papers.<slug> convergence        # writes papers/<slug>/convergence.json
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..atomic import write_text_atomic
from ..data import build_dataset, fewshot_split
from ..errors import TrainingDiverged
from .train import TrainConfig

TOLERANCE = 1.0             # points of validation accuracy
FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1)
LR_FACTORS = (1, 3, 10, 30, 100)
STUDY_DATASETS = ("emb_objects", "emb_satellite")
RECORD = "convergence.json"


def budgets(official_epochs: int, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """Epoch counts of a study: fractions of the official count, at least one epoch, without repeats."""
    return sorted({max(1, int(round(official_epochs * f))) for f in fractions})


def with_schedule(tcfg: TrainConfig, task) -> TrainConfig:
    """`tcfg` with the study's per-run overrides (`task.extra["schedule"]`: epochs, lr) applied; a method's
    fit reads its TrainConfig through this, so one batched study can train several budgets."""
    over = (getattr(task, "extra", None) or {}).get("schedule") or {}
    if not over:
        return tcfg
    epochs = int(over.get("epochs", tcfg.epochs))
    return replace(tcfg, epochs=epochs, lr=float(over.get("lr", tcfg.lr)),
                   warmup_epochs=min(tcfg.warmup_epochs, epochs))


def justified(record: dict, tolerance: float = TOLERANCE) -> int:
    """The smallest studied budget (epochs) whose mean validation accuracy is within `tolerance` of the
    longest budget's."""
    means = {int(k): v for k, v in record["mean_val"].items()}
    top = means[max(means)]
    return min(e for e, v in means.items() if v >= top - tolerance - 1e-9)


def chosen_factor(means: dict, tolerance: float = TOLERANCE) -> float:
    """The learning-rate factor with the best mean validation accuracy; 1 (official) unless beaten by more
    than `tolerance`."""
    means = {float(k): v for k, v in means.items()}
    best = max(means, key=lambda f: (means[f], -f))
    return 1.0 if 1.0 in means and means[1.0] >= means[best] - tolerance else best


def study(cfg: dict, slug: str, method: str, variant: str, fit_many: Callable[[list], list],
          val_accuracy: Callable[[Any, Any], float], official_epochs: int, official_lr: float, datasets: Sequence[str],
          shots: int = 16, seed: int = 1, out: str | Path | None = None, make_task: Callable | None = None,
          note: str = "", lr_factors: Sequence[float] = LR_FACTORS,
          fractions: Sequence[float] = FRACTIONS, load: Callable[[str], Any] | None = None) -> dict:
    """Run a convergence study and write its record (`papers/<slug>/convergence.json` by default).

    `fit_many(tasks) -> states` trains the tasks together, honouring `task.extra["schedule"]` (epochs, lr);
    `val_accuracy(state, task)` scores a trained state on the task's validation split (top-1 %); the method
    logs a validation curve of the runs whose task has `extra["on_eval"]`. `make_task(name, dataset, shots,
    seed)` builds a protocol task (default: a few-shot task). `fractions=(1,)` studies the learning rate only, at
    the official budget (methods whose claims are about late training keep the official schedule). `load(name)`
    reads a study "dataset" (default: the registry's dataset of that name; a multitask stage loads its group)."""
    from .protocols import Task, bundle_for

    bundle = bundle_for(cfg)
    epochs = budgets(official_epochs, fractions)
    record: dict[str, Any] = {"paper": slug, "method": method, "variant": variant, "backbone": cfg["arch"],
                              "checkpoint": bundle.checkpoint_id, "profile": cfg["profile"], "shots": shots,
                              "seed": seed, "official_epochs": official_epochs, "official_lr": official_lr,
                              "budgets": epochs, "lr_factors": list(lr_factors), "tolerance": TOLERANCE,
                              "note": note, "datasets": {}}

    def train(name: str, data, schedules: list[dict], curve_of: int | None) -> list[dict]:
        tasks = []
        for sched in schedules:
            t = make_task(name, data, shots, seed) if make_task is not None else \
                Task(cfg, bundle, fewshot_split(data, shots, seed), shots, seed, None)
            t.extra["schedule"] = dict(sched)
            tasks.append(t)
        if curve_of is not None:
            tasks[curve_of].extra["on_eval"] = True
        states = fit_many(tasks)
        rows = []
        for sched, t, s in zip(schedules, tasks, states):
            if isinstance(s, Diverged):
                rows.append({**sched, "val": 0.0, "loss": None, "steps": None, "diverged": s.reason,
                             "val_curve": [], "loss_curve": []})
                continue
            hist = getattr(s, "train_history", None) or []
            rows.append({**sched, "val": round(float(val_accuracy(s, t)), 3),
                         "loss": round(float(hist[-1]["loss"]), 5) if hist else None,
                         "steps": int(hist[-1]["step"]) if hist and "step" in hist[-1] else None,
                         "val_curve": [{"step": int(c["step"]), "val": round(float(c["val"]), 3)}
                                       for c in (getattr(s, "val_history", None) or [])],
                         "loss_curve": [{"step": int(h["step"]), "loss": round(float(h["loss"]), 5)}
                                        for h in hist if "step" in h]})
        return rows

    loaded = {name: (load(name) if load is not None else build_dataset(name, cfg["data_root"])) for name in datasets}
    lr_rows = {name: train(name, data, [{"epochs": official_epochs, "lr": official_lr * f} for f in lr_factors], None)
               for name, data in loaded.items()}
    record["mean_val_by_lr"] = {str(f): round(sum(rows[i]["val"] for rows in lr_rows.values()) / len(lr_rows), 3)
                                for i, f in enumerate(lr_factors)}
    factor = chosen_factor(record["mean_val_by_lr"])
    record["lr_factor"], record["lr"] = factor, official_lr * factor
    for name, data in loaded.items():
        rows = train(name, data, [{"epochs": e, "lr": record["lr"]} for e in epochs], len(epochs) - 1)
        record["datasets"][name] = {"lr_grid": [{k: v for k, v in r.items() if "curve" not in k} for r in lr_rows[name]],
                                    "final": {str(r["epochs"]): {k: r[k] for k in ("val", "loss", "steps")} for r in rows},
                                    "val_curve": rows[-1]["val_curve"], "loss_curve": rows[-1]["loss_curve"]}
    record["mean_val"] = {str(e): round(sum(d["final"][str(e)]["val"] for d in record["datasets"].values())
                                        / len(record["datasets"]), 3) for e in epochs}
    record["justified_epochs"] = justified(record)
    path = Path(out) if out is not None else Path("papers") / slug / RECORD
    write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"[{slug}] convergence: mean val by lr factor {record['mean_val_by_lr']} -> x{factor:g}; by budget (epochs) "
          f"{record['mean_val']} -> {record['justified_epochs']} of the official {official_epochs} ({path})")
    return record


@dataclass
class Diverged:
    """A study run whose loss became non-finite (its learning rate is too large)."""
    reason: str


def one_by_one(fit: Callable[[Any], Any]) -> Callable[[list], list]:
    """`fit_many` for a method that trains one task at a time: each fit starts from the global RNG seeded with its
    task's seed (as `run_fewshot` does), so a run's initialisation and dropout do not depend on the runs before it
    in the study. A run whose loss diverges is kept as `Diverged` (validation 0) instead of ending the study."""
    from .seed import seed_everything

    def fit_many(tasks: list) -> list:
        out = []
        for t in tasks:
            seed_everything(t.seed)
            try:
                out.append(fit(t))
            except TrainingDiverged as err:   # a learning rate of the grid too large: that run scores 0, the study goes on
                out.append(Diverged(str(err)))
        return out
    return fit_many


def epoch_validation(task, score: Callable[[], float]) -> Callable[[int], dict] | None:
    """`on_epoch_end` for the single-run `Trainer`: the validation accuracy after every epoch, only in the run a
    study draws the validation curve of (`task.extra["on_eval"]`)."""
    if not (getattr(task, "extra", None) or {}).get("on_eval"):
        return None
    return lambda epoch: {"val": float(score())}


def keep_history(state, history: list[dict]):
    """Attach a single-run `Trainer` history to the trained state as a study reads it: `train_history` (loss per
    epoch, with its optimiser step) and `val_history` (the epochs `epoch_validation` scored)."""
    state.train_history = history
    state.val_history = [{"step": h["step"], "val": h["val"]} for h in history if "val" in h]
    return state


def base_class_task(cfg: dict, bundle) -> Callable:
    """`make_task` for methods whose main protocol is base-to-novel: the few-shot split's base classes (the
    split they train on)."""
    from ..data import subsample_classes
    from .protocols import Task

    def make(name: str, data, shots: int, seed: int):
        return Task(cfg, bundle, subsample_classes(fewshot_split(data, shots, seed), "base"), shots, seed, None)
    return make


def load(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def eval_every(total_steps: int, points: int = 20) -> int:
    """Evaluation interval that gives about `points` points on a validation curve."""
    return max(1, math.ceil(total_steps / points))
