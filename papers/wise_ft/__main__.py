"""WiSE-FT: `python -m papers.wise_ft {train,eval,reproduce,plot}`.

Domain-generalisation protocol of the paper's main figure: fine-tune on the reference set (`dg_source`),
then evaluate theta(alpha) for every alpha of the grid on the reference test split and on each shifted
set (`dg_targets`). One run record per (variant, alpha, dataset, seed): variant `e2e_a0.5` is the
end-to-end fine-tuned model interpolated at alpha = 0.5, `lc_a0.5` the linear-classifier one.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch

from common.cli import inputs, run_cli
from common.config import load_config
from common.engine import convergence
from common.data import build_dataset, fewshot_split
from common.engine import distributed
from common.engine.evaluate import classification_metrics
from common.engine.protocols import Task, bundle_for, checkpoint_dir, run_transfer, sweep_tags
from common.engine.runs import load_records
from common.engine.threads import threaded
from common.data.images import build_transform
from papers.zeroshot_clip.method import templates_for

from .method import (alpha_grid, alpha_name, class_projection, finetune_end_to_end, finetune_linear, interpolate,
                     load_images, mean_std, predict, state_of, zeroshot_head, zeroshot_model)

SLUG = "wise_ft"
CONFIG = Path(__file__).with_name("config.yaml")
PROTOCOL = "domain_generalization"
KINDS = ("e2e", "lc")

_STATES: dict[tuple, dict] = {}       # fitted endpoints per (kind, source, shots, seed, checkpoint)
_EVAL_IMAGES: dict[tuple, torch.Tensor] = {}  # decoded test sets (embedded: decoded once, reused per alpha)


def _key(cfg: dict, kind: str, task: Task) -> tuple:
    opts = json.dumps([cfg[kind], cfg["templates"]], sort_keys=True, default=str)
    return (kind, cfg["profile"], task.bundle.checkpoint_id, str(cfg["data_root"]), task.dataset.name, task.shots,
            task.seed, opts)


def validate(cfg: dict) -> list[str]:
    """WiSE-FT's own options, checked by the CLI before any work (the shared ones are checked in common.validate)."""
    bad = [k for k in cfg["variants"] if k not in KINDS]
    return [f"variants must be among {', '.join(KINDS)}, got {bad}"] if bad else []


# --------------------------------------------------------------------------------------------- fitting
def fit(cfg: dict, kind: str, task: Task) -> dict:
    """theta_0 (zero-shot) and theta_1 (fine-tuned) of one variant on the task's training split."""
    key = _key(cfg, kind, task)
    if key in _STATES:
        return _STATES[key]
    ds, bundle = task.dataset, task.bundle
    templates = templates_for(ds, cfg["templates"])
    out_dir = checkpoint_dir(cfg, SLUG, PROTOCOL, ds.name, SLUG, task.shots, task.seed, kind)
    if kind == "e2e":
        zs = zeroshot_model(bundle, ds.classnames, templates)
        ft = finetune_end_to_end(zs, ds.train, cfg["e2e"], bundle.image_size, *mean_std(bundle), task.seed,
                                 out_dir, desc=f"wise_ft e2e seed{task.seed}")
        state = {"module": zs, "theta_0": state_of(zs), "theta_1": state_of(ft)}
    else:
        head0 = zeroshot_head(bundle, ds.classnames, templates).to(bundle.device)
        tr = task.features("train")  # the eval transform, as the official LC (features cached once)
        head1 = finetune_linear(head0, tr["features"], tr["labels"], cfg["lc"], task.seed, out_dir,
                                desc=f"wise_ft lc seed{task.seed}")
        state = {"module": copy.deepcopy(head0), "theta_0": state_of(head0), "theta_1": state_of(head1)}
    state.update(kind=kind, classnames=list(ds.classnames), alpha=None)
    _STATES[key] = state
    return state


def _set_alpha(state: dict, alpha: float) -> torch.nn.Module:
    if state["alpha"] != alpha:
        state["module"].load_state_dict(interpolate(state["theta_0"], state["theta_1"], alpha))
        state["alpha"] = alpha
    return state["module"]


def _test_images(cfg: dict, task: Task) -> torch.Tensor | torch.utils.data.DataLoader:
    """The test images (under torchrun: this rank's share, `distributed.shard`)."""
    b = task.bundle
    tf = build_transform("test", b.image_size, *mean_std(b))
    items = task.dataset.test
    if not cfg["eval_preload"]:  # real sets: stream from disk at every alpha
        from common.data import ImageListDataset
        return torch.utils.data.DataLoader(ImageListDataset(distributed.shard(items), tf),
                                           batch_size=cfg["eval_batch_size"], num_workers=cfg["e2e"]["num_workers"])
    key = (task.dataset.name, b.image_size, len(items), items[0].impath if items else "", distributed.rank())
    if key not in _EVAL_IMAGES:
        _EVAL_IMAGES[key] = load_images(distributed.shard(items), tf, cfg["eval_batch_size"])
    return _EVAL_IMAGES[key]


def evaluate(cfg: dict, kind: str, alpha: float, state: dict, task: Task) -> dict:
    """Top-1 of theta(alpha) on the task's test split (logits projected onto its classes if a subset)."""
    module = _set_alpha(state, alpha)
    labels = torch.tensor([d.label for d in task.dataset.test], dtype=torch.long)
    if kind == "e2e":   # under torchrun each rank scores its share of the test set and the logits are gathered
        local = predict(module, _test_images(cfg, task), cfg["eval_batch_size"], task.bundle.device)
        logits = distributed.gather_rows(local.reshape(-1, len(state["classnames"])), len(labels))
    else:
        with torch.no_grad():
            logits = module(task.features("test")["features"].to(task.bundle.device)).cpu()
    proj = class_projection(state["classnames"], task.dataset.classnames)
    if proj is not None:
        logits = logits[:, proj]
    return classification_metrics(logits, labels)


# -------------------------------------------------------------------------------------------- commands
@inputs("dg_source")
def train(cfg: dict) -> list[dict]:
    """fine-tune both variants on the reference set for every seed (checkpoints; resumes)"""
    bundle = bundle_for(cfg)
    full = build_dataset(cfg["dg_source"], cfg["data_root"])
    states = []
    for seed in cfg["seeds"]:
        ds = fewshot_split(full, cfg["dg_shots"], seed) if cfg["dg_shots"] else full
        task = Task(cfg, bundle, ds, cfg["dg_shots"], seed, None)
        states += [fit(cfg, kind, task) for kind in cfg["variants"]]
    return states


@inputs("dg_source", "dg_targets")
def eval_all(cfg: dict) -> list[dict]:
    """theta(alpha) on the reference and shifted test sets for every alpha of the grid (trains if needed)"""
    records = []
    for kind in cfg["variants"]:
        for alpha in alpha_grid(cfg["alpha_step"]):
            records += run_transfer(cfg, SLUG, SLUG, PROTOCOL, functools.partial(fit, cfg, kind),
                                    functools.partial(evaluate, cfg, kind, alpha), cfg["dg_source"],
                                    cfg["dg_targets"], variant=f"{kind}_a{alpha_name(alpha)}",
                                    shots=cfg["dg_shots"], seeds=cfg["seeds"],
                                    tags=sweep_tags("alpha", round(float(alpha), 4), 0.5))
    return records


def plot(cfg: dict) -> Path | None:
    """the paper's main figure from the run records: reference vs average-shift accuracy along alpha
    (to `figure_dir`; --set figure_dir=papers/wise_ft puts it beside REPORT.md)"""
    from .plot import curve_figure
    recs = load_records(paper=SLUG, protocol=PROTOCOL, profile=cfg["profile"], backbone=cfg["arch"])
    out = Path(cfg["figure_dir"]) / f"wiseft_curve_{cfg['profile']}_{cfg['arch']}.png"
    path = curve_figure(recs, cfg["dg_source"], cfg["dg_targets"], out,
                        title=f"WiSE-FT, {cfg['arch']} ({cfg['profile']}), source {cfg['dg_source']}")
    print(path if path else "no WiSE-FT records to plot yet")
    return path


@inputs("dg_source", "dg_targets")
def reproduce(cfg: dict) -> None:
    """the alpha curves of E2E and LC fine-tuning on the reference set and its shifts, and their figure"""
    eval_all(cfg)
    plot(cfg)


def convergence_cmd(cfg: dict) -> dict:
    """learning-rate study of end-to-end fine-tuning at the official 10 epochs on the reference set (its whole train
    split, the paper's main setting; seed 1) -> papers/wise_ft/convergence.json. WiSE-FT's premise is about the end
    of fine-tuning, so the official epochs are kept and only the learning rate is chosen."""
    official = load_config(CONFIG, "real")["e2e"]
    bundle = bundle_for(cfg)
    ref = cfg["dg_source"]

    def make_task(name, data, shots, seed):
        ds = data if not cfg["dg_shots"] else fewshot_split(data, int(cfg["dg_shots"]), seed)
        return Task(cfg, bundle, ds, cfg["dg_shots"], seed, None)

    val_images = {}

    def val_top1(model, task):
        b, ds = task.bundle, task.dataset
        if ds.name not in val_images:   # decoded once for the whole study
            val_images[ds.name] = load_images(ds.val, build_transform("test", b.image_size, *mean_std(b)),
                                              cfg["eval_batch_size"])
        images = val_images[ds.name]
        labels = torch.tensor([d.label for d in ds.val], dtype=torch.long)
        return classification_metrics(predict(model, images, cfg["eval_batch_size"], b.device), labels)["top1"]

    def fit_one(task):
        ds, b = task.dataset, task.bundle
        zs = zeroshot_model(b, ds.classnames, templates_for(ds, cfg["templates"]))
        return finetune_end_to_end(zs, ds.train, {**cfg["e2e"], **task.extra["schedule"]}, b.image_size,
                                   *mean_std(b), task.seed, desc=f"wise_ft e2e {ds.name}",
                                   val_score=(lambda m: val_top1(m, task)) if task.extra.get("on_eval") else None)
    return convergence.study(cfg, SLUG, SLUG, "e2e", convergence.one_by_one(fit_one), val_top1,
                             int(official["epochs"]), float(official["lr"]), [ref], make_task=make_task,
                             shots=int(cfg["dg_shots"] or 0), lr_factors=(1, 10), fractions=(1,),
                             note=f"end-to-end fine-tuning of the zero-shot model on {ref} "
                             f"({'its whole train split' if not cfg['dg_shots'] else str(cfg['dg_shots']) + ' shots'}), "
                             f"batch {cfg['e2e']['batch_size']}; shots 0 = the whole train split")


def main(argv=None):
    cmds = {"train": train, "eval": eval_all, "reproduce": reproduce, "plot": plot, "convergence": convergence_cmd}
    return run_cli(SLUG, CONFIG, {k: threaded(v) for k, v in cmds.items()},
                   "WiSE-FT: fine-tune zero-shot CLIP (end-to-end or linear head) and interpolate the weights.", argv,
                   validate=validate)


if __name__ == "__main__":
    main()
