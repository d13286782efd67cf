"""SubPT + NFL: `python -m papers.subpt {train,eval,reproduce}`.

Runs, named as the official trainers (record method / variant):
  coop        coop / m16_end   plain CoOp = SubPT's stage 1 (its early context trajectory gives the subspace)
  sub         subpt / sub      CoOp + SubPT (CoOp_sub)
  nfl         subpt / nfl      CoOp + NFL (CoOp_nfl; stage 1 of sub_nfl)
  sub_nfl     subpt / sub_nfl  CoOp + SubPT + NFL (CoOp_sub_nfl), subspace from the CoOp + NFL trajectory
  cocoop      cocoop / ""      the paper's CoCoOp baseline in this setting (papers.cocoop, options `cocoop`)
Each run trains the same seed's initial context on the same shots; the stage-1 trajectories are kept under
runs/subpt/_trajectories/ so a SubPT run reuses the matching CoOp run instead of training it again.
"""
from __future__ import annotations

from pathlib import Path

from common.cli import run_cli
from common.config import load_config
from common.engine import convergence
from common.engine.runs import summarize as summarize_records
from common.data import build_dataset
from common.engine.protocols import Task, run_base2novel, run_fewshot, run_transfer
from papers.cocoop.method import CoCoOpPromptLearner, train_cocoop
from papers.cocoop.method import evaluate as evaluate_cocoop
from papers.coop.method import evaluate as evaluate_coop
from papers.coop.method import variant_name

from .method import nfl_names, train_stage1, train_subpt

SLUG = "subpt"
CONFIG = Path(__file__).with_name("config.yaml")
RUNS = ("coop", "sub", "nfl", "sub_nfl", "cocoop")


def record_name(run: str, cfg: dict) -> tuple[str, str]:
    if run in ("coop", "cocoop"):
        return (run, variant_name(cfg) if run == "coop" else "")
    return (SLUG, run)


def cocoop_cfg(cfg: dict) -> dict:
    """The config of the CoCoOp baseline: SubPT's run options overridden by the `cocoop` block."""
    out = {**cfg, **{k: v for k, v in cfg["cocoop"].items() if k != "train"}}
    out["train"] = {**cfg["train"], **(cfg["cocoop"].get("train") or {})}
    return out


def novel_classnames(task: Task) -> list[str] | None:
    """Class names of the novel half of a base-to-novel task's dataset (None for other tasks)."""
    if "class_subset" not in task.dataset.meta or not task.dataset.name.endswith("[base]"):
        return None
    full = build_dataset(task.dataset.name.split("[")[0], task.cfg["data_root"])
    kept = set(task.dataset.meta["class_subset"])
    return [c for i, c in enumerate(full.classnames) if i not in kept]


def fit(task: Task, run: str):
    cfg = task.cfg
    if run not in RUNS:
        raise ValueError(f"unknown SubPT run {run!r}; expected one of {RUNS}")
    if run == "cocoop":
        return train_cocoop(task, cocoop_cfg(cfg))
    nfl = nfl_names(task, cfg, novel_classnames(task)) if run in ("nfl", "sub_nfl") else None
    if run in ("coop", "nfl"):
        return train_stage1(task, cfg, nfl)[0]
    return train_subpt(task, cfg, nfl)


def evaluate(state, task: Task) -> dict:
    if isinstance(state, CoCoOpPromptLearner):
        return evaluate_cocoop(state, task)
    return evaluate_coop(state, task)


def _runs(cfg: dict, protocol: str) -> list[str]:
    runs = cfg["runs"][protocol]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise ValueError(f"runs.{protocol}: unknown run(s) {bad}; expected a subset of {RUNS}")
    # stage-1 runs first: the SubPT runs read their trajectories
    return sorted(runs, key=lambda r: r.startswith("sub"))


def fewshot(cfg: dict) -> list[dict]:
    """few-shot classification, every dataset x shots x seeds"""
    recs = []
    for run in _runs(cfg, "fewshot"):
        method, variant = record_name(run, cfg)
        recs += run_fewshot(cfg, SLUG, method, lambda t, run=run: evaluate(fit(t, run), t), variant=variant)
    return recs


def base2novel(cfg: dict) -> list[dict]:
    """base-to-novel generalisation (official: 4 shots); NFL uses the novel class names, never their images"""
    recs = []
    for run in _runs(cfg, "base2novel"):
        method, variant = record_name(run, cfg)
        recs += run_base2novel(cfg, SLUG, method, lambda t, run=run: fit(t, run), evaluate, variant=variant,
                               shots=cfg["b2n_shots"])
    return recs


def domain_generalization(cfg: dict) -> list[dict]:
    """source (ImageNet / emb_objects, all classes) -> its shifted variants"""
    recs = []
    for run in _runs(cfg, "domain_generalization"):
        method, variant = record_name(run, cfg)
        recs += run_transfer(cfg, SLUG, method, "domain_generalization", lambda t, run=run: fit(t, run), evaluate,
                             cfg["dg_source"], cfg["dg_targets"], variant=variant, shots=cfg["dg_shots"])
    return recs

def summarize(cfg: dict, protocol: str) -> list[dict]:
    """Print seed means of this paper's records of `protocol` on the current profile and backbone."""
    return summarize_records(SLUG, protocol, cfg["profile"], cfg["arch"])


def train(cfg: dict) -> list[dict]:
    """few-shot CoOp and CoOp+SubPT(+NFL) (the runs of `runs.fewshot`); writes run records"""
    return fewshot(cfg)


def evaluate_cmd(cfg: dict) -> list[dict]:
    """runs whatever `train` has not finished yet, then prints the seed means of the run records"""
    fewshot(cfg)
    return summarize(cfg, "fewshot")


def reproduce(cfg: dict) -> None:
    """few-shot, base-to-novel and domain generalisation, each with the runs listed in `runs`"""
    fewshot(cfg)
    base2novel(cfg)
    domain_generalization(cfg)
    for protocol in ["fewshot", "base2novel", "domain_generalization"]:
        summarize(cfg, protocol)


def convergence_cmd(cfg: dict) -> dict:
    """learning-rate study of CoOp + SubPT at the official schedule (4 shots: 100 epochs, subspace from the first
    30, rank 10; seed 1) -> papers/subpt/convergence.json. SubPT's claims are about late training (CoOp's
    overfitting), so the embedded runs keep the official epochs and only the learning rate is chosen."""
    official = load_config(CONFIG, "real")
    cfg = {**cfg, **{k: official[k] for k in ("epochs_by_shots", "t_early_by_shots", "rank_by_shots", "train")}}
    shots = int(cfg["b2n_shots"])
    return convergence.study(cfg, SLUG, SLUG, "sub", convergence.one_by_one(lambda t: fit(t, "sub")),
                             lambda learner, task: evaluate_coop(learner, task, split="val")["top1"],
                             int(official["epochs_by_shots"][str(shots)]), float(official["train"]["lr"]),
                             convergence.STUDY_DATASETS, shots=shots, lr_factors=(1, 3, 10), fractions=(1,),
                             note=f"CoOp + SubPT at {shots} shots (the embedded few-shot, base-to-novel and DG shot "
                             f"count), batch {cfg['batch_size']}; the budget is the official one (late-training claims)")


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": evaluate_cmd, "reproduce": reproduce,
                                  "convergence": convergence_cmd},
                   "SubPT + NFL (Ma et al., TCSVT 2023): CoOp with gradients projected onto the early-stage "
                   "trajectory subspace, and a text-only novel-feature regulariser.", argv)


if __name__ == "__main__":
    main()
