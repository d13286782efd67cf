"""KgCoOp: `python -m papers.kgcoop {train,eval,reproduce}`.

Methods in the run records: `kgcoop` (the paper) and `coop` variant `m4_end_ctxv1` (the same prompt learner with
weight 0, i.e. CoOp with 4 context vectors initialised from "a photo of a": the paper's CoOp baseline run on
the same shots, seeds and schedule).
"""
from __future__ import annotations

from pathlib import Path

from common.cli import run_cli
from common.engine.runs import summarize as summarize_records
from common.config import load_config
from common.engine import convergence
from common.engine.protocols import BatchedFit, bundle_for, run_base2novel, run_fewshot, run_transfer
from papers.coop.method import evaluate

from .method import train_kgcoop_many

SLUG = "kgcoop"
CONFIG = Path(__file__).with_name("config.yaml")
BASELINE = ("coop", "m4_end_ctxv1")


def batched_fit(cfg: dict, weight: float) -> BatchedFit:
    """The protocols' fit: the pending seeds (and shot counts) of a dataset trained as one batched model."""
    return BatchedFit(lambda tasks: train_kgcoop_many(tasks, cfg, weight, out_dir=tasks[0].extra.get("group_dir")),
                      evaluate)


def for_protocol(cfg: dict, protocol: str) -> dict:
    """The config with the option overrides of `protocol_overrides.<protocol>` applied."""
    over = (cfg.get("protocol_overrides") or {}).get(protocol) or {}
    out = dict(cfg)
    for k, v in over.items():
        if k not in cfg:
            raise ValueError(f"protocol_overrides.{protocol}: unknown option {k!r}")
        out[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg[k], dict) else v
    return out


def _methods(cfg: dict) -> list[tuple[str, str, float]]:
    out = [(SLUG, "", cfg["weight"])]
    if cfg["run_baseline"]:
        out.append((*BASELINE, 0.0))
    return out


def base2novel(cfg: dict) -> list[dict]:
    """base-to-novel generalisation (train on base classes, test base and novel): KgCoOp and the CoOp baseline"""
    recs = []
    cfg = for_protocol(cfg, "base2novel")
    for method, variant, w in _methods(cfg):
        recs += run_base2novel(cfg, SLUG, method, batched_fit(cfg, w), evaluate, variant=variant,
                               shots=cfg["b2n_shots"])
    return recs


def fewshot(cfg: dict) -> list[dict]:
    """few-shot classification on all classes (the official script: 4 shots)"""
    recs = []
    cfg = for_protocol(cfg, "fewshot")
    for method, variant, w in _methods(cfg):
        recs += run_fewshot(cfg, SLUG, method, batched_fit(cfg, w), variant=variant,
                            shots=cfg["fewshot_shots"])
    return recs


def domain_generalization(cfg: dict) -> list[dict]:
    """train on the source (ImageNet / emb_objects, all classes), test on its shifted variants"""
    recs = []
    cfg = for_protocol(cfg, "domain_generalization")
    for method, variant, w in _methods(cfg):
        recs += run_transfer(cfg, SLUG, method, "domain_generalization", batched_fit(cfg, w), evaluate,
                             cfg["dg_source"], cfg["dg_targets"], variant=variant, shots=cfg["dg_shots"])
    return recs

def summarize(cfg: dict, protocol: str) -> list[dict]:
    """Print seed means of this paper's records of `protocol` on the current profile and backbone."""
    return summarize_records(SLUG, protocol, cfg["profile"], cfg["arch"])


def train(cfg: dict) -> list[dict]:
    """the paper's main protocol, base-to-novel (trains and writes records; finished runs are skipped)"""
    return base2novel(cfg)


def evaluate_cmd(cfg: dict) -> list[dict]:
    """runs whatever `train` has not finished yet, then prints the seed means of the run records"""
    base2novel(cfg)
    return summarize(cfg, "base2novel")


def reproduce(cfg: dict) -> None:
    """every protocol of the paper: base-to-novel, few-shot and domain generalisation, with the CoOp baseline"""
    base2novel(cfg)
    fewshot(cfg)
    domain_generalization(cfg)
    for protocol in ["base2novel", "fewshot", "domain_generalization"]:
        summarize(cfg, protocol)


def convergence_cmd(cfg: dict) -> dict:
    """convergence study on the base classes (16 shots, seed 1): learning rate at the official 100 epochs, then
    budgets -> papers/kgcoop/convergence.json"""
    real = load_config(CONFIG, "real")
    return convergence.study(cfg, SLUG, SLUG, "", lambda tasks: train_kgcoop_many(tasks, cfg),
                             lambda learner, task: evaluate(learner, task, split="val")["top1"],
                             int(real["epochs"]), float(real["train"]["lr"]), convergence.STUDY_DATASETS,
                             shots=int(cfg["b2n_shots"]), make_task=convergence.base_class_task(cfg, bundle_for(cfg)),
                             lr_factors=(1, 3, 10), note="base classes of the base-to-novel protocol (the split KgCoOp "
                             "trains on), weight 8")


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": evaluate_cmd, "reproduce": reproduce,
                                  "convergence": convergence_cmd},
                   "KgCoOp (Yao et al., CVPR 2023): CoOp + a knowledge-guided regulariser towards the "
                   "hand-crafted prompt's class embeddings.", argv)


if __name__ == "__main__":
    main()
