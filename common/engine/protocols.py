"""The evaluation protocols every paper runs, in one place: few-shot, base-to-novel, cross-dataset,
domain generalisation. A method plugs in one function; the protocol builds the data, loops over
datasets x shots x seeds with a progress bar, skips runs whose record already exists (so an
interrupted `reproduce` continues where it stopped), and writes one run record per result.

A job of a launch (`common.launch`, `common.engine.cells`) runs only the cells (dataset or source, shots, seed)
its shard owns; under torchrun (`common.engine.distributed`) rank 0 says which runs are done and writes.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .. import metrics
from ..clip.loader import ClipBundle, load_clip
from ..data import Dataset, build_dataset, fewshot_split, subsample_classes
from ..paths import runs_root
from . import distributed
from .cache import cached_features
from .cells import owns
from .runs import print_record, run_dir, write_record
from .seed import seed_everything
from .train import take_resumed_seconds

_BUNDLES: dict[tuple, ClipBundle] = {}


def bundle_for(cfg: dict) -> ClipBundle:
    """The CLIP of this config (memoised: one load per process)."""
    key = (cfg["arch"], str(cfg["pretrained"]), cfg.get("device", "cpu"), cfg.get("precision", "fp32"))
    if key not in _BUNDLES:
        _BUNDLES[key] = load_clip(cfg["arch"], cfg["pretrained"], device=cfg.get("device", "cpu"),
                                  precision=cfg.get("precision", "fp32"))
    return _BUNDLES[key]


def backbone_configs(cfg: dict) -> list[dict]:
    """The configs a multi-backbone `reproduce` runs, one per entry of the `backbones` option ("arch=checkpoint",
    or "arch" for the config's `pretrained`); the config itself when the option is empty or absent."""
    out = []
    for entry in cfg.get("backbones") or []:
        arch, _, pretrained = str(entry).partition("=")
        out.append({**cfg, "arch": arch.strip(), "pretrained": pretrained.strip() or cfg["pretrained"]})
    return out or [cfg]


def backbone_problems(cfg: dict) -> list[str]:
    """What `backbone_configs` would fail on, each one line: malformed entries, unknown archs and missing weights
    (`common.validate.check_run` asks with the weights, so a config names files that need not exist yet)."""
    from ..clip.loader import check_weights
    from ..errors import UserError, one_line
    entries = cfg.get("backbones") or []
    if not isinstance(entries, list):
        return [f"backbones must be a list of 'arch=checkpoint' entries, got {entries!r}"]
    problems = []
    for entry in entries:
        arch, _, pretrained = str(entry).partition("=")
        if not arch.strip():
            problems.append(f"backbones: entry {entry!r} names no arch; write 'arch=checkpoint' (e.g. "
                            f"tiny-vit=data/embedded/checkpoints/tiny-vit.pt)")
            continue
        try:
            check_weights(arch.strip(), pretrained.strip() or cfg.get("pretrained"))
        except UserError as err:
            problems.append(f"backbones: {one_line(str(err))}")
    return problems


@dataclass
class Task:
    """Everything a method needs for one run."""

    cfg: dict
    bundle: ClipBundle
    dataset: Dataset            # few-shot train/val already applied (and class subset for base2novel)
    shots: int | None
    seed: int
    out_dir: Any                # folder for this run's checkpoints
    extra: dict = field(default_factory=dict)

    def features(self, split: str, transform: str = "test", view: int = 0, items=None) -> dict:
        """Cached frozen features of a split of this task's dataset."""
        items = self.dataset.split(split) if items is None else items
        return cached_features(self.bundle, self.dataset.name, split, items, transform=transform, view=view)


def _record(cfg: dict, paper: str, method: str, variant: str, protocol: str, dataset: str, source: str,
            shots: int | None, seed: int, values: dict, wall: float, n_classes: int | None = None,
            train: Dataset | None = None, tags: dict | None = None) -> dict:
    """A run record. `wall_s` is the whole run's time, training done before a resume included; `shots_used` appears
    when some class had fewer than `shots` training images (`fewshot_split` keeps all of them)."""
    rec = {"paper": paper, "method": method, "variant": variant, "profile": cfg["profile"], "protocol": protocol,
           "dataset": dataset, "source": source, "backbone": cfg["arch"], "shots": shots, "seed": seed,
           "n_classes": n_classes,
           "metrics": {k: round(float(v), 4) for k, v in values.items()}, "config": cfg, "wall_s": round(wall, 2)}
    if train is not None and train.meta.get("shots_used"):
        rec["shots_used"] = train.meta["shots_used"]
    rec.update(tags or {})   # e.g. sweep membership / the split a setting was chosen on (the leaderboard reads them)
    return rec


def sweep_tags(param: str, value, default) -> dict:
    """Record fields of one setting of a hyperparameter sweep (the leaderboard shows the default setting and
    the validation-chosen one, the others behind a link)."""
    return {"sweep": {"param": param, "value": value, "default": value == default}}


def run_ablations(cfg: dict, paper: str, fit_eval_of: Callable[[str], Callable], sweep_key: str) -> list[dict]:
    """Few-shot runs of every `cfg["ablations"]` variant at the `ablation_shots` that are also in `shots`; a
    variant that sets `sweep_key` is one point of a sweep around `cfg[sweep_key]` (`sweep_tags`)."""
    shots = [k for k in cfg["ablation_shots"] if k in cfg["shots"]]
    out = []
    for variant, over in cfg["ablations"].items() if shots else ():
        value = over.get(sweep_key)
        out += run_fewshot(cfg, paper, paper, fit_eval_of(variant), variant=variant, shots=shots,
                           tags=sweep_tags(sweep_key, float(value), cfg[sweep_key]) if value is not None else None)
    return out


def record_exists(cfg, paper, protocol, dataset, method, shots, seed, variant, source=None) -> bool:
    """Whether the run's record exists (and `force` is off); an existing record's metrics are printed."""
    path = run_dir(paper, protocol, cfg["profile"], dataset, cfg["arch"], method, shots, seed, variant, source) \
        / "metrics.json"
    if cfg.get("force", False) or not distributed.agree(path.is_file()):
        return False
    print_record(json.loads(path.read_text()), existing=True)
    return True


def training_free_plan(cfg: dict, zeroshot_variants: list[str]) -> list[tuple[str, list[str], str | None, list[str]]]:
    """(protocol, datasets, source, variants) of a training-free evaluation: zero-shot on `datasets` with
    `zeroshot_variants`, and, when there are `dg_targets`, the DG source then its targets with `dg_variants`."""
    out = [("zeroshot", list(cfg["datasets"]), None, list(zeroshot_variants))]
    if cfg["dg_targets"]:
        names = [cfg["dg_source"]] + [t for t in cfg["dg_targets"] if t != cfg["dg_source"]]
        out.append(("domain_generalization", names, cfg["dg_source"], list(cfg["dg_variants"])))
    return out


def plan_datasets(plan) -> list[str]:
    """Every dataset a plan of `training_free_plan` reads, in order (repeats kept: callers dedupe)."""
    return [n for _, names, _, _ in plan for n in names]


def plan_jobs(plan) -> list[tuple[str, str, str | None, list[str]]]:
    """The (protocol, dataset, source, variants) jobs of a plan of `training_free_plan`, one per dataset."""
    return [(p, n, src, v) for p, names, src, v in plan for n in names]


def run_plan(cfg: dict, plan, loaded: dict, evaluate_one: Callable, desc: str) -> list[dict]:
    """Every job of a training-free plan, with a progress bar: `evaluate_one(cfg, *loaded[dataset], protocol, source,
    variants)` -> records (`loaded`: each dataset's (Dataset, class texts), read before any work)."""
    out = []
    for protocol, name, source, variants in tqdm(plan_jobs(plan), desc=desc):
        out += evaluate_one(cfg, *loaded[name], protocol, source, variants)
    return out


def checkpoint_dir(cfg, paper, protocol, dataset, method, shots, seed, variant):
    """Training checkpoints of one run, inside the paper's runs folder (so a pipeline rerun clears them)."""
    return run_dir("_checkpoints", protocol, cfg["profile"], dataset, cfg["arch"], method, shots, seed, variant,
                   root=runs_root() / paper)


def _finish(rec: dict, out_dir) -> dict:
    """Write the record (and print its metrics), then drop the run's resume checkpoint: it exists only to survive
    interruption, and a stale one must never be 'resumed' by a later run with changed code."""
    write_record(rec)
    print_record(rec)
    if out_dir is not None and distributed.is_main():
        ckpt = Path(out_dir) / "checkpoint.pt"
        ckpt.unlink(missing_ok=True)
    return rec


class BatchedFit:
    """A method that can train several runs at once (common.engine.batched): ``fit_many(tasks) -> states``
    and ``evaluate(state, task) -> metrics``. Protocols give it every pending run of one dataset together
    (`many`); called on one task it trains that one."""

    def __init__(self, fit_many: Callable[[list[Task]], list],
                 evaluate: Callable[[Any, Task], dict[str, float]] | None = None):
        self.fit_many, self.evaluate = fit_many, evaluate

    def many(self, tasks: list[Task]) -> list:
        return self.fit_many(tasks)

    def __call__(self, task: Task):
        return self.fit_many([task])[0]


def group_dir(cfg, paper, protocol, dataset, method, variant, cells) -> Path:
    """Checkpoint folder of a batch of runs (cells = [(shots, seed), ...]) trained together."""
    tag = "group-" + "_".join(f"k{k}s{s}" for k, s in cells)
    return run_dir("_checkpoints", protocol, cfg["profile"], dataset, cfg["arch"], method, None, 0, variant,
                   root=runs_root() / paper).parent / tag


def run_fewshot(cfg: dict, paper: str, method: str, fit_eval: Callable[[Task], dict[str, float]] | BatchedFit,
                variant: str = "", datasets: list[str] | None = None, shots: list[int] | None = None,
                seeds: list[int] | None = None, tags: dict | None = None,
                split: Callable[[Dataset, int, int], Dataset] | None = None) -> list[dict]:
    """K-shot training on each dataset's train split, top-1 on its full test split. A :class:`BatchedFit`
    trains the pending runs of each dataset (shot counts x seeds) as one batched model. `split(dataset, shots,
    seed)` draws a run's training data (default: the protocol's few-shot split)."""
    split = split or fewshot_split
    datasets = datasets or cfg["datasets"]
    jobs = [(d, k, s) for d in datasets for k in (shots or cfg["shots"]) for s in (seeds or cfg["seeds"])
            if owns(d, k, s)]
    bundle = bundle_for(cfg)
    if isinstance(fit_eval, BatchedFit):
        return _fewshot_batched(cfg, paper, method, fit_eval, variant, jobs, bundle, tags, split)
    out = []
    for name, k, seed in tqdm(jobs, desc=f"{paper}/{method} few-shot"):
        if record_exists(cfg, paper, "fewshot", name, method, k, seed, variant):
            continue
        t0, _ = time.time(), take_resumed_seconds()
        full = build_dataset(name, cfg["data_root"])
        task = Task(cfg, bundle, split(full, k, seed), k, seed,
                    checkpoint_dir(cfg, paper, "fewshot", name, method, k, seed, variant))
        seed_everything(seed)
        values = fit_eval(task)
        rec = _record(cfg, paper, method, variant, "fewshot", name, name, k, seed, values,
                      time.time() - t0 + take_resumed_seconds(), full.num_classes, task.dataset, tags)
        out.append(_finish(rec, task.out_dir))
    return out


def _fewshot_batched(cfg, paper, method, fit: BatchedFit, variant, jobs, bundle, tags=None, split=fewshot_split) -> list[dict]:
    out = []
    for name in tqdm(list(dict.fromkeys(d for d, _, _ in jobs)), desc=f"{paper}/{method} few-shot (batched)"):
        cells = [(k, s) for d, k, s in jobs if d == name and not record_exists(cfg, paper, "fewshot", d, method, k, s, variant)]
        if not cells:
            continue
        t0, _ = time.time(), take_resumed_seconds()
        full = build_dataset(name, cfg["data_root"])
        tasks = [Task(cfg, bundle, split(full, k, s), k, s,
                      checkpoint_dir(cfg, paper, "fewshot", name, method, k, s, variant)) for k, s in cells]
        states = _fit_all(fit, tasks, group_dir(cfg, paper, "fewshot", name, method, variant, cells))
        wall = (time.time() - t0 + take_resumed_seconds()) / len(tasks)   # the group's time, shared by its runs
        for task, state in zip(tasks, states):
            values = fit.evaluate(state, task)
            rec = _record(cfg, paper, method, variant, "fewshot", name, name, task.shots, task.seed, values, wall,
                          full.num_classes, task.dataset, tags)
            out.append(_finish(rec, task.out_dir))
    return out


def _fit_all(fit, tasks: list[Task], group: Path) -> list:
    """Train the runs of one dataset: together when `fit` has a `many` (a batched model), else one by one."""
    many = getattr(fit, "many", None)
    if many is not None:
        for t in tasks:
            t.extra["group_dir"] = group
        states = many(tasks)
        (group / "checkpoint.pt").unlink(missing_ok=True)
        return states
    states = []
    for t in tasks:
        seed_everything(t.seed)
        states.append(fit(t))
    return states


def run_base2novel(cfg: dict, paper: str, method: str, fit: Callable[[Task], Any],
                   evaluate: Callable[[Any, Task], dict[str, float]], variant: str = "",
                   datasets: list[str] | None = None, shots: int = 16, seeds: list[int] | None = None) -> list[dict]:
    """CoCoOp's protocol: train on K-shot base classes, test on base and novel classes; HM. The seeds of a
    dataset train together when `fit` can batch runs (`fit.many`)."""
    datasets = datasets or cfg["datasets"]
    bundle = bundle_for(cfg)
    out = []
    for name in tqdm(datasets, desc=f"{paper}/{method} base2novel"):
        todo = [s for s in (seeds or cfg["seeds"])
                if owns(name, shots, s) and not record_exists(cfg, paper, "base2novel", name, method, shots, s, variant)]
        if not todo:
            continue
        t0, _ = time.time(), take_resumed_seconds()
        data = build_dataset(name, cfg["data_root"])
        pairs = []
        for seed in todo:
            full = fewshot_split(data, shots, seed)
            ckpt = checkpoint_dir(cfg, paper, "base2novel", name, method, shots, seed, variant)
            pairs.append((Task(cfg, bundle, subsample_classes(full, "base"), shots, seed, ckpt),
                          Task(cfg, bundle, subsample_classes(full, "new"), shots, seed, ckpt)))
        states = _fit_all(fit, [b for b, _ in pairs], group_dir(cfg, paper, "base2novel", name, method, variant,
                                                                 [(shots, s) for s in todo]))
        wall = (time.time() - t0 + take_resumed_seconds()) / len(todo)
        for (base, novel), state in zip(pairs, states):
            b = evaluate(state, base)["top1"]
            n = evaluate(state, novel)["top1"]
            rec = _record(cfg, paper, method, variant, "base2novel", name, name, shots, base.seed,
                          {"base": b, "novel": n, "hm": metrics.harmonic_mean(b, n)}, wall, data.num_classes,
                          base.dataset)
            out.append(_finish(rec, base.out_dir))
    return out


def run_transfer(cfg: dict, paper: str, method: str, protocol: str, fit: Callable[[Task], Any],
                 evaluate: Callable[[Any, Task], dict[str, float]], source: str, targets: list[str],
                 variant: str = "", shots: int | None = 16, seeds: list[int] | None = None,
                 tags: dict | None = None) -> list[dict]:
    """Train once on `source` (K-shot, all classes), evaluate on the source and every target with the
    target's own class names: cross-dataset (`cross_dataset`) or domain generalisation (`domain_generalization`).
    The seeds train together when `fit` can batch runs (`fit.many`)."""
    if protocol not in ("cross_dataset", "domain_generalization"):
        raise ValueError(f"run_transfer protocol must be cross_dataset or domain_generalization, got {protocol!r}")
    bundle = bundle_for(cfg)
    names = [source] + [t for t in targets if t != source]
    todo = [s for s in (seeds or cfg["seeds"]) if owns(source, shots, s)
            and not all(record_exists(cfg, paper, protocol, t, method, shots, s, variant, source) for t in names)]
    if not todo:
        return []
    t0, _ = time.time(), take_resumed_seconds()
    full = build_dataset(source, cfg["data_root"])
    tasks = [Task(cfg, bundle, fewshot_split(full, shots, s) if shots else full, shots, s,
                  checkpoint_dir(cfg, paper, protocol, source, method, shots, s, variant)) for s in todo]
    states = _fit_all(fit, tasks, group_dir(cfg, paper, protocol, source, method, variant, [(shots, s) for s in todo]))
    wall = (time.time() - t0 + take_resumed_seconds()) / len(todo)
    targets_ds = {name: build_dataset(name, cfg["data_root"]) for name in names if name != source}
    out = []
    for task, state in tqdm(list(zip(tasks, states)), desc=f"{paper}/{method} {protocol}"):
        for name in names:
            ds = task.dataset if name == source else targets_ds[name]
            values = evaluate(state, Task(cfg, bundle, ds, shots, task.seed, task.out_dir))
            rec = _record(cfg, paper, method, variant, protocol, name, source, shots, task.seed, values,
                          wall, ds.num_classes, task.dataset, tags)
            out.append(_finish(rec, task.out_dir if name == names[-1] else None))
    return out


@torch.no_grad()
def eval_classifier(task: Task, class_weights: torch.Tensor, scale: float | None = None,
                    split: str = "test") -> dict[str, float]:
    """Top-1 of a fixed (K, D) text classifier on cached test features of `task`."""
    from .evaluate import classification_metrics, cosine_logits
    feats = task.features(split)
    scale = scale if scale is not None else float(task.bundle.model.logit_scale.exp())
    weights = class_weights.detach().to(feats["features"].device, torch.float32)  # cached features live on the CPU
    return classification_metrics(cosine_logits(feats["features"], weights, scale), feats["labels"])
