"""Variational prompt tuning: `python -m papers.vpt_variational {train,eval,reproduce,convergence}`.

Methods in the run records (paper=vpt_variational):
  vpt_variational ""             global posterior (`coopvpt`, the released configs), L = n_samples MC samples
  vpt_variational "conditional"  input-conditioned posterior (`cocoopvpt`: mean / log-variance MLPs of the image)
  vpt_variational "l1"           global posterior with a single MC sample (the paper's MC-samples ablation)
  coop "m4_end_ctxv1"            the deterministic counterpart: CoOp's learner (M = 4 from "a photo of a") with
                                 this folder's schedule, i.e. VPT with mu = 0, sigma = 0 and no KL
"""
from __future__ import annotations

from pathlib import Path

from common.cli import run_cli
from common.config import load_config
from common.engine import convergence
from common.engine.protocols import BatchedFit, Task, bundle_for, run_base2novel, run_transfer
from common.engine.runs import summarize as summarize_records
from papers.coop.method import build_learner as build_coop_learner
from papers.coop.method import evaluate as evaluate_coop
from papers.coop.method import train_config, train_coop_many

from .method import POSTERIORS, evaluate, train_vpt_many

SLUG = "vpt_variational"
CONFIG = Path(__file__).with_name("config.yaml")
BASELINE = ("coop", "m4_end_ctxv1")
PROTOCOLS = ("base2novel", "cross_dataset", "domain_generalization")


def variant_cfg(cfg: dict, variant: str) -> dict:
    """The config with the options of `variants.<variant>` applied."""
    variants = cfg.get("variants") or {}
    if variant not in variants:
        raise ValueError(f"unknown VPT variant {variant!r}; known: {sorted(variants)}")
    out = dict(cfg)
    for k, v in (variants[variant] or {}).items():
        if k not in cfg:
            raise ValueError(f"variants.{variant}: unknown option {k!r}")
        out[k] = v
    return out


def vpt_fit(cfg: dict) -> BatchedFit:
    """A dataset's pending seeds trained as one batched model."""
    return BatchedFit(lambda tasks: train_vpt_many(tasks, cfg, out_dir=tasks[0].extra.get("group_dir")), evaluate)


def coop_fit(cfg: dict) -> BatchedFit:
    """CoOp (M = 4, "a photo of a") on VPT's schedule, batch and learning rate: the deterministic counterpart."""
    coop_cfg = {**cfg, "n_ctx": 4, "csc": False, "class_token_position": "end"}

    def fit_many(tasks):
        from common.engine.seed import seed_everything
        learners = []
        for t in tasks:
            seed_everything(t.seed)
            learners.append(build_coop_learner(t.bundle, t.dataset.classnames, coop_cfg).to(t.bundle.device))
        return train_coop_many(tasks, coop_cfg, learners, desc=f"coop (vpt schedule) x{len(tasks)} {tasks[0].dataset.name}",
                               out_dir=tasks[0].extra.get("group_dir"),
                               schedule=lambda t, n: train_config(coop_cfg, t, epochs=int(cfg["epochs"])),
                               batch_size=int(cfg["batch_size"]), evaluate_fn=evaluate_coop)
    return BatchedFit(fit_many, evaluate_coop)


def plan(cfg: dict) -> list[dict]:
    """The base-to-novel runs of `reproduce.base2novel`: [{method, variant, datasets, seeds}]."""
    out = []
    for item in cfg["reproduce"]["base2novel"]:
        name = item.get("variant", "")
        method = BASELINE[0] if name == "coop" else SLUG
        out.append({"method": method, "variant": BASELINE[1] if name == "coop" else name,
                    "name": name, "datasets": item.get("datasets") or cfg["datasets"],
                    "seeds": item.get("seeds") or cfg["seeds"]})
    return out


def base2novel(cfg: dict, only: str | None = None) -> list[dict]:
    """base-to-novel (CoCoOp's protocol): train on the 16-shot base classes, test base and novel; every variant of
    `reproduce.base2novel` (finished runs are skipped)"""
    recs = []
    for p in plan(cfg):
        if only is not None and p["name"] != only:
            continue
        fit = coop_fit(cfg) if p["method"] == BASELINE[0] else vpt_fit(variant_cfg(cfg, p["name"]))
        ev = evaluate_coop if p["method"] == BASELINE[0] else evaluate
        recs += run_base2novel(cfg, SLUG, p["method"], fit, ev, variant=p["variant"], datasets=p["datasets"],
                               shots=int(cfg["b2n_shots"]), seeds=p["seeds"])
    return recs


def transfers(cfg: dict) -> list[dict]:
    """cross-dataset transfer and domain generalisation of the global posterior, trained once per seed on
    `xd_source` (16 shots, all classes)"""
    recs, fit = [], vpt_fit(variant_cfg(cfg, ""))
    memo: dict = {}

    def once(tasks):                       # one source training per seed serves both transfers
        key = (tasks[0].dataset.name, tuple(t.seed for t in tasks))
        if key not in memo:
            memo[key] = fit.many(tasks)
        return memo[key]
    shared = BatchedFit(once, evaluate)
    seeds = cfg["reproduce"].get("transfer_seeds") or cfg["seeds"]
    for protocol in cfg["reproduce"]["protocols"]:
        if protocol == "cross_dataset":
            recs += run_transfer(cfg, SLUG, SLUG, "cross_dataset", shared, evaluate, cfg["xd_source"],
                                 [d for d in cfg["datasets"] if d != cfg["xd_source"]], shots=int(cfg["b2n_shots"]),
                                 seeds=seeds)
        elif protocol == "domain_generalization":
            recs += run_transfer(cfg, SLUG, SLUG, "domain_generalization", shared, evaluate, cfg["dg_source"],
                                 cfg["dg_targets"], shots=int(cfg["b2n_shots"]), seeds=seeds)
    return recs


def validate(cfg: dict) -> list[str]:
    out = []
    if cfg.get("posterior") not in POSTERIORS:
        out.append(f"posterior must be one of {', '.join(POSTERIORS)}, got {cfg.get('posterior')!r}")
    for key in ("n_samples", "epochs", "batch_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            out.append(f"{key} must be an integer >= 1, got {cfg.get(key)!r}")
    if cfg.get("logvar_init") not in ("official", "token_scale"):
        out.append(f"logvar_init must be official or token_scale, got {cfg.get('logvar_init')!r}")
    if cfg.get("eval_samples") is not None and (not isinstance(cfg["eval_samples"], int) or cfg["eval_samples"] < 1):
        out.append(f"eval_samples must be null (= n_samples) or an integer >= 1, got {cfg['eval_samples']!r}")
    if not isinstance(cfg.get("kl_weight"), (int, float)) or cfg["kl_weight"] < 0:
        out.append(f"kl_weight must be a number >= 0, got {cfg.get('kl_weight')!r}")
    for name, opts in (cfg.get("variants") or {}).items():
        for k in (opts or {}):
            if k not in cfg:
                out.append(f"variants.{name}: unknown option {k!r}")
        if (opts or {}).get("posterior", "global") not in POSTERIORS:
            out.append(f"variants.{name}.posterior must be one of {', '.join(POSTERIORS)}")
    for item in cfg["reproduce"]["base2novel"]:
        v = item.get("variant", "")
        if v != "coop" and v not in (cfg.get("variants") or {}):
            out.append(f"reproduce.base2novel: unknown variant {v!r}; use coop or one of {sorted(cfg['variants'])}")
        for k in item:
            if k not in ("variant", "datasets", "seeds"):
                out.append(f"reproduce.base2novel: unknown key {k!r} (variant, datasets, seeds)")
    for p in cfg["reproduce"]["protocols"]:
        if p not in PROTOCOLS:
            out.append(f"reproduce.protocols: unknown protocol {p!r}; expected one of {', '.join(PROTOCOLS)}")
    return out


def train(cfg: dict) -> list[dict]:
    """base-to-novel with the top-level options (global posterior unless --set posterior=conditional) on every
    dataset x seed; writes run records and keeps each learned prompt"""
    variant = "" if cfg["posterior"] == "global" else "conditional"
    return run_base2novel(cfg, SLUG, SLUG, vpt_fit(cfg), evaluate, variant=variant, shots=int(cfg["b2n_shots"]))


def eval_(cfg: dict) -> list[dict]:
    """runs whatever `train` has not finished, then prints the seed means of this paper's base-to-novel records"""
    train(cfg)
    return summarize_records(SLUG, "base2novel", cfg["profile"], cfg["arch"])


def reproduce(cfg: dict) -> None:
    """every variant of `reproduce.base2novel` (global, conditional, L = 1, the deterministic CoOp counterpart),
    then cross-dataset transfer and domain generalisation of the global posterior"""
    if "base2novel" in cfg["reproduce"]["protocols"]:
        base2novel(cfg)
    transfers(cfg)
    for protocol in cfg["reproduce"]["protocols"]:
        summarize_records(SLUG, protocol, cfg["profile"], cfg["arch"])


def convergence_cmd(cfg: dict) -> dict:
    """convergence study of the global posterior on the base classes (16 shots, seed 1): learning rate at the
    official 10 epochs (ImageNet's schedule, L = 10), then budgets -> papers/vpt_variational/convergence.json"""
    real = load_config(CONFIG, "real")
    vcfg = variant_cfg(cfg, "")
    return convergence.study(cfg, SLUG, SLUG, "", lambda tasks: train_vpt_many(tasks, vcfg),
                             lambda learner, task: evaluate(learner, task, split="val")["top1"],
                             int(real["epochs"]), float(real["train"]["lr"]), convergence.STUDY_DATASETS,
                             shots=int(cfg["b2n_shots"]), make_task=convergence.base_class_task(cfg, bundle_for(cfg)),
                             lr_factors=(1, 3, 10, 30),
                             note="global posterior (coopvpt), L = 10, on the base classes of the base-to-novel "
                                  "protocol (the split VPT trains on)")


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": eval_, "reproduce": reproduce,
                                  "convergence": convergence_cmd},
                   "Variational prompt tuning (Derakhshani et al., Bayesian Prompt Learning, ICCV 2023): a Gaussian "
                   "residual added to CoOp's context, trained with L Monte-Carlo samples and a KL to N(0, I).",
                   argv, validate=validate)


if __name__ == "__main__":
    main()
