"""MaskCLIP: `python -m papers.maskclip {train,eval,reproduce,figure}`.

eval       annotation-free segmentation of every dataset with `arch`: the naive query-key dense baseline
           (`naive`), MaskCLIP's value path (`raw`) and its refinements (`ks`, `pd`, `ks_pd`: thresholds chosen on
           the validation split; `ks_pd_official`: the released thresholds and key normalisation), on the
           dataset's vocabulary and, with `distractor_names`, on that vocabulary plus absent class names; one
           record per variant, vocabulary and test fold (seed)
train      nothing to train: builds and caches the text classifiers
reproduce  eval with every backbone of `reproduce_backbones`, then the overlay figures
figure     image / ground truth / prediction overlays from the predictions eval saved (to `figure_dir`)
"""
from __future__ import annotations

import copy
import itertools
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from common.atomic import atomic_write
from common.cli import inputs, run_cli
from common.clip import zeroshot_classifier
from common.data import build_dataset
from common.engine import run_dir, write_record
from common.engine.protocols import bundle_for
from common.engine.runs import print_record
from common.errors import ConfigError, DataError, UserError, one_line
from common.paths import runs_root

from .method import KS_NORMS, Refinement
from .segment import (Setting, default_templates, fold_ids, fold_scores, miou_all, pixel_stats, run_pass)

SLUG = "maskclip"
PROTOCOL = "segmentation"
CONFIG = Path(__file__).with_name("config.yaml")
VARIANTS = ("naive", "raw", "ks", "pd", "ks_pd", "ks_pd_official")
DISTRACTED = "+distractors"      # dataset label suffix of the runs with the enlarged vocabulary
FIGURE_VARIANTS = ("naive", "raw", "ks_pd")


# ------------------------------------------------------------------------------------------- options
def validate(cfg: dict) -> list[str]:
    out = []
    if cfg["templates"] not in ("maskclip", "single"):
        out.append(f"templates must be maskclip (the 85 MaskCLIP templates) or single, got {cfg['templates']!r}")
    if cfg["pixel_norm"] not in ("imagenet", "model"):
        out.append(f"pixel_norm must be imagenet or model, got {cfg['pixel_norm']!r}")
    size, scale = cfg.get("test_size"), cfg.get("test_scale")
    if (size is None) == (scale is None or scale == []):
        out.append("give exactly one of test_size (pixels, e.g. --set test_size=512) or test_scale (multiples of the "
                   "model's input size, e.g. --set test_scale=[1.0,2.0]); set the other to null")
    if size is not None and (not isinstance(size, int) or size < 16):
        out.append(f"test_size must be an integer >= 16 pixels, got {size!r}")
    for s in scale or []:
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.1 <= s <= 16:
            out.append(f"test_scale values must be numbers in [0.1, 16], got {s!r}")
    for k, v in (cfg.get("test_size_overrides") or {}).items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 16:
            out.append(f"test_size_overrides.{k} must be an integer >= 16 pixels, got {v!r}")
    variants = cfg["variants"]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants or len(set(variants)) != len(variants):
        out.append(f"variants must be distinct names out of {', '.join(VARIANTS)}, got {variants}")
    for key, needed in (("pd_grid", {"pd", "ks_pd"}), ("ks_grid", {"ks", "ks_pd"})):
        grid = cfg[key]
        if any(not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t <= 1 for t in grid):
            out.append(f"{key} values must be thresholds in (0, 1], got {grid}")
        if needed & set(variants) and not grid:
            out.append(f"{key} is empty but variants {sorted(needed & set(variants))} choose a threshold from it")
    th = cfg["official_thresholds"]
    for k in ("t_pd", "t_ks"):
        v = th.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
            out.append(f"official_thresholds.{k} must be a number in [0, 1], got {v!r}")
    names = cfg["distractor_names"]
    if any(not isinstance(n, str) or not n.strip() for n in names) or len(set(names)) != len(names):
        out.append(f"distractor_names must be distinct non-empty class names, got {names}")
    for key in ("val_images", "figure_images"):
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            out.append(f"{key} must be an integer >= 0, got {v!r}")
    seeds = cfg["seeds"]
    if any(not isinstance(s, int) or isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
        out.append(f"seeds must be distinct integers (one test fold each), got {seeds}")
    rb = cfg["reproduce_backbones"]
    if not isinstance(rb, dict) or any(not isinstance(k, str) or not isinstance(v, str) for k, v in rb.items()):
        out.append("reproduce_backbones must map arch -> pretrained (tag or checkpoint path), e.g. {RN50: openai}")
    return out


# ------------------------------------------------------------------------------------------ helpers
def long_sides(cfg: dict, bundle, name: str) -> list[int]:
    """Candidate long sides of the network input for one dataset (one: no choice to make)."""
    fixed = (cfg.get("test_size_overrides") or {}).get(name, cfg.get("test_size"))
    if fixed is not None:
        return [int(fixed)]
    return list(dict.fromkeys(int(round(s * bundle.image_size)) for s in cfg["test_scale"]))


def vocabularies(cfg: dict, bundle, ds) -> dict[str, torch.Tensor]:
    """{dataset label: (K', D) text classifier}: the dataset's classes, and those plus the distractor names."""
    names = list(cfg["distractor_names"])
    templates = default_templates(cfg["templates"])
    out = {ds.name: zeroshot_classifier(bundle, ds.classnames, templates)}
    if names:
        out[ds.name + DISTRACTED] = zeroshot_classifier(bundle, list(ds.classnames) + names, templates)
    return out


def selection_items(cfg: dict, ds) -> list:
    """Labelled images the input scale and thresholds are chosen on: the val split, else `val_images` train images."""
    if ds.val:
        return list(ds.val)
    k = int(cfg["val_images"])
    if k < 1 or not ds.train:
        raise ConfigError(f"{ds.name} has no validation split to choose MaskCLIP's thresholds on; set val_images=N "
                          f"to draw N images from its train split")
    return random.Random(0).sample(list(ds.train), min(k, len(ds.train)))


def grid_settings(cfg: dict) -> dict[str, Setting]:
    """Every setting the val pass scores: the two plain sources and each candidate threshold of each variant."""
    v = set(cfg["variants"])
    out = {"naive": Setting("attention"), "raw": Setting("value")}
    if "ks" in v:
        out.update({f"ks@{t}": Setting("value", Refinement(t_ks=t)) for t in cfg["ks_grid"]})
    if "pd" in v:
        out.update({f"pd@{t}": Setting("value", Refinement(t_pd=t)) for t in cfg["pd_grid"]})
    if "ks_pd" in v:
        out.update({f"ks_pd@{p},{k}": Setting("value", Refinement(t_pd=p, t_ks=k))
                    for p, k in itertools.product(cfg["pd_grid"], cfg["ks_grid"])})
    return out


def official_setting(cfg: dict) -> Setting:
    th = cfg["official_thresholds"]
    return Setting("value", Refinement(t_pd=float(th["t_pd"]), t_ks=float(th["t_ks"]), ks_norm=KS_NORMS[1]))


def choose(variant: str, val_scores: dict[str, float]) -> str:
    """The val-best setting name of a variant (ties: the first candidate in grid order)."""
    if variant in ("naive", "raw"):
        return variant
    cands = [k for k in val_scores if k.split("@")[0] == variant]
    return max(cands, key=lambda k: (val_scores[k], -cands.index(k)))


def _pending(cfg: dict, labels: list[str]) -> bool:
    if cfg.get("force"):
        return True
    paths = [run_dir(SLUG, PROTOCOL, cfg["profile"], d, cfg["arch"], SLUG, None, s, v) / "metrics.json"
             for d in labels for v in cfg["variants"] for s in cfg["seeds"]]
    if all(p.is_file() for p in paths):
        for p in paths:
            print_record(json.loads(p.read_text()), existing=True)
        return False
    return True


def overlay_path(profile: str, dataset: str, arch: str) -> Path:
    return runs_root() / SLUG / PROTOCOL / profile / dataset / f"overlays_{arch}.npz"


# --------------------------------------------------------------------------------------------- eval
def segmentation_set(cfg: dict, name: str):
    """The dataset, refused at once unless every test (and selection) item has a mask, the folds can be cut and no
    distractor name is one of its classes."""
    ds = build_dataset(name, cfg["data_root"])
    items = list(ds.test) + list(ds.val or ds.train)
    if not ds.test or any(d.mask is None for d in items):
        raise DataError(f"{name} has no segmentation masks; MaskCLIP needs a segmentation set "
                        f"(emb_segmentation, voc2012_seg, pascal_context, ade20k)")
    clash = sorted(set(cfg["distractor_names"]) & set(ds.classnames))
    if clash:
        raise ConfigError(f"distractor_names {clash} are classes of {name}; distractors must be absent classes")
    if len(ds.test) < len(cfg["seeds"]):
        raise DataError(f"{name}: {len(ds.test)} test images cannot be cut into {len(cfg['seeds'])} folds (seeds); "
                        f"give fewer seeds")
    return ds


def evaluate_dataset(cfg: dict, name: str) -> list[dict]:
    """The whole protocol on one dataset with cfg's arch: choices on val, then one pass over the test split."""
    t0 = time.time()
    ds = segmentation_set(cfg, name)
    bundle = bundle_for(cfg)
    vocabs = vocabularies(cfg, bundle, ds)
    if not _pending(cfg, list(vocabs)):
        return []
    val = selection_items(cfg, ds)
    K, ignore = ds.num_classes, int(ds.meta.get("ignore_index", 255))
    reduce = bool(ds.meta.get("reduce_zero_label", False))
    mean, std = pixel_stats(cfg["pixel_norm"], bundle)
    common = dict(num_classes=K, mean=mean, std=std, reduce_zero_label=reduce, ignore_index=ignore,
                  batch_size=int(cfg["eval_batch_size"]))

    # 1. input scale (embedded: several candidates) by the plain value path's val mIoU on the dataset's vocabulary
    sides = long_sides(cfg, bundle, name)
    one_fold = torch.zeros(len(val), dtype=torch.long)
    scale_scores = {}
    if len(sides) > 1:
        for side in sides:
            cms, _ = run_pass(bundle, val, side, {"raw": Setting("value")}, {name: vocabs[name]}, folds=one_fold,
                              n_folds=1, desc=f"{name} val {side}px", **common)
            scale_scores[side] = miou_all(cms[(name, "raw")], K)
    side = max(sides, key=lambda s: (scale_scores.get(s, 0.0), -sides.index(s)))

    # 2. thresholds per variant and vocabulary on val at that scale
    grid = grid_settings(cfg)
    cms, _ = run_pass(bundle, val, side, grid, vocabs, folds=one_fold, n_folds=1, desc=f"{name} val grid", **common)
    chosen: dict[tuple[str, str], tuple[str, Setting, float | None]] = {}
    for label in vocabs:
        val_scores = {s: miou_all(cms[(label, s)], K) for s in grid}
        for variant in cfg["variants"]:
            if variant == "ks_pd_official":
                chosen[(label, variant)] = ("official", official_setting(cfg), None)
            else:
                key = choose(variant, val_scores)
                chosen[(label, variant)] = (key, grid[key], val_scores[key])

    # 3. test: every chosen setting from one pass, per fold
    settings = {key: s for key, s, _ in chosen.values()}
    n_folds = len(cfg["seeds"])
    folds = fold_ids(len(ds.test), n_folds, seed=0)
    shown = random.Random(0).sample(range(len(ds.test)), min(int(cfg["figure_images"]), len(ds.test)))
    cms, kept = run_pass(bundle, ds.test, side, settings, vocabs, folds=folds, n_folds=n_folds, keep=shown,
                         desc=f"{name} test", **common)
    wall = time.time() - t0
    records = []
    for (label, variant), (key, setting, val_miou) in chosen.items():
        cm = cms[(label, key)]
        whole = miou_all(cm, K)
        r = setting.refinement
        extra = {"miou_all": whole, "test_size": side, "t_pd": r.t_pd, "t_ks": r.t_ks, "vocabulary": len(vocabs[label])}
        if val_miou is not None:
            extra["val_miou"] = val_miou
        for seed, fold, score in zip(cfg["seeds"], range(n_folds), fold_scores(cm, K)):
            rec = {"paper": SLUG, "method": SLUG, "variant": variant, "profile": cfg["profile"], "protocol": PROTOCOL,
                   "dataset": label, "source": label, "backbone": cfg["arch"], "shots": None, "seed": seed,
                   "n_classes": len(vocabs[label]),
                   "metrics": {k: round(float(v), 4) for k, v in {**score, **extra}.items()},
                   "config": cfg, "wall_s": round(wall, 2),
                   "fold": {"index": fold, "of": n_folds, "images": int((folds == fold).sum())},
                   "ks_norm": r.ks_norm, "selected_on": "val" if val_miou is not None else None,
                   "scale_choice": {str(k): round(v, 4) for k, v in scale_scores.items()}}
            write_record(rec)
            print_record(rec)
            records.append(rec)
    if kept:
        save_overlays(cfg, ds, side, shown, kept, {v: chosen[(name, v)][0] for v in FIGURE_VARIANTS
                                                   if (name, v) in chosen})
    return records


def save_overlays(cfg: dict, ds, side: int, shown: list[int], kept: dict, keys: dict[str, str]) -> Path:
    """The figure's inputs: images, masks and the predictions of `keys` (variant -> setting) on the shown items."""
    arrays = {"image": np.stack([kept[i]["image"] for i in shown]), "mask": np.stack([kept[i]["mask"] for i in shown]),
              "classnames": np.array(ds.classnames), "variants": np.array(list(keys)),
              "ignore_index": np.array(int(ds.meta.get("ignore_index", 255))), "test_size": np.array(side)}
    for variant, key in keys.items():
        arrays[f"pred_{variant}"] = np.stack([kept[i][(ds.name, key)] for i in shown])
    path = overlay_path(cfg["profile"], ds.name, cfg["arch"])

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return atomic_write(path, write)


@inputs("datasets")
def evaluate(cfg: dict) -> list[dict]:
    """annotation-free segmentation (naive, raw, ks, pd, ks_pd, ks_pd_official) on every dataset with `arch`"""
    for name in cfg["datasets"]:
        segmentation_set(cfg, name)
    return [r for name in cfg["datasets"] for r in evaluate_dataset(cfg, name)]


@inputs("datasets")
def train(cfg: dict) -> None:
    """nothing to train (training-free): builds and caches the text classifiers of every dataset"""
    bundle = bundle_for(cfg)
    for name in cfg["datasets"]:
        ds = build_dataset(name, cfg["data_root"])
        for label, t in vocabularies(cfg, bundle, ds).items():
            print(f"{label}: {t.shape[0]} classes x {t.shape[1]} dims, {cfg['templates']} templates")


def backbone_configs(cfg: dict) -> list[dict]:
    """One config per backbone of `reproduce_backbones` (cfg's own arch when the mapping is empty), weights checked."""
    from common.clip.loader import check_weights
    pairs = list(cfg["reproduce_backbones"].items()) or [(cfg["arch"], cfg["pretrained"])]
    problems = []
    for arch, pretrained in pairs:
        try:
            check_weights(arch, pretrained)
        except UserError as err:
            problems.append(f"reproduce_backbones.{arch}: {one_line(str(err))}")
    if problems:
        raise DataError("; ".join(problems))
    out = []
    for arch, pretrained in pairs:
        c = copy.deepcopy(cfg)
        c["arch"], c["pretrained"] = arch, pretrained
        out.append(c)
    return out


@inputs("datasets", weights=False)
def reproduce(cfg: dict) -> None:
    """eval with every backbone of reproduce_backbones (both tiny towers on the embedded profile), then the figures"""
    configs = backbone_configs(cfg)
    for name in cfg["datasets"]:
        segmentation_set(cfg, name)
    for c in configs:
        evaluate(c)
    figure(cfg)


@inputs(weights=False)
def figure(cfg: dict) -> list[Path]:
    """image / ground truth / prediction overlays of the saved test images, drawn to figure_dir
    (--set figure_dir=papers/maskclip puts them beside REPORT.md)"""
    from .plot import overlay_figures
    return overlay_figures(cfg, SLUG, PROTOCOL, "MaskCLIP")


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": evaluate, "reproduce": reproduce, "figure": figure},
                   "MaskCLIP: annotation-free segmentation from CLIP's last-layer value path (training-free).", argv,
                   validate=validate)


if __name__ == "__main__":
    main()
