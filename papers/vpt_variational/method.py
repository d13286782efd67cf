"""Variational prompt tuning (VPT; Derakhshani et al., "Bayesian Prompt Learning", ICCV 2023).

The prompt is a distribution. CoOp's M context vectors (M = 4 from "a photo of a") receive a latent residual
r in R^d (d = text width) added to EVERY context token, one r shared by the M tokens:

    ctx_l = ctx + r_l,    r_l = mu + eps_l * exp(logvar / 2),    eps_l ~ N(0, I),  l = 1..L

with the posterior q(r) = N(mu, diag(exp(logvar))) either
  * global (`coopvpt`, every released config): mu and logvar are free parameters (mu init 0, logvar init
    U[0, 1) - the official "std_posterior" is a log-variance, so sigma starts at 1..1.65 per dimension), or
  * input-conditioned (`cocoopvpt`, the code default): mu = MLP_mu(f), logvar = MLP_logvar(f) on the
    L2-normalised image embedding f, each Linear -> ELU -> Linear -> ELU -> Linear, hidden = D // 2.

Prior p(r) = N(0, I). Each sample gives the K class prompts; logits_l = exp(logit_scale) * cos(f, g(prompt_l)).

    loss  = -mean_b log( (1/L) sum_l p(y_b | x_b, r_l) )  +  lambda * KL(q || p)     (lambda = 0.001)
    KL    = mean over the d dimensions of 0.5 (sigma^2 + mu^2 - 1 - logvar)        (per image if conditional)
    test  : log p(y | x) = logsumexp_l log_softmax(logits_l) - log L

Only the context and the posterior (mu, logvar, or the two MLPs) are trained; CLIP stays frozen. With mu = 0 and
sigma -> 0 the model is CoOp's prompt learner with the same context.

Built on papers.coop (prompt learner, batched trainer on cached image features) and papers.cocoop (one
SOS + context prefix per sample shared by the K class names through the shared-prefix encoder): all L x K
prompts of a step (L x B x K for the conditional posterior) are encoded in one pass.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.clip import ClipBundle, logit_scale
from common.clip.text import shared_prefix_supported
from common.engine import classification_metrics
from common.engine.protocols import Task
from common.engine.seed import seed_everything
from common.engine.threads import torch_threads
from papers.cocoop.method import CoCoOpPromptLearner
from papers.coop.method import PromptLearner, encode_prompts, option, train_config, train_coop_many

POSTERIORS = ("global", "conditional")
LOGVAR_INITS = ("official", "token_scale")
KL_WEIGHT = 0.001          # hard-coded in the official trainers/vpt.py


# ------------------------------------------------------------------------------------------------ the math
def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) averaged over the last (latent) dimension, as the official code
    (`kl_divergence(...).mean(dim=-1)`): 0.5 (sigma^2 + mu^2 - 1 - log sigma^2) per dimension."""
    return (0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar)).mean(-1)


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, n_samples: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(L, *mu.shape) samples r = mu + eps * exp(logvar / 2), eps ~ N(0, I): differentiable in mu and logvar."""
    if n_samples < 1:
        raise ValueError(f"the number of Monte-Carlo samples must be >= 1, got {n_samples}")
    eps = torch.randn((n_samples, *mu.shape), generator=generator, dtype=torch.float32)
    eps = eps.to(device=mu.device, dtype=mu.dtype)
    return mu.unsqueeze(0) + eps * (0.5 * logvar).exp().unsqueeze(0)


def log_predictive(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) Monte-Carlo predictive log-probability from (L, B, K) logits: log mean_l softmax(logits_l)."""
    return torch.logsumexp(F.log_softmax(logits.float(), dim=-1), dim=0) - math.log(logits.shape[0])


def vpt_loss(logits: torch.Tensor, labels: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             kl_weight: float = KL_WEIGHT) -> tuple[torch.Tensor, dict]:
    """The official objective on (L, B, K) logits: -mean_b log-mean-exp_l log p(y_b | r_l) + kl_weight * KL
    (KL averaged over dimensions; over the images of the batch for a conditional posterior)."""
    nll = -log_predictive(logits).gather(-1, labels.view(-1, 1)).squeeze(-1).mean()
    kl = kl_to_standard_normal(mu.float(), logvar.float()).mean()
    return nll + kl_weight * kl, {"nll": float(nll.detach()), "kl": float(kl.detach())}


# ------------------------------------------------------------------------------------------- the learners
class VPTPromptLearner(PromptLearner):
    """Global posterior (`coopvpt`): CoOp's unified context + free mu, logvar of the residual."""

    posterior_type = "global"

    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], n_ctx: int = 4,
                 ctx_init: str | None = "a photo of a", class_token_position: str = "end", init_std: float = 0.02,
                 n_samples: int = 10, eval_samples: int | None = None, kl_weight: float = KL_WEIGHT,
                 eval_seed: int = 0, logvar_init: str = "official"):
        if class_token_position != "end":
            raise ValueError("VPT puts the class token at the end (the official PromptLearner); got "
                             f"class_token_position={class_token_position!r}")
        super().__init__(bundle, classnames, n_ctx=n_ctx, ctx_init=ctx_init, csc=False,
                         class_token_position="end", init_std=init_std)
        if int(n_samples) < 1 or (eval_samples is not None and int(eval_samples) < 1):
            raise ValueError(f"n_samples and eval_samples must be >= 1, got {n_samples} and {eval_samples}")
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        if logvar_init not in LOGVAR_INITS:
            raise ValueError(f"logvar_init must be one of {LOGVAR_INITS}, got {logvar_init!r}")
        # official: log-variance ~ U[0, 1) (sigma 1..1.65, absolute); token_scale: the same draw in units of the
        # initial context's variance, log var = U[0, 1) + log Var(ctx) (sigma 1..1.65 x the token scale)
        self.logvar_init = logvar_init
        self.logvar_shift = 0.0 if logvar_init == "official" else float(torch.log(self.ctx.detach().float().var()))
        self.n_samples, self.kl_weight, self.eval_seed = int(n_samples), float(kl_weight), int(eval_seed)
        self.eval_samples = int(eval_samples or n_samples)
        self.init_kwargs.update(n_samples=self.n_samples, eval_samples=eval_samples, kl_weight=self.kl_weight,
                                eval_seed=self.eval_seed, logvar_init=logvar_init)
        self.init_kwargs.pop("csc")
        self._build_posterior(bundle)

    def _build_posterior(self, bundle: ClipBundle) -> None:
        d = self.encoder.width
        self.mu = nn.Parameter(torch.zeros(d, device=self.ctx.device))
        # official "std_posterior" (a log-variance): U[0, 1), plus the token-scale shift when asked
        self.logvar = nn.Parameter((torch.rand(d) + self.logvar_shift).to(self.ctx.device))

    def posterior(self, image_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar): (d,) for the global posterior."""
        return self.mu, self.logvar

    def sample_contexts(self, r: torch.Tensor) -> torch.Tensor:
        """(*, M, d) contexts ctx + r from residuals r (*, d): one residual shared by the M tokens."""
        return self.ctx + r.unsqueeze(-2).to(self.ctx.dtype)

    def encode_contexts(self, ctx: torch.Tensor) -> torch.Tensor:
        """(G, K, D) normalised class embeddings of G contexts (G, M, d), all G x K prompts in one pass
        (CoCoOp's per-image prefix encoder: each context's SOS + M tokens encoded once)."""
        if shared_prefix_supported(self.encoder):
            return CoCoOpPromptLearner.encode_image_prompts(self, ctx)
        prompts = self.construct_prompts_batched(ctx)
        G, K, T, d = prompts.shape
        text = encode_prompts(self.encoder, prompts.reshape(G * K, T, d), self.token_ids.repeat(G, 1))
        return F.normalize(text, dim=-1).view(G, K, -1)

    def sampled_logits(self, image_features: torch.Tensor, scale: float, n_samples: int | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (L, B, K), mu, logvar): L residuals of the global posterior shared by the batch."""
        L = int(n_samples or self.n_samples)
        mu, logvar = self.posterior()
        text = self.encode_contexts(self.sample_contexts(reparameterise(mu, logvar, L, generator))).float()
        f = F.normalize(image_features.float(), dim=-1)
        return scale * torch.einsum("bd,lkd->lbk", f, text), mu, logvar

    def eval_generator(self) -> torch.Generator:
        """Fixed test-time samples (the official code draws fresh ones per test batch)."""
        return torch.Generator().manual_seed(self.eval_seed)

    @torch.no_grad()
    def predict(self, image_features: torch.Tensor, scale: float, max_prompts: int = 4096,
                progress: bool = False) -> torch.Tensor:
        """(B, K) predictive log-probabilities with `eval_samples` residuals drawn once (seeded)."""
        L = self.eval_samples
        mu, logvar = self.posterior()
        text = self.encode_contexts(self.sample_contexts(reparameterise(mu, logvar, L, self.eval_generator()))).float()
        f = F.normalize(image_features.float(), dim=-1)
        out = [log_predictive(scale * torch.einsum("bd,lkd->lbk", c, text)) for c in f.split(4096)] if len(f) else []
        return torch.cat(out) if out else f.new_zeros(0, self.num_classes)


class MeanVarianceNet(nn.Module):
    """The official InferenceBlock: Linear -> ELU -> Linear -> ELU -> Linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ELU(), nn.Linear(d_hidden, d_hidden), nn.ELU(),
                                 nn.Linear(d_hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConditionalVPTPromptLearner(VPTPromptLearner):
    """Input-conditioned posterior (`cocoopvpt`): mu, logvar = two MLPs of the normalised image embedding."""

    posterior_type = "conditional"

    def _build_posterior(self, bundle: ClipBundle) -> None:
        D, d = bundle.embed_dim, self.encoder.width
        if D < 2:
            raise ValueError(f"the posterior MLPs' hidden width is D // 2; image embedding dim {D} is too small")
        self.mu_net = MeanVarianceNet(D, D // 2, d).to(self.ctx.device)
        self.logvar_net = MeanVarianceNet(D, D // 2, d).to(self.ctx.device)
        with torch.no_grad():
            self.logvar_net.net[-1].bias.add_(self.logvar_shift)    # token_scale init: the same shift of log var

    def posterior(self, image_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar): (B, d) from the normalised image features (B, D)."""
        if image_features is None:
            raise ValueError("the conditional posterior needs the image features")
        f = F.normalize(image_features.float(), dim=-1)
        return self.mu_net(f), self.logvar_net(f)

    def _logits(self, f: torch.Tensor, scale: float, L: int, generator=None):
        mu, logvar = self.posterior(f)                                       # (B, d)
        r = reparameterise(mu, logvar, L, generator)                          # (L, B, d)
        B = f.shape[0]
        text = self.encode_contexts(self.sample_contexts(r).reshape(L * B, self.n_ctx, -1)).float()
        text = text.view(L, B, self.num_classes, -1)
        return scale * torch.einsum("bd,lbkd->lbk", F.normalize(f.float(), dim=-1), text), mu, logvar

    def sampled_logits(self, image_features, scale, n_samples=None, generator=None):
        """(logits (L, B, K), mu (B, d), logvar (B, d)): L residuals per image."""
        return self._logits(image_features, scale, int(n_samples or self.n_samples), generator)

    @torch.no_grad()
    def predict(self, image_features: torch.Tensor, scale: float, max_prompts: int = 4096,
                progress: bool = False) -> torch.Tensor:
        L, gen = self.eval_samples, self.eval_generator()
        per = max(1, max_prompts // (self.num_classes * L))
        chunks = image_features.split(per) if len(image_features) else []
        out = [log_predictive(self._logits(c, scale, L, gen)[0])
               for c in tqdm(chunks, desc="vpt eval", leave=False, disable=not progress or len(chunks) < 5)]
        return torch.cat(out) if out else image_features.new_zeros(0, self.num_classes)


LEARNERS = {"global": VPTPromptLearner, "conditional": ConditionalVPTPromptLearner}


def build_learner(bundle: ClipBundle, classnames: Sequence[str], cfg: dict) -> VPTPromptLearner:
    posterior = cfg.get("posterior") or "global"
    if posterior not in LEARNERS:
        raise ValueError(f"posterior must be one of {POSTERIORS}, got {posterior!r}")
    return LEARNERS[posterior](bundle, classnames, n_ctx=int(cfg.get("n_ctx") or 4),
                               ctx_init=cfg.get("ctx_init", "a photo of a") or None,
                               n_samples=int(cfg["n_samples"]), eval_samples=cfg.get("eval_samples"),
                               kl_weight=float(cfg.get("kl_weight", KL_WEIGHT)),
                               eval_seed=int(cfg.get("eval_seed") or 0),
                               logvar_init=cfg.get("logvar_init") or "official").to(bundle.device)


# ----------------------------------------------------------------------------------------------- training
def vpt_logits_many(learners: Sequence[VPTPromptLearner], xs: Sequence[torch.Tensor], scale: float) -> list[tuple]:
    """[(logits (L, B_r, K), (mu, logvar))] of several runs' batches. Runs on the same class names (the seeds of a
    dataset) have all their sampled contexts encoded in one pass: L x K prompts per run (L x B x K conditional)."""
    first = learners[0]
    if not all(l.classnames == first.classnames for l in learners):
        return [(lambda o: (o[0], (o[1], o[2])))(l.sampled_logits(x, scale)) for l, x in zip(learners, xs)]
    ctxs, posts, shapes = [], [], []
    for l, x in zip(learners, xs):
        L = l.n_samples
        if l.posterior_type == "global":
            mu, logvar = l.posterior()
            r = reparameterise(mu, logvar, L)                                   # (L, d)
            shapes.append((L, None))
        else:
            mu, logvar = l.posterior(x)
            r = reparameterise(mu, logvar, L).reshape(L * len(x), -1)           # (L*B, d)
            shapes.append((L, len(x)))
        ctxs.append(l.sample_contexts(r))
        posts.append((mu, logvar))
    text = first.encode_contexts(torch.cat(ctxs)).float()
    out, start = [], 0
    for x, (L, B), post in zip(xs, shapes, posts):
        f = F.normalize(x.float(), dim=-1)
        if B is None:
            logits = scale * torch.einsum("bd,lkd->lbk", f, text[start:start + L])
            start += L
        else:
            t = text[start:start + L * B].view(L, B, first.num_classes, -1)
            logits = scale * torch.einsum("bd,lbkd->lbk", f, t)
            start += L * B
        out.append((logits, post))
    return out


def vpt_loss_fn(learner: VPTPromptLearner, logits: torch.Tensor, labels: torch.Tensor, post) -> tuple:
    """`loss_fn` of papers.coop's batched trainer: `post` is the (mu, logvar) that `vpt_logits_many` returned."""
    mu, logvar = post
    return vpt_loss(logits, labels, mu, logvar, learner.kl_weight)


def for_dataset(cfg: dict, dataset_name: str) -> dict:
    """The config with the official per-dataset L and epochs (`by_dataset`, real profile) applied."""
    over = (cfg.get("by_dataset") or {}).get(dataset_name.split("[")[0]) or {}
    return {**cfg, **over}


def train_vpt_many(tasks: Sequence[Task], cfg: dict, out_dir=None, desc: str | None = None) -> list[VPTPromptLearner]:
    """Several VPT runs (a dataset's seeds) as one batched model (papers.coop.method.train_coop_many) on cached
    image features; each run keeps its own data, seed, schedule and learning rate."""
    learners = []
    for t in tasks:                       # the protocol's seed: the same initial context and posterior
        seed_everything(t.seed)
        learners.append(build_learner(t.bundle, t.dataset.classnames, for_dataset(cfg, t.dataset.name)))
    return train_coop_many(tasks, cfg, learners, [vpt_loss_fn] * len(tasks),
                           desc=desc or f"vpt {learners[0].posterior_type} L={learners[0].n_samples} "
                                        f"x{len(tasks)} {tasks[0].dataset.name}",
                           out_dir=out_dir, logits_many=vpt_logits_many,
                           schedule=lambda t, n: train_config(cfg, t, epochs=int(for_dataset(cfg, t.dataset.name)["epochs"])),
                           batch_size=int(cfg["batch_size"]), evaluate_fn=evaluate)


def train_vpt(task: Task, cfg: dict) -> VPTPromptLearner:
    return train_vpt_many([task], cfg, out_dir=task.out_dir)[0]


@torch.no_grad()
def evaluate(learner: VPTPromptLearner, task: Task, split: str = "test") -> dict[str, float]:
    """Top-1 of the Monte-Carlo predictive on `task`'s split, with `task`'s own class names."""
    target = learner.with_classnames(task.dataset.classnames)
    was = target.training
    target.eval()
    feats = task.features(split)
    with torch_threads(option(task.cfg, "threads")):
        logp = target.predict(feats["features"].to(task.bundle.device), logit_scale(task.bundle),
                              max_prompts=int(task.cfg.get("eval_max_prompts") or 4096), progress=True)
    target.train(was)
    return classification_metrics(logp.cpu(), feats["labels"])
