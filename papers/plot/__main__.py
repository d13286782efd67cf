"""PLOT: `python -m papers.plot {train,eval,reproduce,convergence}`.

train        few-shot PLOT (the top-level options, or `--set variant=<name>` from `variants`) on every dataset x
             shots x seeds of the configured backbone (arch / pretrained); keeps each learned prompt (`prompt.pt`)
eval         re-evaluates the kept prompts of `train` on their test split (or `--set eval_on=<dataset>`)
reproduce    on every backbone of `backbones`: the few-shot curves of N = 4 (every dataset x shots x seeds,
             `reproduce.backbone_grid` may narrow a backbone's shots/seeds), the ablations (N = 1, uniform plan),
             and CoOp (papers/coop's learner, M = 16) as method `coop` on the backbones of
             `reproduce.coop_baseline`, the same grid
convergence  the budget study (16 shots, seed 1) -> papers/plot/convergence.json

Run records: method `plot`, variant n{N}_m{L}[_uniform]; the CoOp baseline: method `coop`, variant m16_end,
paper `plot`.
"""
from __future__ import annotations

from pathlib import Path

from common.cli import inputs, run_cli
from common.config import load_config
from common.engine import convergence
from common.engine.protocols import backbone_configs, run_fewshot
from papers.coop import __main__ as coop_main
from papers.coop import method as coop

from .method import (PLANS, PlotPromptLearner, evaluate, make_fitter, train_plot_many, variant_name)

SLUG = "plot"
CONFIG = Path(__file__).with_name("config.yaml")


def with_variant(cfg: dict, name: str | None) -> dict:
    """The config with a named variant's options applied (None: the top-level options as they are)."""
    return coop_main.with_variant(cfg, name, "PLOT")


def fewshot(cfg: dict, shots=None, seeds=None) -> list[dict]:
    return run_fewshot(cfg, SLUG, SLUG, make_fitter(cfg).batched(evaluate), variant=variant_name(cfg),
                       shots=shots, seeds=seeds)


def train(cfg: dict) -> list[dict]:
    """few-shot PLOT (top-level options or --set variant=NAME) on datasets x shots x seeds; writes run records"""
    return fewshot(with_variant(cfg, cfg.get("variant")))


@inputs("datasets", "eval_on")
def eval_(cfg: dict) -> list[dict]:
    """re-evaluate the prompts kept by `train` (on their test split, or on --set eval_on=DATASET)"""
    cfg = with_variant(cfg, cfg.get("variant"))
    return coop_main.eval_kept_prompts(cfg, SLUG, variant_name(cfg),
                                       lambda path, bundle: coop.load_learner(path, bundle, PlotPromptLearner),
                                       evaluate)


def grid_of(cfg: dict) -> dict:
    """{shots, seeds} of the main curves on this backbone (`reproduce.backbone_grid`, else the profile's)."""
    grid = ((cfg["reproduce"].get("backbone_grid") or {}).get(cfg["arch"]) or {})
    return {"shots": grid.get("shots") or None, "seeds": grid.get("seeds") or None}


def coop_baseline(cfg: dict) -> list[dict]:
    """CoOp (papers/coop's learner and training: M = 16, unified context, random init) with this config's
    schedule, as method `coop` (variant m16_end) of this paper."""
    ccfg = {k: v for k, v in cfg.items() if k not in ("n_prompts", "eps", "max_iter", "thresh", "plan")}
    ccfg.update({"ctx_init": "", "csc": False, "class_token_position": "end"})
    fit = coop.Fitter(ccfg)
    return run_fewshot(ccfg, SLUG, "coop", fit.batched(coop.evaluate), variant=coop.variant_name(ccfg), **grid_of(cfg))


def reproduce(cfg: dict) -> None:
    """on every backbone: N=4 few-shot curves, the N=1 and uniform-plan ablations, and the CoOp baseline where set"""
    for bcfg in backbone_configs(cfg):
        plan = bcfg["reproduce"]
        for name in plan.get("fewshot") or []:
            fewshot(with_variant(bcfg, name), **grid_of(bcfg))
        ablation = plan.get("ablation") or {}
        if ablation.get("backbones") is None or bcfg["arch"] in ablation["backbones"]:
            for name in ablation.get("variants") or []:
                fewshot(with_variant(bcfg, name), shots=ablation.get("shots"), seeds=ablation.get("seeds"))
        if bcfg["arch"] in (plan.get("coop_baseline") or []):
            coop_baseline(bcfg)


def validate(cfg: dict) -> list[str]:
    """PLOT's own options, checked by the CLI before any work."""
    out = []
    try:
        vcfg = with_variant(cfg, cfg.get("variant"))
    except ValueError as err:
        return [str(err)]
    for name, v in [("top level", cfg)] + [(f"variants.{k}", with_variant(cfg, k)) for k in cfg.get("variants") or {}]:
        where = "" if name == "top level" else f" ({name})"
        if not isinstance(v["n_prompts"], int) or isinstance(v["n_prompts"], bool) or v["n_prompts"] < 1:
            out.append(f"n_prompts must be an integer >= 1{where}, got {v['n_prompts']!r}")
        if not v["eps"] > 0:
            out.append(f"eps (Sinkhorn entropic weight) must be > 0{where}, got {v['eps']!r}")
        if not isinstance(v["max_iter"], int) or v["max_iter"] < 1:
            out.append(f"max_iter must be an integer >= 1{where}, got {v['max_iter']!r}")
        if not v["thresh"] >= 0:
            out.append(f"thresh must be >= 0{where}, got {v['thresh']!r}")
        if v["plan"] not in PLANS:
            out.append(f"plan must be one of {PLANS}{where}, got {v['plan']!r}")
    if not isinstance(vcfg["test_batch_size"], int) or vcfg["test_batch_size"] < 1:
        out.append(f"test_batch_size must be an integer >= 1, got {vcfg['test_batch_size']!r}")
    if vcfg["train_pool"] not in ("full", "fewshot"):
        out.append(f"train_pool must be 'full' or 'fewshot', got {vcfg['train_pool']!r}")
    plan = cfg.get("reproduce") or {}
    unknown = [v for v in (plan.get("fewshot") or []) + ((plan.get("ablation") or {}).get("variants") or [])
               if v not in (cfg.get("variants") or {})]
    if unknown:
        out.append(f"reproduce names unknown variants {unknown}; config.yaml variants: {sorted(cfg.get('variants') or {})}")
    return out


@inputs(datasets=lambda cfg: cfg["convergence_datasets"])
def convergence_cmd(cfg: dict) -> dict:
    """convergence study of N=4 (16 shots, seed 1, on `convergence_datasets`): budgets up to the official 200
    epochs at CoOp's embedded lr factor (x10) -> papers/plot/convergence.json"""
    vcfg = with_variant(cfg, (cfg["reproduce"].get("fewshot") or [None])[0])
    real = load_config(CONFIG, "real")
    factor = float(vcfg["train"]["lr"]) / float(real["train"]["lr"])
    return convergence.study(vcfg, SLUG, SLUG, variant_name(vcfg), lambda tasks: train_plot_many(tasks, vcfg),
                             lambda learner, task: evaluate(learner, task, split="val")["top1"],
                             int(real["epochs_by_shots"]["16"]), float(real["train"]["lr"]), cfg["convergence_datasets"],
                             note=f"N=4 prompts of 16 tokens; the learning-rate factor x{factor:g} is CoOp's "
                                  f"(papers/coop/convergence.json), not searched again", lr_factors=(factor,))


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": eval_, "reproduce": reproduce,
                                  "convergence": convergence_cmd},
                   "PLOT (Chen et al., ICLR 2023): N learned prompts per class matched to local image features by "
                   "entropic optimal transport, trained on cached local features with the frozen text encoder.",
                   argv, validate=validate)


if __name__ == "__main__":
    main()
