"""SubPT (Subspace Prompt Tuning) and NFL (Novel Feature Learner) on CoOp.

SubPT, as the official pipeline runs it (`compute_eigenvector.py`, Dassl `model_subspace_backward_and_update`):
1. train plain CoOp and keep the context after each of the first `t_early` epochs: W in R^{t_early x D}
   (D = M x width, the flattened context);
2. PCA of W (mean-centred rows, full SVD): U in R^{r x D} = the top-r right singular vectors (sklearn's
   `components_`); the centred iterates are accumulated early-stage gradient steps, the paper's
   "early-stage gradient flow";
3. retrain CoOp from the same initialisation with every gradient projected onto span(U) before the
   optimiser step: g <- U^T (U g). Weight decay is added by SGD after the projection (as in the official
   code), so with decay > 0 the iterates leave the subspace slightly.
NFL: extra prompts for class names without images share the learned context; their text features t_j
are pulled towards zero-shot CLIP's prompt-ensemble features z_j of the same names:
L = CE + lambda * mean_j (1 - cos(t_j, z_j))   (`nn.CosineEmbeddingLoss` with target +1).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import IMAGENET_TEMPLATES, ClipBundle, zeroshot_classifier
from common.data import Dataset
from common.engine import index_batches, items_digest
from common.engine.protocols import Task
from common.engine.threads import torch_threads
from common.paths import runs_root
from papers.coop.method import PromptLearner, epochs_for, option, train_coop


# ------------------------------------------------------------------------------------------ subspace

def trajectory_basis(iterates: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal rows U (rank, D) spanning the top-`rank` principal directions of the iterates (T, D).

    = sklearn `PCA(n_components=rank, svd_solver="full").fit(W).components_` up to the sign of each row.
    `rank` = D gives a complete orthonormal basis of R^D (projection = identity): SubPT is then CoOp."""
    if iterates.dim() != 2:
        raise ValueError(f"iterates must be (T, D), got shape {tuple(iterates.shape)}")
    T, D = iterates.shape
    if rank == D:
        full = torch.linalg.svd(iterates.double() - iterates.double().mean(0), full_matrices=True).Vh
        return full.to(iterates.dtype)
    if not 1 <= rank <= min(T, D):
        raise ValueError(f"subspace rank must be in [1, min(T, D)] = [1, {min(T, D)}] (or D = {D} for the full "
                         f"space), got {rank}: record more early epochs (t_early) or lower the rank")
    centred = iterates.double() - iterates.double().mean(0)
    return torch.linalg.svd(centred, full_matrices=False).Vh[:rank].to(iterates.dtype)


def project(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of a tensor (flattened) onto span of the orthonormal rows of `basis`."""
    flat = grad.reshape(-1).to(basis.dtype)
    return (basis.t() @ (basis @ flat)).reshape(grad.shape).to(grad.dtype)


def attach_projection(param: nn.Parameter, basis: torch.Tensor):
    """Project `param.grad` onto span(basis) after every backward, before the optimiser reads it."""
    if basis.shape[1] != param.numel():
        raise ValueError(f"basis has dimension {basis.shape[1]}, parameter has {param.numel()} entries")
    basis = basis.to(param.device)

    def hook(p: torch.Tensor) -> None:
        p.grad.copy_(project(p.grad, basis))
    return param.register_post_accumulate_grad_hook(hook)


class RecordingPromptLearner(PromptLearner):
    """CoOp's learner that keeps its context after each of the first `t_early` epochs (SubPT stage 1).

    A hook counts optimiser steps at every backward (the context there is the state after that many
    steps); at step e * steps_per_epoch it stores the state after epoch e. The trajectory is a buffer, so
    the Trainer's checkpoint holds it and an interrupted run resumes with it."""

    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], t_early: int = 1, steps_per_epoch: int = 1,
                 **kwargs):
        super().__init__(bundle, classnames, **kwargs)
        if t_early < 1 or steps_per_epoch < 1:
            raise ValueError(f"t_early and steps_per_epoch must be >= 1, got {t_early}, {steps_per_epoch}")
        self.init_kwargs.update(t_early=t_early, steps_per_epoch=steps_per_epoch)
        self.t_early, self.steps_per_epoch = t_early, steps_per_epoch
        self.register_buffer("trajectory", torch.zeros(t_early, self.ctx.numel()))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        self.ctx.register_post_accumulate_grad_hook(lambda p: self._step())

    def _record(self) -> None:
        s, spe = int(self.steps_seen), self.steps_per_epoch
        if s % spe == 0 and 1 <= s // spe <= self.t_early:
            self.trajectory[s // spe - 1] = self.ctx.detach().reshape(-1).to(self.trajectory.dtype)

    def _step(self) -> None:
        self._record()
        self.steps_seen += 1

    def recorded(self) -> torch.Tensor:
        """The iterates after epochs 1..t_early (the last one is taken now if training stopped exactly there)."""
        self._record()
        epochs = int(self.steps_seen) // self.steps_per_epoch
        if epochs < self.t_early:
            raise ValueError(f"only {epochs} epochs were trained; SubPT needs the first t_early = {self.t_early}")
        return self.trajectory.clone()


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    """Optimiser steps per epoch of the engine's batching (Dassl drops the last partial batch)."""
    return len(index_batches(n_items, batch_size, seed=0, epoch=0))


# ------------------------------------------------------------------------------------------ NFL

def nfl_loss(text_features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_j (1 - cos(t_j, z_j)): `nn.CosineEmbeddingLoss` with every target +1."""
    if text_features.shape != targets.shape:
        raise ValueError(f"NFL features {tuple(text_features.shape)} and targets {tuple(targets.shape)} differ")
    return (1.0 - F.cosine_similarity(text_features, targets, dim=-1)).mean()


def ensemble_templates(dataset: Dataset) -> list[str]:
    """ZeroshotCLIP2's prompt ensemble: the ImageNet templates (the dataset's own set where it defines one)
    plus the dataset's hand-crafted template when it is not already among them (ImageNet: nothing added)."""
    templates = list(dataset.meta.get("templates") or IMAGENET_TEMPLATES)
    return templates + ([dataset.template] if dataset.template not in templates else [])


class NflLoss:
    """`loss_fn` for `train_coop`: CE + lambda * NFL over prompts of `names` that share the learned context."""

    def __init__(self, bundle: ClipBundle, learner: PromptLearner, names: Sequence[str], templates: Sequence[str],
                 weight: float = 1.0):
        if not names:
            raise ValueError("NFL needs at least one extra class name")
        self.weight = float(weight)
        with torch.random.fork_rng():  # the extra learner's own (unused) context must not move the RNG
            self.extra = PromptLearner(bundle, names, **{k: v for k, v in learner.init_kwargs.items()
                                                          if k in ("n_ctx", "ctx_init", "class_token_position")})
        self.extra.ctx.requires_grad_(False)
        self.extra.to(bundle.device)
        # z_j: frozen zero-shot CLIP ensemble features, computed once (disk-cached per checkpoint/names/templates)
        self.targets = zeroshot_classifier(bundle, list(self.extra.classnames), list(templates)).float().to(
            bundle.device)

    def __call__(self, learner: PromptLearner, logits: torch.Tensor, labels: torch.Tensor,
                 class_embeddings: torch.Tensor) -> tuple[torch.Tensor, dict]:
        ce = F.cross_entropy(logits, labels)
        nfl = nfl_loss(self.extra.class_embeddings(learner.ctx), self.targets)
        return ce + self.weight * nfl, {"ce": float(ce.detach()), "nfl": float(nfl.detach())}


# ------------------------------------------------------------------------------------------ training

def learner_for(task: Task, cfg: dict, cls=PromptLearner, **extra) -> PromptLearner:
    """CoOp's learner (official SubPT: M = 16, random init, unified, end), initialised from the run's seed
    so stage 1 and stage 3 start from the same context."""
    with torch.random.fork_rng():
        torch.manual_seed(int(task.seed))
        learner = cls(task.bundle, task.dataset.classnames, n_ctx=option(cfg, "n_ctx"),
                      ctx_init=option(cfg, "ctx_init") or None, csc=bool(option(cfg, "csc")),
                      class_token_position=option(cfg, "class_token_position"), **extra)
    return learner.to(task.bundle.device)


def nfl_names(task: Task, cfg: dict, novel_names: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(names, templates) of the NFL prompts: the novel class names of a base-to-novel task, otherwise a
    fixed random subset of `nfl_num_names` class names of `nfl_source` (ImageNet in the official scripts)."""
    if novel_names is not None:
        return list(novel_names), ensemble_templates(task.dataset)
    from common.data import build_dataset
    source = build_dataset(cfg["nfl_source"], cfg["data_root"])
    g = torch.Generator().manual_seed(int(cfg["nfl_names_seed"]))
    order = torch.randperm(source.num_classes, generator=g)[: int(cfg["nfl_num_names"])].tolist()
    return [source.classnames[i] for i in order], ensemble_templates(source)


def trajectory_file(task: Task, cfg: dict, nfl: tuple[list[str], list[str]] | None = None) -> Path:
    """Where the stage-1 iterates of this run are kept (keyed by everything that determines them)."""
    key = json.dumps([task.bundle.arch, task.bundle.checkpoint_id, task.dataset.name,
                      items_digest(task.dataset.train), task.shots, task.seed, option(cfg, "n_ctx"),
                      option(cfg, "ctx_init"), option(cfg, "csc"), option(cfg, "class_token_position"),
                      option(cfg, "batch_size"), epochs_for(cfg, task), cfg.get("train"), option(cfg, "cache_views"),
                      t_early_for(cfg, task), nfl and [nfl, cfg.get("nfl_weight")],
                      (task.extra or {}).get("schedule")], sort_keys=True, default=str)   # a study's per-run budget
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    kind = "nfl" if nfl else "coop"
    return runs_root() / "subpt" / "_trajectories" / f"{task.dataset.name}-k{task.shots}-s{task.seed}-{kind}-{digest}.pt"


def _by_shots(table: dict, shots: int | None, what: str) -> int:
    table = {int(k): int(v) for k, v in table.items()}
    if shots is None:
        raise ValueError(f"SubPT's {what} is set per shot count; the task has none")
    fitting = [k for k in sorted(table) if k >= shots]
    return table[fitting[0] if fitting else max(table)]


def t_early_for(cfg: dict, task: Task) -> int:
    """Early-stage epochs (`FINISH` of compute_eigenvector.py): 10/20/30/40/50 at 1/2/4/8/16 shots."""
    return _by_shots(cfg["t_early_by_shots"], task.shots, "t_early")


def rank_for(cfg: dict, task: Task) -> int:
    """Subspace rank (`DIM`): 5 at 1 shot, 10 otherwise."""
    return _by_shots(cfg["rank_by_shots"], task.shots, "rank")


def train_stage1(task: Task, cfg: dict, nfl: tuple[list[str], list[str]] | None = None,
                 out_dir: Path | None = None) -> tuple[PromptLearner, torch.Tensor]:
    """CoOp (or CoOp + NFL) with the context trajectory of the first t_early epochs recorded; the
    trajectory is also written to `trajectory_file` for the SubPT runs."""
    t_early = t_early_for(cfg, task)
    if t_early > epochs_for(cfg, task):
        raise ValueError(f"t_early = {t_early} exceeds the {epochs_for(cfg, task)} training epochs")
    spe = steps_per_epoch(len(task.dataset.train), int(option(cfg, "batch_size")))
    learner = learner_for(task, cfg, RecordingPromptLearner, t_early=t_early, steps_per_epoch=spe)
    with torch_threads(option(cfg, "threads")):  # small text batches: extra threads only synchronise
        loss = NflLoss(task.bundle, learner, *nfl, weight=cfg["nfl_weight"]) if nfl else None
    run = Task(task.cfg, task.bundle, task.dataset, task.shots, task.seed, out_dir or task.out_dir, task.extra)
    train_coop(run, cfg, learner, loss, desc=f"{'coop+nfl' if nfl else 'coop'} {task.dataset.name} "
                                             f"k{task.shots} s{task.seed}")
    iterates = learner.recorded()
    path = trajectory_file(task, cfg, nfl)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(iterates, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return learner, iterates


def load_or_train_stage1(task: Task, cfg: dict, nfl=None) -> torch.Tensor:
    """The stage-1 trajectory of this run: read back, or trained now (its resume checkpoint then dropped)."""
    path = trajectory_file(task, cfg, nfl)
    if path.is_file():
        return torch.load(path, map_location="cpu")
    out_dir = Path(task.out_dir) / "stage1" if task.out_dir else None
    iterates = train_stage1(task, cfg, nfl, out_dir=out_dir)[1]
    if out_dir is not None:
        (out_dir / "checkpoint.pt").unlink(missing_ok=True)
    return iterates


def train_subpt(task: Task, cfg: dict, nfl: tuple[list[str], list[str]] | None = None,
                basis: torch.Tensor | None = None) -> PromptLearner:
    """SubPT stage 3: CoOp (+ NFL) from the stage-1 initialisation with projected gradients. The basis comes
    from the matching stage-1 run (CoOp for SubPT, CoOp + NFL for SubPT + NFL, as the official scripts)."""
    if basis is None:
        basis = trajectory_basis(load_or_train_stage1(task, cfg, nfl), rank_for(cfg, task))
    learner = learner_for(task, cfg)
    attach_projection(learner.ctx, basis)
    with torch_threads(option(cfg, "threads")):
        loss = NflLoss(task.bundle, learner, *nfl, weight=cfg["nfl_weight"]) if nfl else None
    return train_coop(task, cfg, learner, loss, desc=f"subpt{'+nfl' if nfl else ''} {task.dataset.name} "
                                                      f"k{task.shots} s{task.seed}")
