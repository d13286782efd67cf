"""LASP: `python -m papers.lasp {train,eval,reproduce}` (base-to-novel generalisation).

Variants (record method / variant), the rows of the paper's ablation, all on the same shots, seeds, schedule:
  coop      coop / m4_end_ctxv1     CoOp, M = 4 from "a photo of a" (L_TT weight 0, no re-calibration)
  lasp      lasp / lasp      prompts + text-to-text loss over the training class names
  lasp_rp   lasp / lasp_rp   + re-calibration: visual LayerNorms (0.1x lr) and the text bias b
  lasp_v    lasp / lasp_v    + virtual classes: L_TT also over the novel class names (no novel images)
A variant is a set of option overrides (`variants` in config.yaml); `--set variant=NAME` trains one.
"""
from __future__ import annotations

import copy
from pathlib import Path

from common.cli import inputs, run_cli
from common.engine.runs import summarize as summarize_records
from common.data import build_dataset
from common.config import load_config
from common.engine import convergence
from common.engine.protocols import Task, bundle_for, run_base2novel

from .method import evaluate_lasp, train_lasp

SLUG = "lasp"
CONFIG = Path(__file__).with_name("config.yaml")


def with_variant(cfg: dict, name: str) -> dict:
    variants = cfg["variants"]
    if name not in variants:
        raise ValueError(f"unknown LASP variant {name!r}; config.yaml variants: {sorted(variants)}")
    out = copy.deepcopy(cfg)
    for k, v in (variants[name] or {}).items():
        if k not in out:
            raise ValueError(f"variants.{name}: unknown option {k!r}")
        out[k] = copy.deepcopy(v)
    out["variant"] = name
    return out


def record_name(name: str) -> tuple[str, str]:
    return ("coop", "m4_end_ctxv1") if name == "coop" else (SLUG, name)


def for_dataset(cfg: dict, dataset_name: str) -> dict:
    """Per-dataset schedule of the official configs (`dataset_overrides`, keyed by the registry name)."""
    over = (cfg.get("dataset_overrides") or {}).get(dataset_name.split("[")[0])
    if not over:
        return cfg
    out = copy.deepcopy(cfg)
    for k, v in over.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def novel_classnames(task: Task) -> list[str]:
    """The novel half of a base-to-novel task's dataset: LASP-V's virtual classes (names only)."""
    if "class_subset" not in task.dataset.meta:
        raise ValueError(f"virtual classes need a base-class task (base-to-novel); {task.dataset.name} is not one")
    full = build_dataset(task.dataset.name.split("[")[0], task.cfg["data_root"])
    kept = set(task.dataset.meta["class_subset"])
    return [c for i, c in enumerate(full.classnames) if i not in kept]


def fit(task: Task):
    # the dataset's official schedule, then the variant's switches (a variant's tt_weight 0 must win)
    cfg = with_variant(for_dataset(task.cfg, task.dataset.name), task.cfg["variant"])
    tt_names = list(task.dataset.classnames) + (novel_classnames(task) if cfg["virtual"] else [])
    return train_lasp(task, cfg, tt_names)


def base2novel(cfg: dict, names: list[str] | None = None) -> list[dict]:
    recs = []
    for name in names or cfg["reproduce_variants"]:
        vcfg = with_variant(cfg, name)
        method, variant = record_name(name)
        recs += run_base2novel(vcfg, SLUG, method, fit, evaluate_lasp, variant=variant, shots=vcfg["b2n_shots"])
    return recs

def summarize(cfg: dict, protocol: str) -> list[dict]:
    """Print seed means of this paper's records of `protocol` on the current profile and backbone."""
    return summarize_records(SLUG, protocol, cfg["profile"], cfg["arch"])


def train(cfg: dict) -> list[dict]:
    """base-to-novel runs of one variant (--set variant=NAME, default lasp_v, the released configuration)"""
    return base2novel(cfg, [cfg["variant"]])


def evaluate_cmd(cfg: dict) -> list[dict]:
    """runs whatever `train` has not finished yet, then prints the seed means of the run records"""
    train(cfg)
    return summarize(cfg, "base2novel")


@inputs("datasets")
def reproduce(cfg: dict) -> None:
    """base-to-novel for CoOp and every LASP variant in `reproduce_variants` (the paper's ablation rows)"""
    base2novel(cfg)
    summarize(cfg, "base2novel")


def convergence_cmd(cfg: dict) -> dict:
    """convergence study of LASP-V (the released configuration) on the base classes (16 shots, seed 1): learning
    rate at the official 25 epochs, then budgets -> papers/lasp/convergence.json"""
    real = load_config(CONFIG, "real")
    cfg = with_variant({**cfg, "train": {**cfg["train"], "warmup_epochs": real["train"]["warmup_epochs"]}}, "lasp_v")
    return convergence.study(cfg, SLUG, SLUG, "lasp_v", convergence.one_by_one(fit),
                             lambda state, task: evaluate_lasp(state, task, "val")["top1"], int(real["epochs"]),
                             float(real["train"]["lr"]), convergence.STUDY_DATASETS, shots=int(cfg["b2n_shots"]),
                             make_task=convergence.base_class_task(cfg, bundle_for(cfg)), lr_factors=(1, 3, 10),
                             note="LASP-V (prompts, text bias, visual LayerNorms; virtual classes) on the base classes "
                             "of the base-to-novel protocol; the default schedule (Pets/Cars/Flowers/Aircraft/SUN)")


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": evaluate_cmd, "reproduce": reproduce,
                                  "convergence": convergence_cmd},
                   "LASP (Bulat & Tzimiropoulos, CVPR 2023): soft prompts regularised by a text-to-text "
                   "cross-entropy against hand-crafted templates, with re-calibration and virtual classes.", argv)


if __name__ == "__main__":
    main()
