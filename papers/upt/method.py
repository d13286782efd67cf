"""UPT: unified prompt tuning. One small set of prompts, shared by both CLIP towers, mapped by a tiny
transformer layer to the text context and the visual prompt tokens (Zang et al., 2022; official
`trainers/unified.py`, class `Unified_v6`, and `clip/model.py` `VisionTransformer.forward_prompt`).

Learned (CLIP frozen), with M = n_ctx text tokens and N = n_vis visual tokens (official M = N = 4):
- unified prompt U (M + N, d_t) ~ N(0, 0.02) (d_t: text width);
- the transform T, one post-norm transformer layer of width d_t, 1 head, dropout 0.1, FFN hidden d_t (not 4x):
      U1 = LN1(U + Drop(MHA(U, U, U)));  U_hat = U1 + Drop(W_b Drop(ReLU(W_a LN2(U1))));
- the visual projection Linear(d_t -> d_v).
Text prompts P_t = U_hat[:M]; visual prompts P_v = Linear(U_hat[M:]). T runs once for each tower (two dropout
masks in training, as the official `get_text_prompt` / `get_visual_prompt`).

Text: CoOp's layout with the class token at the end, [SOS] P_t [CLASS] . [EOS], on the tokenisation of
"a photo of a {class}." (CTX_INIT only fixes the placeholder positions; P_t is not initialised from those
words): CoOp's `PromptLearner` (imported) holds the frozen token buffers, its own context is frozen.
Vision (VPT-shallow): [CLS, P_v, patches] after the positional embedding and before `ln_pre`, all blocks
unchanged; through `common.clip.visual.encode_image_hooked(deep_prompts=[ln_pre(P_v)])`, which inserts after
`ln_pre` - exact, because `ln_pre` is per token (as MaPLe's first-layer prompts).
logits = exp(logit_scale) * cos(image, text); cross-entropy.

Token mixing (`mode`): the official code stores U as a (1, M+N, d) tensor and feeds it to a sequence-first
`nn.MultiheadAttention`: sequence length 1, batch M+N, so every token attends only to itself ("upt", the
default: per-token transform, prompts interact only through the shared weights). "upt_mix" runs the same layer
as the paper describes it, attention over the M+N tokens. Baselines and ablations with the same class:
- "vpt": VPT-shallow (official `trainers/vpt_shallow.py`): free visual prompts (N, d_v) ~ N(0, 0.02), the
  text is the frozen zero-shot classifier of the dataset's hand-crafted template;
- "upt_sep": separate text context (M, d_t) and visual prompts (N, d_v), both ~ N(0, 0.02), no transform.

Training batches independent runs (common.engine.batched through CoOp's `train_coop_many`): every run's
tensors are stacked on a run axis, a step encodes the concatenated images of the active runs, each with its
own run's visual prompts, in one pass of the frozen image tower.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import ClipBundle, encode_image_hooked, zeroshot_classifier
from common.clip.text import encode_prompts
from common.clip.visual import vit_width
from common.engine.protocols import Task
from common.engine.seed import seed_everything
from papers.coop.method import PromptLearner, train_coop_many, train_config
from papers.maple.method import evaluate as _evaluate
from papers.maple.method import train_views

MODES = ("upt", "upt_mix", "upt_sep", "vpt")
METHOD_OF_MODE = {"upt": "upt", "upt_mix": "upt_mix", "upt_sep": "upt_sep", "vpt": "vpt_shallow"}


class UnifiedTransform(nn.Module):
    """The official transform T (one post-norm transformer layer, FFN hidden = width). `mix=False` is the official
    layout (each token attends only to itself), `mix=True` attends over the tokens."""

    def __init__(self, width: int, heads: int = 1, dropout: float = 0.1, mix: bool = False):
        super().__init__()
        self.mix = mix
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout)   # sequence-first, as the official
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.linear1, self.linear2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, d)."""
        x = u.unsqueeze(1) if self.mix else u.unsqueeze(0)        # (L=T, N=1, d) or the official (L=1, N=T, d)
        a = self.self_attn(x, x, x, need_weights=False)[0]
        a = a.squeeze(1) if self.mix else a.squeeze(0)
        src = self.norm1(u + self.dropout1(a))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(self.norm2(src)))))
        return src + self.dropout2(src2)


class UPTLearner(nn.Module):
    """Unified (or separate, or visual-only) prompts for one set of class names."""

    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], mode: str = "upt", n_ctx: int = 4,
                 n_vis: int | None = None, ctx_init: str | None = "a photo of a", dropout: float = 0.1,
                 init_std: float = 0.02, template: str | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not classnames:
            raise ValueError("UPT needs at least one class name")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.bundle, self.mode = bundle, mode
        self.init_kwargs = dict(mode=mode, n_ctx=n_ctx, n_vis=n_vis, ctx_init=ctx_init, dropout=dropout,
                                init_std=init_std, template=template)
        self.classnames = [c.replace("_", " ") for c in classnames]
        device = bundle.device
        if mode == "vpt":
            self.n_ctx = 0
            weights = zeroshot_classifier(bundle, self.classnames, [template or "a photo of a {}."], cache_dir=None)
            self.register_buffer("text_features", weights.detach().clone(), persistent=False)
        else:
            # CoOp's learner with the placeholder phrase: SOS / "CLASS . EOS" buffers and token ids; its own context
            # (the phrase's embeddings) is frozen and only used when a test asks for the hand-crafted prompt.
            self.text = PromptLearner(bundle, self.classnames, n_ctx=n_ctx, ctx_init=ctx_init or None)
            self.text.ctx.requires_grad_(False)
            self.n_ctx = self.text.n_ctx
        n_vis = self.n_ctx if n_vis is None else int(n_vis)
        if mode == "vpt" and n_vis is None:
            raise ValueError("mode vpt needs n_vis")
        if n_vis < 0:
            raise ValueError(f"n_vis must be >= 0, got {n_vis}")
        if n_vis and not bundle.is_vit:
            raise ValueError("visual prompt tokens need a ViT image tower; use a ViT arch (tiny-vit, ViT-B-16)")
        self.n_vis = n_vis
        d_t = self.bundle.model.token_embedding.weight.shape[1]
        d_v = vit_width(bundle.model) if n_vis else 0
        g = lambda *shape: torch.empty(*shape).normal_(0, init_std).to(device)   # drawn on the CPU: same init anywhere
        if mode in ("upt", "upt_mix"):
            self.unified = nn.Parameter(g(self.n_ctx + n_vis, d_t))
            self.transform = UnifiedTransform(d_t, 1, dropout, mix=(mode == "upt_mix")).to(device)
            self.proj = nn.Linear(d_t, d_v).to(device) if n_vis else None
        elif mode == "upt_sep":
            self.ctx = nn.Parameter(g(self.n_ctx, d_t))
            self.visual_ctx = nn.Parameter(g(n_vis, d_v)) if n_vis else None
        else:
            self.visual_ctx = nn.Parameter(g(n_vis, d_v)) if n_vis else None

    # ------------------------------------------------------------------------------------------- prompts
    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def text_prompts(self) -> torch.Tensor | None:
        """P_t (M, d_t), or None for the frozen hand-crafted text (vpt)."""
        if self.mode in ("upt", "upt_mix"):
            return self.transform(self.unified)[:self.n_ctx]
        return self.ctx if self.mode == "upt_sep" else None

    def visual_prompts(self) -> torch.Tensor | None:
        """P_v (N, d_v) as it enters the image tower before ln_pre, or None without visual tokens."""
        if not self.n_vis:
            return None
        if self.mode in ("upt", "upt_mix"):
            return self.proj(self.transform(self.unified)[self.n_ctx:])
        return self.visual_ctx

    def class_embeddings(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """(K, D) normalised text features; `ctx` replaces P_t (tests: the frozen phrase gives zero-shot CLIP)."""
        if self.mode == "vpt":
            return self.text_features
        return self.text.class_embeddings(self.text_prompts() if ctx is None else ctx)

    def image_features(self, images: torch.Tensor, prompts: torch.Tensor | None = None,
                       use_prompts: bool = True) -> torch.Tensor:
        """(B, D) normalised image features; `prompts` (N, d_v) or (B, N, d_v) override P_v."""
        model = self.bundle.model
        if prompts is None and use_prompts:
            prompts = self.visual_prompts()
        deep = [model.visual.ln_pre(prompts)] if prompts is not None else None
        return F.normalize(encode_image_hooked(model, images, deep_prompts=deep), dim=-1)

    def logits(self, images: torch.Tensor, scale: float, text: torch.Tensor | None = None) -> torch.Tensor:
        text = self.class_embeddings() if text is None else text
        return scale * self.image_features(images) @ text.t()

    # ------------------------------------------------------------------------------------- bookkeeping
    def trained_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def with_classnames(self, classnames: Sequence[str], template: str | None = None) -> "UPTLearner":
        """The same learned prompts for other class names (and, for the frozen-text VPT, another template)."""
        names = [c.replace("_", " ") for c in classnames]
        template = template if template is not None else self.init_kwargs["template"]
        if names == self.classnames and template == self.init_kwargs["template"]:
            return self
        with torch.random.fork_rng():
            new = type(self)(self.bundle, names, **{**self.init_kwargs, "template": template})
        new.load_state_dict(self.trained_state(), strict=False)
        new.train(self.training)
        return new


def parameter_count(learner: nn.Module) -> int:
    return sum(p.numel() for p in learner.parameters() if p.requires_grad)


def build_learner(bundle: ClipBundle, classnames: Sequence[str], cfg: dict, template: str | None = None) -> UPTLearner:
    mode = cfg.get("mode") or "upt"
    n_vis = cfg.get("n_vis")
    return UPTLearner(bundle, classnames, mode=mode, n_ctx=int(cfg.get("n_ctx") or 4),
                      n_vis=None if n_vis is None else int(n_vis), ctx_init=cfg.get("ctx_init") or None,
                      dropout=float(cfg.get("dropout", 0.1)), template=template)


def template_of(task: Task) -> str:
    return task.dataset.template


# --------------------------------------------------------------------------------------------- training
def logits_many(learners: Sequence[UPTLearner], xs: Sequence[torch.Tensor], scale: float) -> list[tuple]:
    """[(logits, text features)] of several runs' image batches: one pass of the image tower over the concatenated
    images, each with its run's visual prompts; the text prompts of runs with the same class names in one pass."""
    model = learners[0].bundle.model
    prompts = [l.visual_prompts() for l in learners]
    images = torch.cat(list(xs))
    if any(p is not None for p in prompts):
        if any(p is None for p in prompts):
            raise ValueError("runs batched together must all have visual prompts or none")
        deep = torch.cat([model.visual.ln_pre(p).unsqueeze(0).expand(len(x), -1, -1) for p, x in zip(prompts, xs)])
        feats = encode_image_hooked(model, images, deep_prompts=[deep])
    else:
        feats = model.encode_image(images)
    feats = F.normalize(feats, dim=-1).split([len(x) for x in xs])
    texts = run_text_features(learners)
    return [(scale * f @ t.t(), t) for f, t in zip(feats, texts)]


def run_text_features(learners: Sequence[UPTLearner]) -> list[torch.Tensor]:
    """Each learner's `class_embeddings()`; learned text prompts of runs with the same class names go through the
    text tower together."""
    out: dict[int, torch.Tensor] = {}
    groups: dict[tuple, list[int]] = {}
    for i, l in enumerate(learners):
        if l.mode == "vpt":
            out[i] = l.class_embeddings()
        else:
            groups.setdefault(tuple(l.classnames), []).append(i)
    for members in groups.values():
        first = learners[members[0]].text
        prompts = torch.cat([learners[i].text.construct_prompts(learners[i].text_prompts()) for i in members])
        ids = first.token_ids.repeat(len(members), 1)
        feats = F.normalize(encode_prompts(first.encoder, prompts, ids), dim=-1).split(first.num_classes)
        for i, f in zip(members, feats):
            out[i] = f
    return [out[i] for i in range(len(learners))]


def fit_many(tasks: Sequence[Task], cfg: dict, out_dir=None, learners: Sequence[UPTLearner] | None = None,
             desc: str | None = None) -> list[UPTLearner]:
    """Train the prompts of several runs (seeds, shot counts, a study's schedules) as one batched model; each run
    is seeded and built as it would be alone (its dataset's template for the frozen-text VPT)."""
    if learners is None:
        learners = []
        for t in tasks:
            seed_everything(t.seed)
            learners.append(build_learner(t.bundle, t.dataset.classnames, cfg, template_of(t)))
    tasks[0].bundle.model.eval()   # frozen towers, deterministic
    return train_coop_many(tasks, cfg, learners=learners, out_dir=out_dir, logits_many=logits_many,
                           views=train_views, evaluate_fn=evaluate, schedule=lambda t, n: train_config(cfg, t, n_train=n),
                           desc=desc or f"{cfg.get('mode') or 'upt'} x{len(tasks)} {tasks[0].dataset.name}")


@torch.no_grad()
def evaluate(learner: UPTLearner, task: Task, split: str = "test") -> dict[str, float]:
    """Top-1 (and mean per-class) on `task`'s split with its own class names (and template for VPT's frozen text):
    the prompted image tower over the split's images in batches (MaPLe's evaluation)."""
    target = learner.with_classnames(task.dataset.classnames, template_of(task) if learner.mode == "vpt" else None)
    return _evaluate(target, task, split=split)
