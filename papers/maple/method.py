"""MaPLe: multi-modal prompt learning, deep prompts in both CLIP towers coupled language -> vision.

Learned (CLIP frozen), prompt length b (`n_ctx`), depth J (`depth`):
- language prompts P_0 .. P_{J-1}, each (b, d_t). P_0 replaces the b token embeddings after SOS of
  "[SOS] a photo of a {class}. [EOS]": it is initialised with the embeddings of the first b tokens of
  `ctx_init` ("a photo" for b=2); the rest of the phrase ("of a") stays frozen in the suffix (official
  issue #32). P_1 .. P_{J-1} ~ N(0, 0.02) replace the residual stream at those b positions before text
  blocks 1 .. J-1 (the previous block's outputs there are thrown away); blocks >= J run unchanged.
- coupling functions F_0 .. F_{J-1}, one Linear(d_t -> d_v) per depth: the visual prompts are
  P~_i = F_i(P_i), never free parameters, so the image loss reaches the language prompts.
  The first-layer visual prompts are appended to [CLS, patches] and normalised by `ln_pre` with them
  (official); before vision blocks 1 .. J-1 the b prompt tokens are replaced by F_i(P_i) (not normalised).
logits = exp(logit_scale) * cos(image feature, text feature); loss = cross-entropy.

The ablations of the paper's prompting-design table use the same class with `mode`:
- `maple`: the above (J=1 is shallow MaPLe);
- `ivlp`: independent V-L prompting: the visual prompts V_i (b, d_v) ~ N(0, 0.02) are free parameters,
  no coupling;
- `vpt`: deep vision prompting only, the text is the hand-crafted "a photo of a {class}." (frozen);
- `language`: deep language prompting only, no visual prompts.

Visual prompts go through `common.clip.visual.encode_image_hooked(deep_prompts=...)`, which inserts them
right after CLS instead of after the patches: the ViT's blocks are permutation-equivariant over tokens and
the prompts carry no positional embedding, so CLS (the pooled output) is the same (tested against the
official token order); `ln_pre` is per-token, so the first-layer prompts are passed as `ln_pre(F_0(P_0))`.

The image tower runs at every training step (the prompts enter it), so training reads images, not cached
features: the pixel tensors of a split (one seeded augmented view per image, as the feature cache draws
them) are loaded once per process and batched by index.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.clip import ClipBundle, PromptTextEncoder, encode_image_hooked, logit_scale, tokenize
from common.clip.visual import vit_depth, vit_width
from common.data.images import build_transform
from common.engine import Trainer, classification_metrics, encode_items, items_digest
from common.engine.cache import mean_std
from common.engine.convergence import with_schedule
from common.engine.protocols import Task
from common.engine.seed import seed_everything
from common.engine.threads import torch_threads
from papers.coop.method import train_config
from common.engine import index_batches

MODES = ("maple", "ivlp", "vpt", "language")


class MaPLeLearner(nn.Module):
    """Deep language prompts, deep visual prompts and (mode `maple`) their coupling functions."""

    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], mode: str = "maple", n_ctx: int = 2,
                 ctx_init: str | None = "a photo of a", depth: int = 9, init_std: float = 0.02):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not classnames:
            raise ValueError("MaPLe needs at least one class name")
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        self.encoder = PromptTextEncoder(bundle.model)
        text_layers = len(self.encoder.transformer.resblocks)
        vision = mode in ("maple", "ivlp", "vpt") and depth >= 1
        if vision and not bundle.is_vit:
            raise ValueError("visual prompts need a ViT image tower (official issue #49: no ResNet support); "
                             "use a ViT arch (tiny-vit, ViT-B-16) or mode=language")
        max_depth = min(text_layers, vit_depth(bundle.model)) if vision else text_layers
        if not 0 <= depth <= max_depth:
            raise ValueError(f"depth must be in [1, {max_depth}] (prompts enter layers 0..depth-1 of this CLIP), "
                             f"got {depth}")
        self.learns_text = mode in ("maple", "ivlp", "language") and depth >= 1   # depth 0: no prompts (CLIP)
        self.bundle, self.mode, self.n_ctx, self.depth = bundle, mode, n_ctx, depth
        self.init_kwargs = dict(mode=mode, n_ctx=n_ctx, ctx_init=ctx_init, depth=depth, init_std=init_std)
        names = [c.replace("_", " ") for c in classnames]
        self.classnames = names
        embed = self.encoder.token_embedding
        device, d_t = embed.weight.device, self.encoder.width
        phrase = " ".join((ctx_init or "").replace("_", " ").split())
        with torch.no_grad():
            if not self.learns_text:    # frozen hand-crafted text: the whole phrase stays in the token sequence
                prefix_text = phrase or "a photo of a"
                ctx = None
            elif phrase:
                init_ids = tokenize(bundle, [phrase], device=device)
                pieces = int(init_ids.argmax(-1).item()) - 1
                if n_ctx > pieces:
                    raise ValueError(f"n_ctx={n_ctx} is longer than ctx_init {phrase!r} ({pieces} tokens); use "
                                     f"n_ctx <= {pieces} or ctx_init='' for a random init")
                ctx = embed(init_ids)[0, 1:1 + n_ctx].clone()
                prefix_text = phrase
            else:
                ctx = torch.empty(n_ctx, d_t).normal_(0, init_std).to(device)
                prefix_text = " ".join(["X"] * n_ctx)
            token_ids = tokenize(bundle, [f"{prefix_text} {n}." for n in names], device=device)
            embedding = embed(token_ids)
        self.register_buffer("token_ids", token_ids, persistent=False)
        if ctx is None:
            self.register_buffer("token_embeddings", embedding.clone(), persistent=False)
        else:
            self.ctx = nn.Parameter(ctx.to(self.encoder.dtype))                                   # P_0
            self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)          # SOS
            self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:].clone(), persistent=False)  # of a CLASS .
            self.deep_text = nn.ParameterList(
                [nn.Parameter(torch.empty(n_ctx, d_t).normal_(0, init_std).to(device)) for _ in range(depth - 1)])
        if vision:
            d_v = vit_width(bundle.model)
            if mode == "maple":
                # official: a separate first-layer projection, and the deep ones deep copies of one Linear
                first = nn.Linear(d_t, d_v)
                deep = nn.Linear(d_t, d_v)
                self.coupling = nn.ModuleList([first] + [copy.deepcopy(deep) for _ in range(depth - 1)]).to(device)
            else:
                self.visual_prompts = nn.ParameterList(
                    [nn.Parameter(torch.empty(n_ctx, d_v).normal_(0, init_std).to(device)) for _ in range(depth)])

    # ------------------------------------------------------------------------------------------- prompts
    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def text_prompts(self) -> list[torch.Tensor]:
        """[P_0, .., P_{J-1}] (empty for mode vpt)."""
        return [self.ctx, *self.deep_text] if self.learns_text else []

    def visual_prompt_list(self) -> list[torch.Tensor] | None:
        """[P~_0, .., P~_{J-1}] as they enter the vision blocks (P~_0 not yet normalised), or None."""
        if self.mode == "language" or self.depth == 0:
            return None
        if self.mode == "maple":
            return [f(p) for f, p in zip(self.coupling, self.text_prompts())]
        return list(self.visual_prompts)

    def text_input(self) -> torch.Tensor:
        """(K, L, d_t) token embeddings entering text block 0: [SOS][P_0][of a CLASS . EOS pad]."""
        if not self.learns_text:
            return self.token_embeddings
        K = self.num_classes
        return torch.cat([self.token_prefix, self.ctx.unsqueeze(0).expand(K, -1, -1).to(self.token_prefix.dtype),
                          self.token_suffix], dim=1)

    def class_embeddings(self) -> torch.Tensor:
        """(K, D) normalised text features; gradients reach P_0..P_{J-1}."""
        deep = list(self.deep_text) if self.learns_text and self.depth > 1 else None
        return encode_deep(self.encoder, self.text_input(), self.token_ids, deep)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised image features with the visual prompts in blocks 0..J-1."""
        prompts = self.visual_prompt_list()
        model = self.bundle.model
        if prompts is not None:
            prompts = [model.visual.ln_pre(prompts[0]), *prompts[1:]]
        return F.normalize(encode_image_hooked(model, images, deep_prompts=prompts), dim=-1)

    def logits(self, images: torch.Tensor, scale: float, text: torch.Tensor | None = None) -> torch.Tensor:
        text = self.class_embeddings() if text is None else text
        return scale * self.image_features(images) @ text.t()

    # ------------------------------------------------------------------------------------- bookkeeping
    def trained_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def with_classnames(self, classnames: Sequence[str]) -> "MaPLeLearner":
        """The same learned prompts and couplings for other class names (novel classes, other datasets)."""
        names = [c.replace("_", " ") for c in classnames]
        if names == self.classnames:
            return self
        with torch.random.fork_rng():
            new = type(self)(self.bundle, names, **self.init_kwargs)
        new.load_state_dict(self.trained_state(), strict=False)
        new.train(self.training)
        return new


def encode_deep(encoder: PromptTextEncoder, prompts: torch.Tensor, token_ids: torch.Tensor,
                deep_prompts: list[torch.Tensor] | None) -> torch.Tensor:
    """Normalised `encoder(prompts, token_ids, deep_prompts)` computed on the positions up to the last EOT
    (the text tower is causal and pools at EOT: later positions never reach an output; exact)."""
    eot = token_ids.argmax(-1)
    keep = int(eot.max()) + 1
    enc = SimpleNamespace(transformer=encoder.transformer, positional_embedding=encoder.positional_embedding[:keep],
                          attn_mask=encoder.attn_mask[:keep, :keep] if encoder.attn_mask is not None else None,
                          ln_final=encoder.ln_final, text_projection=encoder.text_projection,
                          pool_type=encoder.pool_type, eos_id=encoder.eos_id)
    if encoder.attn_mask is None or encoder.pool_type not in ("argmax", "eos"):
        enc, keep = encoder, prompts.shape[1]
    x = PromptTextEncoder.forward(enc, prompts[:, :keep], token_ids[:, :keep], deep_prompts=deep_prompts)
    return F.normalize(x, dim=-1)


def build_learner(bundle: ClipBundle, classnames: Sequence[str], cfg: dict) -> MaPLeLearner:
    return MaPLeLearner(bundle, classnames, mode=cfg.get("mode") or "maple", n_ctx=int(cfg.get("n_ctx") or 2),
                        ctx_init=cfg.get("ctx_init", "a photo of a") or None, depth=int(cfg["depth"]))


# ------------------------------------------------------------------------------------------------- data
_PIXELS: dict[tuple, dict] = {}


def pixels(task: Task, split: str, transform: str = "test", view: int = 0) -> dict:
    """{"images": (N, 3, S, S) float32, "labels": (N,)} of a split, loaded once per process. Augmented view `v`
    is drawn from the stream the feature cache seeds for view v (the same crops CoOp's cached features saw)."""
    items = task.dataset.split(split)
    bundle = task.bundle
    key = (bundle.image_size, task.dataset.name, split, transform, view, items_digest(items))
    if key not in _PIXELS:
        if transform != "test":
            seed_everything(1000 + view, deterministic=False)
        tf = build_transform(transform, bundle.image_size, *mean_std(bundle))
        images = encode_items(bundle, items, tf, encode=lambda x: x.cpu(),
                              desc=f"{task.dataset.name}/{split} pixels") if items else torch.empty(0)
        if len(_PIXELS) > 64:
            _PIXELS.clear()
        _PIXELS[key] = {"images": images, "labels": torch.tensor([d.label for d in items], dtype=torch.long)}
    return _PIXELS[key]


def train_views(task: Task, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, N, 3, S, S) augmented training views and labels (N,)."""
    views = [pixels(task, "train", "train", v) for v in range(int(cfg.get("cache_views") or 1))]
    return torch.stack([v["images"] for v in views]), views[0]["labels"]


def view_batches(views: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
    """`batches(epoch)`: shuffled index batches, each image in a view drawn for (seed, epoch) (CoOp's
    `feature_batches` over pixel tensors); a pure function of (seed, epoch), so a resumed run sees the same."""
    V, N = views.shape[:2]

    def batches(epoch: int):
        view = torch.randint(V, (N,), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        return [(views[view[idx], idx], labels[idx]) for idx in index_batches(N, batch_size, seed, epoch)]
    return batches


# --------------------------------------------------------------------------------------------- training
def schedule_of(cfg: dict, task: Task):
    return with_schedule(train_config(cfg, task, epochs=int(cfg.get("epochs") or 5)), task)


def train_maple(task: Task, cfg: dict, learner: MaPLeLearner | None = None, desc: str | None = None) -> MaPLeLearner:
    """Train the prompts (and couplings) on `task`'s few-shot train split; returns the learner with
    `train_history` (per epoch: loss, step) and `val_history` (when `task.extra["on_eval"]`)."""
    if learner is None:
        seed_everything(task.seed)
        learner = build_learner(task.bundle, task.dataset.classnames, cfg)
    imgs, labels = train_views(task, cfg)
    tcfg = schedule_of(cfg, task)
    scale = logit_scale(task.bundle)
    bs = int(cfg.get("batch_size") or 4)
    device = task.bundle.device
    batches = view_batches(imgs, labels, bs, tcfg.seed)
    steps_per_epoch = len(batches(0))
    trainer = Trainer(learner, tcfg, task.out_dir, desc=desc or f"{learner.mode} {task.dataset.name} s{task.seed}")

    def step(batch):
        x, y = batch
        logits = learner.logits(x.to(device), scale)
        y = y.to(device)
        return F.cross_entropy(logits, y), {"acc": float((logits.argmax(-1) == y).float().mean()) * 100}

    val_history = []

    def on_epoch_end(epoch):
        if not task.extra.get("on_eval"):
            return None
        val = evaluate(learner, task, split="val")["top1"]
        learner.train()
        val_history.append({"step": (epoch + 1) * steps_per_epoch, "val": val})
        return {"val_top1": val}

    with torch_threads(cfg.get("threads")):
        hist = trainer.fit(step, batches, on_epoch_end)
    learner.train_history = [{**h, "step": h["epoch"] * steps_per_epoch} for h in hist]
    learner.val_history = val_history
    return learner


@torch.no_grad()
def evaluate(learner: MaPLeLearner, task: Task, split: str = "test") -> dict[str, float]:
    """Top-1 (and mean per-class) on `task`'s split with its own class names: the prompted image tower over the
    split's images in batches of `eval_batch_size`."""
    target = learner.with_classnames(task.dataset.classnames)
    was = target.training
    target.eval()
    data = pixels(task, split)
    scale = logit_scale(task.bundle)
    bs = int(task.cfg.get("eval_batch_size") or 256)
    with torch_threads(task.cfg.get("threads")):
        text = target.class_embeddings()
        chunks = data["images"].split(bs)
        logits = torch.cat([target.logits(c.to(task.bundle.device), scale, text).float().cpu()
                            for c in tqdm(chunks, desc=f"eval {task.dataset.name}", leave=False,
                                          disable=len(chunks) < 5)])
    target.train(was)
    return classification_metrics(logits, data["labels"])


def parameter_count(learner: MaPLeLearner) -> int:
    return sum(p.numel() for p in learner.parameters() if p.requires_grad)
