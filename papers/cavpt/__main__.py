"""DPT / CAVPT: `python -m papers.cavpt {train,eval,reproduce,convergence}`.

train        few-shot DPT (or `--set mode=vlp`, any option) on every dataset x shots x seeds; keeps each learned
             prompt (`prompt.pt`)
eval         re-evaluates the prompts kept by `train` on their test split (or `--set eval_on=<dataset>`)
reproduce    few-shot DPT, the CoOp baseline on the same backbone and grid, the ablations (VLP = no CAVPT, alpha = 0,
             C = 0) and base-to-novel (16-shot base classes, compared with CoOp's and CoCoOp's records)
convergence  the budget study (16 shots, seed 1) -> papers/cavpt/convergence.json

Run records: paper cavpt, methods cavpt (DPT), vlp, cavpt_noaux, cavpt_nogkg, coop (variant m16_end).
"""
from __future__ import annotations

import copy
from pathlib import Path

from common.cli import inputs, run_cli
from common.config import load_config
from common.engine import convergence
from common.engine.protocols import bundle_for, run_base2novel, run_fewshot, run_transfer
from common.errors import ConfigError
from common.validate import reproduce_problems
from papers.coop import method as coop
from papers.coop.__main__ import eval_kept_prompts

from .method import MODES, DPTLearner, build_learner, evaluate, train_dpt

SLUG = "cavpt"
CONFIG = Path(__file__).with_name("config.yaml")
COOP_CONFIG = Path(coop.__file__).with_name("config.yaml")
PROTOCOLS = ("fewshot", "base2novel", "ablation", "domain_generalization")
DESIGN_KEYS = {"mode", "alpha", "gkg_fraction", "cpn", "vpt_tokens", "cavpt_layers"}


def method_name(cfg: dict) -> str:
    return "cavpt" if (cfg.get("mode") or "dpt") == "dpt" else "vlp"


def design(cfg: dict, name: str) -> dict:
    """The config of one ablation design: its options over the DPT config."""
    out = copy.deepcopy(cfg)
    out.update(copy.deepcopy((cfg["reproduce"]["ablation"].get("designs") or {})[name]))
    return out


def validate(cfg: dict) -> list[str]:
    """DPT's own option rules (common.validate checks the shared ones)."""
    problems = []
    if cfg.get("mode") not in MODES:
        problems.append(f"mode must be one of {MODES}, got {cfg.get('mode')!r}")
    for key, low in (("n_ctx", 1), ("vpt_tokens", 0), ("cavpt_layers", 1), ("cpn", 0), ("kv_tokens", 0),
                     ("attn_dim", 1), ("epochs", 1), ("batch_size", 1), ("text_warmup_epochs", 0), ("b2n_shots", 1)):
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            problems.append(f"{key} must be an integer >= {low}, got {v!r}")
    for key in ("alpha", "gkg_fraction", "text_lr"):
        v = cfg.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            problems.append(f"{key} must be a number >= 0, got {v!r}")
    if isinstance(cfg.get("gkg_fraction"), (int, float)) and cfg["gkg_fraction"] > 1:
        problems.append(f"gkg_fraction (C / epochs) must be in [0, 1], got {cfg['gkg_fraction']}")
    if isinstance(cfg.get("text_lr"), (int, float)) and not cfg["text_lr"] > 0:
        problems.append(f"text_lr must be > 0, got {cfg['text_lr']}")
    problems += reproduce_problems(cfg, PROTOCOLS, DESIGN_KEYS)
    return problems


def check_model(cfg: dict, configs: list[dict]) -> None:
    """Build each configuration's learner once before any training: a ResNet backbone or too many CAVPT blocks fail
    here, in one line."""
    bundle = bundle_for(cfg)
    for c in configs:
        try:
            build_learner(bundle, ["a", "b"], c)
        except ValueError as err:
            raise ConfigError(f"{method_name(c)}: {err}") from None


def fitter(cfg: dict) -> coop.Fitter:
    return coop.Fitter(cfg, train_dpt)


def fewshot(cfg: dict, method: str, grid: dict | None = None, fit: coop.Fitter | None = None) -> list[dict]:
    grid = {k: v for k, v in (grid or {}).items() if v}
    return run_fewshot(cfg, SLUG, method, (fit or fitter(cfg)).batched(evaluate), **grid)


def coop_config(cfg: dict) -> dict:
    """CoOp's own config for this profile (its convergence-justified lr, batch and epochs by shots), on this
    config's backbone, data and grid: M = 16, unified, random init (the context DPT uses)."""
    ccfg = load_config(COOP_CONFIG, cfg["profile"])
    for key in ("arch", "pretrained", "data_root", "datasets", "shots", "seeds", "device", "precision", "force",
                "eval_batch_size"):
        if key in cfg:
            ccfg[key] = copy.deepcopy(cfg[key])
    ccfg.update({"n_ctx": int(cfg["n_ctx"]), "ctx_init": "", "csc": False, "class_token_position": "end"})
    return ccfg


def coop_baseline(cfg: dict, grid: dict, fit: coop.Fitter) -> list[dict]:
    ccfg = coop_config(cfg)
    grid = {k: v for k, v in grid.items() if v}
    return run_fewshot(ccfg, SLUG, "coop", fit.batched(coop.evaluate), variant=coop.variant_name(ccfg), **grid)


def train(cfg: dict) -> list[dict]:
    """few-shot DPT (or --set mode=vlp) on datasets x shots x seeds; writes run records"""
    check_model(cfg, [cfg])
    return fewshot(cfg, method_name(cfg))


@inputs("datasets", "eval_on")
def eval_(cfg: dict) -> list[dict]:
    """re-evaluate the prompts kept by `train` (on their test split, or on --set eval_on=DATASET)"""
    return eval_kept_prompts({**cfg, "eval_on": cfg.get("eval_on")}, SLUG, "",
                             lambda path, bundle: coop.load_learner(path, bundle, DPTLearner), evaluate)


def reproduce(cfg: dict) -> None:
    """few-shot DPT + the CoOp baseline, the ablations (VLP, alpha = 0, C = 0), base-to-novel and domain
    generalisation (the 16-shot source runs of the few-shot grid, reused)"""
    rep = cfg["reproduce"]
    abl = rep.get("ablation") or {}
    names = list(abl.get("methods") or []) if "ablation" in rep["protocols"] else []
    designs = [design(cfg, m) for m in names]
    check_model(cfg, [cfg, *designs])
    grid = rep.get("fewshot") or {}
    fit, ccfg = fitter(cfg), coop_config(cfg)
    coop_fit = coop.Fitter(ccfg)
    for protocol in rep["protocols"]:
        if protocol == "fewshot":
            fewshot(cfg, "cavpt", grid, fit)
            if rep.get("coop_baseline"):
                coop_baseline(cfg, grid, coop_fit)
        elif protocol == "ablation":   # DPT itself and the CoOp baseline on the ablation grid too (matched terms)
            agrid = {k: abl.get(k) for k in ("shots", "seeds", "datasets")}
            fewshot(cfg, "cavpt", agrid, fit)
            if rep.get("coop_baseline"):
                coop_baseline(cfg, agrid, coop_fit)
            for name, d in zip(names, designs):
                fewshot(d, name, agrid)
        elif protocol == "base2novel":
            b2n = rep.get("base2novel_datasets") or None
            run_base2novel(cfg, SLUG, "cavpt", fit, evaluate, shots=int(cfg["b2n_shots"]), datasets=b2n)
            if rep.get("coop_baseline"):
                run_base2novel(ccfg, SLUG, "coop", coop_fit, coop.evaluate, variant=coop.variant_name(ccfg),
                               shots=int(cfg["b2n_shots"]), datasets=b2n)
        elif protocol == "domain_generalization":
            shots, seeds = int(cfg["b2n_shots"]), (grid.get("seeds") or None)
            run_transfer(cfg, SLUG, "cavpt", protocol, fit, evaluate, cfg["dg_source"], cfg["dg_targets"],
                         shots=shots, seeds=seeds)
            if rep.get("coop_baseline"):
                run_transfer(ccfg, SLUG, "coop", protocol, coop_fit, coop.evaluate, cfg["dg_source"],
                             cfg["dg_targets"], variant=coop.variant_name(ccfg), shots=shots, seeds=seeds)


def convergence_cmd(cfg: dict) -> dict:
    """convergence study (16 shots, seed 1, `convergence_datasets`): lr at the official 60 epochs, then budgets
    -> papers/cavpt/convergence.json"""
    real = load_config(CONFIG, "real")
    check_model(cfg, [cfg])
    return convergence.study(cfg, SLUG, "cavpt", "", convergence.one_by_one(lambda t: train_dpt(t, cfg)),
                             lambda learner, task: evaluate(learner, task, split="val")["top1"],
                             int(real["epochs"]), float(real["train"]["lr"]), cfg["convergence_datasets"],
                             lr_factors=tuple(cfg["convergence_lr_factors"]),
                             fractions=tuple(float(f) for f in cfg["convergence_fractions"]),
                             note=f"DPT (VPT {cfg['vpt_tokens']} tokens, CAVPT K={cfg['cpn']}), batch "
                                  f"{cfg['batch_size']}, warmup {cfg['train'].get('warmup_epochs')} epochs, text lr = "
                                  f"train.lr x {cfg['text_lr'] / cfg['train']['lr']:g}; small sets only (the image tower "
                                  f"runs every step: CPU budget)")


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": eval_, "reproduce": reproduce,
                                  "convergence": convergence_cmd},
                   "DPT with CAVPT (Xing et al., IEEE TMM 2023): CoOp text prompts, deep visual prompts and "
                   "class-aware visual prompts from cross-attention between learned class features and image tokens; "
                   "the image tower runs every step on the few-shot images.", argv, validate=validate)


if __name__ == "__main__":
    main()
