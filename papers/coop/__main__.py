"""CoOp: `python -m papers.coop {train,eval,reproduce}`.

train      few-shot CoOp (the options at top level, or `--set variant=<name>` from `variants`) on every
           dataset x shots x seeds; writes run records and keeps each learned prompt (`prompt.pt`)
eval       re-evaluates the kept prompts of `train` on their test split (or `--set eval_on=<dataset>`)
reproduce  every protocol of the paper the profile supports: few-shot curves, context ablations, domain
           generalisation (M=16 and M=4), and CoCoOp's setting (ViT, M=4 "a photo of a"): base-to-novel,
           cross-dataset, domain generalisation
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

from common.cli import inputs, run_cli
from common.config import load_config
from common.engine import convergence
from common.data import build_dataset
from common.engine.runs import beside_record, kept
from common.engine.protocols import (Task, bundle_for, checkpoint_dir, run_base2novel, run_fewshot,
                                     run_transfer)

from .method import PROMPT_FILE, Fitter, evaluate, load_learner, train_coop_many, variant_name

SLUG = "coop"
CONFIG = Path(__file__).with_name("config.yaml")


def with_variant(cfg: dict, name: str | None, paper: str = "CoOp") -> dict:
    """The config with a named variant's options applied (None: the top-level options as they are)."""
    out = copy.deepcopy(cfg)
    if name:
        variants = cfg.get("variants") or {}
        if name not in variants:
            raise ValueError(f"unknown {paper} variant {name!r}; config.yaml variants: {sorted(variants)}")
        out.update(copy.deepcopy(variants[name]))
    return out


def fewshot(cfg: dict, fit: Fitter | None = None, shots=None, datasets=None, seeds=None) -> list[dict]:
    fit = fit or Fitter(cfg)
    return run_fewshot(cfg, SLUG, SLUG, fit.batched(evaluate), variant=variant_name(cfg),
                       shots=shots, datasets=datasets, seeds=seeds)


def train(cfg: dict) -> list[dict]:
    """few-shot CoOp (top-level options or --set variant=NAME) on datasets x shots x seeds; writes run records"""
    return fewshot(with_variant(cfg, cfg.get("variant")))


@inputs("datasets", "eval_on")
def eval_(cfg: dict) -> list[dict]:
    """re-evaluate the prompts kept by `train` (on their test split, or on --set eval_on=DATASET)"""
    cfg = with_variant(cfg, cfg.get("variant"))
    return eval_kept_prompts(cfg, SLUG, variant_name(cfg), load_learner, evaluate)


def eval_kept_prompts(cfg: dict, slug: str, variant: str, load: Callable, evaluate_fn: Callable) -> list[dict]:
    """Re-evaluate the prompts a paper's `train` kept (`load(path, bundle)`) on their test split, or on
    `eval_on`, printing each beside its run record."""
    bundle, out = bundle_for(cfg), []
    for name in cfg["datasets"]:
        target = build_dataset(cfg.get("eval_on") or name, cfg["data_root"])
        for k in cfg["shots"]:
            for seed in cfg["seeds"]:
                path = kept(checkpoint_dir(cfg, slug, "fewshot", name, slug, k, seed, variant) / PROMPT_FILE, slug)
                values = evaluate_fn(load(path, bundle), Task(cfg, bundle, target, k, seed, None))
                note = beside_record("top1", paper=slug, protocol="fewshot", dataset=name, shots=k, seed=seed,
                                     variant=variant, backbone=cfg["arch"]) if target.name == name else ""
                print(f"{name:>16s} -> {target.name:<16s} k={k:<2d} seed={seed} top1 {values['top1']:6.2f}{note}")
                out.append({"dataset": name, "eval_on": target.name, "shots": k, "seed": seed, **values})
    return out


def cocoop_setting(cfg: dict) -> dict:
    """CoCoOp's CoOp baseline: ViT backbone, M=4 from "a photo of a" (configs/trainers/CoOp/vit_b16_ctxv1.yaml)."""
    block = cfg["reproduce"]["cocoop_setting"]
    out = with_variant(cfg, block["variant"])
    for key in ("arch", "pretrained", "epochs_by_shots", "epochs_by_dataset", "seeds", "batch_size", "train"):
        if block.get(key) is not None:
            out[key] = copy.deepcopy(block[key])
    return out


def reproduce(cfg: dict) -> None:
    """few-shot curves + ablations, DG with M=16 and M=4, and CoCoOp's setting (base2novel, cross-dataset, DG)"""
    plan = cfg["reproduce"]
    ablation = plan.get("ablation") or {}
    jobs = [(name, {}) for name in plan.get("fewshot") or []]
    jobs += [(name, {k: ablation.get(k) for k in ("shots", "datasets", "seeds")})
             for name in ablation.get("variants") or []]
    fits: dict[str, Fitter] = {}
    for name, grid in jobs:
        vcfg = with_variant(cfg, name)
        fewshot(vcfg, fits.setdefault(name, Fitter(vcfg)), **grid)
    for name in plan.get("domain_generalization") or []:  # reuses the 16-shot source runs trained above
        vcfg = with_variant(cfg, name)
        run_transfer(vcfg, SLUG, SLUG, "domain_generalization", fits.get(name) or Fitter(vcfg), evaluate,
                     cfg["dg_source"], cfg["dg_targets"], variant=variant_name(vcfg))
    block = plan.get("cocoop_setting") or {}
    if block.get("protocols"):
        ccfg = cocoop_setting(cfg)
        fit, variant = Fitter(ccfg), variant_name(ccfg)
        shots, transfer_seeds = int(block.get("shots") or 16), block.get("transfer_seeds")
        for protocol in block["protocols"]:
            if protocol == "base2novel":
                run_base2novel(ccfg, SLUG, SLUG, fit, evaluate, variant=variant, shots=shots)
            elif protocol == "cross_dataset":
                run_transfer(ccfg, SLUG, SLUG, "cross_dataset", fit, evaluate, ccfg["xd_source"],
                             [d for d in ccfg["datasets"] if d != ccfg["xd_source"]], variant=variant, shots=shots,
                             seeds=transfer_seeds)
            elif protocol == "domain_generalization":
                run_transfer(ccfg, SLUG, SLUG, "domain_generalization", fit, evaluate, ccfg["dg_source"],
                             ccfg["dg_targets"], variant=variant, shots=shots, seeds=transfer_seeds)
            else:
                raise ValueError(f"reproduce.cocoop_setting.protocols: unknown protocol {protocol!r} "
                                 f"(base2novel, cross_dataset, domain_generalization)")


def validate(cfg: dict) -> list[str]:
    """CoOp's own options, checked by the CLI before any work: a known `variant`."""
    try:
        with_variant(cfg, cfg.get("variant"))
    except ValueError as err:
        return [str(err)]
    return []


def convergence_cmd(cfg: dict) -> dict:
    """convergence study of the main variant (M=16, 16 shots, seed 1, every dataset): budgets up to the
    official 200 epochs at the configured learning rate -> papers/coop/convergence.json"""
    vcfg = with_variant(cfg, (cfg["reproduce"].get("fewshot") or [None])[0])
    real = load_config(CONFIG, "real")
    return convergence.study(vcfg, SLUG, SLUG, variant_name(vcfg),
                             lambda tasks: train_coop_many(tasks, vcfg, out_dir=None),
                             lambda learner, task: evaluate(learner, task, split="val")["top1"],
                             int(real["epochs_by_shots"]["16"]), float(real["train"]["lr"]), convergence.STUDY_DATASETS,
                             note="unified context M=16, class token at the end", lr_factors=(1, 3, 10))


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": eval_, "reproduce": reproduce,
                                  "convergence": convergence_cmd},
                   "CoOp (Zhou et al., IJCV 2022): learned prompt context for CLIP, trained on cached image "
                   "features with the frozen text encoder in the loop.", argv, validate=validate)


if __name__ == "__main__":
    main()
