"""DualCoOp: `python -m papers.dualcoop {train,eval,reproduce,convergence}`.

train        partial-label multi-label recognition: DualCoOp (class-specific positive/negative prompts, region
             aggregation, ASL over the observed labels) at every label proportion x seed, the ablations
             (`single` prompt + threshold, `global` pooled embedding, `scale1` / `scale2` regions at 1 x / 2 x the
             model's input size) at `ablations.label_proportions`, and the
             baselines on the same partial labels: zero-shot CLIP (hand-crafted prompt) and a linear probe with
             partial BCE; one run record per (variant, proportion, seed) with the test mAP
zeroshot     zero-shot multi-label recognition: unified prompts trained on the seen classes, tested on the unseen
             ones (ZSL, dataset `<name>[zsl]`) and on all classes (GZSL, `<name>[gzsl]`); mAP and F1@3, beside
             zero-shot CLIP on the same label spaces
eval         re-scores the kept prompts of `train` on the test split (prints them beside the records)
reproduce    train + zeroshot
convergence  the budget study (label proportion 50%, seed 1): lr factor on val mAP, then budgets

Run records: protocol `multilabel`; `shots` holds the label proportion in percent (10..90), null for
zero-shot runs; variants "" (DualCoOp), "single", "global"; baselines zeroshot_clip/single and
linear_probe/partial_bce. Hyperparameters (lr factor, budget, the probe's weight decay) are chosen on the
validation split; the official code selects its checkpoint on the test split.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from common.cli import inputs, run_cli
from common.clip import zeroshot_classifier
from common.config import load_config
from common.data import build_dataset
from common.engine import TrainConfig, convergence, run_dir, write_record
from common.engine.cache import cached_features
from common.engine.protocols import Task, bundle_for, record_exists
from common.engine.runs import beside_record, kept, print_record
from common.engine.threads import threaded
from common.errors import ConfigError
from common.metrics import mean_average_precision
from common.paths import runs_root
from papers.coop.method import PROMPT_FILE, load_learner, save_learner

from .fit import build_models, train_many
from .method import (DualPrompt, encode_regions, multi_hot, partial_labels, predict, resized)

SLUG = "dualcoop"
PROTOCOL = "multilabel"
CONFIG = Path(__file__).with_name("config.yaml")
VARIANTS = {"": {}, "single": {"single": True}, "global": {"aggregation": "global"}, "scale1": {}, "scale2": {}}
SCALES = {"scale1": 1.0, "scale2": 2.0}   # variants reading the regions at another input scale (x the model's size)


# ------------------------------------------------------------------------------------------- options
def validate(cfg: dict) -> list[str]:
    out = []
    props = cfg["label_proportions"]
    if not props or any(not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= 100 for p in props) \
            or len(set(props)) != len(props):
        out.append(f"label_proportions must be distinct integer percentages in [1, 100], got {props}")
    for k in ("n_ctx_pos", "n_ctx_neg"):
        for where, block in (("", cfg), ("zsl.", cfg["zsl"])):
            v = block.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                out.append(f"{where}{k} must be an integer >= 1, got {v!r}")
    for where, block in (("", cfg), ("zsl.", cfg["zsl"])):
        s = block.get("input_scale")
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.25 <= s <= 8:
            out.append(f"{where}input_scale must be a number in [0.25, 8] (multiples of the model's input size), got {s!r}")
        w = block.get("loss_w")
        if not isinstance(w, (int, float)) or isinstance(w, bool) or w <= 0:
            out.append(f"{where}loss_w must be a number > 0, got {w!r}")
    asl = cfg["asl"]
    for k in ("gamma_neg", "gamma_pos", "clip"):
        v = asl.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (k == "clip" and v >= 1):
            out.append(f"asl.{k} must be a number >= 0{' and < 1' if k == 'clip' else ''}, got {v!r}")
    if not isinstance(asl.get("eps"), (int, float)) or not 0 < asl["eps"] < 0.5:
        out.append(f"asl.eps must be a number in (0, 0.5), got {asl.get('eps')!r}")
    ab = cfg["ablations"]
    bad = [v for v in ab["variants"] if v not in VARIANTS or not v]
    if bad:
        out.append(f"ablations.variants must be names out of {[v for v in VARIANTS if v]}, got {ab['variants']}")
    if any(p not in props for p in ab["label_proportions"]):
        out.append(f"ablations.label_proportions must be a subset of label_proportions {props}, "
                   f"got {ab['label_proportions']}")
    if not isinstance(cfg["official_batch"], int) or cfg["official_batch"] < 1:
        out.append(f"official_batch must be an integer >= 1, got {cfg['official_batch']!r}")
    for k in ("lr_by_dataset",):
        for name, v in (cfg.get(k) or {}).items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                out.append(f"{k}.{name} must be a learning rate > 0, got {v!r}")
    lp = cfg["linear_probe"]
    if not isinstance(lp["steps"], int) or lp["steps"] < 1:
        out.append(f"linear_probe.steps must be an integer >= 1, got {lp['steps']!r}")
    if not lp["weight_decays"] or any(not isinstance(v, (int, float)) or v < 0 for v in lp["weight_decays"]):
        out.append(f"linear_probe.weight_decays must be a non-empty list of numbers >= 0, got {lp['weight_decays']}")
    unseen = cfg["zsl"]["unseen"]
    if not isinstance(unseen, dict):
        out.append("zsl.unseen must map dataset -> [unseen class names]")
    return out


def dataset_problems(cfg: dict, data) -> None:
    """Checks that need the dataset (multi-label targets, known unseen names): one line each, before training."""
    if not data.train or getattr(data.train[0], "targets", None) is None:
        raise ConfigError(f"{data.name} is not a multi-label dataset (its items carry no targets); DualCoOp runs on "
                          f"emb_multilabel (embedded) or voc2007 / coco2014 (real)")
    unseen = (cfg["zsl"]["unseen"] or {}).get(data.name) or []
    missing = [u for u in unseen if u not in data.classnames]
    if missing:
        raise ConfigError(f"zsl.unseen.{data.name} names classes the dataset does not have: {missing[:5]}")


def load_dataset(cfg: dict, name: str):
    """The dataset, checked; sets without a val split (VOC2007 trainval/test, COCO train2014/val2014) get
    `val_fraction` of their training images held out (seeded, fixed): selection never touches the test split."""
    from dataclasses import replace
    data = build_dataset(name, cfg["data_root"])
    dataset_problems(cfg, data)
    if data.val:
        return data
    n_val = max(1, int(round(len(data.train) * float(cfg["val_fraction"]))))
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0)).tolist()
    held = set(perm[:n_val])
    return replace(data, train=[d for i, d in enumerate(data.train) if i not in held],
                   val=[d for i, d in enumerate(data.train) if i in held])


# ------------------------------------------------------------------------------------------- features
def region_features(cfg: dict, bundle, data, split: str, scale: float) -> torch.Tensor:
    """Cached (N, 1+hw, D) region embeddings of a split at `scale` x the model's input size."""
    rb = resized(bundle, scale)
    out = cached_features(rb, data.name, split, data.split(split), transform="test", view=0, kind="dualcoop-regions",
                          batch_size=int(cfg["eval_batch_size"]), encode=lambda x: encode_regions(bundle.model, x))
    return out["features"].float()


def global_features(cfg: dict, bundle, data, split: str) -> torch.Tensor:
    """Cached (N, D) pooled image embeddings (the model's own input size): zero-shot CLIP, probe, `global`."""
    return cached_features(bundle, data.name, split, data.split(split), transform="test",
                           batch_size=int(cfg["eval_batch_size"]))["features"].float()


def features(cfg: dict, bundle, data, split: str, aggregation: str, scale: float) -> torch.Tensor:
    return region_features(cfg, bundle, data, split, scale) if aggregation == "region" else \
        global_features(cfg, bundle, data, split)


# ------------------------------------------------------------------------------------------- metrics
def f1_at_k(scores: torch.Tensor, targets: torch.Tensor, k: int = 3) -> dict:
    """Precision / recall / F1 (%) of the top-k predicted labels per image (the zero-shot MLR metrics)."""
    kk = min(k, scores.shape[1])          # a label space smaller than k: every label is predicted
    top = scores.topk(kk, dim=1).indices
    hits = targets.gather(1, top).sum()
    p = float(hits / (kk * scores.shape[0])) * 100
    r = float(hits / targets.sum().clamp(min=1)) * 100
    return {f"P@{k}": p, f"R@{k}": r, f"F1@{k}": 0.0 if p + r == 0 else 2 * p * r / (p + r)}


# ------------------------------------------------------------------------------------------- training
def lr_for(cfg: dict, name: str) -> float:
    return float((cfg.get("lr_by_dataset") or {}).get(name, cfg["train"]["lr"]))


def train_config(cfg: dict, name: str, seed: int, block: dict | None = None, schedule: dict | None = None) -> TrainConfig:
    d = {**cfg["train"], "lr": lr_for(cfg, name), "seed": int(seed)}
    d.update((block or {}).get("train") or {})
    if schedule:
        d["epochs"] = int(schedule.get("epochs", d["epochs"]))
        d["lr"] = float(schedule.get("lr", d["lr"]))
        d["warmup_epochs"] = min(int(d["warmup_epochs"]), d["epochs"])
    return TrainConfig.from_dict(d)


def loss_cfg(cfg: dict, block: dict) -> dict:
    """ASL options; `loss_w` is the official weight of a summed loss over `official_batch` images, rescaled by
    official_batch / batch_size so a step's gradient has the official scale whatever the batch."""
    return {**cfg["asl"], "loss_w": float(block["loss_w"]) * int(cfg["official_batch"]) / int(cfg["batch_size"])}


def builder(bundle, classnames, block: dict, variant: str):
    opts = dict(n_ctx_pos=int(block["n_ctx_pos"]), n_ctx_neg=int(block["n_ctx_neg"]), csc=bool(block["csc"]))
    opts.update(VARIANTS[variant])
    return lambda: DualPrompt(bundle, classnames, **opts)


def group_dir(cfg: dict, name: str, what: str, labels: list) -> Path:
    key = hashlib.sha1(json.dumps([labels, cfg["train"], cfg["arch"]], sort_keys=True, default=str).encode()).hexdigest()[:10]
    return runs_root() / SLUG / "_train" / cfg["profile"] / name / f"{what}-{key}"


def _record(cfg, name, method, variant, shots, seed, metrics, wall, n_classes, extra=None) -> dict:
    rec = {"paper": SLUG, "method": method, "variant": variant, "profile": cfg["profile"], "protocol": PROTOCOL,
           "dataset": name, "source": name.split("[")[0], "backbone": cfg["arch"], "shots": shots, "seed": seed,
           "n_classes": n_classes, "metrics": {k: round(float(v), 4) for k, v in metrics.items()}, "config": cfg,
           "wall_s": round(wall, 2)}
    rec.update(extra or {})
    write_record(rec)
    print_record(rec)
    return rec


def fit_partial(cfg: dict, bundle, data, variant: str, jobs: list[tuple[int, int]], Xtr, Ytr,
                val: tuple | None = None, schedules: list | None = None, desc: str = "", out_dir=None,
                val_runs=()) -> list[DualPrompt]:
    """Train DualCoOp (variant) for `jobs` = [(label percent, seed)] on one dataset, batched."""
    block = {**cfg, "loss_w": cfg["loss_w"]}
    models = build_models(builder(bundle, data.classnames, block, variant), [s for _, s in jobs])
    targets = [partial_labels(Ytr, pp / 100.0, s) for pp, s in jobs]
    tcfgs = [train_config(cfg, data.name, s, schedule=(schedules[i] if schedules else None))
             for i, (_, s) in enumerate(jobs)]
    return train_many(models, Xtr.to(bundle.device), targets, tcfgs, int(cfg["batch_size"]), loss_cfg(cfg, block),
                      out_dir=out_dir, desc=desc or f"dualcoop{'-' + variant if variant else ''} {data.name} x{len(jobs)}",
                      threads=cfg.get("threads"), val=val, val_runs=val_runs)


def partial_label(cfg: dict, variant: str = "", proportions=None) -> list[dict]:
    """DualCoOp (variant) at each label proportion x seed on every dataset; one record each (test mAP)."""
    proportions = list(proportions or cfg["label_proportions"])
    bundle, out = bundle_for(cfg), []
    for name in cfg["datasets"]:
        jobs = [(pp, s) for pp in proportions for s in cfg["seeds"]
                if not record_exists(cfg, SLUG, PROTOCOL, name, SLUG, pp, s, variant)]
        if not jobs:
            continue
        data = load_dataset(cfg, name)
        agg = "global" if variant == "global" else "region"
        scale = SCALES.get(variant, cfg["input_scale"])
        t0 = time.time()
        Xtr = features(cfg, bundle, data, "train", agg, scale)
        Ytr = multi_hot(data.train, data.num_classes)
        Xva, Yva = features(cfg, bundle, data, "val", agg, scale), multi_hot(data.val, data.num_classes)
        Xte, Yte = features(cfg, bundle, data, "test", agg, scale), multi_hot(data.test, data.num_classes)
        models = fit_partial(cfg, bundle, data, variant, jobs, Xtr, Ytr,
                             out_dir=group_dir(cfg, name, f"partial{'-' + variant if variant else ''}", jobs))
        wall = (time.time() - t0) / len(jobs)
        for (pp, s), m in zip(jobs, models):
            folder = run_dir(SLUG, PROTOCOL, cfg["profile"], name, cfg["arch"], SLUG, pp, s, variant)
            save_learner(m, folder / PROMPT_FILE)
            metrics = {"mAP": mean_average_precision(predict(m, Xte), Yte),
                       "val_mAP": mean_average_precision(predict(m, Xva), Yva)}
            out.append(_record(cfg, name, SLUG, variant, pp, s, metrics, wall, data.num_classes,
                               {"label_proportion": pp / 100.0}))
    return out


def zeroshot_clip(cfg: dict) -> list[dict]:
    """Zero-shot CLIP (the dataset's hand-crafted template on the pooled embedding): the training-free baseline
    on the full label space and on the zero-shot MLR label spaces (unseen, seen+unseen)."""
    bundle, out = bundle_for(cfg), []
    for name in cfg["datasets"]:
        data = load_dataset(cfg, name)
        X, Y = global_features(cfg, bundle, data, "test"), multi_hot(data.test, data.num_classes)
        W = zeroshot_classifier(bundle, data.classnames, [data.template]).float().cpu()
        scores = F.normalize(X, dim=-1) @ W.t()
        spaces = {name: (list(range(data.num_classes)), False)}
        unseen = (cfg["zsl"]["unseen"] or {}).get(name) or []
        if unseen:
            spaces[f"{name}[zsl]"] = ([data.classnames.index(u) for u in unseen], True)
            spaces[f"{name}[gzsl]"] = (list(range(data.num_classes)), True)
        for label, (cols, topk) in spaces.items():
            for s in cfg["seeds"]:   # deterministic: one record per seed keeps the seed grids matched
                if record_exists(cfg, SLUG, PROTOCOL, label, "zeroshot_clip", None, s, "single"):
                    continue
                m = {"mAP": mean_average_precision(scores[:, cols], Y[:, cols])}
                if topk:
                    m.update(f1_at_k(scores[:, cols], Y[:, cols], int(cfg["zsl"]["top_k"])))
                out.append(_record(cfg, label, "zeroshot_clip", "single", None, s, m, 0.0, len(cols)))
    return out


def linear_probe(cfg: dict, proportions=None) -> list[dict]:
    """Linear probe on the pooled embedding with partial BCE (unknown labels ignored), full batch Adam; the
    weight decay is chosen per run on val mAP from `linear_probe.weight_decays`."""
    lp = cfg["linear_probe"]
    proportions = list(proportions or cfg["label_proportions"])
    bundle, out = bundle_for(cfg), []
    for name in cfg["datasets"]:
        jobs = [(pp, s) for pp in proportions for s in cfg["seeds"]
                if not record_exists(cfg, SLUG, PROTOCOL, name, "linear_probe", pp, s, "partial_bce")]
        if not jobs:
            continue
        data = load_dataset(cfg, name)
        t0 = time.time()
        X = {sp: F.normalize(global_features(cfg, bundle, data, sp), dim=-1) for sp in ("train", "val", "test")}
        Y = {sp: multi_hot(data.split(sp), data.num_classes) for sp in ("train", "val", "test")}
        wds = [float(w) for w in lp["weight_decays"]]
        runs = [(pp, s, wd) for pp, s in jobs for wd in wds]
        T = torch.stack([partial_labels(Y["train"], pp / 100.0, s) for pp, s, _ in runs])      # (R, N, C)
        mask = (T >= 0).float()
        g = torch.Generator().manual_seed(0)
        W = torch.nn.Parameter(torch.randn(len(runs), X["train"].shape[1], data.num_classes, generator=g) * 0.01)
        b = torch.nn.Parameter(torch.zeros(len(runs), 1, data.num_classes))
        decay = torch.tensor([wd for *_, wd in runs]).view(-1, 1, 1)
        opt = torch.optim.Adam([W, b], lr=float(lp["lr"]))
        for _ in range(int(lp["steps"])):
            logits = torch.einsum("nd,rdc->rnc", X["train"], W) + b
            bce = F.binary_cross_entropy_with_logits(logits, T.clamp(min=0), reduction="none")
            loss = ((bce * mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)).sum() + (decay * W ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            sc = {sp: torch.einsum("nd,rdc->rnc", X[sp], W) + b for sp in ("val", "test")}
        wall = (time.time() - t0) / len(jobs)
        for pp, s in jobs:
            idx = [i for i, r in enumerate(runs) if r[:2] == (pp, s)]
            vals = [mean_average_precision(sc["val"][i], Y["val"]) for i in idx]
            best = idx[max(range(len(idx)), key=lambda j: (vals[j], -j))]
            m = {"mAP": mean_average_precision(sc["test"][best], Y["test"]), "val_mAP": max(vals)}
            out.append(_record(cfg, name, "linear_probe", "partial_bce", pp, s, m, wall, data.num_classes,
                               {"label_proportion": pp / 100.0, "weight_decay": runs[best][2]}))
    return out


@inputs("datasets")
def train(cfg: dict) -> list[dict]:
    """partial-label MLR: DualCoOp at every label proportion x seed, its ablations, zero-shot CLIP, linear probe"""
    out = partial_label(cfg, "")
    for v in cfg["ablations"]["variants"]:
        out += partial_label(cfg, v, cfg["ablations"]["label_proportions"])
    out += zeroshot_clip(cfg)
    out += linear_probe(cfg)
    return out


@inputs("datasets")
def zeroshot(cfg: dict) -> list[dict]:
    """zero-shot MLR: unified prompts trained on the seen classes; ZSL (unseen) and GZSL (all) mAP and F1@k"""
    z = {**cfg, **{k: v for k, v in cfg["zsl"].items() if k in ("n_ctx_pos", "n_ctx_neg", "csc", "loss_w", "input_scale")}}
    bundle, out = bundle_for(cfg), []
    for name in cfg["datasets"]:
        unseen = (cfg["zsl"]["unseen"] or {}).get(name) or []
        if not unseen:
            continue
        labels = {"zsl": f"{name}[zsl]", "gzsl": f"{name}[gzsl]"}
        seeds = [s for s in cfg["seeds"] if not all(record_exists(cfg, SLUG, PROTOCOL, lab, SLUG, None, s, "")
                                                    for lab in labels.values())]
        if not seeds:
            continue
        data = load_dataset(cfg, name)
        u_idx = [data.classnames.index(c) for c in unseen]
        seen = [i for i in range(data.num_classes) if i not in u_idx]
        seen_names = [data.classnames[i] for i in seen]
        t0 = time.time()
        Xtr = region_features(cfg, bundle, data, "train", z["input_scale"])
        Ytr = multi_hot(data.train, data.num_classes)[:, seen]            # unseen labels never reach training
        Xte, Yte = region_features(cfg, bundle, data, "test", z["input_scale"]), multi_hot(data.test, data.num_classes)
        models = build_models(builder(bundle, seen_names, z, ""), seeds)
        tcfgs = [train_config(cfg, name, s, cfg["zsl"]) for s in seeds]
        models = train_many(models, Xtr.to(bundle.device), [Ytr] * len(seeds), tcfgs, int(cfg["batch_size"]),
                            loss_cfg(cfg, z), out_dir=group_dir(cfg, name, "zsl", seeds),
                            desc=f"dualcoop zsl {name} x{len(seeds)}", threads=cfg.get("threads"))
        wall = (time.time() - t0) / len(seeds)
        k = int(cfg["zsl"]["top_k"])
        for s, m in zip(seeds, models):
            save_learner(m, run_dir(SLUG, PROTOCOL, cfg["profile"], labels["zsl"], cfg["arch"], SLUG, None, s, "") / PROMPT_FILE)
            for key, cols in (("zsl", u_idx), ("gzsl", list(range(data.num_classes)))):
                scores = predict(m.with_classnames([data.classnames[i] for i in cols]), Xte)
                met = {"mAP": mean_average_precision(scores, Yte[:, cols]), **f1_at_k(scores, Yte[:, cols], k)}
                out.append(_record(cfg, labels[key], SLUG, "", None, s, met, wall, len(cols),
                                   {"unseen": list(unseen)}))
    return out


@inputs("datasets")
def eval_(cfg: dict) -> list[dict]:
    """re-score the prompts kept by `train` (DualCoOp, every label proportion x seed) on the test split"""
    bundle, out = bundle_for(cfg), []
    for name in cfg["datasets"]:
        data = load_dataset(cfg, name)
        Xte, Yte = region_features(cfg, bundle, data, "test", cfg["input_scale"]), multi_hot(data.test, data.num_classes)
        for pp in cfg["label_proportions"]:
            for s in cfg["seeds"]:
                path = kept(run_dir(SLUG, PROTOCOL, cfg["profile"], name, cfg["arch"], SLUG, pp, s, "") / PROMPT_FILE, SLUG)
                value = mean_average_precision(predict(load_learner(path, bundle, DualPrompt), Xte), Yte)
                note = beside_record("mAP", paper=SLUG, protocol=PROTOCOL, dataset=name, method=SLUG, shots=pp, seed=s,
                                     variant="")
                print(f"{name} {pp}% seed={s} mAP {value:6.2f}{note}")
                out.append({"dataset": name, "label_percent": pp, "seed": s, "mAP": value})
    return out


@inputs("datasets")
def reproduce(cfg: dict) -> None:
    """partial-label MLR (DualCoOp, ablations, baselines) and zero-shot MLR"""
    train(cfg)
    zeroshot(cfg)


@inputs("datasets")
def convergence_cmd(cfg: dict) -> dict:
    """convergence study of DualCoOp at 50 percent of the labels, seed 1: lr = official x {1,3,10,30,100} at the official 50
    epochs, then budgets of 1/8..1 of them; val mAP -> papers/dualcoop/convergence.json"""
    real = load_config(CONFIG, "real")
    pp = int(cfg["convergence_proportion"])
    cache: dict = {}

    def make_task(name, data, shots, seed):
        return Task(cfg, bundle_for(cfg), load_dataset(cfg, name), shots, seed, None)

    def fit_many(tasks):
        t0 = tasks[0]
        data, bundle = t0.dataset, t0.bundle
        if data.name not in cache:
            cache[data.name] = (features(cfg, bundle, data, "train", "region", cfg["input_scale"]),
                                multi_hot(data.train, data.num_classes),
                                (features(cfg, bundle, data, "val", "region", cfg["input_scale"]),
                                 multi_hot(data.val, data.num_classes)))
        Xtr, Ytr, val = cache[data.name]
        curve = [i for i, t in enumerate(tasks) if t.extra.get("on_eval")]
        models = fit_partial(cfg, bundle, data, "", [(pp, t.seed) for t in tasks], Xtr, Ytr, val=val,
                             schedules=[t.extra.get("schedule") for t in tasks], val_runs=curve,
                             desc=f"dualcoop convergence {data.name} x{len(tasks)}")
        for m in models:
            m.val_history = m.val_history if m.val_history else []
        return [SimpleNamespace(model=m, train_history=m.train_history,
                                val_history=m.val_history if i in curve else [], val=val)
                for i, m in enumerate(models)]

    return convergence.study(cfg, SLUG, SLUG, "", fit_many,
                             lambda s, t: mean_average_precision(predict(s.model, s.val[0]), s.val[1]),
                             int(real["train"]["epochs"]), float(real["train"]["lr"]), cfg["datasets"], shots=pp,
                             make_task=make_task,
                             note=f"DualCoOp (CSC, region aggregation) at {pp}% of the labels; the score is val mAP")


def main(argv=None):
    commands = {"train": train, "zeroshot": zeroshot, "eval": eval_, "reproduce": reproduce,
                "convergence": convergence_cmd}
    return run_cli(SLUG, CONFIG, {k: threaded(v) for k, v in commands.items()},
                   "DualCoOp (Sun et al., NeurIPS 2022): positive and negative learned prompts per class over CLIP's "
                   "region features, ASL on the observed labels; partial-label and zero-shot multi-label recognition "
                   "on cached frozen features. Selection on val, never on test.", argv, validate=validate)


if __name__ == "__main__":
    main()
