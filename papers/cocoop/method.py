"""CoCoOp: CoOp's context plus an image-conditional token from a small Meta-Net.

For an image feature f (L2-normalised, as the official code feeds it), the Meta-Net
h = Linear(D, D//16) -> ReLU -> Linear(D//16, d) gives pi = h(f), and every context vector is shifted
by it: v_m(x) = v_m + pi. Each image therefore has its own K prompts, and the text encoder runs on
B x K sequences per batch; logits_b,k = scale * cos(f_b, g_k(x_b)).

The official trainer loops over the images of a batch (batch size 1 in every paper script). Here a
batch is encoded in one pass: the B x K prompts are stacked into one (B*K, L, d) tensor; image chunks
of at most `max_prompts // K` images bound memory at evaluation (novel classes, test batches).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.clip import ClipBundle, logit_scale
from common.clip.text import encode_shared_prefix, shared_prefix_supported
from common.engine import classification_metrics
from common.engine.protocols import Task
from common.engine.threads import torch_threads
from papers.coop.method import PromptLearner, encode_prompts, option, train_config, train_coop_many


class CoCoOpPromptLearner(PromptLearner):
    """Unified context (M x d, "a photo of a" by default) + Meta-Net; the CLIP weights stay frozen."""

    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], n_ctx: int = 4,
                 ctx_init: str | None = "a photo of a", csc: bool = False, class_token_position: str = "end",
                 init_std: float = 0.02):
        if csc:
            raise ValueError("CoCoOp has no class-specific context: one conditional token is shared by all classes")
        super().__init__(bundle, classnames, n_ctx=n_ctx, ctx_init=ctx_init, csc=False,
                         class_token_position=class_token_position, init_std=init_std)
        vis_dim, ctx_dim = bundle.embed_dim, self.encoder.width
        if vis_dim < 16:
            raise ValueError(f"the Meta-Net's hidden width is D//16; image embedding dim {vis_dim} is too small")
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(vis_dim // 16, ctx_dim)),
        ])).to(self.ctx.device)

    def conditional_context(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, M, d): the context shifted by pi = meta_net(normalised image feature)."""
        pi = self.meta_net(F.normalize(image_features.float(), dim=-1))
        return self.ctx.unsqueeze(0) + pi.unsqueeze(1).to(self.ctx.dtype)

    def text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, K, D) normalised class embeddings of each image's own prompts, all B x K in one pass."""
        ctx = self.conditional_context(image_features)
        if shared_prefix_supported(self.encoder) and self.position == "end":
            return self.encode_image_prompts(ctx)
        prompts = self.construct_prompts_batched(ctx)  # (B, K, L, d)
        B, K, L, d = prompts.shape
        text = encode_prompts(self.encoder, prompts.reshape(B * K, L, d), self.token_ids.repeat(B, 1))
        return F.normalize(text, dim=-1).view(B, K, -1)

    def encode_image_prompts(self, ctx: torch.Tensor) -> torch.Tensor:
        """(B, K, D) normalised features of the prompts [SOS][ctx_b][CLASS_k . EOS]: each image's SOS + context
        is encoded once and shared by the K class names (the shared-prefix encoder, exact)."""
        B = ctx.shape[0]
        P = 1 + self.n_ctx
        eot = self.token_ids.argmax(-1) - P
        S = int(eot.max()) + 1
        prefix = torch.cat([self.token_prefix[:1].expand(B, -1, -1), ctx.to(self.token_prefix.dtype)], dim=1)
        suffix = self.token_suffix[:, :S].unsqueeze(0).expand(B, -1, -1, -1)
        return F.normalize(encode_shared_prefix(self.encoder, prefix, suffix, eot), dim=-1)

    def logits(self, image_features: torch.Tensor, scale: float, max_prompts: int | None = None,
               progress: bool = False) -> torch.Tensor:
        """(B, K) = scale * cos(f_b, g_k(x_b)); images go through in chunks of max_prompts // K."""
        f = F.normalize(image_features.float(), dim=-1)
        per = len(f) if not max_prompts else max(1, max_prompts // self.num_classes)
        chunks = f.split(per) if len(f) else [f]
        out = [scale * torch.einsum("bd,bkd->bk", c, self.text_features(c).float())
               for c in tqdm(chunks, desc="cocoop eval", leave=False, disable=not progress or len(chunks) < 5)]
        return torch.cat(out)


def build_learner(bundle: ClipBundle, classnames: Sequence[str], cfg: dict) -> CoCoOpPromptLearner:
    return CoCoOpPromptLearner(bundle, classnames, n_ctx=int(cfg.get("n_ctx") or 4),
                               ctx_init=cfg.get("ctx_init", "a photo of a") or None,
                               class_token_position=cfg.get("class_token_position") or "end")


def cocoop_loss(learner: CoCoOpPromptLearner, image_features: torch.Tensor, labels: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the batch (= the mean of the official batch-1 losses) and the logits."""
    logits = learner.logits(image_features, scale)
    return F.cross_entropy(logits, labels), logits


def train_cocoop(task: Task, cfg: dict, learner: CoCoOpPromptLearner | None = None,
                 desc: str | None = None) -> CoCoOpPromptLearner:
    """Train context + Meta-Net on `task`'s few-shot train split (cached features); returns the learner."""
    return train_cocoop_many([task], cfg, None if learner is None else [learner], desc=desc, out_dir=task.out_dir)[0]


def train_cocoop_many(tasks, cfg: dict, learners=None, desc: str | None = None, out_dir=None,
                      eval_fn=None, eval_every: int = 0) -> list[CoCoOpPromptLearner]:
    """Several CoCoOp runs as one batched model (papers.coop.method.train_coop_many): every image of every
    run gets its own SOS + context prefix, shared by its K class names, all encoded in one pass."""
    return train_coop_many(tasks, cfg, learners, desc=desc or f"cocoop x{len(tasks)} {tasks[0].dataset.name}",
                           out_dir=out_dir, eval_fn=eval_fn, eval_every=eval_every, build=build_learner,
                           logits_many=cocoop_logits_many,
                           schedule=lambda t, n: train_config(cfg, t, epochs=int(cfg.get("epochs") or 10)),
                           batch_size=int(cfg.get("batch_size") or 1), evaluate_fn=evaluate)


def cocoop_logits_many(learners, xs, scale: float) -> list[tuple]:
    """[(logits (B_r, K), None)] of several runs' image batches; runs on the same class names share one pass of
    the shared-prefix encoder over all their images' prompts."""
    first = learners[0]
    same = all(l.classnames == first.classnames and l.position == "end" for l in learners)
    if not (same and shared_prefix_supported(first.encoder)):
        return [(l.logits(x, scale), None) for l, x in zip(learners, xs)]
    ctx = torch.cat([l.conditional_context(x) for l, x in zip(learners, xs)])           # (sum B, M, d)
    text = first.encode_image_prompts(ctx).float()                                        # (sum B, K, D)
    out, start = [], 0
    for x in xs:
        f = F.normalize(x.float(), dim=-1)
        out.append((scale * torch.einsum("bd,bkd->bk", f, text[start:start + len(x)]), None))
        start += len(x)
    return out


@torch.no_grad()
def evaluate(learner: CoCoOpPromptLearner, task: Task, split: str = "test") -> dict[str, float]:
    """Top-1 on `task`'s split in its own label space (its class names), B x K prompts chunked."""
    target = learner.with_classnames(task.dataset.classnames)
    was = target.training
    target.eval()
    feats = task.features(split)
    with torch_threads(option(task.cfg, "threads")):
        logits = target.logits(feats["features"].to(task.bundle.device), logit_scale(task.bundle),
                               max_prompts=int(task.cfg.get("eval_max_prompts") or 4096), progress=True)
    target.train(was)
    return classification_metrics(logits.cpu(), feats["labels"])


def step_cost(bundle: ClipBundle, num_classes: int, batch_sizes: Sequence[int], repeats: int = 3) -> list[dict]:
    """Wall time (and peak CUDA memory) of one training step, CoOp (K prompts) vs CoCoOp (B x K prompts),
    on random image features: the cost the paper names as CoCoOp's limitation."""
    import time

    names = [f"class {i}" for i in range(num_classes)]
    coop = PromptLearner(bundle, names, n_ctx=4, ctx_init="a photo of a")
    cocoop = CoCoOpPromptLearner(bundle, names)
    cuda = bundle.device.type == "cuda"
    rows = []
    for B in batch_sizes:
        x = torch.randn(B, bundle.embed_dim, device=bundle.device)
        y = torch.randint(num_classes, (B,), device=bundle.device)
        row = {"batch": B, "classes": num_classes}
        for name, loss_fn in (("coop", lambda: F.cross_entropy(100 * F.normalize(x, dim=-1) @ coop.class_embeddings().t(), y)),
                              ("cocoop", lambda: cocoop_loss(cocoop, x, y, 100.0)[0])):
            loss_fn().backward()  # warm-up
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(repeats):
                loss_fn().backward()
            if cuda:
                torch.cuda.synchronize()
                row[f"{name}_peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
            row[f"{name}_step_ms"] = round((time.perf_counter() - t0) / repeats * 1000, 2)
        rows.append(row)
    return rows
