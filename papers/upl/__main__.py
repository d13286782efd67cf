"""UPL: `python -m papers.upl {train,eval,reproduce,convergence}`.

Protocol `unsupervised` (no labelled target image; records with shots null, metric top1 on the test split):
per dataset, zero-shot CLIP pseudo-labels the unlabelled training pool, the K most confident images of each
predicted class are kept, and CoOp prompts are trained on them. Variants (record `variant`):

  ens     UPL: N prompts (seeds) trained on the pseudo-labels of `arch`, their logits averaged at test
  single  one prompt (the first of `ens`'s N): the fairness baseline of the official issue #4
  star    UPL*: N prompts on pseudo-labels from the logits of every model of `pseudo_models` averaged
  ens_ctxv1  ablation: `ens` with the context initialised from "a photo of a" (M = 4) instead of random

A run's N prompts, for every seed and variant of a dataset, train together as one batched model
(papers.coop.method.train_coop_many). Zero-shot CLIP and few-shot CoOp come from their own folders' runs.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from common.cli import inputs, run_cli
from common.config import load_config
from common.data import build_dataset
from common.engine import convergence
from common.engine.protocols import (Task, backbone_configs, backbone_problems, bundle_for, checkpoint_dir,
                                     eval_classifier, group_dir, record_exists)
from common.engine.runs import load_records, print_record, write_record
from common.engine.threads import torch_threads
from common.errors import ConfigError, DataError
from papers.coop.method import class_weights, evaluate, load_learner, option, save_learner, train_coop_many

from .method import (RANK_BY, ensemble_weights, member_seeds, pseudo_label, pseudo_label_quality)

SLUG = "upl"
CONFIG = Path(__file__).with_name("config.yaml")
PROTOCOL = "unsupervised"
VARIANTS = ("ens", "single", "star", "ens_ctxv1")
CTXV1 = "a photo of a"


# ------------------------------------------------------------------------------------------- options
def validate(cfg: dict) -> list[str]:
    """UPL's own options, checked by the CLI before any work."""
    out = []
    bad = [v for v in cfg.get("variants") or [] if v not in VARIANTS]
    if bad or not cfg.get("variants"):
        out.append(f"variants must be a non-empty list drawn from {', '.join(VARIANTS)}, got {cfg.get('variants')!r}")
    n = cfg.get("n_prompts")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        out.append(f"n_prompts must be a whole number >= 1 (prompts per ensemble; the paper trains 16), got {n!r}")
    k = cfg.get("per_class")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        out.append(f"per_class must be a whole number >= 1 (pseudo-labels kept per class; the paper keeps 16), got {k!r}")
    if cfg.get("rank_by") not in RANK_BY:
        out.append(f"rank_by must be one of {', '.join(RANK_BY)} (logit: the official code), got {cfg.get('rank_by')!r}")
    if "star" in (cfg.get("variants") or []):
        models = cfg.get("pseudo_models")
        if not isinstance(models, list) or len(models) < 2:
            out.append(f"pseudo_models must list at least two 'arch=checkpoint' models for UPL* (variant star), got "
                       f"{models!r}; e.g. --set pseudo_models=[tiny-rn=data/embedded/checkpoints/tiny-rn.pt,"
                       f"tiny-vit=data/embedded/checkpoints/tiny-vit.pt], or drop star from variants")
    bad_seeds = [s for s in cfg.get("seeds") or [] if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad_seeds:
        out.append(f"seeds must be whole numbers >= 1 (a run's prompts train with seeds N*(seed-1)+1..N*seed), "
                   f"got {bad_seeds[0]!r}")
    return out


def check_pseudo_models(cfg: dict) -> None:
    """The UPL* models' weights exist (checked before any work of a command that uses them)."""
    if "star" in cfg["variants"]:
        problems = backbone_problems({"backbones": cfg["pseudo_models"], "pretrained": cfg["pretrained"]})
        if problems:
            raise DataError("pseudo_models: " + "; ".join(problems))


def pseudo_bundles(cfg: dict, variant: str) -> list:
    """The CLIP model(s) whose zero-shot logits make the pseudo-labels of `variant`."""
    if variant == "star":
        return [bundle_for(c) for c in backbone_configs({**cfg, "backbones": cfg["pseudo_models"]})]
    return [bundle_for(cfg)]


def source_of(variant: str) -> str:
    return "multi" if variant == "star" else "main"


def recipe_of(variant: str) -> tuple[str, str]:
    """(label source, context init) of a variant's prompts: variants with the same recipe share prompts."""
    return source_of(variant), "ctxv1" if variant == "ens_ctxv1" else "cfg"


def recipe_cfg(cfg: dict, recipe: tuple[str, str]) -> dict:
    return {**cfg, "ctx_init": CTXV1} if recipe[1] == "ctxv1" else cfg


def prompts_of(cfg: dict, variant: str) -> int:
    return 1 if variant == "single" else int(cfg["n_prompts"])


# ------------------------------------------------------------------------------------------- protocol
def run_unsupervised(cfg: dict, datasets: list[str] | None = None, variants: list[str] | None = None,
                     seeds: list[int] | None = None) -> list[dict]:
    """Every (dataset, variant, seed) without a record: pseudo-label once per dataset and label source, train
    every prompt the runs need in one batched model, evaluate each run's ensemble on the test split."""
    check_pseudo_models(cfg)
    datasets, variants, seeds = datasets or cfg["datasets"], variants or cfg["variants"], seeds or cfg["seeds"]
    bundle = bundle_for(cfg)
    k, n_max = int(cfg["per_class"]), int(cfg["n_prompts"])
    out = []
    for name in datasets:
        todo = [(v, s) for v in variants for s in seeds
                if not record_exists(cfg, SLUG, PROTOCOL, name, SLUG, None, s, v)]
        if not todo:
            continue
        t0 = time.time()
        full = build_dataset(name, cfg["data_root"])
        labels = {}
        for src in dict.fromkeys(source_of(v) for v, _ in todo):
            variant = "star" if src == "multi" else "ens"
            with torch_threads(option(cfg, "threads")):
                labels[src] = pseudo_label(pseudo_bundles(cfg, variant), full, k, cfg["rank_by"])
        # the prompts to train: (recipe, member seed); `single` is the first prompt of `ens`. Prompts of the same
        # context init (every seed and label source) train together as one batched model.
        need: dict[tuple, None] = {}
        for v, s in todo:
            for m in member_seeds(s, n_max)[:prompts_of(cfg, v)]:
                need[(recipe_of(v), m)] = None
        learners = {}
        for init in dict.fromkeys(r[1] for r, _ in need):
            keys = [(r, m) for r, m in need if r[1] == init]
            rcfg = recipe_cfg(cfg, keys[0][0])
            tasks = [Task(rcfg, bundle, labels[r[0]].dataset, k, m, None) for r, m in keys]
            cells = sorted({(0 if r[0] == "main" else 1, m) for r, m in keys})
            gdir = group_dir(cfg, SLUG, PROTOCOL, name, SLUG, init, cells)
            trained = train_coop_many(tasks, rcfg, out_dir=gdir, desc=f"upl {init} x{len(tasks)} {name}")
            (gdir / "checkpoint.pt").unlink(missing_ok=True)
            learners.update(dict(zip(keys, trained)))
        wall = (time.time() - t0) / len(todo)
        test_task = Task(cfg, bundle, full, None, 0, None)
        chunk = int(option(cfg, "eval_chunk"))
        for v, s in todo:
            members = [learners[(recipe_of(v), m)] for m in member_seeds(s, n_max)[:prompts_of(cfg, v)]]
            ckpt = checkpoint_dir(cfg, SLUG, PROTOCOL, name, SLUG, None, s, v)
            ckpt.mkdir(parents=True, exist_ok=True)
            for i, learner in enumerate(members):
                save_learner(learner, ckpt / f"prompt_{i}.pt")
            with torch_threads(option(cfg, "threads")):
                weights = ensemble_weights([class_weights(l, full.classnames, chunk).cpu() for l in members])
            values = eval_classifier(test_task, weights)
            pl = labels[source_of(v)]
            rec = {"paper": SLUG, "method": SLUG, "variant": v, "profile": cfg["profile"], "protocol": PROTOCOL,
                   "dataset": name, "source": name, "backbone": cfg["arch"], "shots": None, "seed": s,
                   "n_classes": full.num_classes, "n_prompts": len(members), "per_class": k,
                   "metrics": {**{m: round(float(x), 4) for m, x in values.items()},
                               **{m: round(x, 4) for m, x in pseudo_label_quality(full, pl).items()}},
                   "config": cfg, "wall_s": round(wall, 2)}
            write_record(rec)
            print_record(rec)
            out.append(rec)
    return out


def summarize(cfg: dict) -> list[dict]:
    """Seed means per dataset and variant of this profile's records."""
    recs = load_records(paper=SLUG, protocol=PROTOCOL, profile=cfg["profile"], backbone=cfg["arch"])
    rows: dict[tuple, list] = {}
    for r in recs:
        rows.setdefault((r["dataset"], r["variant"]), []).append(r["metrics"]["top1"])
    for (ds, v), vals in sorted(rows.items()):
        print(f"[upl] {ds:>16s} {v:>6s} top1 {sum(vals) / len(vals):6.2f} over {len(vals)} seed(s)")
    return recs


# ------------------------------------------------------------------------------------------- commands
@inputs("datasets")
def train(cfg: dict) -> list[dict]:
    """pseudo-label each dataset's unlabelled pool, train the prompts of every variant x seed, write run records"""
    return run_unsupervised(cfg)


@inputs("datasets")
def eval_(cfg: dict) -> list[dict]:
    """re-evaluate the prompts kept by `train` (each run's ensemble) on the test split"""
    bundle = bundle_for(cfg)
    out = []
    for name in cfg["datasets"]:
        full = build_dataset(name, cfg["data_root"])
        task = Task(cfg, bundle, full, None, 0, None)
        for v in cfg["variants"]:
            for s in cfg["seeds"]:
                ckpt = checkpoint_dir(cfg, SLUG, PROTOCOL, name, SLUG, None, s, v)
                paths = [ckpt / f"prompt_{i}.pt" for i in range(prompts_of(cfg, v))]
                missing = [p for p in paths if not p.is_file()]
                if missing:
                    raise DataError(f"no trained prompt at {missing[0]}: run `python -m papers.upl train` with the "
                                    f"same options first")
                weights = ensemble_weights([class_weights(load_learner(p, bundle), full.classnames).cpu()
                                            for p in paths])
                values = eval_classifier(task, weights)
                print(f"{name:>16s} {v:>6s} seed={s} top1 {values['top1']:6.2f}")
                out.append({"dataset": name, "variant": v, "seed": s, **values})
    return out


@inputs("datasets")
def reproduce(cfg: dict) -> list[dict]:
    """every variant (UPL, single prompt, UPL*) on every dataset and seed, then the seed means"""
    run_unsupervised(cfg)
    return summarize(cfg)


@inputs(datasets=lambda cfg: list(convergence.STUDY_DATASETS))
def convergence_cmd(cfg: dict) -> dict:
    """convergence study of UPL's prompt training (K=16 pseudo-labels per class of `arch`, one prompt, seed 1):
    lr = official x {1,3,10} at the official 50 epochs, then budgets up to 50 epochs -> papers/upl/convergence.json"""
    real = load_config(CONFIG, "real")
    bundle = bundle_for(cfg)
    memo: dict[str, object] = {}

    def make_task(name, data, shots, seed):
        if name not in memo:
            memo[name] = pseudo_label([bundle], data, int(cfg["per_class"]), cfg["rank_by"]).dataset
        return Task(cfg, bundle, memo[name], shots, seed, None)

    return convergence.study(cfg, SLUG, SLUG, "single", lambda tasks: train_coop_many(tasks, cfg, out_dir=None),
                             lambda learner, task: evaluate(learner, task, split="val")["top1"],
                             int(real["epochs"]), float(real["train"]["lr"]), convergence.STUDY_DATASETS,
                             shots=int(cfg["per_class"]), make_task=make_task,
                             note="one prompt (M=16, random init) on the 16 most confident zero-shot pseudo-labels "
                                  "per class; validation top-1 on the labelled val split (budget study only)",
                             lr_factors=(1, 3, 10))


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": eval_, "reproduce": reproduce,
                                  "convergence": convergence_cmd},
                   "UPL (Huang et al., 2022): CoOp prompts learned from zero-shot CLIP's class-balanced top-K "
                   "pseudo-labels of the unlabelled training images, ensembled over N prompts; UPL* pseudo-labels "
                   "with several CLIP models.", argv, validate=validate)


if __name__ == "__main__":
    main()
