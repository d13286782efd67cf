"""SoftCPT: `python -m papers.softcpt {train,eval,reproduce,convergence}`.

train        joint multi-task few-shot training of one variant (`--set variant=<name>`, default nata) over every
             dataset of `datasets` as one task set, for every shot count x seed; one run record per (dataset, shots,
             seed), each task scored only against its own classes; keeps each run's learner (`prompt.pt`)
eval         re-evaluates the kept learners of `train` on their tasks' test splits, beside the stored records
reproduce    every variant of `reproduce.variants` (soft sharing NATA and NATS, hard sharing CoOp-MT) on the
             few-shot grid; CoOp trained per task (the paper's CoOp-CA) comes from papers/coop's records
convergence  the learning rate (official x 1/3/10/30) and the epoch budget of NATA at 16 shots, seed 1, on the whole
             task set -> papers/softcpt/convergence.json

Methods in the run records: `softcpt` (variants nata, nats, cata, csta, cats, csts) and `coop_mt` (hard sharing,
variant m16_end_mt). The paper's other baseline, CoOp per task (CoOp-CA), is papers/coop's `coop` / `m16_end`.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from common.atomic import write_text_atomic
from common.cli import inputs, run_cli
from common.config import load_config
from common.data import build_dataset, fewshot_split
from common.engine import convergence
from common.engine.cells import owns
from common.engine.protocols import Task, _record, bundle_for, checkpoint_dir, group_dir, record_exists
from common.engine.runs import beside_record, kept, print_record, write_record
from common.engine.train import take_resumed_seconds
from common.errors import ConfigError

from .method import (SHARINGS, JointRun, evaluate_run, load_learner, parameter_count, save_learner,
                     task_weights, train_joint_many, variant_name)

SLUG = "softcpt"
CONFIG = Path(__file__).with_name("config.yaml")
PROMPT_FILE = "prompt.pt"
GROUP = "multitask"     # checkpoint folder name of a joint run (it trains on every dataset at once)


def with_variant(cfg: dict, name: str | None) -> dict:
    out = copy.deepcopy(cfg)
    if name:
        variants = cfg.get("variants") or {}
        if name not in variants:
            raise ConfigError(f"unknown SoftCPT variant {name!r}; config.yaml variants: {sorted(variants)}")
        out.update(copy.deepcopy(variants[name]))
    return out


def method_of(cfg: dict) -> tuple[str, str]:
    """(record method, record variant): hard sharing is the paper's CoOp-MT baseline, recorded as its own method."""
    v = variant_name(cfg)
    return ("coop_mt", f"m{cfg['n_ctx']}_end_mt") if v == "coop_mt" else (SLUG, v)


def task_names(cfg: dict, datasets) -> dict[str, str]:
    """Task name string of each dataset: `task_names[name]`, else the dataset name read as words."""
    given = cfg.get("task_names") or {}
    return {d: given.get(d) or d.removeprefix("emb_").replace("_", " ") for d in datasets}


def joint_runs(cfg: dict, cells, datasets=None) -> list[JointRun]:
    bundle = bundle_for(cfg)
    datasets = datasets or cfg["datasets"]
    full = {n: build_dataset(n, cfg["data_root"]) for n in datasets}
    return [JointRun([Task(cfg, bundle, fewshot_split(full[n], k, s), k, s, None) for n in datasets]) for k, s in cells]


def fewshot(cfg: dict) -> list[dict]:
    """Joint few-shot runs of one variant on every pending (shots, seed); one record per task."""
    method, variant = method_of(cfg)
    datasets = list(cfg["datasets"])
    cfg = {**cfg, "task_names": task_names(cfg, datasets)}
    cells = [(k, s) for k in cfg["shots"] for s in cfg["seeds"] if owns(datasets[0], k, s)
             and not all([record_exists(cfg, SLUG, "fewshot", d, method, k, s, variant) for d in datasets])]
    if not cells:
        return []
    t0, _ = time.time(), take_resumed_seconds()
    runs = joint_runs(cfg, cells, datasets)
    group = group_dir(cfg, SLUG, "fewshot", GROUP, method, variant, cells)
    learner = train_joint_many(runs, cfg, out_dir=group, desc=f"softcpt {variant} x{len(runs)} joint runs")
    weights = task_weights(learner, int(cfg["eval_chunk"]))
    wall = (time.time() - t0 + take_resumed_seconds()) / len(runs)
    out = []
    for r, run in enumerate(runs):
        ckpt = checkpoint_dir(cfg, SLUG, "fewshot", GROUP, method, run.shots, run.seed, variant)
        ckpt.mkdir(parents=True, exist_ok=True)
        save_learner(learner, r, ckpt / PROMPT_FILE)
        for task, values in zip(run.tasks, evaluate_run(learner, run, r, weights=weights)):
            name = task.dataset.name
            rec = _record(cfg, SLUG, method, variant, "fewshot", name, name, run.shots, run.seed, values, wall,
                          len(task.dataset.classnames), task.dataset,
                          {"multitask": {"tasks": datasets, "task_name": cfg["task_names"][name],
                                         "trainable_params": parameter_count(learner)}})
            write_record(rec)
            print_record(rec)
            out.append(rec)
    (group / "checkpoint.pt").unlink(missing_ok=True)
    return out


def train(cfg: dict) -> list[dict]:
    """joint multi-task training of one variant (--set variant=NAME, default nata) for every shots x seed

    Every dataset of `datasets` is one task of the joint set; one run record per task."""
    return fewshot(with_variant(cfg, cfg.get("variant") or "nata"))


@inputs("datasets")
def eval_(cfg: dict) -> list[dict]:
    """re-evaluate the learners kept by `train` on their tasks' test splits (printed beside the records)"""
    cfg = with_variant(cfg, cfg.get("variant") or "nata")
    method, variant = method_of(cfg)
    bundle, out = bundle_for(cfg), []
    datasets = list(cfg["datasets"])
    for k in cfg["shots"]:
        for seed in cfg["seeds"]:
            path = kept(checkpoint_dir(cfg, SLUG, "fewshot", GROUP, method, k, seed, variant) / PROMPT_FILE, SLUG, "learner")
            learner = load_learner(path, bundle)
            (run,) = joint_runs(cfg, [(k, seed)], datasets)
            for task, values in zip(run.tasks, evaluate_run(learner, run, 0)):
                note = beside_record("top1", paper=SLUG, protocol="fewshot", dataset=task.dataset.name, shots=k,
                                     seed=seed, variant=variant, method=method, backbone=cfg["arch"],
                                     profile=cfg["profile"])
                print(f"{task.dataset.name:>16s} k={k:<2d} seed={seed} top1 {values['top1']:6.2f}{note}")
                out.append({"dataset": task.dataset.name, "shots": k, "seed": seed, **values})
    return out


def reproduce(cfg: dict) -> None:
    """every variant of reproduce.variants (NATA, NATS, hard-sharing CoOp-MT) on the few-shot grid"""
    plan = cfg["reproduce"]
    for name in plan["variants"]:
        fewshot(with_variant(cfg, name))
    for name in plan.get("ablation", {}).get("variants") or []:
        grid = {k: v for k, v in plan["ablation"].items() if k in ("shots", "seeds") and v}
        fewshot({**with_variant(cfg, name), **grid})


def validate(cfg: dict) -> list[str]:
    """SoftCPT's own options, checked before any work."""
    problems = []
    try:
        vcfg = with_variant(cfg, cfg.get("variant") or "nata")
        for name in (cfg.get("reproduce") or {}).get("variants") or []:
            with_variant(cfg, name)
    except ConfigError as err:
        return [str(err)]
    if vcfg["sharing"] not in SHARINGS:
        problems.append(f"sharing must be one of {SHARINGS}, got {vcfg['sharing']!r}")
    if vcfg["meta_net"] != "lin":
        problems.append(f"meta_net must be lin (the paper's linear meta net), got {vcfg['meta_net']!r}")
    for key in ("n_ctx", "task_n_ctx", "batch_size", "epochs"):
        if not isinstance(vcfg[key], int) or vcfg[key] < 1:
            problems.append(f"{key} must be an integer >= 1, got {vcfg[key]!r}")
    if not isinstance(vcfg["class_n_ctx"], int) or vcfg["class_n_ctx"] < 0:
        problems.append(f"class_n_ctx must be an integer >= 0, got {vcfg['class_n_ctx']!r}")
    names = cfg.get("task_names")
    if not isinstance(names, dict) or not all(isinstance(v, str) and v.strip() for v in names.values()):
        problems.append("task_names must map dataset -> a non-empty task name string")
    elif len(set(task_names(cfg, cfg["datasets"]).values())) != len(cfg["datasets"]):
        problems.append(f"task names of {cfg['datasets']} must differ (the meta net's only input): "
                        f"{task_names(cfg, cfg['datasets'])}")
    if len(cfg["datasets"]) < 1:
        problems.append("datasets must name at least one task")
    return problems


def convergence_cmd(cfg: dict) -> dict:
    """convergence study of NATA (16 shots, seed 1, all tasks jointly) -> papers/softcpt/convergence.json

    The learning rate (official x 1/3/10/30) at the official 50 epochs, chosen on the tasks' mean validation accuracy,
    then budgets (fractions of 50 epochs) at that rate."""
    vcfg = with_variant(cfg, "nata")
    real = load_config(CONFIG, "real")
    datasets = list(vcfg["datasets"])
    vcfg["task_names"] = task_names(vcfg, datasets)
    official_epochs, official_lr = int(real["epochs"]), float(real["train"]["lr"])
    shots, seed, factors = 16, 1, (1, 3, 10, 30)
    bundle = bundle_for(vcfg)
    record = {"paper": SLUG, "method": SLUG, "variant": variant_name(vcfg), "backbone": vcfg["arch"],
              "checkpoint": bundle.checkpoint_id, "profile": vcfg["profile"], "shots": shots, "seed": seed,
              "official_epochs": official_epochs, "official_lr": official_lr,
              "budgets": convergence.budgets(official_epochs), "lr_factors": list(factors),
              "tolerance": convergence.TOLERANCE, "datasets": {},
              "note": "one joint run over every task (the method trains them together); the validation score of a "
                      "dataset is its task's accuracy in that joint run, the loss the joint loss"}

    def train_schedules(schedules, curve_of=None):
        runs = joint_runs(vcfg, [(shots, seed)] * len(schedules), datasets)
        for run, sched in zip(runs, schedules):
            run.tasks[0].extra["schedule"] = dict(sched)
        eval_fn = every = None
        if curve_of is not None:
            def eval_fn(learner):
                w = task_weights(learner, runs=[curve_of])
                return torch.tensor([sum(m["top1"] for m in evaluate_run(learner, runs[r], r, split="val", weights=w))
                                     / len(datasets) if r == curve_of else 0.0 for r in range(len(runs))])
            n_train = sum(len(t.dataset.train) for t in runs[0].tasks)
            steps = max(sched["epochs"] for sched in schedules) * max(1, n_train // int(vcfg["batch_size"]))
            every = convergence.eval_every(steps)
        learner = train_joint_many(runs, vcfg, eval_fn=eval_fn, eval_every=every or 0,
                                   desc=f"softcpt convergence x{len(runs)}")
        w = task_weights(learner)
        rows = []
        for r, (run, sched) in enumerate(zip(runs, schedules)):
            hist = learner.train_history[r]
            vals = {t.dataset.name: m["top1"] for t, m in zip(run.tasks, evaluate_run(learner, run, r, "val", w))}
            rows.append({**sched, "val": vals, "loss": round(float(hist[-1]["loss"]), 5), "steps": int(hist[-1]["step"]),
                         "loss_curve": [{"step": int(h["step"]), "loss": round(float(h["loss"]), 5)} for h in hist],
                         "val_curve": [{"step": int(e["step"]), "val": round(float(e["val"]), 3)}
                                       for e in learner.val_history[r]]})
        return rows

    lr_rows = train_schedules([{"epochs": official_epochs, "lr": official_lr * f} for f in factors])
    mean = lambda vals: round(sum(vals.values()) / len(vals), 3)
    record["mean_val_by_lr"] = {str(f): mean(row["val"]) for f, row in zip(factors, lr_rows)}
    factor = convergence.chosen_factor(record["mean_val_by_lr"])
    record["lr_factor"], record["lr"] = factor, official_lr * factor
    epochs = record["budgets"]
    rows = train_schedules([{"epochs": e, "lr": record["lr"]} for e in epochs], curve_of=len(epochs) - 1)
    for name in datasets:
        record["datasets"][name] = {
            "lr_grid": [{"epochs": r["epochs"], "lr": r["lr"], "val": round(r["val"][name], 3), "loss": r["loss"],
                         "steps": r["steps"]} for r in lr_rows],
            "final": {str(r["epochs"]): {"val": round(r["val"][name], 3), "loss": r["loss"], "steps": r["steps"]}
                      for r in rows},
            "val_curve": rows[-1]["val_curve"], "loss_curve": rows[-1]["loss_curve"]}
    record["mean_val"] = {str(r["epochs"]): mean(r["val"]) for r in rows}
    record["justified_epochs"] = convergence.justified(record)
    path = Path("papers") / SLUG / convergence.RECORD
    write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"[{SLUG}] convergence: mean val by lr factor {record['mean_val_by_lr']} -> x{factor:g}; by budget (epochs) "
          f"{record['mean_val']} -> {record['justified_epochs']} of the official {official_epochs} ({path})")
    return record


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": eval_, "reproduce": reproduce,
                                  "convergence": convergence_cmd},
                   "SoftCPT (Ding et al.): multi-task prompt tuning, each task's context generated from its name by a "
                   "task-shared meta network, trained jointly on cached image features.", argv, validate=validate)


if __name__ == "__main__":
    main()
