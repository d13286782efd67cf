"""LASP: language-aware soft prompting (Bulat & Tzimiropoulos, CVPR 2023), on CoOp's prompt learner.

- Prompts: M = 4 context vectors from "a photo of a", shared by the classes (CoOp, class token at the end).
- Vision-language loss L_VL = CE(s * f W^T, y) over the training (base) classes, as CoOp.
- Text-to-text loss (Eq. 5): the L hand-crafted templates' class embeddings t^l_j (frozen CLIP, normalised)
  are *samples* classified by the learned class embeddings w_i: for every template l and class j,
  CE over i of s <w_i, t^l_j> with target i = j, averaged over l and j (`text_to_text_loss`). The official
  code adds N(0, 0.05^2) noise to the template embeddings with probability 0.5 per step.
  Total: L_VL + alpha * L_TT.
- Grouped prompts (G > 1): G contexts; the templates are split into G disjoint subsets and group g's L_TT
  uses only its subset. The class embedding used for classification is the normalised mean of the G
  groups' normalised embeddings (the combination rule is our reading; the released code has G = 1).
- Re-calibration (LASP-RP): (a) the LayerNorm affine parameters (ln_1, ln_2 of every block) of the *visual*
  encoder are trained at 0.1x the learning rate; (b) a class-agnostic bias b (zero init) is added to every
  text feature before normalisation, w_c = norm(T(P, c) + b), in both losses.
- Virtual classes (LASP-V): L_TT runs over the training names plus extra class names that have no images
  (the novel names in base-to-novel); the image-classification head only ever holds the training classes.
"""
from __future__ import annotations

import copy
import weakref
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import ClipBundle, is_vit, logit_scale, tokenize
from common.engine import Trainer, TrainConfig, index_batches, lr_at
from common.engine import convergence
from common.engine.convergence import with_schedule
from common.engine.cache import cached_features, encode_items
from common.engine.evaluate import classification_metrics
from common.engine.protocols import Task
from common.engine.threads import torch_threads
from papers.coop.method import (PromptLearner, class_weights, coop_logits, encode_prompts, option, train_config,
                                train_coop)

# configs/LASP/*.yaml LASP_PROMPTS (35 entries; "a bad photo of the {}." appears twice, as in the release)
LASP_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}, a type of flower.", "a photo of a person doing {}.", "a centered satellite photo of {}.",
    "a photo of a {}, a type of aircraft.", "{} texture.", "itap of a {}.", "a bad photo of the {}.",
    "a origami {}.", "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
    "a photo of the small {}.", "a photo of a {}.", "a photo of many {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a pixelated photo of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a close-up photo of the {}.", "a low resolution photo of a {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a blurry photo of a {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
)


def text_to_text_loss(learned: torch.Tensor, templates: torch.Tensor, scale: float) -> torch.Tensor:
    """L_TT: template embeddings (L, A, D) classified by the learned class embeddings (A, D).

    logits[l, j, i] = scale * <t^l_j, w_i>; cross-entropy over i with target j, mean over (l, j)."""
    if templates.dim() != 3 or templates.shape[1:] != learned.shape:
        raise ValueError(f"templates {tuple(templates.shape)} must be (L, A, D) with (A, D) = {tuple(learned.shape)}")
    L, A, _ = templates.shape
    logits = scale * templates @ learned.t()
    target = torch.arange(A, device=learned.device).repeat(L)
    return F.cross_entropy(logits.reshape(L * A, A), target)


def split_templates(templates: Sequence[str], groups: int) -> list[list[str]]:
    """G disjoint, contiguous subsets of the templates (as equal as possible)."""
    if not 1 <= groups <= len(templates):
        raise ValueError(f"groups must be in [1, {len(templates)}] (number of templates), got {groups}")
    n, out, start = len(templates), [], 0
    for g in range(groups):
        size = n // groups + (1 if g < n % groups else 0)
        out.append(list(templates[start:start + size]))
        start += size
    return out


class LaspPromptLearner(PromptLearner):
    """CoOp's learner with G context groups (ctx: (M, d) for G = 1, (G, M, d) otherwise) and the optional
    class-agnostic text bias b of the re-calibration."""

    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], n_ctx: int = 4,
                 ctx_init: str | None = "a photo of a", groups: int = 1, bias: bool = False, **kwargs):
        if kwargs.get("csc"):
            raise ValueError("LASP uses one context shared by the classes (csc must be false)")
        super().__init__(bundle, classnames, n_ctx=n_ctx, ctx_init=ctx_init, **kwargs)
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.init_kwargs.update(groups=groups, bias=bias)
        self.groups = groups
        if groups > 1:
            ctx = self.ctx.detach()
            ctx = ctx.unsqueeze(0).repeat(groups, 1, 1) if ctx_init else \
                torch.empty(groups, *ctx.shape, dtype=ctx.dtype).normal_(0, kwargs.get("init_std", 0.02))
            self.ctx = nn.Parameter(ctx)
        dim = self.encoder.text_projection.shape[1] if isinstance(self.encoder.text_projection, torch.Tensor) \
            else self.encoder.text_projection.out_features
        self.bias = nn.Parameter(torch.zeros(1, dim)) if bias else None

    def group_ctx(self) -> torch.Tensor:
        """(G, M, d) contexts."""
        return self.ctx.unsqueeze(0) if self.groups == 1 else self.ctx

    def group_embeddings(self, layout: PromptLearner | None = None) -> torch.Tensor:
        """(G, K, D) normalised text features of every group's prompts for the class names of `layout`
        (default: this learner's names); the bias is added before normalisation."""
        layout = layout or self
        feats = torch.stack([encode_prompts(layout.encoder, layout.construct_prompts(c), layout.token_ids)
                             for c in self.group_ctx()])
        if self.bias is not None:
            feats = feats + self.bias
        return F.normalize(feats, dim=-1)

    def class_embeddings(self, ctx: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
        if ctx is not None:
            raise ValueError("LaspPromptLearner encodes its own context groups; use group_embeddings(layout)")
        g = self.group_embeddings()
        return g[0] if self.groups == 1 else F.normalize(g.mean(0), dim=-1)


_TEMPLATE_MEMO: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def template_embeddings(bundle: ClipBundle, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(L, A, D) normalised frozen-CLIP text features of every template filled with every name, encoded in
    one batched pass (memoised per process: the variants of a run share them)."""
    memo = _TEMPLATE_MEMO.setdefault(bundle.model, {})
    key = (tuple(names), tuple(templates))
    if key not in memo:
        ids = tokenize(bundle, [t.format(n) for t in templates for n in names], device=bundle.device)
        was = bundle.model.training
        bundle.model.eval()
        feats = torch.cat([bundle.model.encode_text(chunk).float() for chunk in ids.split(1024)])
        bundle.model.train(was)
        memo[key] = F.normalize(feats, dim=-1).view(len(templates), len(names), -1)
    return memo[key]


class LaspLoss:
    """`loss_fn` for CoOp-style training: L_VL + alpha * L_TT over `tt_names` (training names, plus virtual
    classes for LASP-V), templates split over the learner's groups."""

    def __init__(self, bundle: ClipBundle, learner: LaspPromptLearner, tt_names: Sequence[str],
                 templates: Sequence[str] = LASP_TEMPLATES, weight: float = 5.0, noise_std: float = 0.05,
                 noise_prob: float = 0.5):
        self.weight, self.noise_std, self.noise_prob = float(weight), float(noise_std), float(noise_prob)
        self.scale = logit_scale(bundle)
        with torch.random.fork_rng():  # the layout learner's own (unused) context must not move the RNG
            self.layout = PromptLearner(bundle, tt_names, n_ctx=learner.n_ctx,
                                        ctx_init=learner.init_kwargs["ctx_init"]).to(bundle.device)
        self.layout.ctx.requires_grad_(False)
        names = list(self.layout.classnames)
        # t^l_j: one normalised embedding per (template, class), frozen CLIP, computed once: (L, A, D) per group
        self.targets = [template_embeddings(bundle, names, group)
                        for group in split_templates(list(templates), learner.groups)]

    def tt_loss(self, learner: LaspPromptLearner) -> torch.Tensor:
        learned = learner.group_embeddings(self.layout)
        losses = []
        for g, target in enumerate(self.targets):
            if self.noise_std > 0 and torch.rand(()).item() < self.noise_prob:
                target = target + self.noise_std * torch.randn_like(target)   # no re-normalisation (official)
            losses.append(text_to_text_loss(learned[g], target, self.scale))
        return torch.stack(losses).mean()

    def __call__(self, learner: LaspPromptLearner, logits: torch.Tensor, labels: torch.Tensor,
                 class_embeddings: torch.Tensor) -> tuple[torch.Tensor, dict]:
        vl = F.cross_entropy(logits, labels)
        if self.weight == 0:
            return vl, {"vl": float(vl.detach())}
        tt = self.tt_loss(learner)
        return vl + self.weight * tt, {"vl": float(vl.detach()), "tt": float(tt.detach())}


# ------------------------------------------------------------------------------------------ visual LN

LN_NAMES = ("ln_1", "ln_2")


def recalibrated_visual(bundle: ClipBundle) -> nn.Module:
    """A private copy of the ViT image tower whose block LayerNorms (ln_1, ln_2; affine weight and bias) are
    trainable and everything else frozen. A copy: the shared CLIP stays untouched for other runs."""
    if not is_vit(bundle.model):
        raise ValueError(f"LN re-calibration needs a ViT image tower; {bundle.arch} has a ResNet (use tiny-vit / "
                         f"ViT-B-16, or set vision_ln=false)")
    visual = copy.deepcopy(bundle.model.visual)
    for name, p in visual.named_parameters():
        p.requires_grad_(name.startswith("transformer.resblocks.") and name.split(".")[3] in LN_NAMES)
    return visual


def vit_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The input of the first transformer block (patch + class embeddings, positions, ln_pre): frozen."""
    return visual._embeds(images.to(visual.conv1.weight.dtype))


def vit_from_tokens(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The rest of the ViT on cached block inputs: transformer, pooling, projection (= encode_image)."""
    pooled, _ = visual._pool(visual.transformer(tokens))
    return pooled @ visual.proj if visual.proj is not None else pooled


class LaspModel(nn.Module):
    """What LASP-RP trains: the prompt learner (context, bias) and the visual LayerNorms."""

    def __init__(self, learner: LaspPromptLearner, visual: nn.Module):
        super().__init__()
        self.learner, self.visual = learner, visual

    def param_groups(self, ln_lr_mult: float) -> list[dict]:
        ln = [p for p in self.visual.parameters() if p.requires_grad]
        rest = [p for p in self.learner.parameters() if p.requires_grad]
        return [{"params": rest, "lr_mult": 1.0}, {"params": ln, "lr_mult": ln_lr_mult}]


class GroupLRTrainer(Trainer):
    """The engine's Trainer with per-group learning-rate multipliers, as Dassl's schedulers do with param
    groups: every group at the constant warmup lr during warmup, then its base lr (x lr_mult) on the cosine."""

    def __init__(self, module: nn.Module, cfg: TrainConfig, out_dir, param_groups: list[dict], desc: str = "train"):
        super().__init__(module, cfg, out_dir, params=[p for g in param_groups for p in g["params"]], desc=desc)
        if cfg.optimizer != "sgd":
            raise ValueError("LASP trains with SGD (the official configs); per-group lr is implemented for sgd only")
        self.optimizer = torch.optim.SGD([{"params": g["params"], "lr_mult": g["lr_mult"]} for g in param_groups
                                          if g["params"]], lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)

    def _set_lr(self, epoch: float) -> float:
        lr = lr_at(self.cfg, epoch)
        warm = epoch < self.cfg.warmup_epochs
        for g in self.optimizer.param_groups:
            g["lr"] = lr if warm else lr * g["lr_mult"]
        return lr


def token_views(task: Task, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached ViT block inputs of the augmented training views: (V, N, T, width) and labels (N,)."""
    visual = task.bundle.model.visual
    views = [cached_features(task.bundle, task.dataset.name, "train", task.dataset.train, transform="train", view=v,
                             kind="vit_tokens", encode=lambda x: vit_tokens(visual, x))
             for v in range(int(option(cfg, "cache_views")))]
    return torch.stack([v["features"] for v in views]), views[0]["labels"]


def token_batches(tokens: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
    """`batches(epoch)`: shuffled index batches, each image in one of its cached views, a pure function of
    (seed, epoch) so a resumed run sees the same batches."""
    V, N = tokens.shape[:2]

    def batches(epoch: int):
        view = torch.randint(V, (N,), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        return [(tokens[view[i], i], labels[i]) for i in index_batches(N, batch_size, seed, epoch)]
    return batches


def train_with_visual_ln(task: Task, cfg: dict, learner: LaspPromptLearner, loss_fn: LaspLoss) -> LaspModel:
    """LASP-RP training: the image tower runs from cached block inputs every step (its LNs are trained)."""
    model = LaspModel(learner, recalibrated_visual(task.bundle)).to(task.bundle.device)
    tokens, labels = token_views(task, cfg)
    tcfg = with_schedule(train_config(cfg, task), task)
    scale = logit_scale(task.bundle)
    trainer = GroupLRTrainer(model, tcfg, task.out_dir, model.param_groups(float(cfg["ln_lr_mult"])),
                             desc=f"lasp-rp {task.dataset.name} k{task.shots} s{task.seed}")

    def step(batch):
        x, y = batch
        text = learner.class_embeddings()
        logits = coop_logits(vit_from_tokens(model.visual, x.to(task.bundle.device)), text, scale)
        loss, logs = loss_fn(learner, logits, y.to(task.bundle.device), text)
        return loss, {"acc": float((logits.argmax(-1) == y.to(logits.device)).float().mean()) * 100, **logs}

    on_epoch_end = convergence.epoch_validation(task, lambda: _evaluate(model, task, "val")["top1"])
    with torch_threads(option(cfg, "threads")):  # small per-step ops: extra threads only synchronise
        history = trainer.fit(step, token_batches(tokens, labels, int(option(cfg, "batch_size")), tcfg.seed),
                              on_epoch_end)
    return convergence.keep_history(model, history)


def train_lasp(task: Task, cfg: dict, tt_names: Sequence[str]) -> LaspPromptLearner | LaspModel:
    """One LASP run: prompts (+ bias) with L_VL + alpha L_TT; with `vision_ln`, also the visual LNs."""
    learner = LaspPromptLearner(task.bundle, task.dataset.classnames, n_ctx=option(cfg, "n_ctx"),
                                ctx_init=option(cfg, "ctx_init") or None, groups=int(cfg["groups"]),
                                bias=bool(cfg["bias"])).to(task.bundle.device)
    templates = LASP_TEMPLATES if cfg["templates"] == "lasp" else list(cfg["templates"])
    with torch_threads(option(cfg, "threads")):  # small text batches: extra threads only synchronise
        loss = LaspLoss(task.bundle, learner, tt_names, templates, cfg["tt_weight"], cfg["tt_noise_std"],
                        cfg["tt_noise_prob"])
    if cfg["vision_ln"]:
        return train_with_visual_ln(task, cfg, learner, loss)
    return train_coop(task, cfg, learner, loss, desc=f"lasp {task.dataset.name} k{task.shots} s{task.seed}")


@torch.no_grad()
def evaluate_lasp(state: LaspPromptLearner | LaspModel, task: Task, split: str = "test") -> dict[str, float]:
    """Top-1 with prompts for the task's class names; LASP-RP encodes the test images with its tuned tower."""
    with torch_threads(option(task.cfg, "threads")):
        return _evaluate(state, task, split)


def _evaluate(state: LaspPromptLearner | LaspModel, task: Task, split: str = "test") -> dict[str, float]:
    learner = state.learner if isinstance(state, LaspModel) else state
    weights = class_weights(learner, task.dataset.classnames)
    scale = logit_scale(task.bundle)
    if isinstance(state, LaspModel):
        visual = state.visual.eval()
        test = task.dataset.split(split)
        if task.cfg.get("ln_eval_cache", True):  # cache the frozen block inputs of the test images
            tok = cached_features(task.bundle, task.dataset.name, split, test, kind="vit_tokens",
                                  encode=lambda x: vit_tokens(task.bundle.model.visual, x))
            feats = torch.cat([vit_from_tokens(visual, t.to(task.bundle.device)).float().cpu()
                               for t in tok["features"].split(int(task.cfg.get("eval_batch_size", 256)))])
            labels = tok["labels"]
        else:  # real-size test sets: encode images through the tuned tower, nothing stored
            from common.data.images import build_transform
            from common.engine.cache import mean_std
            tf = build_transform("test", task.bundle.image_size, *mean_std(task.bundle))
            feats = encode_items(task.bundle, test, tf, encode=lambda x: vit_from_tokens(visual, vit_tokens(visual, x)))
            labels = torch.tensor([d.label for d in test])
    else:
        f = task.features(split)
        feats, labels = f["features"], f["labels"]
    return classification_metrics(coop_logits(feats.to(weights.device), weights, scale), labels.to(weights.device))
