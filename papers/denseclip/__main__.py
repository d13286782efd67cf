"""DenseCLIP: `python -m papers.denseclip {train,eval,reproduce,convergence,figure}`.

train        train every variant of `variants` on each dataset's train split, seeds `seeds`, and score it on the
             test split (one record per variant and seed; `eval` is the same command: a finished run is skipped)
reproduce    train with every backbone of `reproduce_backbones`, then the overlay figures
convergence  lr (official x convergence_lr_factors at the official 127 epochs), then budgets of 1/8..1 of them, for
             the released variant on emb_segmentation, seed 1; val mIoU -> papers/denseclip/convergence.json
figure       image / ground truth / prediction overlays of the saved test images (to `figure_dir`)
"""
from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from common.atomic import atomic_write
from common.cli import inputs, run_cli
from common.config import load_config
from common.data import build_dataset
from common.engine import convergence, run_dir, write_record
from common.engine.cache import mean_std
from common.engine.convergence import keep_history
from common.engine.protocols import bundle_for
from common.engine.runs import print_record
from common.engine.threads import threaded
from common.errors import ConfigError, DataError
from common.paths import runs_root
from papers.maskclip.__main__ import backbone_configs  # one config per reproduce backbone, weights checked

from .method import VARIANT_SPEC, VARIANTS
from .segment import (FeatureBank, build_model, evaluate_cached, evaluate_images, fit_cached, fit_images, miou,
                      preload, train_config)

SLUG = "denseclip"
PROTOCOL = "segmentation"
CONFIG = Path(__file__).with_name("config.yaml")
BASELINE_METHOD = "clip_fpn"     # the paper's "RN50-CLIP": the same FPN on the CLIP image tower, no language
MODEL_KEYS = ("n_ctx", "class_len", "ctx_init_std", "decoder_width", "decoder_heads", "decoder_layers",
              "decoder_dropout", "gamma_init", "fpn_channels", "head_dropout", "freeze_backbone", "vit_out_indices")
FIGURE_VARIANTS = ("baseline", "post")


# ------------------------------------------------------------------------------------------- options
def validate(cfg: dict) -> list[str]:
    out = []
    v = cfg["variants"]
    if not v or any(x not in VARIANTS for x in v) or len(set(v)) != len(v):
        out.append(f"variants must be distinct names out of {', '.join(VARIANTS)}, got {v}")
    m = cfg["model"]
    for key in ("n_ctx", "class_len", "decoder_width", "decoder_heads", "decoder_layers", "fpn_channels"):
        if not isinstance(m[key], int) or isinstance(m[key], bool) or m[key] < 1:
            out.append(f"model.{key} must be an integer >= 1, got {m[key]!r}")
    if isinstance(m["class_len"], int) and m["class_len"] < 3:
        out.append(f"model.class_len must be >= 3 (SOS, at least one name token, EOT), got {m['class_len']}")
    if isinstance(m["decoder_width"], int) and isinstance(m["decoder_heads"], int) and m["decoder_heads"] >= 1 \
            and m["decoder_width"] % m["decoder_heads"]:
        out.append(f"model.decoder_width {m['decoder_width']} must be divisible by model.decoder_heads "
                   f"{m['decoder_heads']}")
    for key in ("decoder_dropout", "head_dropout"):
        if not isinstance(m[key], (int, float)) or not 0 <= m[key] < 1:
            out.append(f"model.{key} must be in [0, 1), got {m[key]!r}")
    for key in ("gamma_init", "ctx_init_std"):
        if not isinstance(m[key], (int, float)) or m[key] < 0:
            out.append(f"model.{key} must be a number >= 0, got {m[key]!r}")
    if not isinstance(m["freeze_backbone"], bool):
        out.append(f"model.freeze_backbone must be true or false, got {m['freeze_backbone']!r}")
    vi = m["vit_out_indices"]
    if not isinstance(vi, list) or (vi and (len(vi) != 4 or any(not isinstance(i, int) or i < 0 for i in vi))):
        out.append(f"model.vit_out_indices must be [] or 4 block indices, got {vi!r}")
    for key in ("aux_weight", "backbone_lr_mult"):
        if not isinstance(cfg[key], (int, float)) or cfg[key] < 0:
            out.append(f"{key} must be a number >= 0, got {cfg[key]!r}")
    if not isinstance(cfg["tau"], (int, float)) or cfg["tau"] <= 0:
        out.append(f"tau must be > 0, got {cfg['tau']!r}")
    for key in ("crop_size", "test_stride"):
        if not isinstance(cfg[key], int) or cfg[key] < 32:
            out.append(f"{key} must be an integer >= 32 pixels, got {cfg[key]!r}")
    ts = cfg["train_scale"]
    if not isinstance(ts, list) or len(ts) != 2 or any(not isinstance(s, int) or s < 32 for s in ts):
        out.append(f"train_scale must be two integers >= 32 (long, short side), got {ts!r}")
    if not isinstance(cfg["input_size"], int) or (cfg["input_size"] != 0 and cfg["input_size"] < 16):
        out.append(f"input_size must be 0 (the model's own size) or an integer >= 16, got {cfg['input_size']!r}")
    for key in ("figure_images", "workers"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 0:
            out.append(f"{key} must be an integer >= 0, got {cfg[key]!r}")
    f = cfg["convergence_lr_factors"]
    if not f or any(not isinstance(x, (int, float)) or x <= 0 for x in f) or 1 not in f:
        out.append(f"convergence_lr_factors must be positive numbers including 1 (the official lr), got {f}")
    seeds = cfg["seeds"]
    if any(not isinstance(s, int) or isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
        out.append(f"seeds must be distinct integers, got {seeds}")
    for name, mapping in (("reproduce_backbones", cfg["reproduce_backbones"]), ("arch_overrides", cfg["arch_overrides"])):
        if not isinstance(mapping, dict):
            out.append(f"{name} must be a mapping keyed by arch")
    for arch, over in (cfg["arch_overrides"] or {}).items():
        bad = set(over or {}) - {"train_scale", "crop_size", "test_stride", "vit_out_indices", "input_size"}
        if not isinstance(over, dict) or bad:
            out.append(f"arch_overrides.{arch} may set train_scale, crop_size, test_stride, vit_out_indices, "
                       f"input_size; got {sorted(bad) if isinstance(over, dict) else over!r}")
    return out


def for_arch(cfg: dict) -> dict:
    """cfg with its arch's overrides applied (the ViT recipe: 640 crops, its pyramid blocks)."""
    c = copy.deepcopy(cfg)
    for k, v in (cfg["arch_overrides"] or {}).get(cfg["arch"], {}).items():
        if k == "vit_out_indices":
            c["model"]["vit_out_indices"] = v
        else:
            c[k] = v
    return c


def model_config(cfg: dict) -> dict:
    m = {k: cfg["model"][k] for k in MODEL_KEYS}
    m["vit_out_indices"] = m["vit_out_indices"] or None
    return m


def method_of(variant: str) -> tuple[str, str]:
    """(record method, record variant): the baseline is its own method (the paper's CLIP-initialised FPN)."""
    return (BASELINE_METHOD, "") if variant == "baseline" else (SLUG, variant)


def segmentation_set(cfg: dict, name: str):
    ds = build_dataset(name, cfg["data_root"])
    items = list(ds.train) + list(ds.test) + list(ds.val)
    if not ds.train or not ds.test or any(d.mask is None for d in items):
        raise DataError(f"{name} has no segmentation masks on every train/test image; DenseCLIP needs a segmentation "
                        f"set (emb_segmentation, ade20k, voc2012_seg, pascal_context)")
    return ds


def record_path(cfg: dict, dataset: str, variant: str, seed: int) -> Path:
    method, var = method_of(variant)
    return run_dir(SLUG, PROTOCOL, cfg["profile"], dataset, cfg["arch"], method, None, seed, var) / "metrics.json"


# ------------------------------------------------------------------------------------------ the runs
class Split:
    """One split ready for the frozen-tower regime: images at the network input, masks, and per model
    kind (with / without the attention-pool embeddings) its FeatureBank."""

    def __init__(self, items, size, mean, std, reduce, ignore, flip: bool):
        self.items = list(items)
        self.images, self.masks = preload(self.items, size, mean, std, reduce, ignore)
        self.flip, self.banks = flip, {}

    def bank(self, model) -> FeatureBank:
        key = model.language
        if key not in self.banks:
            self.banks[key] = FeatureBank(model, self.images, self.flip)
        return self.banks[key]


def prepare(cfg: dict, ds, bundle) -> dict:
    """Normalisation, label handling and (frozen tower) the preloaded splits."""
    mean, std = mean_std(bundle)
    reduce, ignore = bool(ds.meta.get("reduce_zero_label", False)), int(ds.meta.get("ignore_index", 255))
    out = {"mean": mean, "std": std, "reduce": reduce, "ignore": ignore}
    if cfg["model"]["freeze_backbone"]:
        size = int(cfg["input_size"]) or bundle.image_size
        out["size"] = size
        out["train"] = Split(ds.train, size, mean, std, reduce, ignore, flip=True)
        out["test"] = Split(ds.test, size, mean, std, reduce, ignore, flip=False)
        out["val"] = Split(ds.val, size, mean, std, reduce, ignore, flip=False) if ds.val else None
    return out


def train_one(cfg: dict, bundle, ds, data: dict, variant: str, seed: int, epochs=None, lr=None, out_dir=None,
              val_every: int = 0):
    """Build and train one model; returns (model, history). `val_every` > 0 scores the val split every that many
    epochs (a convergence study's curve)."""
    model = build_model(bundle, ds.classnames, variant, model_config(cfg), seed)
    tcfg = train_config(cfg["train"], seed, epochs, lr)
    desc = f"denseclip {variant} {ds.name} s{seed}"
    on_epoch_end = None
    if val_every and data.get("val") is not None:
        def on_epoch_end(epoch):
            if (epoch + 1) % val_every and epoch + 1 != tcfg.epochs:
                return None
            r = evaluate_cached(model, data["val"].bank(model), data["val"].masks, data["ignore"])
            return {"val": miou(r["cm"])}
    if cfg["model"]["freeze_backbone"]:
        tr = data["train"]
        hist = fit_cached(model, tr.bank(model), tr.masks, tcfg, int(cfg["batch_size"]), float(cfg["aux_weight"]),
                          float(cfg["tau"]), float(cfg["backbone_lr_mult"]), out_dir, desc, on_epoch_end)
    else:
        hist = fit_images(model, ds.train, tcfg, int(cfg["batch_size"]), float(cfg["aux_weight"]), float(cfg["tau"]),
                          float(cfg["backbone_lr_mult"]), cfg["train_scale"], int(cfg["crop_size"]), data["mean"],
                          data["std"], data["reduce"], data["ignore"], int(cfg["workers"]), out_dir, desc, on_epoch_end)
    return model, hist


def chance_miou_of(cm: torch.Tensor) -> float:
    from papers.maskclip.method import chance_miou
    return chance_miou(cm.sum(1))


def run_dataset(cfg: dict, name: str) -> list[dict]:
    ds = segmentation_set(cfg, name)
    pending = [(v, s) for v in cfg["variants"] for s in cfg["seeds"]
               if cfg.get("force") or not record_path(cfg, name, v, s).is_file()]
    for v in cfg["variants"]:
        for s in cfg["seeds"]:
            if (v, s) not in pending:
                print_record(json.loads(record_path(cfg, name, v, s).read_text()), existing=True)
    if not pending:
        return []
    bundle = bundle_for(cfg)
    data = prepare(cfg, ds, bundle)
    K = ds.num_classes
    shown = random.Random(0).sample(range(len(ds.test)), min(int(cfg["figure_images"]), len(ds.test))) \
        if cfg["model"]["freeze_backbone"] else []
    kept: dict[str, np.ndarray] = {}
    records = []
    for variant, seed in pending:
        t0 = time.time()
        out_dir = record_path(cfg, name, variant, seed).parent
        model, hist = train_one(cfg, bundle, ds, data, variant, seed, out_dir=out_dir)
        if cfg["model"]["freeze_backbone"]:
            r = evaluate_cached(model, data["test"].bank(model), data["test"].masks, data["ignore"],
                                keep=shown if seed == cfg["seeds"][0] else ())
        else:
            r = evaluate_images(model, ds.test, cfg["train_scale"], int(cfg["crop_size"]), int(cfg["test_stride"]),
                                data["mean"], data["std"], data["reduce"], data["ignore"])
        if r["kept"]:
            kept[variant] = np.stack([r["kept"][i] for i in shown])
        scores = {"miou": miou(r["cm"]), "chance_miou": chance_miou_of(r["cm"])}
        if r["cm_score"] is not None:
            scores["miou_score_map"] = miou(r["cm_score"])
        method, var = method_of(variant)
        rec = {"paper": SLUG, "method": method, "variant": var, "profile": cfg["profile"], "protocol": PROTOCOL,
               "dataset": name, "source": name, "backbone": cfg["arch"], "shots": None, "seed": seed, "n_classes": K,
               "metrics": {k: round(float(v), 4) for k, v in scores.items()},
               "train": {"epochs": int(cfg["train"]["epochs"]), "lr": float(cfg["train"]["lr"]),
                         "final_loss": round(float(hist[-1]["loss"]), 5) if hist else None,
                         "steps": int(hist[-1]["step"]) if hist else 0},
               "gamma_mean": round(float(model.gamma.detach().abs().mean()), 6) if hasattr(model, "gamma") else None,
               "frozen_backbone": bool(cfg["model"]["freeze_backbone"]),
               "config": cfg, "wall_s": round(time.time() - t0, 2)}
        write_record(rec)
        print_record(rec)
        records.append(rec)
        ckpt = out_dir / "checkpoint.pt"
        ckpt.unlink(missing_ok=True)       # a finished run keeps its record only (checkpoints hold the FPN)
    if kept and shown:
        save_overlays(cfg, ds, shown, kept, data)
    return records


def overlay_path(profile: str, dataset: str, arch: str) -> Path:
    return runs_root() / SLUG / PROTOCOL / profile / dataset / f"overlays_{arch}.npz"


def save_overlays(cfg: dict, ds, shown: list[int], kept: dict, data: dict) -> Path:
    from common.data.images import load_image
    from common.data.real import load_mask
    variants = [v for v in FIGURE_VARIANTS if v in kept] + [v for v in kept if v not in FIGURE_VARIANTS]
    arrays = {"image": np.stack([np.asarray(load_image(ds.test[i].impath), dtype=np.uint8) for i in shown]),
              "mask": np.stack([load_mask(ds.test[i].mask, data["reduce"], data["ignore"]) for i in shown]).astype(np.int16),
              "classnames": np.array(ds.classnames), "variants": np.array(variants),
              "ignore_index": np.array(data["ignore"]), "test_size": np.array(data.get("size", 0))}
    for v in variants:
        arrays[f"pred_{v}"] = kept[v]
    path = overlay_path(cfg["profile"], ds.name, cfg["arch"])

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return atomic_write(path, write)


# -------------------------------------------------------------------------------------------- commands
@inputs("datasets")
def train(cfg: dict) -> list[dict]:
    """train every variant x seed on each dataset's train split and score it on the test split"""
    cfg = for_arch(cfg)
    for name in cfg["datasets"]:
        segmentation_set(cfg, name)
    return [r for name in cfg["datasets"] for r in run_dataset(cfg, name)]


@inputs("datasets", weights=False)
def reproduce(cfg: dict) -> None:
    """train + test every variant with every backbone of reproduce_backbones, then the overlay figures"""
    configs = backbone_configs(cfg)
    for name in cfg["datasets"]:
        segmentation_set(cfg, name)
    for c in configs:
        train(c)
    figure(cfg)


@inputs(weights=False)
def figure(cfg: dict) -> list[Path]:
    """image / ground truth / prediction overlays of the saved test images, drawn to figure_dir"""
    from papers.maskclip.plot import overlay_figures
    return overlay_figures(cfg, SLUG, PROTOCOL, "DenseCLIP",
                           titles={"baseline": "CLIP + FPN (no language)", "post": "DenseCLIP"})


@inputs("datasets")
def convergence_cmd(cfg: dict) -> dict:
    """convergence study of the released variant (post) on the first dataset, seed 1: lr = official x
    convergence_lr_factors at the official 127 epochs, then budgets of 1/8..1 of them; val mIoU ->
    papers/denseclip/convergence.json"""
    cfg = for_arch(cfg)
    real = load_config(CONFIG, "real")
    name = cfg["datasets"][0]
    ds = segmentation_set(cfg, name)
    if not ds.val:
        raise ConfigError(f"{name} has no validation split to run the convergence study on")
    bundle = bundle_for(cfg)
    data = prepare(cfg, ds, bundle)
    official_epochs = int(real["train"]["epochs"])

    def make_task(dname, dset, shots, seed):
        return SimpleNamespace(extra={}, seed=seed, dataset=dset)

    done: dict = {}     # (epochs, lr, seed) -> state: the lr grid's run at the chosen lr is the longest budget's

    def fit_many(tasks):
        states = []
        for t in tasks:
            sched = t.extra.get("schedule") or {}
            epochs = int(sched.get("epochs", cfg["train"]["epochs"]))
            lr = float(sched.get("lr", cfg["train"]["lr"]))
            key = (epochs, round(lr, 12), t.seed)
            if key not in done:     # every run keeps its val curve (16 points on the val split), so it can be reused
                model, hist = train_one(cfg, bundle, ds, data, "post", t.seed, epochs, lr,
                                        val_every=convergence.eval_every(epochs, 16))
                done[key] = keep_history(SimpleNamespace(val=[h["val"] for h in hist if "val" in h][-1]), hist)
            states.append(done[key])
        return states

    return convergence.study(cfg, SLUG, SLUG, "post", fit_many, lambda s, t: s.val, official_epochs,
                             float(real["train"]["lr"]), [name], shots=None, make_task=make_task,
                             lr_factors=[float(f) for f in cfg["convergence_lr_factors"]],
                             out=cfg["convergence_out"] or None,
                             note=f"DenseCLIP (post-model prompting, frozen tower={cfg['model']['freeze_backbone']}) "
                                  f"trained on the whole train split of {name}; the score is val mIoU")


def main(argv=None):
    commands = {"train": train, "eval": train, "reproduce": reproduce, "convergence": convergence_cmd,
                "figure": figure}
    return run_cli(SLUG, CONFIG, {k: threaded(v) for k, v in commands.items()},
                   "DenseCLIP (Rao et al., CVPR 2022): pixel-text score maps and context-aware prompting on a Semantic "
                   "FPN over the CLIP image tower, against the same FPN without language. Schedules chosen on val.",
                   argv, validate=validate)


if __name__ == "__main__":
    main()
