"""DPT with CAVPT: CoOp text prompts + VPT-deep visual prompts + class-aware visual prompts (Xing et al.).

Learned (CLIP frozen), following the official `fanrena/DPT` trainers/DPT.py:
- text prompts: CoOp's prompt learner (papers/coop): M shared context vectors, class token at the end; the
  text encoder gives learned class features z_c (unnormalised);
- VPT-deep: `vpt_tokens` learnable tokens (N(0, 0.02)) before each of the lower ViT blocks (all blocks below
  the CAVPT blocks; mode `vlp`: every block), fresh per block, never normalised by `ln_pre`;
- CAVPT in the top `cavpt_layers` blocks. Before such a block, for every image:
  1. class pre-selection (no gradient): zero-shot CLIP (the unprompted image feature, cached, against the
     dataset's hand-crafted template) keeps the top K = min(`cpn`, classes) classes;
  2. queries q_k = Phi(z_{c_k}) (Linear D -> w, with bias) of the LEARNED text features of those classes;
  3. keys/values: the block's input tokens X (CLS + patches, prompts removed), detached, plus `kv_tokens`
     learnable tokens;
  4. O = W_v softmax((W_q q)(W_k X)^T / sqrt(attn_dim)) X  (W_q, W_k: w -> attn_dim, W_v: w -> w, no biases);
  5. prompts p_k = LN2(O_k + q_k) enter the block (removed after it); auxiliary logits Cls(LN1(O_k)) over the
     classes (training only; dropped when the learner moves to other class names, as the official load_model).
Prediction: s = exp(logit_scale) * cos(image feature, z_c / |z_c|).

Loss (official forward_backward): for epochs < C (general knowledge guidance, `gkg_fraction` of the epochs)
CE(s1) + CE(s2) + 0.1 CE(s), with s1 = zero-shot image feature vs learned text and s2 = prompted image feature vs
the hand-crafted text; afterwards CE(s); plus alpha * CE(aux logits, y) over the class-aware prompts whose selected
class is the label. Three official optimisers: VPT and CAVPT at `train.lr` (with `train.warmup_epochs`), the CoOp
context at `text_lr` with `text_warmup_epochs`: here one SGD with two parameter groups, each on its own schedule.

Prompts go through `common.clip.visual.encode_image_hooked(deep_prompts=...)`: VPT tensors for the lower blocks,
a callable for each CAVPT block (it receives the block input without prompts and returns the K prompts).
The image tower runs at every step (the prompts enter it), so training reads the pixel tensors of the few-shot
images (papers/maple's loader: one seeded augmented view per image, the crops CoOp's cached features saw).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.clip import ClipBundle, encode_image_hooked, logit_scale, zeroshot_classifier
from common.clip.text import encode_prompts, encode_shared_prefix, shared_prefix_supported
from common.clip.visual import vit_depth, vit_width
from common.engine import Trainer, classification_metrics, index_batches
from common.engine import convergence
from common.engine.convergence import with_schedule
from common.engine.protocols import Task
from common.engine.seed import seed_everything
from common.engine.threads import torch_threads
from common.engine.train import TrainConfig, lr_at
from papers.coop.method import PromptLearner, train_config
from papers.maple.method import pixels

MODES = ("dpt", "vlp")


class ClassAwarePrompt(nn.Module):
    """One CAVPT block's prompt generator (official `CAVPT` + `Attention`, one layer)."""

    def __init__(self, text_dim: int, width: int, n_classes: int, kv_tokens: int = 10, attn_dim: int = 32,
                 init_std: float = 0.02):
        super().__init__()
        self.query = nn.Linear(text_dim, width)                  # Phi_l (official meta_nets[l])
        self.wq = nn.Linear(width, attn_dim, bias=False)
        self.wk = nn.Linear(width, attn_dim, bias=False)
        self.wv = nn.Linear(width, width, bias=False)
        self.ln_aux = nn.LayerNorm(width)                         # official lns[l]
        self.classifier = nn.Linear(width, n_classes, bias=False)  # official classfiers[l] (training only)
        self.ln_out = nn.LayerNorm(width)                         # official lns2[l]
        self.kv = nn.Parameter(torch.empty(kv_tokens, width).normal_(0, init_std))   # official ctx[l]

    def attention(self, q: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """O = W_v (softmax((W_q q)(W_k kv)^T / sqrt(d)) kv) and the attention map: q (n, K, w), kv (n, T, w)."""
        qq, kk = self.wq(q), self.wk(kv)
        attn = torch.softmax(qq @ kk.transpose(1, 2) / math.sqrt(qq.shape[-1]), dim=-1)
        return self.wv(attn @ kv), attn

    def forward(self, class_text: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompts (n, K, w), aux logits (n, K, C)) from the selected classes' learned text features (n, K, D)
        and the block input tokens (n, T, w)."""
        q = self.query(class_text.to(self.query.weight.dtype))
        kv = torch.cat([tokens.detach().to(q.dtype), self.kv.unsqueeze(0).expand(len(tokens), -1, -1)], dim=1)
        o, _ = self.attention(q, kv)
        return self.ln_out(o + q), self.classifier(self.ln_aux(o))


class DPTLearner(nn.Module):
    """CoOp context + VPT-deep tokens + CAVPT generators; mode `vlp` = the same without CAVPT (VPT in every block)."""

    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], template: str = "a photo of a {}.",
                 mode: str = "dpt", n_ctx: int = 16, ctx_init: str | None = None, vpt_tokens: int = 10,
                 cavpt_layers: int = 1, cpn: int = 10, kv_tokens: int = 10, attn_dim: int = 32,
                 init_std: float = 0.02):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not bundle.is_vit:
            raise ValueError("DPT's visual prompts need a ViT image tower; use a ViT arch (tiny-vit, ViT-B-32)")
        if "{}" not in template:
            raise ValueError(f"template {template!r} lacks a '{{}}' slot for the class name")
        depth = vit_depth(bundle.model)
        for name, value, low in (("vpt_tokens", vpt_tokens, 0), ("cpn", cpn, 0), ("kv_tokens", kv_tokens, 0),
                                 ("attn_dim", attn_dim, 1), ("cavpt_layers", cavpt_layers, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if mode == "dpt" and cavpt_layers > depth:
            raise ValueError(f"cavpt_layers must be in [1, {depth}] (the ViT has {depth} blocks), got {cavpt_layers}")
        self.bundle, self.mode = bundle, mode
        self.init_kwargs = dict(template=template, mode=mode, n_ctx=n_ctx, ctx_init=ctx_init, vpt_tokens=vpt_tokens,
                                cavpt_layers=cavpt_layers, cpn=cpn, kv_tokens=kv_tokens, attn_dim=attn_dim,
                                init_std=init_std)
        self.text = PromptLearner(bundle, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std)
        self.classnames = self.text.classnames
        self.template = template
        device, width = self.text.ctx.device, vit_width(bundle.model)
        self.n_cavpt = cavpt_layers if mode == "dpt" else 0
        self.n_vpt = depth - self.n_cavpt                         # official: blocks 1 .. BOTTOMLIMIT-1
        self.cpn = min(cpn, self.num_classes)                     # official: CPN clipped to the class count
        self.vpt = nn.Parameter(torch.empty(self.n_vpt, vpt_tokens, width).normal_(0, init_std).to(device)) \
            if vpt_tokens and self.n_vpt else None
        self.cavpt = nn.ModuleList([ClassAwarePrompt(bundle.embed_dim, width, self.num_classes, kv_tokens, attn_dim,
                                                     init_std) for _ in range(self.n_cavpt)]).to(device)
        with torch.no_grad():
            zs = zeroshot_classifier(bundle, self.classnames, [template], cache_dir=None)
        self.register_buffer("zs_text", zs.float(), persistent=False)   # hand-crafted, normalised (K, D)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    # ------------------------------------------------------------------------------------------ forward
    def text_features(self) -> torch.Tensor:
        """Learned class features z (K, D), unnormalised (the CAVPT queries read them so). CoOp's layout (unified
        context, class token at the end) goes through the shared-prefix encoder: [SOS][ctx] once, then each class's
        suffix (exact; the text tower is causal)."""
        t = self.text
        if t.position != "end" or t.csc or not shared_prefix_supported(t.encoder):
            return encode_prompts(t.encoder, t(), t.token_ids)
        P = 1 + t.n_ctx
        eot = t.token_ids.argmax(-1) - P
        S = int(eot.max()) + 1
        prefix = torch.cat([t.token_prefix[:1], t.ctx.unsqueeze(0).to(t.token_prefix.dtype)], dim=1)
        return encode_shared_prefix(t.encoder, prefix, t.token_suffix[:, :S].unsqueeze(0), eot)[0]

    @torch.no_grad()
    def select(self, zs_image: torch.Tensor) -> torch.Tensor:
        """(n, K') indices of the zero-shot top-K' classes of each image (K' = cpn clipped)."""
        logits = F.normalize(zs_image.float(), dim=-1) @ self.zs_text.t()
        return logits.topk(self.cpn, dim=-1).indices

    def deep_prompts(self, text: torch.Tensor, indices: torch.Tensor | None, aux: list) -> list | None:
        """The `encode_image_hooked` prompt list: VPT tensors for the lower blocks, a generator per CAVPT block
        (its auxiliary logits are appended to `aux`)."""
        prompts: list = [self.vpt[i] if self.vpt is not None else None for i in range(self.n_vpt)]
        if self.n_cavpt and self.cpn > 0:
            selected = text[indices]                              # (n, K', D) learned, unnormalised

            def generator(block: ClassAwarePrompt):
                def make(tokens):
                    p, logits = block(selected, tokens)
                    aux.append(logits)
                    return p
                return make
            prompts += [generator(b) for b in self.cavpt]
        return prompts if any(p is not None for p in prompts) else None

    def image_features(self, images: torch.Tensor, text: torch.Tensor, indices: torch.Tensor | None
                       ) -> tuple[torch.Tensor, list]:
        """(normalised prompted image features (n, D), [aux logits (n, K', C) per CAVPT block])."""
        aux: list = []
        deep = self.deep_prompts(text, indices, aux)
        feats = encode_image_hooked(self.bundle.model, images, deep_prompts=deep)
        return F.normalize(feats.float(), dim=-1), aux

    def forward(self, images: torch.Tensor, zs_image: torch.Tensor, scale: float, text: torch.Tensor | None = None
                ) -> dict:
        """logits (the prediction), logits_zs_img (s1: zero-shot image vs learned text), logits_fixed_text (s2:
        prompted image vs hand-crafted text), aux (n, L, K', C) or None, indices (n, K')."""
        text = self.text_features() if text is None else text
        indices = self.select(zs_image) if self.n_cavpt and self.cpn > 0 else None
        img, aux = self.image_features(images, text, indices)
        t = F.normalize(text.float(), dim=-1)
        return {"logits": scale * img @ t.t(),
                "logits_zs_img": scale * F.normalize(zs_image.float(), dim=-1) @ t.t(),
                "logits_fixed_text": scale * img @ self.zs_text.t(),
                "aux": torch.stack(aux, dim=1) if aux else None, "indices": indices}

    # ------------------------------------------------------------------------------------- bookkeeping
    def trained_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def with_classnames(self, classnames: Sequence[str], template: str | None = None) -> "DPTLearner":
        """The same prompts for other class names (novel classes, other datasets); the auxiliary classifiers are
        training-only and dropped (official load_model)."""
        names = [c.replace("_", " ") for c in classnames]
        template = template or self.template
        if names == self.classnames and template == self.template:
            return self
        state = {k: v for k, v in self.trained_state().items() if ".classifier." not in k}
        with torch.random.fork_rng():
            new = type(self)(self.bundle, names, **{**self.init_kwargs, "template": template})
        new.load_state_dict(state, strict=False)
        new.train(self.training)
        return new

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(visual: VPT + CAVPT, text: CoOp context), the official optimisers' parameters."""
        text = [p for p in self.text.parameters() if p.requires_grad]
        ids = {id(p) for p in text}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in ids], text


def dpt_loss(out: dict, labels: torch.Tensor, guidance: bool, alpha: float) -> tuple[torch.Tensor, dict]:
    """The official loss: general knowledge guidance CE(s1) + CE(s2) + 0.1 CE(s) while `guidance`, else CE(s); plus
    alpha * CE over the class-aware prompts (every CAVPT block) whose selected class is the label."""
    ce = F.cross_entropy(out["logits"], labels)
    loss = (F.cross_entropy(out["logits_zs_img"], labels) + F.cross_entropy(out["logits_fixed_text"], labels)
            + 0.1 * ce) if guidance else ce
    logs = {}
    aux = out.get("aux")
    if aux is not None and alpha:
        hit = (out["indices"] == labels[:, None])                       # (n, K')
        mask = hit[:, None, :].expand(aux.shape[:3])                      # (n, L, K')
        if mask.any():
            target = labels[:, None, None].expand(aux.shape[:3])[mask]
            aux_ce = F.cross_entropy(aux[mask].float(), target)
            loss = loss + alpha * aux_ce
            logs["aux_ce"] = float(aux_ce.detach())
    return loss, logs


def build_learner(bundle: ClipBundle, classnames: Sequence[str], cfg: dict, template: str = "a photo of a {}."
                  ) -> DPTLearner:
    return DPTLearner(bundle, classnames, template=template, mode=cfg.get("mode") or "dpt",
                      n_ctx=int(cfg["n_ctx"]), ctx_init=cfg.get("ctx_init") or None,
                      vpt_tokens=int(cfg["vpt_tokens"]), cavpt_layers=int(cfg["cavpt_layers"]), cpn=int(cfg["cpn"]),
                      kv_tokens=int(cfg["kv_tokens"]), attn_dim=int(cfg["attn_dim"]))


# --------------------------------------------------------------------------------------------- training
class GroupTrainer(Trainer):
    """The project's Trainer with one optimiser over parameter groups, each on its own TrainConfig schedule
    (the official DPT steps three optimisers: prompts and CAVPT at one rate, the CoOp context at another)."""

    def __init__(self, module: nn.Module, groups: list[tuple[list[nn.Parameter], TrainConfig]], out_dir=None,
                 desc: str = "train"):
        groups = [(ps, c) for ps, c in groups if ps]
        super().__init__(module, groups[0][1], out_dir, params=[p for ps, _ in groups for p in ps], desc=desc)
        cfg = groups[0][1]
        self.group_cfgs = [c for _, c in groups]
        param_groups = [{"params": ps, "lr": c.lr} for ps, c in groups]
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum,
                                             weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)
        else:
            self.optimizer = torch.optim.Adam(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)

    def _set_lr(self, epoch: float) -> float:
        for g, c in zip(self.optimizer.param_groups, self.group_cfgs):
            g["lr"] = lr_at(c, epoch)
        return self.optimizer.param_groups[0]["lr"]


def schedules(cfg: dict, task: Task) -> tuple[TrainConfig, TrainConfig]:
    """(visual, text) schedules: `train` for VPT + CAVPT; the context at text_lr (scaled with train.lr when a
    convergence study changes it) with text_warmup_epochs."""
    visual = with_schedule(train_config(cfg, task, epochs=int(cfg["epochs"])), task)
    ratio = float(cfg["text_lr"]) / float(cfg["train"]["lr"])
    text = replace(visual, lr=visual.lr * ratio, warmup_epochs=min(int(cfg["text_warmup_epochs"]), visual.epochs))
    return visual, text


@torch.no_grad()
def encode_plain(bundle: ClipBundle, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unprompted (zero-shot CLIP) image features of pixel tensors, unnormalised."""
    model = bundle.model
    was = model.training
    model.eval()
    out = torch.cat([model.encode_image(c.to(bundle.device)).float() for c in images.split(batch)]) \
        if len(images) else torch.empty(0, bundle.embed_dim)
    model.train(was)
    return out


def train_dpt(task: Task, cfg: dict, learner: DPTLearner | None = None, desc: str | None = None) -> DPTLearner:
    """Train DPT (or VLP) on `task`'s few-shot train split; returns the learner with `train_history` / `val_history`."""
    if learner is None:
        seed_everything(task.seed)
        learner = build_learner(task.bundle, task.dataset.classnames, cfg, task.dataset.template)
    device = task.bundle.device
    views = [pixels(task, "train", "train", v) for v in range(int(cfg.get("cache_views") or 1))]
    imgs = torch.stack([v["images"] for v in views])                            # (V, N, 3, S, S)
    labels = views[0]["labels"]
    zs = torch.stack([encode_plain(task.bundle, v["images"]) for v in views])   # (V, N, D) zero-shot features
    visual, text = schedules(cfg, task)
    V, N = imgs.shape[:2]
    bs = int(cfg["batch_size"])
    C = int(round(float(cfg["gkg_fraction"]) * visual.epochs))
    alpha = float(cfg["alpha"])
    scale = logit_scale(task.bundle)

    def batches(epoch: int):
        view = torch.randint(V, (N,), generator=torch.Generator().manual_seed(visual.seed * 7919 + epoch))
        return [(imgs[view[i], i], zs[view[i], i], labels[i], epoch) for i in index_batches(N, bs, visual.seed, epoch)]

    steps_per_epoch = len(batches(0))
    vis_params, text_params = learner.parameter_groups()
    trainer = GroupTrainer(learner, [(vis_params, visual), (text_params, text)], task.out_dir,
                           desc=desc or f"{learner.mode} {task.dataset.name} k{task.shots} s{task.seed}")

    def step(batch):
        x, z, y, epoch = batch
        y = y.to(device)
        out = learner(x.to(device), z.to(device), scale)
        loss, logs = dpt_loss(out, y, epoch < C, alpha)
        return loss, {"acc": float((out["logits"].argmax(-1) == y).float().mean()) * 100, **logs}

    on_epoch_end = convergence.epoch_validation(task, lambda: evaluate(learner, task, split="val")["top1"])
    with torch_threads(cfg.get("threads")):
        hist = trainer.fit(step, batches, on_epoch_end)
    hist = [{**h, "step": h.get("step", h["epoch"] * steps_per_epoch)} for h in hist]
    return convergence.keep_history(learner, hist)


@torch.no_grad()
def evaluate(learner: DPTLearner, task: Task, split: str = "test") -> dict[str, float]:
    """Top-1 (and mean per-class) on `task`'s split with its own class names and template: zero-shot pre-selection
    from the cached unprompted features, then the prompted tower over the split's images."""
    target = learner.with_classnames(task.dataset.classnames, task.dataset.template)
    was = target.training
    target.eval()
    data = pixels(task, split)
    zs = task.features(split)["features"]
    scale = logit_scale(task.bundle)
    bs = int(task.cfg.get("eval_batch_size") or 256)
    device = task.bundle.device
    with torch_threads(task.cfg.get("threads")):
        text = target.text_features()
        chunks = list(zip(data["images"].split(bs), zs.split(bs)))
        logits = torch.cat([target(x.to(device), z.to(device), scale, text)["logits"].float().cpu()
                            for x, z in tqdm(chunks, desc=f"eval {task.dataset.name}", leave=False,
                                             disable=len(chunks) < 5)])
    target.train(was)
    return classification_metrics(logits, data["labels"])


def parameter_count(learner: DPTLearner) -> int:
    return sum(p.numel() for p in learner.parameters() if p.requires_grad)
