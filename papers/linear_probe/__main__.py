"""Linear-probe CLIP baseline: `python -m papers.linear_probe {train,eval,reproduce}`."""
from __future__ import annotations

from pathlib import Path

from common.cli import run_cli
from common.engine.evaluate import classification_metrics
from common.engine.protocols import Task, run_fewshot, run_transfer

from .method import train_probe

SLUG = "linear_probe"
CONFIG = Path(__file__).with_name("config.yaml")


def fit(task: Task):
    tr, va = task.features("train"), task.features("val")
    return train_probe(tr["features"], tr["labels"], va["features"], va["labels"], task.dataset.num_classes)


def evaluate_probe(probe, task: Task) -> dict:
    te = task.features("test")
    if task.dataset.num_classes != probe.weight.shape[0]:
        raise ValueError(f"probe has {probe.weight.shape[0]} classes, {task.dataset.name} has "
                         f"{task.dataset.num_classes}: a linear probe cannot transfer to other class sets")
    return classification_metrics(probe.logits(te["features"]), te["labels"])


def fit_eval(task: Task) -> dict:
    return evaluate_probe(fit(task), task)


def train(cfg: dict) -> list[dict]:
    """few-shot linear probes (shots x seeds) on every dataset; writes run records"""
    return run_fewshot(cfg, SLUG, SLUG, fit_eval)


def evaluate(cfg: dict) -> list[dict]:
    """same as train: a probe is trained and tested in one go (seconds on cached features)"""
    return train(cfg)


def reproduce(cfg: dict) -> None:
    """few-shot curves on every dataset and the domain-generalisation rows (16-shot source probe on the shifts)"""
    train(cfg)
    run_transfer(cfg, SLUG, SLUG, "domain_generalization", fit, evaluate_probe, cfg["dg_source"], cfg["dg_targets"])


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": evaluate, "reproduce": reproduce},
                   "Linear-probe CLIP baseline (logistic regression on frozen features, C chosen on val).", argv)


if __name__ == "__main__":
    main()
