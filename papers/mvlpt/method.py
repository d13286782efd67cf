"""MVLPT: multitask vision-language prompt tuning (Shen et al., WACV 2024; official `trainers/mvlpt.py`).

A training recipe around three prompt families, imported from their own folders:
- text prompts: CoOp's `PromptLearner` (papers/coop), trained on cached image features;
- visual prompts: VPT-shallow (papers/upt, `UPTLearner(mode="vpt")`: free visual tokens, frozen hand-crafted text);
- both: UPT (papers/upt, `UPTLearner(mode="upt")`: one unified prompt and transform for both towers).

Stage 1, multitask source prompt: one prompt of a family is trained jointly on several source datasets. Their
training sets are concatenated with labels offset so that the label space is the union of their classes, and
batches mix tasks (a random sampler over the concatenation, as the official code). The text tower encodes the
prompts of all source classes every step; each image is scored on its own task's class set (`label_space: task`:
logits of the other tasks' classes are -inf) or, as the official default, on the union (`union`).
Stage 2, target adaptation: a few-shot prompt on each target dataset initialised from the source prompt: the
learner is built for the target's class names and loads the source prompt's trained tensors (all of them are
class-agnostic: CoOp's unified context, VPT's visual tokens, UPT's unified prompt, transform and projection),
then trains exactly as the family's single-task runs (papers/coop's and papers/upt's batched trainers). The
baseline is the same training from the family's own initialisation (from scratch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import logit_scale, zeroshot_classifier
from common.engine import Trainer, classification_metrics, index_batches
from common.engine.convergence import epoch_validation, keep_history, with_schedule
from common.engine.protocols import Task
from common.engine.seed import seed_everything
from common.engine.threads import torch_threads
from papers.coop import method as coop
from papers.maple.method import pixels
from papers.maple.method import train_views as pixel_views
from papers.upt import method as upt

FAMILIES = ("coop", "vpt", "upt")
LABEL_SPACES = ("task", "union")
# record method names: (single-task from scratch, multitask-initialised), as the paper names them
METHODS = {"coop": ("coop", "mcoop"), "vpt": ("vpt_shallow", "mvpt"), "upt": ("upt", "mupt")}


@dataclass
class MultiTask:
    """The union label space of several tasks: task t owns classes offsets[t] .. offsets[t] + sizes[t] - 1."""
    names: list[str]
    classnames: list[str]
    templates: list[str]
    offsets: list[int]
    sizes: list[int]

    @classmethod
    def of(cls, datasets: Sequence) -> "MultiTask":
        if not datasets:
            raise ValueError("a multitask source needs at least one dataset")
        offsets, names, classnames, sizes, templates, start = [], [], [], [], [], 0
        for d in datasets:
            names.append(d.name)
            offsets.append(start)
            sizes.append(d.num_classes)
            classnames += list(d.classnames)
            templates.append(d.template)
            start += d.num_classes
        return cls(names, classnames, templates, offsets, sizes)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def allowed(self, task_ids: torch.Tensor) -> torch.Tensor:
        """(B, K_all) bool: the classes of each sample's own task."""
        start = torch.tensor(self.offsets, device=task_ids.device)[task_ids].unsqueeze(1)
        end = start + torch.tensor(self.sizes, device=task_ids.device)[task_ids].unsqueeze(1)
        idx = torch.arange(self.num_classes, device=task_ids.device).unsqueeze(0)
        return (idx >= start) & (idx < end)


def multitask_logits(logits: torch.Tensor, task_ids: torch.Tensor, mt: MultiTask, label_space: str = "task") -> torch.Tensor:
    """Union logits (B, K_all) scored on each sample's own task (`task`: the others' classes at -inf, so the softmax
    runs over the task's classes only) or on every class (`union`, the official default)."""
    if label_space not in LABEL_SPACES:
        raise ValueError(f"label_space must be one of {LABEL_SPACES}, got {label_space!r}")
    if label_space == "union":
        return logits
    return logits.masked_fill(~mt.allowed(task_ids), float("-inf"))


# ------------------------------------------------------------------------------------------------ learners
def build_family(family: str, bundle, classnames: Sequence[str], cfg: dict, templates: Sequence[str] | None = None,
                 sizes: Sequence[int] | None = None) -> nn.Module:
    """A prompt learner of `family` for `classnames` (with `cfg` the family's config: papers/coop's or papers/upt's).
    `templates`/`sizes`: per-task hand-crafted templates of a union label space (VPT's frozen text)."""
    if family == "coop":
        return coop.build_learner(bundle, classnames, cfg)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    templates = list(templates or [None])
    learner = upt.build_learner(bundle, classnames, cfg, templates[0])
    if learner.mode == "vpt" and len(templates) > 1:   # each task's classes with its own template
        weights, start = [], 0
        for t, n in zip(templates, sizes):
            weights.append(zeroshot_classifier(bundle, learner.classnames[start:start + n], [t], cache_dir=None))
            start += n
        learner.text_features = torch.cat(weights).to(learner.text_features)
    return learner


def transfer(source: nn.Module, target: nn.Module) -> nn.Module:
    """`target` initialised from the source prompt: every trained tensor of the source copied in (exactly)."""
    state = {n: p.detach().clone() for n, p in source.named_parameters() if p.requires_grad}
    own = {n for n, p in target.named_parameters() if p.requires_grad}
    if set(state) != own:
        raise ValueError(f"source prompt tensors {sorted(state)} do not match the target's {sorted(own)}")
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected
    return target


# ------------------------------------------------------------------------------------- stage 1: source
def source_data(family: str, tasks: Sequence[Task], cfg: dict, mt: MultiTask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenated training views of the source tasks: inputs (V, N, ...) (cached features for CoOp, pixels for
    the image-tower families), labels offset into the union (N,), task ids (N,)."""
    xs, ys, ts = [], [], []
    for i, t in enumerate(tasks):
        x, y = coop.train_views(t, cfg) if family == "coop" else pixel_views(t, cfg)
        xs.append(x)
        ys.append(y + mt.offsets[i])
        ts.append(torch.full_like(y, i))
    return torch.cat(xs, dim=1), torch.cat(ys), torch.cat(ts)


def union_logits(family: str, learner: nn.Module, x: torch.Tensor, scale: float) -> torch.Tensor:
    if family == "coop":
        return coop.coop_logits(x, learner.class_embeddings(), scale)
    return learner.logits(x, scale)


def train_source(family: str, tasks: Sequence[Task], cfg: dict, out_dir=None, seed: int = 1,
                 desc: str | None = None, val_score: Callable | None = None) -> tuple[nn.Module, MultiTask]:
    """Stage 1: one prompt of `family` trained on the concatenated source tasks (random batches over all of
    them); returns the learner (for the union class names) and the label space. `tasks[0].extra["schedule"]`
    overrides the budget (a convergence study), whose validation curve `val_score(learner, mt)` draws when
    `tasks[0].extra["on_eval"]` is set."""
    mt = MultiTask.of([t.dataset for t in tasks])
    bundle = tasks[0].bundle
    bundle.model.eval()
    seed_everything(seed)
    learner = build_family(family, bundle, mt.classnames, cfg, mt.templates, mt.sizes)
    x, y, tid = source_data(family, tasks, cfg, mt)
    n = y.numel()
    tcfg = with_schedule(coop.train_config(cfg, Task(cfg, bundle, tasks[0].dataset, tasks[0].shots, seed, None),
                                           n_train=n), tasks[0])
    scale = logit_scale(bundle)
    bs = int(coop.option(cfg, "batch_size"))
    space = cfg.get("label_space") or "task"
    device = bundle.device
    V = x.shape[0]

    def batches(epoch):
        view = torch.randint(V, (n,), generator=torch.Generator().manual_seed(tcfg.seed * 7919 + epoch))
        return [(x[view[idx], idx], y[idx], tid[idx]) for idx in index_batches(n, bs, tcfg.seed, epoch)]

    def step(batch):
        xb, yb, tb = (b.to(device) for b in batch)
        logits = multitask_logits(union_logits(family, learner, xb, scale), tb, mt, space)
        return F.cross_entropy(logits, yb), {"acc": float((logits.argmax(-1) == yb).float().mean()) * 100}

    trainer = Trainer(learner, tcfg, out_dir, desc=desc or f"{family} multitask source x{len(tasks)}")
    with torch_threads(coop.option(cfg, "threads")):
        history = trainer.fit(step, batches, epoch_validation(tasks[0], lambda: val_score(learner, mt))
                              if val_score is not None else None)
    keep_history(learner, history)
    return learner, mt


@torch.no_grad()
def evaluate_task(family: str, learner: nn.Module, task: Task, split: str = "test") -> dict[str, float]:
    """A learner on one task with that task's own classes (and template, for VPT's frozen text)."""
    return (coop.evaluate if family == "coop" else upt.evaluate)(learner, task, split=split)


@torch.no_grad()
def evaluate_union(family: str, learner: nn.Module, mt: MultiTask, tasks: Sequence[Task], split: str = "test",
                   label_space: str = "task") -> list[dict[str, float]]:
    """The source prompt on each source task in the union label space, scored on the task's own classes (the
    official per-task evaluation) or on the union."""
    was = learner.training
    learner.eval()
    scale = logit_scale(tasks[0].bundle)
    out = []
    text = None if family == "coop" else learner.class_embeddings()
    for i, t in enumerate(tasks):
        if family == "coop":
            data = t.features(split)
            logits = coop.coop_logits(data["features"].float(), coop.class_weights(learner, mt.classnames).float().cpu(), scale)
        else:
            data = {**pixels(t, split)}
            data["features"] = data["images"]
            logits = torch.cat([learner.logits(c.to(t.bundle.device), scale, text).float().cpu()
                                for c in data["images"].split(int(t.cfg.get("eval_batch_size") or 256))])
        ids = torch.full((len(logits),), i, dtype=torch.long)
        logits = multitask_logits(logits, ids, mt, label_space)
        out.append(classification_metrics(logits, data["labels"] + mt.offsets[i]))
    learner.train(was)
    return out


# ------------------------------------------------------------------------------------- stage 2: target
def target_learners(family: str, source: nn.Module | None, tasks: Sequence[Task], cfg: dict) -> list[nn.Module]:
    """One learner per target run, seeded as its single-task run is, then (multitask init) loaded from `source`."""
    out = []
    for t in tasks:
        seed_everything(t.seed)
        learner = build_family(family, t.bundle, t.dataset.classnames, cfg, [t.dataset.template])
        out.append(transfer(source, learner) if source is not None else learner)
    return out


def fit_targets(family: str, source: nn.Module | None, cfg: dict) -> Callable[[list[Task]], list[nn.Module]]:
    """`fit_many(tasks)` for the protocols: the family's own batched trainer from the source prompt (or from its own
    initialisation when `source` is None)."""
    def fit_many(tasks):
        learners = target_learners(family, source, tasks, cfg)
        out_dir = tasks[0].extra.get("group_dir") if len(tasks) > 1 else tasks[0].out_dir
        if family == "coop":
            return coop.train_coop_many(tasks, cfg, learners=learners, out_dir=out_dir)
        return upt.fit_many(tasks, cfg, out_dir=out_dir, learners=learners)
    return fit_many
