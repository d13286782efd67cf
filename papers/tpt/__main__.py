"""TPT: `python -m papers.tpt {train,eval,reproduce,benchmark}`.

train      fits the CoOp context TPT+CoOp starts from (papers/coop, M=4, 16 shots of dg_source, every seed);
           TPT itself trains nothing
eval       on dg_source + dg_targets (Table 1) and `datasets` (Table 2), each test image (of a fixed stratified
           subset when test_per_set is set): TPT from "a photo of a", TPT+CoOp (dg sets), and on the same
           images zero-shot CLIP with TPT's initial prompt and CoOp; run records under protocol test_time
reproduce  train + eval with both of the paper's backbones (reproduce.backbones)
benchmark  images/s of the batched implementation vs the per-view loop on the same images, and whether their
           predictions agree -> papers/tpt/benchmark.json and benchmark.png
"""
from __future__ import annotations

import copy
import json
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.cli import inputs, run_cli
from common.clip import logit_scale
from common.clip.loader import check_weights
from common.config import load_config
from common.data import build_dataset, fewshot_split
from common.engine.cache import mean_std, cached_features
from common.engine.evaluate import classification_metrics
from common.engine.protocols import Task, bundle_for, checkpoint_dir
from common.engine.runs import print_record, run_dir, write_record
from common.engine.threads import torch_threads
from common.errors import ConfigError, UserError, one_line
from papers.coop.__main__ import CONFIG as COOP_CONFIG, with_variant
from papers.coop.method import PROMPT_FILE, Fitter, PromptLearner, class_weights, load_learner

from .method import load_uint8, size_chunks, tpt_loop, tpt_predict, view_features
from .views import draw_views

SLUG = "tpt"
PROTOCOL = "test_time"
CONFIG = Path(__file__).with_name("config.yaml")
HERE = Path(__file__).parent
ZS_VARIANT = "photo"            # zero-shot CLIP with TPT's initial prompt "a photo of a {}."


# ------------------------------------------------------------------------------------------------ settings

def dg_sets(cfg: dict) -> list[str]:
    return list(dict.fromkeys([cfg["dg_source"]] + list(cfg["dg_targets"])))


def all_sets(cfg: dict) -> list[str]:
    return list(dict.fromkeys(dg_sets(cfg) + list(cfg["datasets"])))


def group_of(cfg: dict, name: str) -> str:
    """Table 1 (natural shifts, crop + flip views) or Table 2 (cross-dataset, AugMix views)."""
    return "domain_generalization" if name in dg_sets(cfg) else "cross_dataset"


def coop_config(cfg: dict) -> dict:
    """papers/coop's config for this profile with the coop_init variant, on this run's backbone, data and seeds."""
    ccfg = with_variant(load_config(COOP_CONFIG, cfg["profile"]), cfg["coop_init"]["variant"])
    for key in ("arch", "pretrained", "data_root", "device", "precision", "seeds", "force"):
        ccfg[key] = copy.deepcopy(cfg[key])
    if cfg["coop_init"].get("epochs"):
        ccfg["epochs"] = int(cfg["coop_init"]["epochs"])
    return ccfg


def stratified(items, n: int | None, seed: int) -> list[int]:
    """Indices of a fixed stratified subset of `items`: each class shuffled with `seed`, classes taken in turn
    (class sizes differ by at most one), sorted; every index when `n` is None or covers the split."""
    if n is None or n >= len(items):
        return list(range(len(items)))
    g = torch.Generator().manual_seed(int(seed))
    by_class: dict[int, list[int]] = {}
    for i, d in enumerate(items):
        by_class.setdefault(d.label, []).append(i)
    queues = [[members[j] for j in torch.randperm(len(members), generator=g).tolist()]
              for _, members in sorted(by_class.items())]
    picked: list[int] = []
    while len(picked) < n:
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return sorted(picked)


def view_seed(seed: int, dataset: str) -> int:
    """The generator seed of a dataset's augmented views under a run seed (stable across processes)."""
    return int(seed) * 1_000_003 + zlib.crc32(dataset.encode())


# ------------------------------------------------------------------------------------------------ CoOp init

def coop_contexts(cfg: dict) -> dict[int, PromptLearner]:
    """The CoOp learner of every seed (M=4 from 16 shots of dg_source): read from this paper's checkpoints,
    the missing ones trained together (papers/coop `Fitter`, CoOp's own config for the profile)."""
    ccfg, block = coop_config(cfg), cfg["coop_init"]
    bundle, source, shots = bundle_for(cfg), cfg["dg_source"], int(block["shots"])
    path = lambda s: checkpoint_dir(cfg, SLUG, PROTOCOL, source, "coop", shots, s, block["variant"])
    out, todo = {}, []
    for s in cfg["seeds"]:
        if (path(s) / PROMPT_FILE).is_file() and not cfg.get("force"):
            out[s] = load_learner(path(s) / PROMPT_FILE, bundle)
        else:
            todo.append(s)
    if todo:
        full = build_dataset(source, cfg["data_root"])
        tasks = [Task(ccfg, bundle, fewshot_split(full, shots, s), shots, s, path(s)) for s in todo]
        for s, learner in zip(todo, Fitter(ccfg).many(tasks)):
            out[s] = learner
    return out


# ------------------------------------------------------------------------------------------------ records

def _path(cfg, method, variant, name, source, shots, seed) -> Path:
    return run_dir(SLUG, PROTOCOL, cfg["profile"], name, cfg["arch"], method, shots, seed, variant, source) / \
        "metrics.json"


def _done(cfg, *key) -> bool:
    return _path(cfg, *key).is_file() and not cfg.get("force")


def _write(cfg, method, variant, name, source, shots, seed, logits, labels, wall, ds, n_test) -> dict:
    rec = {"paper": SLUG, "method": method, "variant": variant, "profile": cfg["profile"], "protocol": PROTOCOL,
           "dataset": name, "source": source, "backbone": cfg["arch"], "shots": shots, "seed": seed,
           "n_classes": ds.num_classes, "metrics": {k: round(v, 4) for k, v in
                                                   classification_metrics(logits, labels).items()},
           "config": cfg, "wall_s": round(wall, 2), "group": group_of(cfg, name), "n_test": n_test,
           "n_test_split": len(ds.test)}
    write_record(rec)
    print_record(rec)
    return rec


def settings(cfg: dict, over: dict | None = None) -> dict:
    """TPT's settings (`tpt_predict` keywords and the views used) from the config, with a variant's overrides."""
    c = {**cfg, **(over or {})}
    return dict(rho=float(c["selection"]), lr=float(c["lr"]), steps=int(c["steps"]),
                weight_decay=float(c["weight_decay"]), n_views=int(c["n_views"]))


def ablations(cfg: dict, name: str) -> dict[str, dict]:
    """The ablation variants (name -> settings) this backbone runs on this set, sharing the views' features:
    fewer views are the first n of the same views."""
    block = cfg["ablation"]
    if cfg["arch"] not in (block.get("backbones") or []) or group_of(cfg, name) not in (block.get("sets") or []):
        return {}
    return {v: settings(cfg, over) for v, over in (block.get("variants") or {}).items()}


def run_set(cfg: dict, name: str, coop: dict[int, PromptLearner]) -> list[dict]:
    """Every method on one test set (its subset), for every seed; finished runs are skipped. The views of a
    chunk of images are rendered and encoded once per seed and serve every TPT run (TPT, TPT+CoOp, ablations)."""
    bundle = bundle_for(cfg)
    ds = build_dataset(name, cfg["data_root"])
    source, shots, cvar = cfg["dg_source"], int(cfg["coop_init"]["shots"]), cfg["coop_init"]["variant"]
    hand = PromptLearner(bundle, ds.classnames, ctx_init=cfg["ctx_init"])
    coop_here = {s: coop[s].with_classnames(ds.classnames) for s in coop}
    # (method, variant, record source, shots, learner of a seed, settings)
    runs = [("tpt", "", name, None, lambda s: hand, settings(cfg))]
    if group_of(cfg, name) in cfg["tpt_coop_on"]:
        runs.append(("tpt_coop", "", source, shots, lambda s: coop_here[s], settings(cfg)))
    runs += [("tpt", v, name, None, lambda s: hand, st) for v, st in ablations(cfg, name).items()]
    todo = {s: [r for r in runs if not _done(cfg, r[0], r[1], name, r[2], r[3], s)] for s in cfg["seeds"]}
    todo = {s: rs for s, rs in todo.items() if rs}
    zs_todo = not _done(cfg, "zeroshot_clip", ZS_VARIANT, name, name, None, 0)
    coop_todo = [s for s in cfg["seeds"] if not _done(cfg, "coop", cvar, name, source, shots, s)]
    if not (todo or zs_todo or coop_todo):
        return []
    idx = stratified(ds.test, cfg["test_per_set"], cfg["subset_seed"])
    items = [ds.test[i] for i in idx]
    labels = torch.tensor([d.label for d in items])
    feats0 = cached_features(bundle, ds.name, "test", ds.test)["features"][idx]   # view 0 = the cached test view
    scale, out = logit_scale(bundle), []
    f0 = F.normalize(feats0.float(), dim=-1)
    t0 = time.time()
    if zs_todo:
        out.append(_write(cfg, "zeroshot_clip", ZS_VARIANT, name, name, None, 0, scale * f0 @ class_weights(
            hand, ds.classnames).t(), labels, time.time() - t0, ds, len(items)))
    for s in coop_todo:
        t0 = time.time()
        out.append(_write(cfg, "coop", cvar, name, source, shots, s, scale * f0 @ class_weights(
            coop_here[s], ds.classnames).t(), labels, time.time() - t0, ds, len(items)))
    if not todo:
        return out
    images = load_uint8(items)
    for s, seed_runs in todo.items():
        t0 = time.time()
        draws = draw_views(len(ds.test), int(cfg["n_views"]) - 1, view_seed(s, name)).take(torch.tensor(idx))
        logits = tpt_on_images(cfg, bundle, images, draws, feats0, group_of(cfg, name) == "cross_dataset",
                               [(learner_of(s), st) for *_, learner_of, st in seed_runs],
                               desc=f"tpt {cfg['arch']} {name} seed {s}")
        wall = (time.time() - t0) / len(seed_runs)       # the seed's time, shared by the runs its views served
        for (method, variant, src, k, _, _), lg in zip(seed_runs, logits):
            out.append(_write(cfg, method, variant, name, src, k, s, lg, labels, wall, ds, len(items)))
    return out


def tpt_on_images(cfg: dict, bundle, images, draws, feats0: torch.Tensor, augmix: bool,
                  runs: list[tuple[PromptLearner, dict]], desc: str = "") -> list[torch.Tensor]:
    """(n, K) view-0 logits of each TPT run (learner, `settings`) on the images: the views of each chunk of
    images are rendered and encoded once, as one batch, and serve every run (fewer views = the first n)."""
    mean, std = mean_std(bundle)
    scale = logit_scale(bundle)
    out: list[list[torch.Tensor]] = [[] for _ in runs]
    for ch in tqdm(size_chunks(images, int(cfg["chunk"])), desc=desc, leave=False, disable=not desc):
        feats = view_features(bundle.model, [images[i] for i in ch], draws.take(torch.tensor(ch)), feats0[ch],
                              bundle.image_size, augmix, mean, std, int(cfg["encode_batch"]))
        for j, (learner, st) in enumerate(runs):
            hp = {k: v for k, v in st.items() if k != "n_views"}
            out[j].append(tpt_predict(learner, learner.ctx, feats[:, :st["n_views"]], scale, **hp).cpu())
    return [torch.cat(o) for o in out]     # on the CPU, where the labels are


# ------------------------------------------------------------------------------------------------ commands

@inputs("dg_source")
def train(cfg: dict) -> None:
    """fits the CoOp context TPT+CoOp starts from (M=4, 16 shots of dg_source, every seed); TPT trains nothing"""
    with torch_threads(cfg["threads"]):
        coop_contexts(cfg)


@inputs("dg_source", "dg_targets", "datasets")
def eval_(cfg: dict) -> list[dict]:
    """TPT, TPT+CoOp, zero-shot and CoOp on the natural-shift and cross-dataset test sets (protocol test_time)"""
    bundle_for(cfg).model.eval()
    out = []
    with torch_threads(cfg["threads"]):
        coop = coop_contexts(cfg)
        for name in tqdm(all_sets(cfg), desc=f"tpt {cfg['arch']}"):
            out += run_set(cfg, name, coop)
    return out


def backbone_cfgs(cfg: dict) -> list[dict]:
    """The config of each backbone of reproduce.backbones (the run's own arch when none are listed)."""
    backbones = cfg["reproduce"].get("backbones") or {cfg["arch"]: cfg["pretrained"]}
    return [{**cfg, "arch": arch, "pretrained": pretrained} for arch, pretrained in backbones.items()]


@inputs("dg_source", "dg_targets", "datasets")
def reproduce(cfg: dict) -> None:
    """train + eval with each of the paper's backbones (RN50 and ViT-B/16, or their embedded stand-ins)"""
    for bcfg in check_backbones(cfg):
        eval_(bcfg)


@inputs(datasets=lambda cfg: cfg["benchmark"]["datasets"])
def benchmark(cfg: dict) -> list[dict]:
    """images/s of the batched TPT vs the per-view loop on the same images (same predictions?) -> benchmark.json"""
    rows = []
    for bcfg in check_backbones(cfg):
        bundle = bundle_for(bcfg)
        bundle.model.eval()
        mean, std = mean_std(bundle)
        for name in cfg["benchmark"]["datasets"]:
            ds = build_dataset(name, cfg["data_root"])
            idx = stratified(ds.test, int(cfg["benchmark"]["images"]), cfg["subset_seed"])
            images = load_uint8([ds.test[i] for i in idx])
            feats0 = cached_features(bundle, ds.name, "test", ds.test)["features"][idx]
            draws = draw_views(len(ds.test), int(cfg["n_views"]) - 1,
                               view_seed(int(cfg["benchmark"]["seed"]), name)).take(torch.tensor(idx))
            learner = PromptLearner(bundle, ds.classnames, ctx_init=cfg["ctx_init"])
            augmix = group_of(cfg, name) == "cross_dataset"
            hp = {k: v for k, v in settings(cfg).items() if k != "n_views"}
            batched_run = lambda n: tpt_on_images(cfg, bundle, images[:n], draws.take(torch.arange(n)), feats0[:n],
                                                  augmix, [(learner, settings(cfg))])[0]
            loop_run = lambda n: tpt_loop(learner, learner.ctx, bundle.model, feats0[:n], images[:n],
                                          draws.take(torch.arange(n)), bundle.image_size, augmix, mean, std,
                                          logit_scale(bundle), **hp)
            with torch_threads(cfg["threads"]):
                batched_run(1), loop_run(1)          # warm-up (a GPU's kernels and allocator), not timed
                t0 = clock(bundle)
                batched = batched_run(len(images))
                t1 = clock(bundle)
                loop = loop_run(len(images))
                t2 = clock(bundle)
            n = len(images)
            row = {"backbone": bcfg["arch"], "pretrained": str(bcfg["pretrained"]), "device": device_name(bundle),
                   "dataset": name, "augmix": augmix, "images": n,
                   "views": int(cfg["n_views"]), "chunk": int(cfg["chunk"]),
                   "batched_images_per_s": round(n / (t1 - t0), 3), "loop_images_per_s": round(n / (t2 - t1), 3),
                   "speedup": round((t2 - t1) / (t1 - t0), 2),
                   "same_predictions": bool((batched.argmax(-1) == loop.argmax(-1)).all()),
                   "max_abs_logit_diff": float((batched - loop).abs().max())}
            print(json.dumps(row))
            rows.append(row)
    out = Path(cfg["benchmark"].get("out_dir") or HERE)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(rows, indent=1) + "\n")
    _plot(rows, out / "benchmark.png")
    return rows


def clock(bundle) -> float:
    """perf_counter after the model's device has finished its queued work."""
    if bundle.device.type == "cuda":
        torch.cuda.synchronize(bundle.device)
    return time.perf_counter()


def device_name(bundle) -> str:
    """Where the benchmark ran: the GPU's name, or the CPU with its thread count."""
    if bundle.device.type == "cuda":
        return torch.cuda.get_device_name(bundle.device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    chunks = len({r["chunk"] for r in rows}) > 1
    labels = [f"{r['backbone']}\n{r['dataset']}" + (f"\nchunk {r['chunk']}" if chunks else "") for r in rows]
    x = torch.arange(len(rows)).numpy()
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 3.2))
    ax.bar(x - 0.2, [r["loop_images_per_s"] for r in rows], 0.4, label="per-view loop")
    ax.bar(x + 0.2, [r["batched_images_per_s"] for r in rows], 0.4, label="batched")
    for i, r in enumerate(rows):
        ax.text(x[i] + 0.2, r["batched_images_per_s"], f"{r['speedup']:.1f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("test images / s")
    ax.set_title(f"TPT ({rows[0]['views']} views, 1 step): batched vs per-view loop, {rows[0].get('device', 'cpu')}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def validate(cfg: dict) -> list[str]:
    """TPT's own options: ranges, the sets TPT+CoOp runs on, the CoOp variant it starts from."""
    out = []
    if not 0 < float(cfg["selection"]) <= 1 or int(int(cfg["n_views"]) * float(cfg["selection"])) < 1:
        out.append(f"selection must be in (0, 1] and keep at least one of n_views={cfg['n_views']} views "
                   f"(int(n_views * selection) >= 1), got {cfg['selection']}")
    if int(cfg["n_views"]) < 2:
        out.append(f"n_views must be >= 2 (the test view and at least one augmented view), got {cfg['n_views']}")
    for key in ("chunk", "encode_batch"):
        if int(cfg[key]) < 1:
            out.append(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["test_per_set"] is not None and int(cfg["test_per_set"]) < 1:
        out.append(f"test_per_set must be >= 1 or null (the whole test split), got {cfg['test_per_set']}")
    if int(cfg["coop_init"]["shots"]) < 1:
        out.append(f"coop_init.shots must be >= 1, got {cfg['coop_init']['shots']}")
    for key in ("tpt_coop_on", "ablation.sets"):
        bad = [g for g in (cfg["tpt_coop_on"] if key == "tpt_coop_on" else cfg["ablation"]["sets"])
               if g not in ("domain_generalization", "cross_dataset")]
        if bad:
            out.append(f"{key}: unknown {bad}; use domain_generalization and/or cross_dataset")
    for v, over in (cfg["ablation"].get("variants") or {}).items():
        unknown = sorted(set(over) - {"selection", "n_views", "steps", "lr"})
        st = settings(cfg, {k: x for k, x in over.items() if k not in unknown})
        if unknown:
            out.append(f"ablation.variants.{v}: unknown options {unknown}; use selection, n_views, steps, lr")
        elif not 2 <= st["n_views"] <= int(cfg["n_views"]) or not 0 < st["rho"] <= 1 \
                or int(st["n_views"] * st["rho"]) < 1 or st["steps"] < 1 or st["lr"] <= 0:
            out.append(f"ablation.variants.{v}: {over} must keep 2 <= n_views <= {cfg['n_views']}, a selection in "
                       f"(0, 1] keeping a view, steps >= 1 and lr > 0")
    try:
        coop_config(cfg)
    except (ValueError, UserError) as err:
        out.append(f"coop_init.variant: {one_line(str(err))}")
    return out


def check_backbones(cfg: dict) -> list[dict]:
    """The config of every backbone `reproduce` / `benchmark` runs, their weights found before any work."""
    cfgs = backbone_cfgs(cfg)
    problems = []
    for bcfg in cfgs:
        try:
            check_weights(bcfg["arch"], bcfg["pretrained"])
        except UserError as err:
            problems.append(f"reproduce.backbones {bcfg['arch']}: {one_line(str(err))}")
    if problems:
        raise ConfigError("; ".join(problems))
    return cfgs


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": eval_, "reproduce": reproduce, "benchmark": benchmark},
                   "TPT (Shu et al., NeurIPS 2022): per test image, one entropy-minimising step on the prompt over "
                   "confident augmented views, then predict; reset.", argv, validate=validate)


if __name__ == "__main__":
    main()
