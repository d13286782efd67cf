"""MVLPT: `python -m papers.mvlpt {train,eval,reproduce}`.

train      stage 1 + 2 for the configured `families`: a multitask source prompt per family on `sources`
           (`source.shots` shots, seed `source.seed`), then few-shot target adaptation on every `targets` dataset x
           shots x seeds initialised from it (records: mcoop / mvpt / mupt), plus the from-scratch runs of the
           families in `reproduce.scratch` (records: coop / vpt_shallow / upt)
eval       evaluates the kept source prompts on each source test split (own classes) and prints the table
reproduce  the same as train (the paper's single-task target adaptation protocol the profile supports)

The families are imported: CoOp (papers/coop, its config for the profile at `coop.variant`), VPT-shallow and UPT
(papers/upt, its config for the profile). A family trains its target runs exactly as its single-task runs; only
the initialisation differs. The from-scratch VPT and UPT runs on the same targets, shots and seeds are papers/upt's
few-shot records (the same learner, config and seeds), so `reproduce.scratch` holds only CoOp by default.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from common.cli import inputs, run_cli
from common.config import load_config
from common.data import build_dataset, fewshot_split
from common.engine import convergence
from common.engine.runs import kept
from common.engine.protocols import (BatchedFit, Task, _finish, _record, bundle_for, checkpoint_dir, record_exists,
                                     run_fewshot)
from common.errors import ConfigError
from papers.coop import __main__ as coop_main
from papers.coop.method import variant_name as coop_variant
from papers.upt import __main__ as upt_main

from .method import FAMILIES, LABEL_SPACES, METHODS, build_family, evaluate_task, evaluate_union, fit_targets, train_source

SLUG = "mvlpt"
CONFIG = Path(__file__).with_name("config.yaml")
PROTOCOL = "fewshot"


def family_config(cfg: dict, family: str) -> dict:
    """The family's own config for this profile (papers/coop's at `coop.variant`, papers/upt's for vpt / upt), on this
    paper's backbone, data and grid."""
    if family == "coop":
        out = coop_main.with_variant(load_config(coop_main.CONFIG, cfg["profile"]), cfg["coop"]["variant"])
    else:
        base = load_config(upt_main.CONFIG, cfg["profile"])
        out = upt_main.method_config(base, "upt" if family == "upt" else "vpt_shallow")
    for key in upt_main.SHARED:
        if key in cfg:
            out[key] = copy.deepcopy(cfg[key])
    out["label_space"] = cfg["label_space"]
    if cfg.get("epochs"):
        out["epochs"] = int(cfg["epochs"])      # a fixed epoch count for both stages (tests, quick runs)
    return out


def variant_of(family: str, fcfg: dict) -> str:
    return coop_variant(fcfg) if family == "coop" else upt_main.variant_of(fcfg)


def source_tasks(cfg: dict, bundle, task_cfg: dict | None = None) -> list[Task]:
    """The source tasks (`source.shots` shots, seed `source.seed`), with the family's config `task_cfg`."""
    shots, seed = int(cfg["source"]["shots"]), int(cfg["source"]["seed"])
    return [Task(task_cfg or cfg, bundle, fewshot_split(build_dataset(n, cfg["data_root"]), shots, seed), shots, seed, None)
            for n in cfg["sources"]]


def source_budget(cfg: dict, family: str) -> dict:
    """The family's source-stage budget from `source.budget.<family>` ({epochs, lr}), {} for its own schedule."""
    return dict(((cfg["source"].get("budget") or {}).get(family)) or {})


def source_config(cfg: dict, family: str, fcfg: dict) -> dict:
    """The family's config for its source stage: its own, or with the epochs and lr of `source.budget.<family>`."""
    b = source_budget(cfg, family)
    if not b:
        return fcfg
    out = copy.deepcopy(fcfg)
    out["epochs"] = int(b["epochs"])
    out["train"] = {**(out.get("train") or {}), "lr": float(b["lr"])}
    return out


def source_folder(cfg: dict, family: str, fcfg: dict) -> Path:
    """Where the family's source prompt is kept; the folder names a `source.budget`, so another budget never loads it."""
    b = source_budget(cfg, family)
    budget = f"-e{int(b['epochs'])}-lr{float(b['lr']):g}" if b else ""
    return checkpoint_dir(cfg, SLUG, "source", "+".join(cfg["sources"]), METHODS[family][1], int(cfg["source"]["shots"]),
                          int(cfg["source"]["seed"]), variant_of(family, fcfg) + budget)


def source_prompt(cfg: dict, family: str, fcfg: dict, tasks: list[Task]):
    """The family's multitask source prompt: trained (and kept as `source_prompt.pt`), or loaded when kept."""
    folder = source_folder(cfg, family, fcfg)
    path = folder / "source_prompt.pt"
    if path.is_file() and not cfg.get("force"):
        from .method import MultiTask
        mt = MultiTask.of([t.dataset for t in tasks])
        learner = build_family(family, tasks[0].bundle, mt.classnames, fcfg, mt.templates, mt.sizes)
        learner.load_state_dict(torch.load(path, map_location="cpu"), strict=False)
        return learner, mt
    learner, mt = train_source(family, tasks, source_config(cfg, family, fcfg), out_dir=folder,
                               seed=int(cfg["source"]["seed"]),
                               desc=f"{METHODS[family][1]} source {'+'.join(cfg['sources'])}")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({n: p.detach().clone() for n, p in learner.named_parameters() if p.requires_grad}, path)
    (folder / "checkpoint.pt").unlink(missing_ok=True)
    return learner, mt


def source_records(cfg: dict, family: str, fcfg: dict, learner, mt, tasks: list[Task], wall: float) -> list[dict]:
    """The source prompt on each source task's test split, scored on that task's own classes (`<m>_source`)."""
    out = []
    method = METHODS[family][1] + "_source"
    variant = variant_of(family, fcfg)
    for task, values in zip(tasks, evaluate_union(family, learner, mt, tasks, label_space="task")):
        rec = _record(fcfg, SLUG, method, variant, PROTOCOL, task.dataset.name, task.dataset.name, task.shots,
                      task.seed, values, wall, task.dataset.num_classes, task.dataset,
                      {"sources": list(cfg["sources"])})
        out.append(_finish(rec, None))
    return out


def pending(cfg: dict, fcfg: dict, method: str, variant: str) -> bool:
    plan = cfg["reproduce"]
    shots, seeds = plan.get("shots") or cfg["shots"], plan.get("seeds") or cfg["seeds"]
    return not all(record_exists(fcfg, SLUG, PROTOCOL, d, method, k, s, variant)
                   for d in cfg["targets"] for k in shots for s in seeds)


def run(cfg: dict) -> list[dict]:
    plan = cfg["reproduce"]
    grid = {"shots": plan.get("shots"), "seeds": plan.get("seeds"), "datasets": list(cfg["targets"])}
    configs = {f: family_config(cfg, f) for f in cfg["families"]}
    check_model(cfg, configs)
    bundle = bundle_for(cfg)
    out = []
    for family in cfg["families"]:
        fcfg = configs[family]
        variant = variant_of(family, fcfg)
        scratch, multi = METHODS[family]
        if family in (plan.get("scratch") or []):
            out += run_fewshot(fcfg, SLUG, scratch, BatchedFit(fit_targets(family, None, fcfg),
                                                               lambda l, t, f=family: evaluate_task(f, l, t)),
                               variant=variant, **grid)
        source_pending = any(not record_exists(fcfg, SLUG, PROTOCOL, n, multi + "_source", int(cfg["source"]["shots"]),
                                               int(cfg["source"]["seed"]), variant) for n in cfg["sources"])
        if not (pending(cfg, fcfg, multi, variant) or source_pending):
            continue
        tasks = source_tasks(cfg, bundle, fcfg)
        t0 = time.time()
        learner, mt = source_prompt(cfg, family, fcfg, tasks)
        if source_pending:
            out += source_records(cfg, family, fcfg, learner, mt, tasks, time.time() - t0)
        learner.train()
        out += run_fewshot(fcfg, SLUG, multi, BatchedFit(fit_targets(family, learner, fcfg),
                                                         lambda l, t, f=family: evaluate_task(f, l, t)),
                           variant=variant, tags={"init": "multitask", "sources": list(cfg["sources"])}, **grid)
    return out


def check_model(cfg: dict, configs: dict) -> None:
    bundle = bundle_for(cfg)
    for family, fcfg in configs.items():
        try:
            build_family(family, bundle, ["a"], fcfg)
        except ValueError as err:
            raise ConfigError(f"family {family}: {err}") from None


def _datasets(cfg: dict) -> list[str]:
    return list(cfg["sources"]) + list(cfg["targets"])


@inputs(datasets=_datasets)
def train(cfg: dict) -> list[dict]:
    """multitask source prompts on `sources`, then few-shot target adaptation on `targets` (and scratch baselines)"""
    return run(cfg)


@inputs(datasets=_datasets)
def reproduce(cfg: dict) -> None:
    """the paper's single-task target adaptation from multitask source prompts, beside single-task prompts from
    scratch (CoOp here; VPT and UPT from papers/upt's records on the same grid)"""
    run(cfg)


@inputs(datasets=lambda cfg: list(cfg["sources"]))
def eval_(cfg: dict) -> list[dict]:
    """evaluate the kept source prompts on each source test split (each task on its own classes)"""
    bundle, rows = bundle_for(cfg), []
    for family in cfg["families"]:
        fcfg = family_config(cfg, family)
        tasks = source_tasks(cfg, bundle, fcfg)
        kept(source_folder(cfg, family, fcfg) / "source_prompt.pt", SLUG, "source prompt")
        learner, mt = source_prompt({**cfg, "force": False}, family, fcfg, tasks)
        for task, values in zip(tasks, evaluate_union(family, learner, mt, tasks)):
            print(f"{METHODS[family][1]:>6s} source prompt on {task.dataset.name:<16s} top1 {values['top1']:6.2f}")
            rows.append({"family": family, "dataset": task.dataset.name, **values})
    return rows


# MVLPT's source-stage recipe: configs/trainers/MVLPT/vit_b16.yaml (SGD lr 0.002, 200 epochs)
OFFICIAL_SOURCE = {"epochs": 200, "lr": 0.002}


@inputs(datasets=lambda cfg: list(cfg["sources"]))
def convergence_cmd(cfg: dict) -> dict:
    """convergence study of the multitask source stage of the text family (MCoOp: `source.shots` shots, seed
    `source.seed`, every source in one joint run, scored by the mean of the source tasks' val top-1, each on its
    own classes): lr = official x {1, 3, 10} at the official 200 epochs, then budgets -> papers/mvlpt/convergence.json"""
    family = "coop"
    fcfg, bundle = family_config(cfg, family), bundle_for(cfg)
    group = "+".join(cfg["sources"])
    shots, seed = int(cfg["source"]["shots"]), int(cfg["source"]["seed"])

    def make_task(name, data, k, s):
        return SimpleNamespace(extra={}, seed=s, tasks=source_tasks(cfg, bundle, fcfg))

    def source_val(learner, mt, tasks) -> float:
        was = learner.training
        learner.eval()
        vals = evaluate_union(family, learner, mt, tasks, split="val")
        learner.train(was)
        return sum(v["top1"] for v in vals) / len(vals)

    def fit(run):
        run.tasks[0].extra = run.extra            # the study's schedule (and curve flag) reach train_source
        learner, mt = train_source(family, run.tasks, fcfg, seed=seed, desc=f"mcoop source study {group}",
                                   val_score=lambda l, m: source_val(l, m, run.tasks))
        return SimpleNamespace(pair=(learner, mt), train_history=learner.train_history, val_history=learner.val_history)

    return convergence.study(cfg, SLUG, "mcoop_source", coop_variant(fcfg), convergence.one_by_one(fit),
                             lambda state, run: source_val(*state.pair, run.tasks), OFFICIAL_SOURCE["epochs"],
                             OFFICIAL_SOURCE["lr"], [group], shots=shots, seed=seed, make_task=make_task,
                             load=lambda name: None, lr_factors=(1, 3, 10),
                             note=f"the text family's multitask source stage (MCoOp, {coop_variant(fcfg)}) on "
                                  f"{', '.join(cfg['sources'])} jointly; the score is the mean of the source tasks' "
                                  f"validation top-1, each on its own classes")


def validate(cfg: dict) -> list[str]:
    problems = []
    fams = cfg.get("families") or []
    for f in fams:
        if f not in FAMILIES:
            problems.append(f"families: unknown family {f!r}; expected some of {FAMILIES}")
    for f in (cfg.get("reproduce") or {}).get("scratch") or []:
        if f not in FAMILIES:
            problems.append(f"reproduce.scratch: unknown family {f!r}; expected some of {FAMILIES}")
    if cfg.get("label_space") not in LABEL_SPACES:
        problems.append(f"label_space must be one of {LABEL_SPACES}, got {cfg.get('label_space')!r}")
    sources, targets = cfg.get("sources") or [], cfg.get("targets") or []
    if not sources or not targets:
        problems.append("sources and targets must each name at least one dataset")
    overlap = sorted(set(sources) & set(targets))
    if overlap:
        problems.append(f"sources and targets overlap on {overlap}: a target must be unseen by the source prompt")
    e = cfg.get("epochs")
    if e is not None and (not isinstance(e, int) or isinstance(e, bool) or e < 1):
        problems.append(f"epochs must be an integer >= 1 (or null for each family's own schedule), got {e!r}")
    src = cfg.get("source") or {}
    for key in ("shots", "seed"):
        v = src.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"source.{key} must be an integer >= 1, got {v!r}")
    for fam, b in (src.get("budget") or {}).items():
        if fam not in FAMILIES:
            problems.append(f"source.budget: unknown family {fam!r}; expected some of {FAMILIES}")
        elif b and set(b) != {"epochs", "lr"}:
            problems.append(f"source.budget.{fam} must set epochs and lr (or be null for the family's own), got {b!r}")
    try:
        coop_main.with_variant(load_config(coop_main.CONFIG, cfg["profile"]), (cfg.get("coop") or {}).get("variant"))
    except ValueError as err:
        problems.append(f"coop.variant: {err}")
    return problems


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": eval_, "reproduce": reproduce, "convergence": convergence_cmd},
                   "MVLPT (Shen et al., WACV 2024): prompts (CoOp text, VPT visual, UPT unified) trained jointly on "
                   "several source datasets initialise few-shot prompt tuning on unseen target datasets.", argv,
                   validate=validate)


if __name__ == "__main__":
    main()
