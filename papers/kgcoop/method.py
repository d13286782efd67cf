"""KgCoOp: CoOp plus a knowledge-guided regulariser that keeps the learned class embeddings close to those
of a hand-crafted prompt.

    L = CE(s * f w^T, y) + lambda * L_kg,   L_kg = (1/N_c) sum_i ||w_i - w_i^clip||^2   (paper, Eq. 4-5)

w_i: L2-normalised text feature of the learned prompt "[SOS] ctx_1..ctx_4 {class}. [EOS]" (CoOp's prompt
learner, context initialised from "a photo of a"); w_i^clip: L2-normalised text feature of the dataset's
hand-crafted template (`CUSTOM_TEMPLATES` of the official `trainers/kgcoop.py`), computed once with the
frozen CLIP. The official code writes the term as W * (1 - mean_i cos(w_i, w_i^clip)); for unit vectors
||a - b||^2 = 2 (1 - cos), so code weight W equals paper weight W / 2. `form="code"` (default) reproduces
the code, `form="paper"` the paper's equation. Training is CoOp's (`train_coop`, cached image features,
text encoder in the loop) with this loss; only the context is learned.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from common.clip import ClipBundle, zeroshot_classifier
from common.data import Dataset
from common.engine.protocols import Task
from common.engine.threads import torch_threads
from common.engine.seed import seed_everything
from papers.coop.method import PromptLearner, option, train_coop_many

# Official per-dataset anchors (trainers/kgcoop.py CUSTOM_TEMPLATES), keyed by this project's dataset names.
# They equal CoOp's zero-shot templates except DTD. Other datasets (embedded) use their own `template`.
KGCOOP_TEMPLATES: dict[str, str] = {
    "imagenet": "a photo of a {}.", "imagenetv2": "a photo of a {}.", "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.", "imagenet_r": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.", "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.", "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "sun397": "a photo of a {}.",
    "dtd": "a photo of a {}, a type of texture.", "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
}
FORMS = ("code", "paper")


def anchor_template(dataset: Dataset) -> str:
    """The hand-crafted template KgCoOp anchors to for this dataset ('dtd[base]' reads 'dtd')."""
    return KGCOOP_TEMPLATES.get(dataset.name.split("[")[0], dataset.template)


def kg_distance(w: torch.Tensor, w_clip: torch.Tensor) -> torch.Tensor:
    """Paper's L_kg: mean over classes of the squared Euclidean distance (inputs already normalised)."""
    if w.shape != w_clip.shape:
        raise ValueError(f"learned embeddings {tuple(w.shape)} and anchors {tuple(w_clip.shape)} differ in shape")
    return (w - w_clip).pow(2).sum(-1).mean()


def kg_regulariser(w: torch.Tensor, w_clip: torch.Tensor, form: str = "code") -> torch.Tensor:
    """The term multiplied by the weight: code 1 - mean cos (= L_kg / 2 on unit vectors), paper L_kg."""
    if form == "code":
        if w.shape != w_clip.shape:
            raise ValueError(f"learned embeddings {tuple(w.shape)} and anchors {tuple(w_clip.shape)} differ")
        return 1.0 - F.cosine_similarity(w, w_clip, dim=-1).mean()
    if form == "paper":
        return kg_distance(w, w_clip)
    raise ValueError(f"kg form must be one of {FORMS}, got {form!r}")


class KgLoss:
    """`loss_fn` for `train_coop`: CE + weight * regulariser against the hand-crafted anchors w^clip."""

    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], template: str, weight: float = 8.0,
                 form: str = "code"):
        if form not in FORMS:
            raise ValueError(f"kg form must be one of {FORMS}, got {form!r}")
        if weight < 0:
            raise ValueError(f"KgCoOp weight must be >= 0, got {weight}")
        self.weight, self.form, self.template = float(weight), form, template
        names = [c.replace("_", " ") for c in classnames]
        # w^clip: encoded once by the frozen CLIP; a constant, never trained or checkpointed
        self.anchors = zeroshot_classifier(bundle, names, [template], cache_dir=None).float().to(bundle.device)

    def __call__(self, learner: PromptLearner, logits: torch.Tensor, labels: torch.Tensor,
                 class_embeddings: torch.Tensor) -> tuple[torch.Tensor, dict]:
        ce = F.cross_entropy(logits, labels)
        kg = kg_regulariser(class_embeddings, self.anchors, self.form)
        return ce + self.weight * kg, {"ce": float(ce.detach()), "kg": float(kg.detach())}


def build_learner(bundle: ClipBundle, classnames: Sequence[str], cfg: dict) -> PromptLearner:
    """CoOp's unified context, class token at the end; "a photo of a" init (M = 4) in the official configs."""
    return PromptLearner(bundle, classnames, n_ctx=cfg["n_ctx"], ctx_init=cfg["ctx_init"] or None).to(bundle.device)


def train_kgcoop(task: Task, cfg: dict, weight: float | None = None) -> PromptLearner:
    """KgCoOp on `task` (weight 0: CoOp with the same learner and schedule)."""
    return train_kgcoop_many([task], cfg, weight, out_dir=task.out_dir)[0]


def train_kgcoop_many(tasks: Sequence[Task], cfg: dict, weight: float | None = None, out_dir=None) -> list[PromptLearner]:
    """KgCoOp on several tasks as one batched model (`train_coop_many`); each run as `train_kgcoop` alone."""
    w = cfg["weight"] if weight is None else weight
    learners, losses = [], []
    for t in tasks:
        seed_everything(t.seed)
        learners.append(build_learner(t.bundle, t.dataset.classnames, cfg))
        with torch_threads(option(cfg, "threads")):  # small text batches: extra threads only synchronise
            losses.append(KgLoss(t.bundle, t.dataset.classnames, anchor_template(t.dataset), w, cfg["kg_form"]))
    desc = f"kgcoop w={w:g} " + (f"{tasks[0].dataset.name} k{tasks[0].shots} s{tasks[0].seed}" if len(tasks) == 1
                                 else f"x{len(tasks)} {tasks[0].dataset.name}")
    return train_coop_many(tasks, cfg, learners, losses, desc=desc, out_dir=out_dir)
