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

import torch

from common.cli import inputs, run_cli
from common.config import load_config
from common.data import build_dataset, fewshot_split
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


def source_prompt(cfg: dict, family: str, fcfg: dict, tasks: list[Task]):
    """The family's multitask source prompt: trained (and kept as `source_prompt.pt`), or loaded when kept."""
    folder = checkpoint_dir(cfg, SLUG, "source", "+".join(cfg["sources"]), METHODS[family][1], int(cfg["source"]["shots"]),
                            int(cfg["source"]["seed"]), variant_of(family, fcfg))
    path = folder / "source_prompt.pt"
    if path.is_file() and not cfg.get("force"):
        from .method import MultiTask
        mt = MultiTask.of([t.dataset for t in tasks])
        learner = build_family(family, tasks[0].bundle, mt.classnames, fcfg, mt.templates, mt.sizes)
        learner.load_state_dict(torch.load(path, map_location="cpu"), strict=False)
        return learner, mt
    learner, mt = train_source(family, tasks, fcfg, out_dir=folder, seed=int(cfg["source"]["seed"]),
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
        folder = checkpoint_dir(cfg, SLUG, "source", "+".join(cfg["sources"]), METHODS[family][1],
                                int(cfg["source"]["shots"]), int(cfg["source"]["seed"]), variant_of(family, fcfg))
        if not (folder / "source_prompt.pt").is_file():
            raise FileNotFoundError(f"no source prompt at {folder / 'source_prompt.pt'}: run `python -m papers.mvlpt "
                                    f"train` with the same options first")
        learner, mt = source_prompt({**cfg, "force": False}, family, fcfg, tasks)
        for task, values in zip(tasks, evaluate_union(family, learner, mt, tasks)):
            print(f"{METHODS[family][1]:>6s} source prompt on {task.dataset.name:<16s} top1 {values['top1']:6.2f}")
            rows.append({"family": family, "dataset": task.dataset.name, **values})
    return rows


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
    try:
        coop_main.with_variant(load_config(coop_main.CONFIG, cfg["profile"]), (cfg.get("coop") or {}).get("variant"))
    except ValueError as err:
        problems.append(f"coop.variant: {err}")
    return problems


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": eval_, "reproduce": reproduce},
                   "MVLPT (Shen et al., WACV 2024): prompts (CoOp text, VPT visual, UPT unified) trained jointly on "
                   "several source datasets initialise few-shot prompt tuning on unseen target datasets.", argv,
                   validate=validate)


if __name__ == "__main__":
    main()
