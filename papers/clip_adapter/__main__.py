"""CLIP-Adapter: `python -m papers.clip_adapter {train,eval,reproduce}`.

Run records: method `clip_adapter`; variant "" is the configured adapter (visual, ratio 0.2: the released
code); the ablation variants of `ablations` (other branches / residual ratios) run at `ablation_shots`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.cli import run_cli
from common.config import load_config
from common.clip import logit_scale
from common.engine import TrainConfig, classification_metrics
from common.engine.protocols import BatchedFit, Task, run_ablations, run_fewshot, run_transfer
from common.engine import convergence
from common.engine.convergence import with_schedule
from common.engine.seed import seed_everything
from common.engine.cost import random_features, report_epoch_cost
from common.engine.threads import threaded

from .method import ClipAdapter, raw_text_features, train_on_views, train_on_views_many

SLUG = "clip_adapter"
CONFIG = Path(__file__).with_name("config.yaml")
SETTINGS = ("branch", "ratio", "text_ratio", "reduction")


def settings(cfg: dict, variant: str) -> dict:
    base = {k: cfg.get(k) for k in SETTINGS}
    if variant:
        over = cfg["ablations"][variant]
        unknown = set(over) - set(SETTINGS)
        if unknown:
            raise ValueError(f"ablations.{variant}: unknown keys {sorted(unknown)}; allowed {list(SETTINGS)}")
        base.update(over)
    return base


def text_features(task: Task) -> torch.Tensor:
    """Unnormalised class text features from the dataset's hand-crafted template (CLIP-Adapter's `TextEncoder`)."""
    return raw_text_features(task.bundle, task.dataset.classnames, [task.dataset.template])


def train_views(task: Task) -> tuple[list[torch.Tensor], torch.Tensor]:
    n = int(task.cfg["cache_views"])
    if n < 1:
        raise ValueError(f"cache_views must be >= 1, got {n}")
    tf, dev = task.cfg["train_transform"], task.bundle.device
    views = [task.features("train", transform=tf, view=v)["features"].to(dev) for v in range(n)]
    return views, task.features("train", transform=tf, view=0)["labels"].to(dev)


def build(task: Task, variant: str = "") -> ClipAdapter:
    s = settings(task.cfg, variant)
    return ClipAdapter(text_features(task), logit_scale(task.bundle), s["branch"], s["ratio"], s["text_ratio"],
                       s["reduction"]).to(task.bundle.device)   # features are cached on CPU, trained where CLIP is


def fit_many(tasks: list[Task], variant: str = "", eval_fn=None, eval_every: int = 0) -> list[ClipAdapter]:
    """CLIP-Adapters of several runs (seeds, shot counts of one dataset) trained as one batched model."""
    models = []
    for t in tasks:            # each adapter's initial weights are drawn after seeding its run, as alone
        seed_everything(t.seed)
        models.append(build(t, variant))
    data = [train_views(t) for t in tasks]
    cfg = tasks[0].cfg
    out_dir = tasks[0].extra.get("group_dir", tasks[0].out_dir) if len(tasks) > 1 else tasks[0].out_dir
    tcfgs = [with_schedule(TrainConfig.from_dict({**cfg["train"], "seed": t.seed}), t) for t in tasks]
    if eval_fn is None and any(t.extra.get("on_eval") for t in tasks):   # a convergence study's validation curve
        eval_fn = lambda ms: torch.tensor([evaluate(m, t, "val")["top1"] if t.extra.get("on_eval") else 0.0
                                           for m, t in zip(ms, tasks)])
        eval_every = convergence.eval_every(max(c.epochs * max(1, len(y) // int(cfg["batch_size"]))
                                                for c, (_, y) in zip(tcfgs, data)))
    train_on_views_many(models, [v for v, _ in data], [y for _, y in data], tcfgs,
                        int(cfg["batch_size"]), out_dir,
                        desc=f"clip_adapter{'-' + variant if variant else ''} {tasks[0].dataset.name} x{len(tasks)}",
                        threads=cfg.get("threads"), eval_fn=eval_fn, eval_every=eval_every)
    return models


def fit(task: Task, variant: str = "") -> ClipAdapter:
    return fit_many([task], variant)[0]


@torch.no_grad()
def evaluate(model: ClipAdapter, task: Task, split: str = "test") -> dict:
    """Top-1 on the task's test (or val) split with the task's own class names (a shifted target's classes)."""
    te, dev = task.features(split), next(model.buffers()).device
    model.eval()
    logits = model(te["features"].to(dev), text_features(task).to(dev)).cpu()
    return classification_metrics(logits, te["labels"])


def _fit_eval(variant: str) -> BatchedFit:
    return BatchedFit(lambda tasks: fit_many(tasks, variant), evaluate)


def train(cfg: dict) -> list[dict]:
    """few-shot CLIP-Adapter on every dataset x shots x seeds, plus the ablation variants at ablation_shots"""
    return run_fewshot(cfg, SLUG, SLUG, _fit_eval("")) + run_ablations(cfg, SLUG, _fit_eval, "ratio")


def evaluate_cmd(cfg: dict) -> list[dict]:
    """same as train: adapters are trained and tested in one go on cached features"""
    return train(cfg)


def cost(cfg: dict) -> dict:
    """wall time of one adapter epoch on random cached features of size cost.{dim,classes,shots}"""
    c = cfg["cost"]
    views, labels, n, g = random_features(c)
    s = settings(cfg, "")
    model = ClipAdapter(torch.randn(int(c["classes"]), int(c["dim"]), generator=g), 100.0, s["branch"], s["ratio"],
                        s["text_ratio"], s["reduction"])
    tcfg = TrainConfig.from_dict({**cfg["train"], "epochs": int(c["epochs"]), "checkpoint_every": 10 ** 6})
    hist = train_on_views(model, views, labels, tcfg, int(cfg["batch_size"]), threads=cfg.get("threads"))
    return report_epoch_cost(cfg, SLUG, SLUG, n, hist)


def convergence_cmd(cfg: dict) -> dict:
    """convergence study of the main variant (16 shots, seed 1, every dataset): budgets up to the official
    200 epochs at the official learning rate -> papers/clip_adapter/convergence.json"""
    real = load_config(CONFIG, "real")["train"]
    return convergence.study(cfg, SLUG, SLUG, "", fit_many, lambda m, t: evaluate(m, t, "val")["top1"],
                             int(real["epochs"]), float(real["lr"]), convergence.STUDY_DATASETS,
                             note="visual adapter, ratio 0.2 (the released code's)")


def reproduce(cfg: dict) -> None:
    """few-shot curves and ablations on every dataset, and the domain-generalisation rows (16-shot source ->
    shifted sets) that Tip-Adapter reports for CLIP-Adapter"""
    train(cfg)
    run_transfer(cfg, SLUG, SLUG, "domain_generalization", BatchedFit(fit_many), evaluate, cfg["dg_source"],
                 cfg["dg_targets"], shots=int(cfg["dg_shots"]))


def main(argv=None):
    commands = {"train": train, "eval": evaluate_cmd, "reproduce": reproduce, "cost": cost,
                "convergence": convergence_cmd}
    # every command under cfg['threads'] intra-op threads (encoding included): see common/engine/threads.py
    return run_cli(SLUG, CONFIG, {k: threaded(v) for k, v in commands.items()},
                   "CLIP-Adapter: residual bottleneck adapters on frozen CLIP features (trained on cached "
                   "augmented features).", argv)


if __name__ == "__main__":
    main()
