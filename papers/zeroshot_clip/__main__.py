"""Zero-shot CLIP baseline: `python -m papers.zeroshot_clip {train,eval,reproduce}`."""
from __future__ import annotations

from pathlib import Path

from common.cli import inputs, run_cli
from common.data import build_dataset
from common.engine.cells import owns
from common.engine.protocols import Task, bundle_for, eval_classifier, run_base2novel, run_transfer
from common.engine.runs import write_record

from .method import zeroshot_weights

SLUG = "zeroshot_clip"
CONFIG = Path(__file__).with_name("config.yaml")


def train(cfg: dict) -> None:
    """builds and caches the zero-shot classifiers (zero-shot CLIP has nothing to train)"""
    bundle = bundle_for(cfg)
    for name in cfg["datasets"]:
        ds = build_dataset(name, cfg["data_root"])
        for variant in cfg["variants"]:
            zeroshot_weights(bundle, ds, variant)


@inputs("datasets", "dg_source", "dg_targets")
def evaluate(cfg: dict) -> list[dict]:
    """zero-shot top-1 on the test split of every dataset (and the shifted variants), both variants"""
    bundle = bundle_for(cfg)
    records = []
    names = list(dict.fromkeys(cfg["datasets"] + [cfg["dg_source"]] + cfg["dg_targets"]))
    for name in names:
        if not owns(name, None, 0):   # a job of a launch: another job's cell
            continue
        ds = build_dataset(name, cfg["data_root"])
        task = Task(cfg, bundle, ds, None, 0, None)
        for variant in cfg["variants"]:
            values = eval_classifier(task, zeroshot_weights(bundle, ds, variant))
            rec = {"paper": SLUG, "method": SLUG, "variant": variant, "profile": cfg["profile"],
                   "protocol": "zeroshot", "dataset": name, "backbone": cfg["arch"], "shots": None, "seed": 0,
                   "n_classes": ds.num_classes,
                   "metrics": values, "config": cfg}
            write_record(rec)
            records.append(rec)
            print(f"{name:28s} {variant:9s} top1 {values['top1']:6.2f}")
    return records


def _zs_eval(_state, task: Task) -> dict:
    return eval_classifier(task, zeroshot_weights(task.bundle, task.dataset, "single"))


def reproduce(cfg: dict) -> None:
    """zero-shot on every dataset, base-to-novel and domain-generalisation rows for the paper tables"""
    evaluate(cfg)
    run_base2novel(cfg, SLUG, SLUG, lambda task: None, _zs_eval, variant="single")
    run_transfer(cfg, SLUG, SLUG, "domain_generalization", lambda task: None, _zs_eval,
                 cfg["dg_source"], cfg["dg_targets"], variant="single", shots=None, seeds=[0])


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": evaluate, "reproduce": reproduce},
                   "Zero-shot CLIP baseline (dataset template or 80-template ensemble).", argv)


if __name__ == "__main__":
    main()
