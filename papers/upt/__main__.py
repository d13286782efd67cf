"""UPT: `python -m papers.upt {train,eval,reproduce,convergence}`.

train        few-shot UPT (or `--set mode=upt_mix|upt_sep|vpt`) on every dataset x shots x seeds; writes run records
             and keeps each learned prompt (`prompt.pt`)
eval         re-evaluates the kept few-shot prompts on their test split (or `--set eval_on=<dataset>`)
reproduce    the paper's protocols the profile supports, UPT beside its two unimodal baselines trained here on the
             same grid: few-shot (UPT, VPT-shallow, CoOp), domain generalisation from `dg_source` (16 shots, the
             few-shot source runs reused), and the transform ablation (token mixing, separate prompts)
convergence  the budget study of UPT (16 shots, seed 1, study.datasets) -> papers/upt/convergence.json

Run records: paper `upt`; methods `upt` (the official per-token transform), `upt_mix` (attention over the
unified tokens, the paper's description), `upt_sep` (separate prompts), `vpt_shallow`, and `coop` at the variant
of `coop.variant` (papers/coop's learner and trainer, CoOp's own config for the profile).
"""
from __future__ import annotations

import copy
from pathlib import Path

from common.cli import inputs, run_cli
from common.config import load_config
from common.engine import convergence
from common.engine.protocols import bundle_for, run_fewshot, run_transfer
from common.errors import ConfigError
from papers.coop import __main__ as coop_main
from papers.coop.method import Fitter, load_learner, variant_name as coop_variant
from papers.coop.method import evaluate as coop_evaluate

from .method import METHOD_OF_MODE, MODES, UPTLearner, build_learner, evaluate, fit_many

SLUG = "upt"
CONFIG = Path(__file__).with_name("config.yaml")
PROTOCOLS = ("fewshot", "domain_generalization", "ablation")
MODE_OF_METHOD = {v: k for k, v in METHOD_OF_MODE.items()}
METHODS = tuple(MODE_OF_METHOD) + ("coop",)
SHARED = ("profile", "arch", "pretrained", "data_root", "datasets", "shots", "seeds", "dg_source", "dg_targets",
          "xd_source", "device", "precision", "eval_batch_size", "force")


def method_config(cfg: dict, method: str) -> dict:
    """The config of one prompt learner of this paper (`upt`, `upt_mix`, `upt_sep`, `vpt_shallow`)."""
    out = copy.deepcopy(cfg)
    out["mode"] = MODE_OF_METHOD[method]
    if method == "vpt_shallow":
        out["n_vis"] = int(cfg["vpt"]["n_vis"])
        if cfg["vpt"].get("lr") is not None:
            out["train"] = {**cfg["train"], "lr": float(cfg["vpt"]["lr"])}
    return out


def coop_config(cfg: dict) -> dict:
    """CoOp's own config for this profile at `coop.variant`, on this paper's backbone, data and grid."""
    base = load_config(coop_main.CONFIG, cfg["profile"])
    out = coop_main.with_variant(base, cfg["coop"]["variant"])
    for key in SHARED:
        if key in cfg:
            out[key] = copy.deepcopy(cfg[key])
    return out


def fitter(mcfg: dict) -> Fitter:
    return Fitter(mcfg, lambda task, c: fit_many([task], c, out_dir=task.out_dir)[0],
                  lambda tasks, c: fit_many(tasks, c, out_dir=tasks[0].extra.get("group_dir")))


def variant_of(mcfg: dict) -> str:
    """"" at the paper's prompt lengths; `m{M}v{N}` otherwise."""
    learner_n = 4 if mcfg.get("ctx_init") == "a photo of a" else int(mcfg.get("n_ctx") or 4)
    n_vis = mcfg.get("n_vis")
    n_vis = learner_n if n_vis is None else int(n_vis)
    official = (learner_n, n_vis) == (4, 4)
    return "" if official else f"m{learner_n}v{n_vis}"


def check_model(cfg: dict, configs: list[dict]) -> None:
    """Build each learner once before any training: a ResNet under visual prompts fails here, in one line."""
    bundle = bundle_for(cfg)
    for c in configs:
        try:
            build_learner(bundle, ["a"], c)
        except ValueError as err:
            raise ConfigError(f"{METHOD_OF_MODE[c['mode']]}: {err}") from None


def fewshot(mcfg: dict, fit: Fitter, shots=None, datasets=None, seeds=None) -> list[dict]:
    return run_fewshot(mcfg, SLUG, METHOD_OF_MODE[mcfg["mode"]], fit.batched(evaluate), variant=variant_of(mcfg),
                       shots=shots, datasets=datasets, seeds=seeds)


def train(cfg: dict) -> list[dict]:
    """few-shot UPT (or --set mode=upt_mix|upt_sep|vpt) on datasets x shots x seeds; writes run records"""
    check_model(cfg, [cfg])
    return fewshot(cfg, fitter(cfg))


@inputs("datasets", "eval_on")
def eval_(cfg: dict) -> list[dict]:
    """re-evaluate the UPT prompts kept by `train` (on their test split, or on --set eval_on=DATASET)"""
    if METHOD_OF_MODE[cfg["mode"]] != SLUG:
        raise ConfigError(f"eval re-evaluates the prompts of mode upt (kept under method upt); mode {cfg['mode']} "
                          f"records are written by train and reproduce directly")
    return coop_main.eval_kept_prompts(cfg, SLUG, variant_of(cfg),
                                       lambda path, bundle: load_learner(path, bundle, UPTLearner), evaluate)


def reproduce(cfg: dict) -> None:
    """few-shot (UPT, VPT-shallow, CoOp), domain generalisation, and the transform ablation"""
    plan = cfg["reproduce"]
    abl = plan.get("ablation") or {}
    methods = list(plan.get("methods") or [])
    dg_methods = list(plan.get("dg_methods") or []) if "domain_generalization" in plan["protocols"] else []
    ablation = list(abl.get("methods") or []) if "ablation" in plan["protocols"] else []
    configs = {m: method_config(cfg, m) for m in methods + dg_methods + ablation if m != "coop"}
    check_model(cfg, list(configs.values()))
    fits = {m: fitter(c) for m, c in configs.items()}
    ccfg = coop_config(cfg) if "coop" in methods + dg_methods else None
    coop_fit = Fitter(ccfg) if ccfg is not None else None
    grid = {k: plan.get(k) for k in ("shots", "datasets", "seeds")}
    dg_seeds = plan.get("dg_seeds") or plan.get("seeds")
    for protocol in plan["protocols"]:
        if protocol == "fewshot":
            for m in methods:
                if m == "coop":
                    run_fewshot(ccfg, SLUG, "coop", coop_fit.batched(coop_evaluate), variant=coop_variant(ccfg), **grid)
                else:
                    fewshot(configs[m], fits[m], **grid)
        elif protocol == "domain_generalization":
            for m in dg_methods:
                if m == "coop":
                    run_transfer(ccfg, SLUG, "coop", protocol, coop_fit, coop_evaluate, cfg["dg_source"],
                                 cfg["dg_targets"], variant=coop_variant(ccfg), seeds=dg_seeds)
                else:
                    run_transfer(configs[m], SLUG, m, protocol, fits[m], evaluate, cfg["dg_source"],
                                 cfg["dg_targets"], variant=variant_of(configs[m]), seeds=dg_seeds)
        elif protocol == "ablation":
            for m in ablation:
                fewshot(configs[m], fits[m], shots=abl.get("shots"), datasets=abl.get("datasets"),
                        seeds=abl.get("seeds"))


def validate(cfg: dict) -> list[str]:
    """UPT's own option rules (common.validate checks the shared ones)."""
    problems = []
    if cfg.get("mode") not in MODES:
        problems.append(f"mode must be one of {MODES}, got {cfg.get('mode')!r}")
    n_ctx, n_vis = cfg.get("n_ctx"), cfg.get("n_vis")
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1:
        problems.append(f"n_ctx must be an integer >= 1, got {n_ctx!r}")
    for key, value in (("n_vis", n_vis), ("vpt.n_vis", (cfg.get("vpt") or {}).get("n_vis"))):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            problems.append(f"{key} must be an integer >= 0 (or null), got {value!r}")
    d = cfg.get("dropout")
    if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0 <= d < 1:
        problems.append(f"dropout must be a number in [0, 1), got {d!r}")
    lr = (cfg.get("vpt") or {}).get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or lr <= 0):
        problems.append(f"vpt.lr must be a positive number (or null for train.lr), got {lr!r}")
    plan = cfg.get("reproduce") or {}
    dg_seeds = plan.get("dg_seeds")
    if dg_seeds is not None and (not isinstance(dg_seeds, list) or not dg_seeds
                                 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in dg_seeds)):
        problems.append(f"reproduce.dg_seeds must be a non-empty list of seeds (or null for seeds), got {dg_seeds!r}")
    for p in plan.get("protocols") or []:
        if p not in PROTOCOLS:
            problems.append(f"reproduce.protocols: unknown protocol {p!r}; expected some of {PROTOCOLS}")
    for where, names in (("reproduce.methods", plan.get("methods")), ("reproduce.dg_methods", plan.get("dg_methods")),
                         ("reproduce.ablation.methods", (plan.get("ablation") or {}).get("methods"))):
        for m in names or []:
            if m not in METHODS:
                problems.append(f"{where}: unknown method {m!r}; expected some of {METHODS}")
    for where, names in (("reproduce.datasets", plan.get("datasets")),
                         ("reproduce.ablation.datasets", (plan.get("ablation") or {}).get("datasets"))):
        unknown = [n for n in names or [] if n not in cfg["datasets"]]
        if unknown:
            problems.append(f"{where} names {unknown}, which are not in datasets {cfg['datasets']}; add them to "
                            f"datasets (--set datasets=[...]) or drop them")
    try:
        coop_main.with_variant(load_config(coop_main.CONFIG, cfg["profile"]), (cfg.get("coop") or {}).get("variant"))
    except ValueError as err:
        problems.append(f"coop.variant: {err}")
    study = cfg.get("study") or {}
    if study:
        e = study.get("epochs")
        if not isinstance(e, int) or isinstance(e, bool) or e < 1:
            problems.append(f"study.epochs must be an integer >= 1, got {e!r}")
    return problems


def convergence_cmd(cfg: dict) -> dict:
    """convergence study of UPT (16 shots, seed 1, study.datasets): learning rate (official x study.lr_factors) at
    study.epochs, then budgets up to it -> papers/upt/convergence.json"""
    check_model(cfg, [cfg])
    study = cfg["study"]
    real = load_config(CONFIG, "real")
    return convergence.study(cfg, SLUG, METHOD_OF_MODE[cfg["mode"]], variant_of(cfg),
                             lambda tasks: fit_many(tasks, cfg, out_dir=None),
                             lambda learner, task: evaluate(learner, task, split="val")["top1"],
                             int(study["epochs"]), float(real["train"]["lr"]), tuple(study["datasets"]),
                             note=study["note"], lr_factors=tuple(study["lr_factors"]))


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": eval_, "reproduce": reproduce,
                                  "convergence": convergence_cmd},
                   "UPT (Zang et al., 2022): one set of unified prompts mapped by a tiny transformer layer to CoOp-style "
                   "text context and VPT-shallow visual prompt tokens; the image tower runs every step on the "
                   "few-shot images. Epochs and learning rate are chosen on validation data, never on test.", argv,
                   validate=validate)


if __name__ == "__main__":
    main()
