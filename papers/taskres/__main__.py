"""TaskRes: `python -m papers.taskres {train,eval,reproduce}`.

Run records: method `taskres`; variant "" = TaskRes on the regular base, "enhanced" = TaskRes* (enhanced
base), and the ablation variants of `ablations` at `ablation_shots`. Every record also holds `base_top1`
(the frozen base alone: zero-shot CLIP for the regular base), `difficulty` ((100 / classes) / base_top1,
the paper's relative transfer difficulty) and `residual_pct` (mean ||alpha x_k|| / ||t_k||, in percent).
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.cli import run_cli
from common.config import load_config
from common.engine import convergence
from common.engine.convergence import with_schedule
from common.clip import logit_scale
from common.data import prompt_classnames
from common.engine import TrainConfig, classification_metrics
from common.engine.protocols import BatchedFit, Task, run_ablations, run_fewshot, run_transfer
from common.engine.seed import seed_everything
from common.engine.cost import random_features, report_epoch_cost
from common.engine.threads import threaded
from papers.clip_adapter.method import raw_text_features, train_on_views, train_on_views_many

from .method import TaskRes, load_text_projection, pooled_text_states, project, train_text_projection

SLUG = "taskres"
CONFIG = Path(__file__).with_name("config.yaml")
SETTINGS = ("alpha", "residual", "form", "reduction", "lr")


def settings(cfg: dict, name: str, variant: str, protocol: str = "fewshot") -> dict:
    """alpha / residual / form / lr for one dataset and variant: shared defaults < per_dataset < (dg) < ablation."""
    out = {k: cfg.get(k) for k in SETTINGS if k != "lr"}
    out["lr"] = cfg["train"]["lr"]
    layers = [(f"per_dataset.{name}", (cfg.get("per_dataset") or {}).get(name, {}))]
    if protocol == "domain_generalization":
        layers.append(("dg", cfg.get("dg") or {}))
    if variant and variant != "enhanced":
        layers.append((f"ablations.{variant}", cfg["ablations"][variant]))
    for where, over in layers:
        unknown = set(over) - set(SETTINGS) - {"epochs"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed {list(SETTINGS) + ['epochs']}")
        out.update(over)
    return out


def epochs_for(cfg: dict, shots: int | None, protocol: str) -> int:
    """100 epochs for 1/2/4 shots, 200 for 8/16 (train_regular.sh); DG: the generalization config."""
    if protocol == "domain_generalization" and (cfg.get("dg") or {}).get("epochs"):
        return int(cfg["dg"]["epochs"])
    table = {int(k): int(v) for k, v in (cfg.get("epochs_by_shots") or {}).items()}
    return table.get(int(shots), cfg["train"]["epochs"]) if shots is not None else cfg["train"]["epochs"]


def templates_for(task: Task) -> list[str]:
    """The dataset's template; ImageNet: the 7 'select' templates + its own (official, without the in-place
    list mutation of the official code)."""
    extra = (task.cfg.get("templates") or {}).get(task.dataset.name) or []
    return list(extra) + [task.dataset.template]


def check_options(cfg: dict) -> None:
    if not isinstance(cfg.get("clean_classnames"), bool):
        raise ValueError(f"clean_classnames must be true or false, got {cfg.get('clean_classnames')!r}")


def prompt_names(task: Task) -> list[str]:
    """The class names formatted into the base's prompts. `clean_classnames: false` (official): TaskRes's
    `_get_base_text_features` formats the dataset's names verbatim, "a photo of a american_bulldog, a type of
    pet."; true gives CoOp's cleaned names. Rows are still matched across datasets by the cleaned names."""
    return prompt_classnames(task.dataset, clean=task.cfg["clean_classnames"])


def train_views(task: Task) -> tuple[list[torch.Tensor], torch.Tensor]:
    n = int(task.cfg["cache_views"])
    if n < 1:
        raise ValueError(f"cache_views must be >= 1, got {n}")
    tf, dev = task.cfg["train_transform"], task.bundle.device
    views = [task.features("train", transform=tf, view=v)["features"].to(dev) for v in range(n)]
    return views, task.features("train", transform=tf, view=0)["labels"].to(dev)


def enhanced_base(task: Task, views, labels, epochs: int) -> torch.Tensor:
    """TaskRes*'s base: an official checkpoint when `enhanced.checkpoint` names one, else the text projection
    fine-tuned here (`enhanced.epochs`, `enhanced.lr`)."""
    ecfg = task.cfg["enhanced"]
    states = pooled_text_states(task.bundle, prompt_names(task), templates_for(task))
    if ecfg.get("checkpoint"):
        path = Path(str(ecfg["checkpoint"]).format(dataset=task.dataset.name, shots=task.shots))
        if not path.is_file():
            raise FileNotFoundError(f"enhanced-base checkpoint {path} not found: download the official `strong_base` "
                                    f"folder (TaskRes README) or set enhanced.checkpoint=null to train the base here")
        return project(states, load_text_projection(path))
    tcfg = TrainConfig.from_dict({**task.cfg["train"], "epochs": int(ecfg["epochs"]), "lr": float(ecfg["lr"]),
                                  "seed": task.seed})
    out = None if task.out_dir is None else Path(task.out_dir) / "enhanced_base"
    return train_text_projection(task.bundle, states, views, labels, tcfg, int(task.cfg["batch_size"]), out,
                                 desc=f"enhanced base {task.dataset.name} k{task.shots}",
                                 threads=task.cfg.get("threads"))


def fit(task: Task, variant: str = "", protocol: str = "fewshot") -> TaskRes:
    return fit_many([task], variant, protocol)[0]


def fit_many(tasks: list[Task], variant: str = "", protocol: str = "fewshot", eval_fn=None,
             eval_every: int = 0) -> list[TaskRes]:
    """TaskRes of several runs (seeds, shot counts of one dataset) trained as one batched model; each run keeps
    its own epochs (by shots) and learning rate. The enhanced base is fitted per run first."""
    models, views, labels, tcfgs = [], [], [], []
    for task in tasks:
        s = settings(task.cfg, task.dataset.name, variant, protocol)
        v, y = train_views(task)
        epochs = s.get("epochs") or epochs_for(task.cfg, task.shots, protocol)
        if variant == "enhanced":
            base = enhanced_base(task, v, y, epochs)
        else:
            base = raw_text_features(task.bundle, prompt_names(task), templates_for(task))
        seed_everything(task.seed)    # the adapter-style forms draw their initial weights
        model = TaskRes(base, logit_scale(task.bundle), s["alpha"], s["residual"], s["form"], s["reduction"])
        model = model.to(task.bundle.device)   # features are cached on CPU, trained where CLIP is
        model.classnames = list(task.dataset.classnames)   # the rows a shifted target picks from
        models.append(model)
        views.append(v)
        labels.append(y)
        tcfgs.append(with_schedule(TrainConfig.from_dict({**task.cfg["train"], "epochs": int(epochs),
                                                          "lr": float(s["lr"]), "seed": task.seed}), task))
    cfg = tasks[0].cfg
    out_dir = tasks[0].extra.get("group_dir", tasks[0].out_dir) if len(tasks) > 1 else tasks[0].out_dir
    if eval_fn is None and any(t.extra.get("on_eval") for t in tasks):   # a convergence study's validation curve
        eval_fn = lambda ms: torch.tensor([evaluate(m, t, "val")["top1"] if t.extra.get("on_eval") else 0.0
                                           for m, t in zip(ms, tasks)])
        eval_every = convergence.eval_every(max(c.epochs * max(1, len(y) // int(cfg["batch_size"]))
                                                for c, y in zip(tcfgs, labels)))
    train_on_views_many(models, views, labels, tcfgs, int(cfg["batch_size"]), out_dir,
                        desc=f"taskres{'-' + variant if variant else ''} {tasks[0].dataset.name} x{len(tasks)}",
                        threads=cfg.get("threads"), eval_fn=eval_fn, eval_every=eval_every)
    for task in tasks:
        if variant == "enhanced" and task.out_dir is not None:
            # the projection's resume checkpoint is only needed until the residual is trained (the protocol
            # removes the residual's own checkpoint once the record is written)
            (Path(task.out_dir) / "enhanced_base" / "checkpoint.pt").unlink(missing_ok=True)
    return models


def class_index(source: list[str], target: list[str]) -> torch.Tensor:
    """Rows of the source classifier for the target's classes (ImageNet-A/-R hold 200 of the 1000)."""
    where = {c: i for i, c in enumerate(source)}
    missing = [c for c in target if c not in where]
    if missing:
        raise ValueError(f"{len(missing)} target classes are not source classes (e.g. {missing[:3]}): the task "
                         f"residual only exists for the classes it was trained on")
    return torch.tensor([where[c] for c in target])


@torch.no_grad()
def evaluate(model: TaskRes, task: Task, split: str = "test") -> dict:
    """Test (or val) top-1 with the trained classifier (a target uses the source classifier's rows of its classes,
    as the official evaluation loads base and residual from the source checkpoint), plus the frozen base alone."""
    te, dev = task.features(split), model.base.device
    x = te["features"].to(dev)
    idx = class_index(model.classnames, list(task.dataset.classnames)).to(dev)
    model.eval()
    out = classification_metrics(model(x, idx).cpu(), te["labels"])
    base = TaskRes(model.base, model.logit_scale)
    base_top1 = classification_metrics(base(x, idx).cpu(), te["labels"])["top1"]
    chance = 100.0 / len(idx)
    return {**out, "base_top1": base_top1, "difficulty": chance / max(base_top1, 1e-6),
            "residual_pct": model.residual_scale()}


def _fit_eval(variant: str) -> BatchedFit:
    return BatchedFit(lambda tasks: fit_many(tasks, variant), evaluate)


def train(cfg: dict) -> list[dict]:
    """few-shot TaskRes (regular and enhanced base) on every dataset x shots x seeds, ablations at ablation_shots"""
    check_options(cfg)
    out = []
    for variant in [""] + (["enhanced"] if cfg["enhanced"]["run"] else []):
        out += run_fewshot(cfg, SLUG, SLUG, _fit_eval(variant), variant=variant)
    return out + run_ablations(cfg, SLUG, _fit_eval, "alpha")


def evaluate_cmd(cfg: dict) -> list[dict]:
    """same as train: the residual is trained and tested in one go on cached features"""
    return train(cfg)


def domain_generalization(cfg: dict) -> list[dict]:
    check_options(cfg)
    out = []
    for variant in [""] + (["enhanced"] if cfg["enhanced"]["run"] else []):
        out += run_transfer(cfg, SLUG, SLUG, "domain_generalization",
                            BatchedFit(lambda ts, v=variant: fit_many(ts, v, "domain_generalization")), evaluate,
                            cfg["dg_source"],
                            cfg["dg_targets"], variant=variant, shots=int(cfg["dg_shots"]))
    return out


def cost(cfg: dict) -> dict:
    """wall time of one residual-training epoch on random cached features of size cost.{dim,classes,shots}"""
    c = cfg["cost"]
    views, labels, n, g = random_features(c)
    model = TaskRes(torch.randn(int(c["classes"]), int(c["dim"]), generator=g), 100.0, cfg["alpha"])
    tcfg = TrainConfig.from_dict({**cfg["train"], "epochs": int(c["epochs"]), "checkpoint_every": 10 ** 6})
    hist = train_on_views(model, views, labels, tcfg, int(cfg["batch_size"]), threads=cfg.get("threads"))
    return report_epoch_cost(cfg, SLUG, SLUG, n, hist)


def convergence_cmd(cfg: dict) -> dict:
    """convergence study of TaskRes (regular base, 16 shots, seed 1, every dataset): budgets up to the official 200
    epochs at the official Adam lr -> papers/taskres/convergence.json"""
    real = load_config(CONFIG, "real")
    return convergence.study(cfg, SLUG, SLUG, "", lambda tasks: fit_many(tasks, ""),
                             lambda m, t: evaluate(m, t, "val")["top1"], int(real["epochs_by_shots"][16]),
                             float(real["train"]["lr"]), convergence.STUDY_DATASETS, note="text residual, alpha 0.5")


def reproduce(cfg: dict) -> None:
    """few-shot curves (TaskRes, TaskRes*), ablations at 16 shots, domain generalisation (16-shot source ->
    shifted sets)"""
    train(cfg)
    domain_generalization(cfg)


def main(argv=None):
    commands = {"train": train, "eval": evaluate_cmd, "reproduce": reproduce, "cost": cost,
                "convergence": convergence_cmd}
    # every command under cfg['threads'] intra-op threads (encoding included): see common/engine/threads.py
    return run_cli(SLUG, CONFIG, {k: threaded(v) for k, v in commands.items()},
                   "TaskRes: a learnable residual on CLIP's text classifier (regular or enhanced base), trained on "
                   "cached augmented image features.", argv)


if __name__ == "__main__":
    main()
