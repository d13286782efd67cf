"""SVL-Adapter: `python -m papers.svl_adapter {train,eval,reproduce}`.

train: SimCLR encoder per dataset on its unlabelled train + val images (checkpointed, resumable) and its
cached features. eval: the low-shot protocol (shots x seeds) with variants `tuned` (SVL-Adapter, lambda
on the few-shot val images), `conf` (SVL-Adapter*, lambda from CLIP's mean confidence on the unlabelled
test images) and `ssl` (the SSL classifier alone, lambda = 0); and the zero-shot pseudo-label variant
`pseudo` (protocol zeroshot). Zero-shot CLIP and the linear probe come from their own runs.
"""
from __future__ import annotations

from pathlib import Path

import torch

import json
from common.cli import inputs, run_cli
from common.clip import logit_scale
from common.config import load_config
from common.data import Dataset, build_dataset
from common.engine import convergence
from common.engine.cache import cache_key, items_digest
from common.engine.evaluate import classification_metrics
from common.engine.cells import owns, owns_dataset
from common.engine.protocols import Task, bundle_for, checkpoint_dir, run_fewshot
from common.engine.runs import run_dir, write_record
from common.engine.seed import seed_everything
from common.engine.threads import threaded
from papers.zeroshot_clip.method import zeroshot_weights

from .method import clip_logits, confidence_lambda, fit_adapter, fuse, pseudo_labels, tune_lambda
from .ssl import load_uint8, pretrain_simclr, ssl_features, state_hash

SLUG = "svl_adapter"
CONFIG = Path(__file__).with_name("config.yaml")
VARIANTS = ("tuned", "conf", "ssl")

_ENCODERS: dict[tuple, tuple] = {}
_RESULTS: dict[tuple, dict] = {}


def _check(cfg: dict) -> None:
    bad = [v for v in cfg["variants"] if v not in VARIANTS]
    if bad:
        raise ValueError(f"variants must be among {VARIANTS}, got {bad}")
    res = cfg.get("feature_res")
    if isinstance(res, bool) or not isinstance(res, int) or res < 1:
        raise ValueError(f"feature_res must be a positive number of pixels, got {res!r}")


# --------------------------------------------------------------------------------------- SSL encoder
def ssl_pool(full: Dataset, cfg: dict) -> list:
    """The unlabelled images SimCLR sees: train + val of the dataset (never test), optionally a seeded
    subset of `ssl.max_images` (embedded budget)."""
    pool = list(full.train) + list(full.val)
    cap = cfg["ssl"].get("max_images")
    if cap and len(pool) > cap:
        keep = torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(cfg["ssl"]["seed"])))[:cap]
        pool = [pool[i] for i in sorted(keep.tolist())]
    return pool


def ssl_encoder(cfg: dict, name: str) -> tuple[torch.nn.Module, str]:
    """The dataset's SimCLR encoder (trained once, checkpointed) and its weights hash."""
    opts = cfg["ssl"]
    memo = (cfg["profile"], name, str(cfg["data_root"]), json.dumps(opts, sort_keys=True, default=str))
    if memo in _ENCODERS:
        return _ENCODERS[memo]
    full = build_dataset(name, cfg["data_root"])
    pool = ssl_pool(full, cfg)
    key = cache_key(dataset=name, pool=items_digest(pool), **{k: opts[k] for k in sorted(opts)})
    if key not in _ENCODERS:
        out_dir = checkpoint_dir(cfg, SLUG, "ssl", name, "simclr", None, int(opts["seed"]), key[:12])
        images = _LazyImages(pool, int(opts["load_size"]))
        model = pretrain_simclr(images, opts, int(opts["seed"]), out_dir, cfg.get("device", "cpu"),
                                desc=f"simclr {name}")
        _ENCODERS[key] = (model.encoder, state_hash(model.encoder))
    _ENCODERS[memo] = _ENCODERS[key]
    return _ENCODERS[key]


class _LazyImages:
    """The SSL pool decoded on first use (a finished, checkpointed pretraining never decodes it)."""

    def __init__(self, items, size):
        self.items, self.size, self._x = items, size, None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        if self._x is None:
            self._x = load_uint8(self.items, self.size)
        return self._x[idx]


def _ssl_feats(cfg: dict, name: str, split: str, items) -> dict:
    enc, enc_id = ssl_encoder(cfg, name)
    # extraction size: official feature_extraction.py --im_res (default 224), not the SimCLR crop size (112)
    return ssl_features(enc, name, split, items, int(cfg["feature_res"]), encoder_id=enc_id)


def _clip_test(cfg: dict, task: Task, split: str, items=None) -> torch.Tensor:
    w = zeroshot_weights(task.bundle, task.dataset, cfg["clip_template"])
    return clip_logits(task.features(split, items=items)["features"], w, logit_scale(task.bundle))


# -------------------------------------------------------------------------------------------- few-shot
def fit_eval_all(cfg: dict, task: Task) -> dict[str, dict]:
    """Train the adapter once on the task's K-shot features and score every variant."""
    key = (cfg["profile"], task.dataset.name, task.shots, task.seed, task.bundle.checkpoint_id)
    if key in _RESULTS:
        return _RESULTS[key]
    ds = task.dataset
    tr = _ssl_feats(cfg, ds.name, "train", ds.train)
    va = _ssl_feats(cfg, ds.name, "val", ds.val)
    te = _ssl_feats(cfg, ds.name, "test", ds.test)
    adapter = fit_adapter(tr["features"], tr["labels"], ds.num_classes, cfg["adapter"], task.seed,
                          desc=f"svl adapter {ds.name} k{task.shots}")
    with torch.no_grad():
        ssl_val, ssl_test = adapter(va["features"]), adapter(te["features"])
    clip_val, clip_test = _clip_test(cfg, task, "val"), _clip_test(cfg, task, "test")
    lams = {"tuned": tune_lambda(clip_val, ssl_val, va["labels"], cfg["lambda_step"], cfg["fusion"]),
            "conf": confidence_lambda(clip_test), "ssl": 0.0}
    out = {}
    for variant, lam in lams.items():
        m = classification_metrics(fuse(clip_test, ssl_test, lam, cfg["fusion"]), te["labels"])
        out[variant] = {**m, "lambda": lam}
    _RESULTS[key] = out
    return out


def train(cfg: dict) -> list[str]:
    """SimCLR-pretrain the SSL encoder of every dataset and cache its train/val/test features"""
    _check(cfg)
    done = []
    for name in cfg["datasets"]:
        if not owns_dataset(name):   # a job of a launch pretrains the encoders of its own datasets
            continue
        full = build_dataset(name, cfg["data_root"])
        for split in ("train", "val", "test"):
            _ssl_feats(cfg, name, split, full.split(split))
        done.append(name)
    return done


def evaluate(cfg: dict) -> list[dict]:
    """low-shot protocol (shots x seeds) for each variant, and the zero-shot pseudo-label variant"""
    _check(cfg)
    records = []
    for variant in cfg["variants"]:
        records += run_fewshot(cfg, SLUG, SLUG, lambda task, v=variant: fit_eval_all(cfg, task)[v], variant=variant)
    if cfg["pseudo_label"]["enabled"]:
        records += pseudo_label_runs(cfg)
    return records


def pseudo_label_runs(cfg: dict) -> list[dict]:
    """Zero-shot SVL-Adapter*: adapter trained on CLIP's most confident pseudo-labels of the unlabelled
    train split, fused with lambda from CLIP's confidence on the test images."""
    bundle = bundle_for(cfg)
    out = []
    for name in cfg["datasets"]:
        for seed in cfg["seeds"]:
            if not owns(name, None, seed):
                continue
            rd = run_dir(SLUG, "zeroshot", cfg["profile"], name, cfg["arch"], SLUG, None, seed, "pseudo")
            if (rd / "metrics.json").is_file() and not cfg.get("force", False):
                continue
            seed_everything(seed)
            full = build_dataset(name, cfg["data_root"])
            task = Task(cfg, bundle, full, None, seed, None)
            idx, lab = pseudo_labels(_clip_test(cfg, task, "train"), int(cfg["pseudo_label"]["per_class"]))
            feats = _ssl_feats(cfg, name, "train", full.train)["features"][idx]
            adapter = fit_adapter(feats, lab, full.num_classes, cfg["adapter"], seed, desc=f"svl pseudo {name}")
            te = _ssl_feats(cfg, name, "test", full.test)
            clip_test = _clip_test(cfg, task, "test")
            lam = confidence_lambda(clip_test)
            with torch.no_grad():
                m = classification_metrics(fuse(clip_test, adapter(te["features"]), lam, cfg["fusion"]), te["labels"])
            pseudo_acc = float((lab == torch.tensor([full.train[i].label for i in idx.tolist()])).float().mean() * 100)
            rec = {"paper": SLUG, "method": SLUG, "variant": "pseudo", "profile": cfg["profile"],
                   "protocol": "zeroshot", "dataset": name, "backbone": cfg["arch"], "shots": None, "seed": seed,
                   "metrics": {**m, "lambda": lam, "pseudo_label_acc": pseudo_acc, "n_pseudo": float(len(idx))},
                   "config": cfg}
            write_record(rec)
            out.append(rec)
    return out


@inputs("datasets")
def reproduce(cfg: dict) -> None:
    """SSL pretraining per dataset, then the low-shot and zero-shot (pseudo-label) evaluations"""
    train(cfg)
    evaluate(cfg)


def convergence_cmd(cfg: dict) -> dict:
    """convergence study of the adapter on the SSL features (official Adam, 50 epochs; 16 shots, seed 1): learning
    rate, then budgets -> papers/svl_adapter/convergence.json. The score is the SSL branch's val top-1 (what the
    adapter is trained for); the fused variants add CLIP's fixed logits."""
    _check(cfg)
    official = load_config(CONFIG, "real")["adapter"]

    def val_top1(adapter, task):
        va = _ssl_feats(cfg, task.dataset.name, "val", task.dataset.val)
        with torch.no_grad():
            return classification_metrics(adapter(va["features"]), va["labels"])["top1"]

    def fit_one(task):
        ds, sched = task.dataset, task.extra["schedule"]
        tr = _ssl_feats(cfg, ds.name, "train", ds.train)
        return fit_adapter(tr["features"], tr["labels"], ds.num_classes, {**cfg["adapter"], **sched}, task.seed,
                           desc=f"svl adapter {ds.name}", val_score=(lambda a: val_top1(a, task))
                           if task.extra.get("on_eval") else None)
    return convergence.study(cfg, SLUG, SLUG, "ssl", convergence.one_by_one(fit_one), val_top1,
                             int(official["epochs"]), float(official["lr"]), convergence.STUDY_DATASETS,
                             note="the adapter MLP on the dataset's SimCLR features (the SimCLR epochs were chosen "
                             "on val separately, config.yaml)")


def main(argv=None):
    cmds = {"train": train, "eval": evaluate, "reproduce": reproduce, "convergence": convergence_cmd}
    return run_cli(SLUG, CONFIG, {k: threaded(v) for k, v in cmds.items()},
                   "SVL-Adapter: SimCLR encoder on the target images + few-shot adapter, blended with zero-shot CLIP.",
                   argv)


if __name__ == "__main__":
    main()
