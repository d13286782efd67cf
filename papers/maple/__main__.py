"""MaPLe: `python -m papers.maple {train,eval,reproduce,convergence}`.

train        base-to-novel: MaPLe (or `--set mode=ivlp|vpt|language`, `--set depth=J`) on the 16-shot base classes
             of every dataset x seeds, tested on base and novel classes; keeps each learned prompt (`prompt.pt`)
eval         re-evaluates the kept base-to-novel prompts on the base and novel test splits
reproduce    base-to-novel (Table 3), the prompting-design ablation (shallow MaPLe, IVLP, deep vision prompting,
             deep language prompting; Table 1), cross-dataset transfer from `xd_source` (Table 4) and domain
             generalisation from `dg_source` (Table 5); one source training per seed serves both transfers
convergence  the budget study on the base classes (16 shots, seed 1) -> papers/maple/convergence.json
"""
from __future__ import annotations

import copy
from pathlib import Path

from common.cli import run_cli
from common.config import load_config
from common.data import fewshot_split, subsample_classes
from common.engine import convergence
from common.engine.protocols import Task, bundle_for, run_base2novel, run_transfer
from common.validate import reproduce_problems
from papers.cocoop.__main__ import eval_kept_base2novel
from papers.coop.method import Fitter, load_learner

from .method import MODES, MaPLeLearner, build_learner, evaluate, train_maple

SLUG = "maple"
CONFIG = Path(__file__).with_name("config.yaml")
PROTOCOLS = ("base2novel", "ablation", "cross_dataset", "domain_generalization")


def method_name(cfg: dict) -> str:
    """Record method of a top-level config (`train`): maple, or the single-branch/independent designs by mode."""
    return {"maple": "maple", "ivlp": "ivlp", "vpt": "vpt_deep", "language": "language_deep"}[cfg.get("mode") or "maple"]


def variant(cfg: dict) -> str:
    """"" at the profile's depth J, else `depth{J}` (e.g. shallow MaPLe run through `train --set depth=1`)."""
    depth = int(cfg["depth"])
    return "" if depth == _main_depth(cfg) else f"depth{depth}"


def _main_depth(cfg: dict) -> int:
    return int(load_config(CONFIG, cfg["profile"])["depth"])


def design(cfg: dict, name: str) -> dict:
    """The config of one prompting design of the ablation (`reproduce.ablation.designs`): its options over the
    MaPLe config; `lr` sets train.lr."""
    over = copy.deepcopy((cfg["reproduce"]["ablation"].get("designs") or {})[name])
    out = copy.deepcopy(cfg)
    if "lr" in over:
        out["train"] = {**cfg["train"], "lr": float(over.pop("lr"))}
    out.update(over)
    return out


def transfer_config(cfg: dict) -> dict:
    """The cross-dataset / DG source training (the official cross_datasets config: its depth, epochs and lr)."""
    out = copy.deepcopy(cfg)
    t = cfg["transfer"]
    out["depth"], out["epochs"] = int(t["depth"]), int(t["epochs"])
    out["train"] = {**cfg["train"], "lr": float(t["lr"])}
    return out


def validate(cfg: dict) -> list[str]:
    """MaPLe's own option rules (common.validate checks the shared ones)."""
    problems = []
    if cfg.get("mode") not in MODES:
        problems.append(f"mode must be one of {MODES}, got {cfg.get('mode')!r}")
    for key, value in (("depth", cfg.get("depth")), ("transfer.depth", (cfg.get("transfer") or {}).get("depth")),
                       ("transfer.epochs", (cfg.get("transfer") or {}).get("epochs"))):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{key} must be an integer >= 1, got {value!r}")
    problems += reproduce_problems(cfg, PROTOCOLS, {"mode", "depth", "n_ctx", "lr"})
    designs = ((cfg.get("reproduce") or {}).get("ablation") or {}).get("designs") or {}
    for name, over in designs.items():
        if "mode" in over and over["mode"] not in MODES:
            problems.append(f"reproduce.ablation.designs.{name}.mode must be one of {MODES}, got {over['mode']!r}")
        for key in ("depth", "n_ctx"):
            if key in over and (not isinstance(over[key], int) or over[key] < 1):
                problems.append(f"reproduce.ablation.designs.{name}.{key} must be an integer >= 1, got {over[key]!r}")
    return problems


def check_model(cfg: dict, configs: list[dict]) -> None:
    """Build each configuration's learner once before any training: a depth the CLIP cannot hold, a ResNet under
    visual prompts or an init phrase shorter than n_ctx fail here, in one line."""
    bundle = bundle_for(cfg)
    for c in configs:
        try:
            build_learner(bundle, ["a"], c)
        except ValueError as err:
            from common.errors import ConfigError
            raise ConfigError(f"{c.get('_design') or method_name(c)}: {err}") from None


def fitter(cfg: dict) -> Fitter:
    return Fitter(cfg, train_maple)


def base2novel(cfg: dict, method: str, var: str, datasets=None, seeds=None) -> list[dict]:
    return run_base2novel(cfg, SLUG, method, fitter(cfg), evaluate, variant=var, datasets=datasets,
                          shots=int(cfg["b2n_shots"]), seeds=seeds)


def train(cfg: dict) -> list[dict]:
    """base-to-novel on every dataset x seeds (train on base classes, test base and novel); writes run records"""
    check_model(cfg, [cfg])
    return base2novel(cfg, method_name(cfg), variant(cfg))


def eval_(cfg: dict) -> list[dict]:
    """re-evaluate the prompts kept by `train` on the base and novel test splits"""
    return eval_kept_base2novel(cfg, SLUG, method_name(cfg), variant(cfg),
                                lambda path, bundle: load_learner(path, bundle, MaPLeLearner), evaluate)


def convergence_cmd(cfg: dict) -> dict:
    """convergence study on the base classes (16 shots, seed 1): learning rate at the official 5 epochs, then
    budgets -> papers/maple/convergence.json"""
    real = load_config(CONFIG, "real")
    bundle = bundle_for(cfg)
    check_model(cfg, [cfg])

    def base_task(name, data, shots, seed):
        return Task(cfg, bundle, subsample_classes(fewshot_split(data, shots, seed), "base"), shots, seed, None)

    return convergence.study(cfg, SLUG, "maple", "", convergence.one_by_one(lambda t: train_maple(t, cfg)),
                             lambda learner, task: evaluate(learner, task, split="val")["top1"],
                             int(real["epochs"]), float(real["train"]["lr"]), convergence.STUDY_DATASETS,
                             shots=int(cfg["b2n_shots"]), make_task=base_task, lr_factors=(1, 3, 10, 30),
                             note=f"MaPLe J={cfg['depth']}, batch {cfg['batch_size']}, warmup "
                                  f"{cfg['train'].get('warmup_epochs')} epochs, on the base classes of the "
                                  f"base-to-novel protocol (the split MaPLe trains on)")


def reproduce(cfg: dict) -> None:
    """base-to-novel, the prompting-design ablation, cross-dataset transfer and domain generalisation"""
    rep = cfg["reproduce"]
    abl = rep.get("ablation") or {}
    names = list(abl.get("methods") or []) if "ablation" in rep["protocols"] else []
    designs = [{**design(cfg, m), "_design": m} for m in names]
    xd = transfer_config(cfg)
    check_model(cfg, [cfg, xd, *designs])
    for d in designs:
        d.pop("_design")
    xd_fit = fitter(xd)
    for protocol in rep["protocols"]:
        if protocol == "base2novel":
            base2novel(cfg, "maple", variant(cfg))
        elif protocol == "ablation":
            for name, d in zip(names, designs):
                base2novel(d, name, "", datasets=abl.get("datasets"), seeds=abl.get("seeds"))
        elif protocol == "cross_dataset":
            run_transfer(xd, SLUG, "maple", "cross_dataset", xd_fit, evaluate, cfg["xd_source"],
                         [d for d in cfg["datasets"] if d != cfg["xd_source"]], shots=int(cfg["b2n_shots"]),
                         seeds=rep.get("transfer_seeds"))
        elif protocol == "domain_generalization":
            run_transfer(xd, SLUG, "maple", "domain_generalization", xd_fit, evaluate, cfg["dg_source"],
                         cfg["dg_targets"], shots=int(cfg["b2n_shots"]), seeds=rep.get("transfer_seeds"))


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": eval_, "reproduce": reproduce,
                                  "convergence": convergence_cmd},
                   "MaPLe (Khattak et al., CVPR 2023): deep prompts in both CLIP towers, the visual ones projected "
                   "from the language ones; the image tower runs every step on the few-shot images.", argv,
                   validate=validate)


if __name__ == "__main__":
    main()
