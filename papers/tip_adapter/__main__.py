"""Tip-Adapter / Tip-Adapter-F: `python -m papers.tip_adapter {train,eval,reproduce,figure}`.

Run records: method `tip_adapter`, variant "" (training-free Tip-Adapter) and "tip_f" (Tip-Adapter-F).
The alpha/beta validation grid of every few-shot run is saved as `search_grid.json` next to its
metrics.json; `figure` turns the grids at the largest shot count into papers/tip_adapter/heatmap_alpha_beta.png
(not `fig_*.png`: REPORT.md rendering regenerates those).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from common.cli import run_cli
from common.config import load_config
from common.clip import logit_scale, zeroshot_classifier
from common.data import build_dataset, sample_per_class
from common.engine import TrainConfig, classification_metrics, run_dir
from common.engine.protocols import Task, run_fewshot, run_transfer
from common.engine import convergence
from common.engine.convergence import with_schedule
from common.engine.cost import random_features, report_epoch_cost
from common.engine.threads import threaded
from common.paths import runs_root

from .method import TipAdapterF, build_cache, search_alpha_beta, tip_logits, train_tip_f

SLUG = "tip_adapter"
CONFIG = Path(__file__).with_name("config.yaml")
VARIANTS = {"": False, "tip_f": True}   # variant -> fine-tune the keys
PER_DATASET_KEYS = ("init_alpha", "init_beta", "search_scale", "epochs")


def dataset_cfg(cfg: dict, name: str) -> dict:
    """The per-dataset settings of the official configs, over the shared defaults."""
    out = {"init_alpha": cfg["init_alpha"], "init_beta": cfg["init_beta"], "search_scale": cfg["search_scale"],
           "epochs": cfg["train"]["epochs"]}
    over = (cfg.get("per_dataset") or {}).get(name, {})
    unknown = set(over) - set(PER_DATASET_KEYS)
    if unknown:
        raise ValueError(f"per_dataset.{name}: unknown keys {sorted(unknown)}; allowed {list(PER_DATASET_KEYS)}")
    out.update(over)
    return out


def text_classifier(task: Task) -> torch.Tensor:
    """Normalised (C, D) CLIP classifier: the dataset's template, or the configured ensemble (per-template
    normalised, averaged, renormalised: the official `clip_classifier`)."""
    templates = (task.cfg.get("templates") or {}).get(task.dataset.name) or [task.dataset.template]
    return zeroshot_classifier(task.bundle, task.dataset.classnames, templates).float().cpu()


def clip_scale(task: Task) -> float:
    """The constant multiplying the zero-shot logits: the official 100 (= OpenAI CLIP's exp(logit_scale)), or,
    with clip_scale null, the loaded model's own temperature (the embedded tiny CLIPs learn a different one)."""
    value = task.cfg.get("clip_scale")
    return float(value) if value is not None else logit_scale(task.bundle)


def validation_items(task: Task) -> list:
    """The few-shot validation split (min(K, 4) per class, CoOp/Tip-Adapter). Datasets without one (ImageNet,
    whose official val images are the test set) get min(K, 4) per class held out from the train images
    outside the few-shot sample: the official ImageNet script searches on the test set instead."""
    if task.dataset.val:
        return task.dataset.val
    full = build_dataset(task.dataset.name, task.cfg["data_root"])
    used = {d.impath for d in task.dataset.train}
    pool = [d for d in full.train if d.impath not in used]
    if not pool:
        raise ValueError(f"dataset {task.dataset.name} has no validation split and no training images outside the "
                         f"few-shot sample to hold out: alpha/beta cannot be searched without touching the test set")
    return sample_per_class(pool, min(task.shots or 4, 4), 10_000 + task.seed)


def normalised(feats: dict, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = feats["features"].float(), feats["labels"]
    if device is not None:
        x, y = x.to(device), y.to(device)
    return F.normalize(x, dim=-1), y


def fit(task: Task, finetune: bool) -> dict:
    """Build the cache from `cache_views` augmented views, search alpha/beta on val; with `finetune`, train
    the keys first (Tip-Adapter-F) and search again with the tuned keys."""
    cfg, name = task.cfg, task.dataset.name
    dcfg = dataset_cfg(cfg, name)
    n_views = int(cfg["cache_views"])
    if n_views < 1:
        raise ValueError(f"cache_views must be >= 1, got {n_views}")
    dev = task.bundle.device   # features are cached on CPU; the cache model lives where CLIP is
    views = [task.features("train", transform=cfg["cache_transform"], view=v)["features"].to(dev)
             for v in range(n_views)]
    labels = task.features("train", transform=cfg["cache_transform"], view=0)["labels"].to(dev)
    keys, values = build_cache(views, labels, task.dataset.num_classes)
    weights = text_classifier(task).to(dev)
    val_x, val_y = normalised(task.features("val", items=validation_items(task)), dev)
    scale = clip_scale(task)
    if finetune:
        model = TipAdapterF(keys, values, weights, dcfg["init_alpha"], dcfg["init_beta"], scale)
        tcfg = with_schedule(TrainConfig.from_dict({**cfg["train"], "epochs": int(dcfg["epochs"]), "seed": task.seed}),
                             task)
        history = train_tip_f(model, views, labels, val_x, val_y, tcfg, int(cfg["batch_size"]),
                              float(cfg["adam_eps"]), task.out_dir, desc=f"tip_f {name} k{task.shots}",
                              threads=cfg.get("threads"))
        keys = model.keys.detach().clone()
    search = search_alpha_beta(val_x, val_y, val_x @ keys.t(), values, weights, dcfg["search_scale"],
                               cfg["search_step"], scale)
    return {"keys": keys, "values": values, "classnames": list(task.dataset.classnames), "alpha": search.alpha,
            "beta": search.beta, "clip_scale": scale, "search": search,
            "history": history if finetune else [], "steps_per_epoch": -(-len(labels) // int(cfg["batch_size"]))}


def convergence_cmd(cfg: dict) -> dict:
    """convergence study of Tip-Adapter-F (16 shots, seed 1): lr from official x {1,3,10,30,100} at the official 20
    epochs, then budgets up to 20 epochs; validation top-1 after the alpha/beta search -> papers/tip_adapter/
    convergence.json"""
    real = load_config(CONFIG, "real")

    def fit_many(tasks):
        out = []
        for t in tasks:
            state = fit(t, finetune=True)
            spe = state["steps_per_epoch"]
            hist = [{**h, "step": h["epoch"] * spe} for h in state["history"]]
            curve = [{"step": h["step"], "val": h["val_top1"]} for h in hist] if t.extra.get("on_eval") else []
            out.append(SimpleNamespace(state=state, train_history=hist, val_history=curve))
        return out

    return convergence.study(cfg, SLUG, SLUG, "tip_f", fit_many, lambda s, t: s.state["search"].best,
                             int(real["train"]["epochs"]), float(real["train"]["lr"]), convergence.STUDY_DATASETS,
                             note="Tip-Adapter-F keys fine-tuned; val top-1 after the val alpha/beta search")


def class_index(source: list[str], target: list[str]) -> torch.Tensor:
    """Columns of the source cache values for the target's classes (shifted sets may hold a subset)."""
    where = {c: i for i, c in enumerate(source)}
    missing = [c for c in target if c not in where]
    if missing:
        raise ValueError(f"{len(missing)} target classes are not source classes (e.g. {missing[:3]}): the cache "
                         f"values of Tip-Adapter only cover the classes it was built on")
    return torch.tensor([where[c] for c in target])


def evaluate(state: dict, task: Task) -> dict:
    dev = state["keys"].device
    x, y = normalised(task.features("test"), dev)
    values = state["values"][:, class_index(state["classnames"], list(task.dataset.classnames)).to(dev)]
    logits = tip_logits(x, state["keys"], values, text_classifier(task).to(dev), state["alpha"], state["beta"],
                        state["clip_scale"])
    return {**classification_metrics(logits.cpu(), y.cpu()), "alpha": state["alpha"], "beta": state["beta"]}


def _fewshot(variant: str):
    def fit_eval(task: Task) -> dict:
        state = fit(task, VARIANTS[variant])
        folder = run_dir(SLUG, "fewshot", task.cfg["profile"], task.dataset.name, task.cfg["arch"], SLUG, task.shots,
                         task.seed, variant)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "search_grid.json").write_text(json.dumps(state["search"].as_dict()))
        return evaluate(state, task)
    return fit_eval


def train(cfg: dict) -> list[dict]:
    """few-shot Tip-Adapter and Tip-Adapter-F on every dataset x shots x seeds (writes run records)"""
    out = []
    for variant in VARIANTS:
        out += run_fewshot(cfg, SLUG, SLUG, _fewshot(variant), variant=variant)
    return out


def evaluate_cmd(cfg: dict) -> list[dict]:
    """same as train: the cache is built and scored in one go on cached features"""
    return train(cfg)


def domain_generalization(cfg: dict) -> list[dict]:
    out = []
    for variant, finetune in VARIANTS.items():
        out += run_transfer(cfg, SLUG, SLUG, "domain_generalization", lambda t, f=finetune: fit(t, f), evaluate,
                            cfg["dg_source"], cfg["dg_targets"], variant=variant, shots=int(cfg["dg_shots"]))
    return out


def grids(cfg: dict, shots: int, variant: str = "") -> dict[str, list[dict]]:
    """Saved validation grids per dataset at `shots` (one per seed)."""
    out: dict[str, list[dict]] = {}
    for name in cfg["datasets"]:
        for seed in cfg["seeds"]:
            folder = run_dir(SLUG, "fewshot", cfg["profile"], name, cfg["arch"], SLUG, shots, seed, variant)
            p = folder / "search_grid.json"
            if p.is_file():
                out.setdefault(name, []).append(json.loads(p.read_text()))
    return out


def figure(cfg: dict, path: Path | None = None) -> Path | None:
    """heat map of validation accuracy over (alpha, beta) per dataset, largest shot count, mean over seeds"""
    from common.report.figures import STYLE, save
    import matplotlib.pyplot as plt

    shots = max(cfg["shots"])
    found = grids(cfg, shots)
    if not found:
        print(f"no search grids under {runs_root() / SLUG} for {shots} shots: run `reproduce` first")
        return None
    path = Path(path if path is not None else cfg["figure"])
    path = path if path.is_absolute() else Path(__file__).parent / path
    cols = min(4, len(found))
    rows = -(-len(found) // cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.6 * rows), squeeze=False)
        for ax in axes.flat[len(found):]:
            ax.axis("off")
        for ax, (name, gs) in zip(axes.flat, found.items()):
            same = [g for g in gs if g["betas"] == gs[0]["betas"] and g["alphas"] == gs[0]["alphas"]]
            acc = torch.tensor([g["acc"] for g in same], dtype=torch.float64).mean(0)
            a, b = same[0]["alphas"], same[0]["betas"]
            im = ax.imshow(acc.numpy(), origin="lower", aspect="auto", cmap="viridis",
                           extent=(a[0], a[-1], b[0], b[-1]))
            bi, ai = divmod(int(torch.argmax(acc.flatten())), len(a))
            ax.plot([a[ai]], [b[bi]], marker="x", color="red")
            ax.set_title(f"{name} ({len(same)} seeds)")
            ax.set_xlabel("alpha (residual ratio)")
            ax.set_ylabel("beta (sharpness)")
            fig.colorbar(im, ax=ax, label="val top-1 (%)")
        fig.suptitle(f"Tip-Adapter, {shots}-shot: validation accuracy over the search grid ({cfg['profile']})")
        fig.tight_layout()
        save(fig, path)
    print(path)
    return path


def cost(cfg: dict) -> dict:
    """wall time of one Tip-Adapter-F epoch on random cached features of size cost.{dim,classes,shots}"""
    c = cfg["cost"]
    views, labels, n, g = random_features(c)
    keys, values = build_cache(views, labels, int(c["classes"]))
    weights = F.normalize(torch.randn(int(c["classes"]), int(c["dim"]), generator=g), dim=-1)
    model = TipAdapterF(keys, values, weights, cfg["init_alpha"], cfg["init_beta"], float(cfg["clip_scale"] or 100.0))
    tcfg = TrainConfig.from_dict({**cfg["train"], "epochs": int(c["epochs"]), "checkpoint_every": 10 ** 6})
    hist = train_tip_f(model, views, labels, keys[: 4 * int(c["classes"])], labels[: 4 * int(c["classes"])], tcfg,
                       int(cfg["batch_size"]), float(cfg["adam_eps"]), threads=cfg.get("threads"))
    return report_epoch_cost(cfg, SLUG, "tip_f", n, hist, suffix="-tip_f")


def reproduce(cfg: dict) -> None:
    """few-shot curves of Tip-Adapter and Tip-Adapter-F on every dataset, domain generalisation (16-shot source
    -> shifted sets), and the alpha/beta heat map"""
    train(cfg)
    domain_generalization(cfg)
    figure(cfg)


def main(argv=None):
    commands = {"train": train, "eval": evaluate_cmd, "reproduce": reproduce, "figure": figure, "cost": cost,
                "convergence": convergence_cmd}
    # every command under cfg['threads'] intra-op threads (encoding included): see common/engine/threads.py
    return run_cli(SLUG, CONFIG, {k: threaded(v) for k, v in commands.items()},
                   "Tip-Adapter (training-free cache model) and Tip-Adapter-F (fine-tuned keys) on cached CLIP "
                   "features; alpha/beta and the -F epoch are chosen on validation data, never on test.", argv)


if __name__ == "__main__":
    main()
