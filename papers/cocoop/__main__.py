"""CoCoOp: `python -m papers.cocoop {train,eval,reproduce}`.

train      base-to-novel: context + Meta-Net on the 16-shot base classes of every dataset x seeds, tested on
           base and novel classes; writes run records and keeps each learned prompt (`prompt.pt`)
eval       re-evaluates the kept base-to-novel prompts on the base and novel test splits
reproduce  base-to-novel (Table 1), cross-dataset transfer from `xd_source` (Table 2) and domain
           generalisation from `dg_source` (Table 3); one source training per seed serves both transfers
cost       time (and CUDA memory) of a training step, CoOp (K prompts) vs CoCoOp (B x K), at several B
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from common.cli import run_cli
from common.config import load_config
from common.engine import convergence
from common.data import build_dataset, subsample_classes
from common.engine import load_records
from common.engine.runs import kept
from common.engine.protocols import Task, bundle_for, checkpoint_dir, run_base2novel, run_transfer
from common.engine.threads import torch_threads
from common.paths import runs_root
from papers.coop.method import PROMPT_FILE, Fitter, load_learner

from .method import CoCoOpPromptLearner, evaluate, step_cost, train_cocoop, train_cocoop_many

SLUG = "cocoop"
CONFIG = Path(__file__).with_name("config.yaml")
PROTOCOLS = ("base2novel", "cross_dataset", "domain_generalization")


def variant(cfg: dict) -> str:
    return cfg.get("variant") or ""


def fitter(cfg: dict) -> Fitter:
    """CoCoOp runs of one dataset train as one batched model (seeds together)."""
    return Fitter(cfg, train_cocoop,
                  train_many=lambda tasks, c: train_cocoop_many(tasks, c, out_dir=tasks[0].extra.get("group_dir")))


def train(cfg: dict, fit: Fitter | None = None) -> list[dict]:
    """base-to-novel on every dataset x seeds (train on base classes, test base and novel); writes run records"""
    return run_base2novel(cfg, SLUG, SLUG, fit or fitter(cfg), evaluate, variant=variant(cfg),
                          shots=int(cfg["b2n_shots"]))


def eval_(cfg: dict) -> list[dict]:
    """re-evaluate the prompts kept by `train` on the base and novel test splits"""
    return eval_kept_base2novel(cfg, SLUG, SLUG, variant(cfg),
                                lambda path, bundle: load_learner(path, bundle, CoCoOpPromptLearner), evaluate)


def eval_kept_base2novel(cfg: dict, slug: str, method: str, var: str, load: Callable,
                         evaluate_fn: Callable) -> list[dict]:
    """Re-evaluate the prompts a paper's base-to-novel `train` kept (`load(path, bundle)`) on the base and novel
    test splits, printing each beside its run record."""
    bundle, shots, out = bundle_for(cfg), int(cfg["b2n_shots"]), []
    for name in cfg["datasets"]:
        full = build_dataset(name, cfg["data_root"])  # test splits do not depend on the few-shot sample
        for seed in cfg["seeds"]:
            path = kept(checkpoint_dir(cfg, slug, "base2novel", name, method, shots, seed, var) / PROMPT_FILE, slug)
            learner = load(path, bundle)
            row = {split: evaluate_fn(learner, Task(cfg, bundle, subsample_classes(full, split), shots, seed, None))["top1"]
                   for split in ("base", "new")}
            rec = load_records(paper=slug, protocol="base2novel", dataset=name, seed=seed, method=method, variant=var)
            stored = rec[0]["metrics"] if rec else {}
            print(f"{name:>16s} seed={seed} base {row['base']:6.2f} novel {row['new']:6.2f}"
                  + (f"  (record base {stored['base']:6.2f} novel {stored['novel']:6.2f})" if stored else ""))
            out.append({"dataset": name, "seed": seed, **row})
    return out


def convergence_cmd(cfg: dict) -> dict:
    """convergence study on the base classes (16 shots, seed 1): learning rate at the official 10 epochs, then
    budgets -> papers/cocoop/convergence.json"""
    real = load_config(CONFIG, "real")
    return convergence.study(cfg, SLUG, SLUG, variant(cfg), lambda tasks: train_cocoop_many(tasks, cfg),
                             lambda learner, task: evaluate(learner, task, split="val")["top1"],
                             int(real["epochs"]), float(real["train"]["lr"]), convergence.STUDY_DATASETS,
                             shots=int(cfg["b2n_shots"]), make_task=convergence.base_class_task(cfg, bundle_for(cfg)), lr_factors=(1, 3, 10, 30),
                             note="base classes of the base-to-novel protocol (the split CoCoOp trains on)")


def reproduce(cfg: dict) -> None:
    """base-to-novel on every dataset, cross-dataset transfer and domain generalisation"""
    fit = fitter(cfg)
    for protocol in cfg["reproduce"]["protocols"]:
        if protocol == "base2novel":
            train(cfg, fit)
        elif protocol == "cross_dataset":
            run_transfer(cfg, SLUG, SLUG, "cross_dataset", fit, evaluate, cfg["xd_source"],
                         [d for d in cfg["datasets"] if d != cfg["xd_source"]], variant=variant(cfg),
                         shots=int(cfg["b2n_shots"]), seeds=cfg["reproduce"].get("transfer_seeds"))
        elif protocol == "domain_generalization":
            run_transfer(cfg, SLUG, SLUG, "domain_generalization", fit, evaluate, cfg["dg_source"],
                         cfg["dg_targets"], variant=variant(cfg), shots=int(cfg["b2n_shots"]),
                         seeds=cfg["reproduce"].get("transfer_seeds"))
        else:
            raise ValueError(f"reproduce.protocols: unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def cost(cfg: dict) -> list[dict]:
    """time (and CUDA memory) of one training step, CoOp vs CoCoOp, at cost_batch_sizes x cost_classes"""
    bundle = bundle_for(cfg)
    with torch_threads(cfg.get("threads")):
        rows = step_cost(bundle, int(cfg["cost_classes"]), cfg["cost_batch_sizes"])
    out = runs_root() / SLUG / "cost" / f"{cfg['profile']}-{cfg['arch']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    for r in rows:
        print("  ".join(f"{k} {v}" for k, v in r.items()))
    print(f"written to {out}")
    return rows


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": eval_, "reproduce": reproduce, "cost": cost,
                                  "convergence": convergence_cmd},
                   "CoCoOp (Zhou et al., CVPR 2022): CoOp's context plus an image-conditional token from a "
                   "Meta-Net, trained in real batches on cached image features.", argv)


if __name__ == "__main__":
    main()
