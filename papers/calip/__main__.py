"""CALIP: `python -m papers.calip {train,eval,reproduce}`.

eval      zero-shot CALIP on every dataset (fusion weights searched on each dataset's validation split),
          with its ablation variants, and the domain-generalisation rows (weights from the source's val)
train     CALIP-FS few-shot (learnable projections in the attention) over datasets x shots x seeds
reproduce both
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from common.cli import inputs, run_cli
from common.clip import logit_scale, zeroshot_classifier
from common.data import build_dataset, sample_per_class
from common.config import load_config
from common.engine import TrainConfig, classification_metrics, run_dir, write_record
from common.engine import convergence
from common.engine.convergence import with_schedule
from common.engine.dense import dense_features, dense_train_views, fit_dense_head, predict_dense, train_pool
from common.engine.cells import owns
from common.engine.protocols import Task, bundle_for, run_fewshot
from papers.zeroshot_clip.method import templates_for

from .method import CalipFS, beta_grid, calip_terms, fuse, search_betas

SLUG = "calip"
CONFIG = Path(__file__).with_name("config.yaml")
ZS_VARIANTS = ("val", "val_b2", "val_b3", "val_wrong_axis", "test_oracle", "paper")


def text_classifier(bundle, dataset, cfg) -> torch.Tensor:
    """F_t: the dataset's explicit template set from the config if any, else zero-shot CLIP's `templates`."""
    explicit = (cfg.get("template_sets") or {}).get(dataset.name)
    return zeroshot_classifier(bundle, dataset.classnames, explicit or templates_for(dataset, cfg["templates"]))


def grids(cfg, dataset_name: str) -> tuple[list[float], list[float]]:
    s = cfg["search"]
    b2_max, b3_max = (s.get("ranges") or {}).get(dataset_name, (s["beta2_max"], s["beta3_max"]))
    return beta_grid(b2_max, s["steps"]), beta_grid(b3_max, s["steps"])


def selection_split(task: Task) -> tuple[str, list]:
    """Labelled images the fusion weights are searched on: the validation split, or, for a dataset without
    one (ImageNet: its official val is our test), `val_from_train` images per class drawn from train."""
    if task.dataset.val:
        return "val", task.dataset.val
    k = task.cfg.get("val_from_train") or 0
    if k < 1 or not task.dataset.train:
        raise ValueError(f"{task.dataset.name} has no validation split to search CALIP's fusion weights on; set "
                         f"val_from_train=K to draw K images per class from its train split, or use variant paper")
    return "val_from_train", sample_per_class(task.dataset.train, int(k), seed=0)


def split_terms(task: Task, split: str, F_t: torch.Tensor, text_softmax: str = "positions", items=None):
    cfg = task.cfg
    items = task.dataset.split(split) if items is None else items
    feats = dense_features(task.bundle, task.dataset.name, split, items, mode=cfg["dense_mode"],
                           batch_size=cfg["eval_batch_size"])
    dev = task.bundle.device
    terms = calip_terms(feats["global"].to(dev), feats["dense"].to(dev), F_t.to(dev), logit_scale(task.bundle),
                        cfg["attn_scale"], cfg["normalize_updated"], text_softmax)
    return terms, feats["labels"].to(dev)


def choose_betas(variant: str, cfg, name: str, val, test, val_wrong=None) -> tuple[float, float, float | None]:
    """(beta2, beta3, selection accuracy) of a zero-shot variant. Only `test_oracle` looks at test labels."""
    g2, g3 = grids(cfg, name)
    if variant == "val":
        return search_betas(*val, g2, g3)
    if variant == "val_b2":      # visual-guided text term only
        return search_betas(*val, g2, [0.0])
    if variant == "val_b3":      # text-aware visual term only
        return search_betas(*val, [0.0], g3)
    if variant == "val_wrong_axis":
        return search_betas(*val_wrong, g2, g3)
    if variant == "test_oracle":  # the official protocol (search on test labels): an upper bound, never the result
        return search_betas(*test, g2, g3)
    if variant == "paper":
        b2, b3 = cfg["paper_betas"][name]
        return float(b2), float(b3), None
    raise ValueError(f"unknown CALIP variant {variant!r}; known: {ZS_VARIANTS}")


def _zs_record(cfg, variant, protocol, dataset, source, values, wall) -> dict:
    rec = {"paper": SLUG, "method": SLUG, "variant": variant, "profile": cfg["profile"], "protocol": protocol,
           "dataset": dataset, "source": source, "backbone": cfg["arch"], "shots": None, "seed": 0,
           "metrics": {k: round(float(v), 4) for k, v in values.items()}, "config": cfg, "wall_s": round(wall, 2)}
    if variant == "test_oracle":       # the official search on test labels: shown, never ranked
        rec["selected_on"] = "test"
    elif variant.startswith("val"):
        rec["selected_on"] = "val"
    return rec


def _done(cfg, protocol, dataset, variant, source=None) -> bool:
    return (run_dir(SLUG, protocol, cfg["profile"], dataset, cfg["arch"], SLUG, None, 0, variant, source)
            / "metrics.json").is_file() and not cfg.get("force", False)


def zeroshot_dataset(cfg, name: str, variants: list[str]) -> dict[str, tuple[float, float]]:
    """Run every zero-shot variant on one dataset; returns the chosen (beta2, beta3) per variant."""
    bundle = bundle_for(cfg)
    variants = [v for v in variants if v != "paper" or name in (cfg.get("paper_betas") or {})]
    t0 = time.time()
    task = Task(cfg, bundle, build_dataset(name, cfg["data_root"]), None, 0, None)
    F_t = text_classifier(bundle, task.dataset, cfg)
    sel_split, sel_items = selection_split(task) if any(v.startswith("val") for v in variants) else ("val", [])
    val = split_terms(task, sel_split, F_t, items=sel_items) if sel_items else None
    test = split_terms(task, "test", F_t)
    wrong = ({"val": split_terms(task, sel_split, F_t, "classes", sel_items),
              "test": split_terms(task, "test", F_t, "classes")} if "val_wrong_axis" in variants else {})
    zs_top1 = classification_metrics(test[0].zero_shot, test[1])["top1"]
    chosen = {}
    for variant in variants:
        b2, b3, sel = choose_betas(variant, cfg, name, val, test, wrong.get("val"))
        terms, labels = wrong["test"] if variant == "val_wrong_axis" else test
        values = {**classification_metrics(fuse(terms, b2, b3), labels), "beta2": b2, "beta3": b3, "zs_top1": zs_top1}
        if sel is not None:
            values["select_top1"] = sel
        write_record(_zs_record(cfg, variant, "zeroshot", name, name, values, time.time() - t0))
        chosen[variant] = (b2, b3)
        print(f"{name:24s} {variant:15s} top1 {values['top1']:6.2f} (CLIP {zs_top1:6.2f}) b2={b2:.3f} b3={b3:.3f}")
    return chosen


@inputs("datasets", "dg_source", "dg_targets")
def evaluate(cfg: dict) -> None:
    """zero-shot CALIP on every dataset (all variants) and the domain-generalisation rows"""
    for name in cfg["datasets"]:
        if not owns(name, None, 0):   # a job of a launch: another job's cell
            continue
        if all(_done(cfg, "zeroshot", name, v) for v in cfg["zeroshot_variants"]
               if v != "paper" or name in (cfg.get("paper_betas") or {})):
            continue
        zeroshot_dataset(cfg, name, cfg["zeroshot_variants"])
    domain_generalization(cfg)


def domain_generalization(cfg: dict) -> None:
    """CALIP with the source's val-searched weights on the source and each shifted target (no target labels used)."""
    source, targets = cfg["dg_source"], [t for t in cfg["dg_targets"] if t != cfg["dg_source"]]
    if not targets or not owns(source, None, 0) or all(_done(cfg, "domain_generalization", t, "val", source) for t in [source] + targets):
        return
    t0 = time.time()
    rec = run_dir(SLUG, "zeroshot", cfg["profile"], source, cfg["arch"], SLUG, None, 0, "val") / "metrics.json"
    if _done(cfg, "zeroshot", source, "val"):  # the source's val-searched weights, as its zero-shot run chose them
        m = json.loads(rec.read_text())["metrics"]
        b2, b3 = m["beta2"], m["beta3"]
    else:
        b2, b3 = zeroshot_dataset(cfg, source, ["val"])["val"]
    bundle = bundle_for(cfg)
    for name in [source] + targets:
        task = Task(cfg, bundle, build_dataset(name, cfg["data_root"]), None, 0, None)
        terms, labels = split_terms(task, "test", text_classifier(bundle, task.dataset, cfg))
        values = {**classification_metrics(fuse(terms, b2, b3), labels), "beta2": b2, "beta3": b3,
                  "zs_top1": classification_metrics(terms.zero_shot, labels)["top1"]}
        write_record(_zs_record(cfg, "val", "domain_generalization", name, source, values, time.time() - t0))


def fit_calip_fs(task: Task) -> CalipFS:
    cfg, fs = task.cfg, task.cfg["fs"]
    F_t = text_classifier(task.bundle, task.dataset, cfg)
    if fs["beta"] == "val":  # CALIP's search on this run's few-shot val split: CALIP-FS starts at that CALIP
        # (no val split, e.g. ImageNet: search on the K-shot training images, test-time transform)
        split = "val" if task.dataset.val else "train"
        b2, b3, _ = search_betas(*split_terms(task, split, F_t), *grids(cfg, task.dataset.name))
    else:
        b2, b3 = (float(b) for b in fs["beta"])
    model = CalipFS(F_t, b2, b3, logit_scale(task.bundle), cfg["attn_scale"], cfg["normalize_updated"])
    model.to(task.bundle.device)
    views = dense_train_views(task.bundle, task.dataset.name, task.dataset.train, cfg["dense_mode"],
                              fs["train_transform"], max(1, int(cfg["cache_views"])), cfg["eval_batch_size"],
                              train_pool(task.dataset.name, cfg["data_root"], cfg["train_pool"]))
    tcfg = with_schedule(TrainConfig.from_dict(dict(fs["train"], seed=task.seed)), task)
    hist = fit_dense_head(model, views, tcfg, fs["batch_size"], task.seed, task.out_dir, desc="calip-fs",
                          on_epoch_end=convergence.epoch_validation(
                              task, lambda: evaluate_calip_fs(model, task, "val")["top1"]))
    return convergence.keep_history(model, hist)


def evaluate_calip_fs(model: CalipFS, task: Task, split: str = "test") -> dict:
    feats = dense_features(task.bundle, task.dataset.name, split, task.dataset.split(split), mode=task.cfg["dense_mode"],
                           batch_size=task.cfg["eval_batch_size"])
    logits = predict_dense(model, feats, task.cfg["fs"]["eval_chunk"])
    return {**classification_metrics(logits, feats["labels"]), "beta2": model.beta2, "beta3": model.beta3}


def train(cfg: dict) -> list[dict]:
    """CALIP-FS few-shot: datasets x shots x seeds (trained on cached dense features)"""
    return run_fewshot(cfg, SLUG, "calip_fs", lambda task: evaluate_calip_fs(fit_calip_fs(task), task))


def reproduce(cfg: dict) -> None:
    """zero-shot CALIP (all datasets, variants, DG) and CALIP-FS few-shot"""
    evaluate(cfg)
    train(cfg)


def convergence_cmd(cfg: dict) -> dict:
    """convergence study of CALIP-FS at the official recipe (SGD, 200 epochs; 16 shots, seed 1): learning rate,
    then budgets -> papers/calip/convergence.json"""
    official = load_config(CONFIG, "real")["fs"]["train"]
    cfg = {**cfg, "fs": {**cfg["fs"], "train": dict(official)}}
    return convergence.study(cfg, SLUG, "calip_fs", "", convergence.one_by_one(fit_calip_fs),
                             lambda model, task: evaluate_calip_fs(model, task, "val")["top1"],
                             int(official["epochs"]), float(official["lr"]), convergence.STUDY_DATASETS,
                             lr_factors=(1, 10, 100), note="CALIP-FS with the official optimiser (SGD, momentum 0.9); betas searched on val")


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": evaluate, "reproduce": reproduce,
                                  "convergence": convergence_cmd},
                   "CALIP: parameter-free attention for zero-shot CLIP (eval), CALIP-FS few-shot (train).", argv)


if __name__ == "__main__":
    main()
