"""SoftCPT (Ding et al., 2022/2024): one prompt learner for T few-shot tasks trained jointly, the context of each
task generated from its task name by a task-shared meta network (official trainer `MTCoOp`, trainers/mtcoop.py).

Per task t (name string, C_t class names), all CLIP weights frozen:

1. task prompt  [SOS] u_1..u_L <task name> . [EOS]; u = learnable task context, one L x d tensor shared by all
   tasks (TA, `task_csc=False`) or one per task (TS, `task_csc=True`), N(0, 0.02) init.
2. f_t = text encoder(task prompt) (EOT token, after ln_final and the projection; not normalised), (D,).
3. meta net `lin`: V_t = reshape(f_t W, M x d), W in R^{D x M d} bias-free, N(0, 0.02) init
   (`PromptGen`, PG_TYPE lin). Meta network = frozen text encoder + this linear layer.
   Class-aware variants (CA / CS, `class_n_ctx > 0`): h_{t,c} = text encoder([SOS] w_1..w_4 <class> . [EOS]) with
   w shared by all classes (CA) or per class (CS); the meta-net input is concat[h_{t,c}, f_t] (2D) and every class
   gets its own generated context V_{t,c}.
4. class prompts [SOS] V_t <class> . [EOS] (CoOp's layout, papers.coop's PromptLearner buffers), encoded by the
   same frozen encoder and L2-normalised -> g_{t,c}.
5. logits of an image of task t: exp(logit_scale) cos(x, g_{t,c}) over task t's C_t classes only; the loss is the
   cross-entropy of each image over its own task's block, summed and divided by the batch size (`mutitask_loss`),
   a batch mixing images of every task (random sampler over the union of the tasks' few-shot sets).

Hard sharing (`sharing="hard"`, the paper's CoOp-MT): one free M x d context shared by every class of every task,
trained on the same mixed batches (papers.coop's learner over the union of class names).

All runs of a grid (shot counts x seeds, each one joint multi-task run) train as one batched model: every
trainable tensor carries a leading run axis R, and the class prompts of all runs and tasks go through the text
tower together (`encode_shared_prefix_lean`: the causal tower computes each [SOS] V_t prefix once).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import ClipBundle, logit_scale
from common.clip.text import encode_prompts, shared_prefix_supported
from common.engine import TrainConfig, index_batches
from common.engine.batched import BatchedTrainer, RunSchedule
from common.engine.convergence import with_schedule
from common.engine.protocols import Task
from common.engine.seed import seed_everything
from common.engine.threads import torch_threads
from papers.coop.method import PromptLearner

SHARINGS = ("soft", "hard")
META_NETS = ("lin",)


@dataclass(frozen=True)
class TaskSpec:
    """One task of the multi-task set: its name string (the meta net's input) and its class names."""
    name: str
    classnames: tuple[str, ...]


def _drop_ctx(learner: PromptLearner) -> PromptLearner:
    """A papers.coop PromptLearner used for its frozen prompt pieces only (SOS, name . EOS, token ids): its own
    context parameter is removed, SoftCPT supplies the context."""
    del learner.ctx
    return learner


class SoftCPT(nn.Module):
    """SoftCPT's prompt learner for R independent runs at once (R = 1 for a single run).

    Trainable tensors, each with a leading run axis: soft sharing: `task_ctx` (R, L, d) [TA] or (R, T, L, d) [TS],
    `proj` (R, D_in, M d) [the meta net's W], and with a class branch `class_ctx` (R, Lc, d) [CA] or
    (R, C, Lc, d) [CS]; hard sharing: `ctx` (R, M, d). Run r's initial tensors are drawn after
    `seed_everything(seeds[r])` in the official order (task context, class context, meta net)."""

    def __init__(self, bundle: ClipBundle, tasks: Sequence[TaskSpec], sharing: str = "soft", n_ctx: int = 16,
                 task_n_ctx: int = 4, task_csc: bool = False, class_n_ctx: int = 0, class_csc: bool = False,
                 meta_net: str = "lin", init_std: float = 0.02, seeds: Sequence[int] | None = None):
        super().__init__()
        if sharing not in SHARINGS:
            raise ValueError(f"sharing must be one of {SHARINGS}, got {sharing!r}")
        if meta_net not in META_NETS:
            raise ValueError(f"meta_net must be one of {META_NETS} (the paper's `lin`), got {meta_net!r}")
        if not tasks or any(not t.classnames for t in tasks):
            raise ValueError("SoftCPT needs at least one task, each with at least one class name")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names) and sharing == "soft":
            raise ValueError(f"task names must differ (they are the meta net's only input): {names}")
        for key, v, lo in (("n_ctx", n_ctx, 1), ("task_n_ctx", task_n_ctx, 1 if sharing == "soft" else 0),
                           ("class_n_ctx", class_n_ctx, 0)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{key} must be an integer >= {lo}, got {v!r}")
        if sharing == "hard" and class_n_ctx:
            raise ValueError("hard sharing (CoOp-MT) has no class branch: class_n_ctx must be 0")
        self.bundle, self.tasks = bundle, list(tasks)
        self.sharing, self.n_ctx, self.task_n_ctx, self.task_csc = sharing, n_ctx, task_n_ctx, task_csc
        self.class_n_ctx, self.class_csc, self.meta_net, self.init_std = class_n_ctx, class_csc, meta_net, init_std
        self.init_kwargs = dict(sharing=sharing, n_ctx=n_ctx, task_n_ctx=task_n_ctx, task_csc=task_csc,
                                class_n_ctx=class_n_ctx, class_csc=class_csc, meta_net=meta_net, init_std=init_std)
        self.sizes = [len(t.classnames) for t in tasks]
        self.offsets = [0] + list(torch.tensor(self.sizes).cumsum(0).tolist())
        allnames = [c for t in tasks for c in t.classnames]
        with torch.random.fork_rng():   # the pieces' own random contexts must not move the RNG stream
            self.class_prompts = _drop_ctx(PromptLearner(bundle, allnames, n_ctx=n_ctx))
            self.task_prompts = _drop_ctx(PromptLearner(bundle, names, n_ctx=task_n_ctx)) if sharing == "soft" else None
            self.class_branch = (_drop_ctx(PromptLearner(bundle, allnames, n_ctx=class_n_ctx))
                                 if class_n_ctx else None)
        self.encoder = self.class_prompts.encoder
        self.register_buffer("class_task", torch.repeat_interleave(torch.arange(len(tasks)), torch.tensor(self.sizes))
                             .to(self.class_prompts.token_ids.device), persistent=False)
        d, D = self.encoder.width, bundle.embed_dim
        self.d_in = 2 * D if class_n_ctx else D
        T, C = len(tasks), len(allnames)
        inits: dict[str, list[torch.Tensor]] = {}
        for seed in (seeds if seeds is not None else [None]):
            if seed is not None:
                seed_everything(int(seed))
            if sharing == "hard":
                inits.setdefault("ctx", []).append(torch.empty(n_ctx, d).normal_(0, init_std))
                continue
            inits.setdefault("task_ctx", []).append(
                torch.empty((T, task_n_ctx, d) if task_csc else (task_n_ctx, d)).normal_(0, init_std))
            if class_n_ctx:
                inits.setdefault("class_ctx", []).append(
                    torch.empty((C, class_n_ctx, d) if class_csc else (class_n_ctx, d)).normal_(0, init_std))
            inits.setdefault("proj", []).append(torch.empty(self.d_in, n_ctx * d).normal_(0, init_std))
        device, dtype = self.encoder.token_embedding.weight.device, self.encoder.dtype
        for name, ts in inits.items():
            self.register_parameter(name, nn.Parameter(torch.stack(ts).to(device, dtype)))
        self.grouped = shared_prefix_supported(self.encoder) and not class_n_ctx

    # ------------------------------------------------------------------------------------------ pieces
    @property
    def num_runs(self) -> int:
        return next(p for p in self.parameters() if p.requires_grad).shape[0]

    @property
    def num_classes(self) -> int:
        return self.offsets[-1]

    def block(self, t: int) -> slice:
        """Columns of task t in the concatenated class axis."""
        return slice(self.offsets[t], self.offsets[t + 1])

    def task_features(self, runs: torch.Tensor | None = None) -> torch.Tensor:
        """(R', T, D) unnormalised task features f_t = text encoder([SOS] u <task name> . [EOS])."""
        u = self.task_ctx if runs is None else self.task_ctx[runs]
        R, T = u.shape[0], len(self.tasks)
        if not self.task_csc:
            u = u.unsqueeze(1).expand(R, T, -1, -1)
        prompts = self.task_prompts._assemble(u)                              # (R, T, Ltok, d)
        ids = self.task_prompts.token_ids.repeat(R, 1)
        return encode_prompts(self.encoder, prompts.flatten(0, 1), ids).view(R, T, -1)

    def class_branch_features(self, runs: torch.Tensor | None = None) -> torch.Tensor:
        """(R', C, D) class features h_{t,c} = text encoder([SOS] w <class> . [EOS]) of the class-aware variants."""
        w = self.class_ctx if runs is None else self.class_ctx[runs]
        R, C = w.shape[0], self.num_classes
        if not self.class_csc:
            w = w.unsqueeze(1).expand(R, C, -1, -1)
        prompts = self.class_branch._assemble(w)
        ids = self.class_branch.token_ids.repeat(R, 1)
        return encode_prompts(self.encoder, prompts.flatten(0, 1), ids).view(R, C, -1)

    def meta_input(self, runs: torch.Tensor | None = None) -> torch.Tensor:
        """The meta net's input: f_t (R', T, D), or concat[h_{t,c}, f_t] per class (R', C, 2D)."""
        f = self.task_features(runs)
        if not self.class_n_ctx:
            return f
        return torch.cat([self.class_branch_features(runs), f[:, self.class_task]], dim=-1)

    def contexts(self, runs: torch.Tensor | None = None) -> torch.Tensor:
        """Generated contexts: (R', T, M, d) per task (class-agnostic) or (R', C, M, d) per class (class-aware);
        hard sharing: the free (R', M, d) context."""
        if self.sharing == "hard":
            return self.ctx if runs is None else self.ctx[runs]
        proj = self.proj if runs is None else self.proj[runs]
        x = self.meta_input(runs)
        return torch.bmm(x.to(proj.dtype), proj).view(x.shape[0], x.shape[1], self.n_ctx, -1)

    def class_embeddings(self, runs: torch.Tensor | None = None, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """(R', C, D) L2-normalised class features g_{t,c} of every task's classes, concatenated task by task."""
        ctx = self.contexts(runs) if ctx is None else ctx
        cp = self.class_prompts
        R, C = ctx.shape[0], self.num_classes
        if self.sharing == "hard" or not self.class_n_ctx:
            per_task = self.sharing == "soft"
            if self.grouped:
                return F.normalize(self._grouped_features(ctx, per_task), dim=-1)
            ctx = ctx[:, self.class_task] if per_task else ctx.unsqueeze(1).expand(R, C, -1, -1)
        prompts = cp._assemble(ctx)                                               # (R, C, Ltok, d)
        feats = encode_prompts(self.encoder, prompts.flatten(0, 1), cp.token_ids.repeat(R, 1))
        return F.normalize(feats.view(R, C, -1), dim=-1)

    def _grouped_features(self, ctx: torch.Tensor, per_task: bool) -> torch.Tensor:
        """(R, C, D) unnormalised class features of the CoOp layout [SOS] V <class> . [EOS] through the causal
        shared-prefix encoder: V per (run, task) (soft, `ctx` (R, T, M, d)) or per run (hard, `ctx` (R, M, d)).
        Tasks with equal class counts are encoded together (R x their number of groups)."""
        cp = self.class_prompts
        R, P = ctx.shape[0], 1 + self.n_ctx
        eot = cp.token_ids.argmax(-1) - P
        S = int(eot.max()) + 1
        sos = cp.token_prefix[:1]
        if not per_task:
            prefix = torch.cat([sos.expand(R, -1, -1), ctx.to(sos.dtype)], dim=1)
            suffix = cp.token_suffix[:, :S].unsqueeze(0).expand(R, -1, -1, -1)
            return encode_shared_prefix_lean(self.encoder, prefix, suffix, eot)
        by_size: dict[int, list[int]] = {}
        for t, n in enumerate(self.sizes):
            by_size.setdefault(n, []).append(t)
        parts: dict[int, torch.Tensor] = {}
        for n, ts in by_size.items():
            prefix = torch.cat([sos.expand(R * len(ts), -1, -1),
                                ctx[:, ts].transpose(0, 1).reshape(len(ts) * R, self.n_ctx, -1).to(sos.dtype)], dim=1)
            rows = torch.cat([torch.arange(self.offsets[t], self.offsets[t + 1]) for t in ts]).view(len(ts), 1, n)
            suffix = cp.token_suffix[:, :S][rows.expand(-1, R, -1).reshape(len(ts) * R, n)]
            feats = encode_shared_prefix_lean(self.encoder, prefix, suffix, eot[rows.expand(-1, R, -1)
                                                                                .reshape(len(ts) * R, n)])
            for i, t in enumerate(ts):
                parts[t] = feats.view(len(ts), R, n, -1)[i]
        return torch.cat([parts[t] for t in range(len(self.tasks))], dim=1)

    # ------------------------------------------------------------------------------------------ heads
    def logits(self, x: torch.Tensor, task: torch.Tensor, class_emb: torch.Tensor, scale: float) -> torch.Tensor:
        """(B, C) logits of images x (B, D) of tasks `task` (B,) against one run's class features (C, D); columns of
        other tasks are -inf, so a softmax / cross-entropy over a row is over the image's own task's classes."""
        full = scale * F.normalize(x, dim=-1) @ class_emb.t()
        own = self.class_task.unsqueeze(0) == task.unsqueeze(1)
        return full.masked_fill(~own, float("-inf"))

    def loss(self, x: torch.Tensor, task: torch.Tensor, label: torch.Tensor, class_emb: torch.Tensor,
             scale: float) -> torch.Tensor:
        """Official `mutitask_loss`: sum over tasks of CE(reduction=sum) over the task's columns on its images,
        divided by the whole batch size; `label` is the class index within the image's task."""
        target = label + torch.tensor(self.offsets[:-1], device=label.device)[task]
        return F.cross_entropy(self.logits(x, task, class_emb, scale), target, reduction="sum") / x.shape[0]

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------ grouped encoding

def encode_shared_prefix_lean(encoder, prefix: torch.Tensor, suffix: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """(G, K, D) text features of prompts `cat(prefix[g], suffix[g, k])`, unnormalised: the numbers of
    common.clip.text.encode_shared_prefix (and of the encoder on the full prompts, up to float rounding), with the
    shared tokens' keys and values never copied per prompt: each prompt's S suffix queries score the group's P
    prefix keys in one batched product per group and their own causal suffix keys, under one softmax. With SoftCPT's
    156 classes x 15 runs the copies of the prefix keys/values were the largest single cost of a step.
    prefix (G, P, d), suffix (G, K, S, d), eot (G, K) or (K,): the pooling position in the suffix."""
    G, P, _ = prefix.shape
    K, S = suffix.shape[1], suffix.shape[2]
    cast = encoder.transformer.get_cast_dtype()
    pos = encoder.positional_embedding.to(cast)
    hp = prefix.to(cast) + pos[:P]                                  # (G, P, w)
    hs = suffix.to(cast) + pos[P:P + S]                             # (G, K, S, w)
    causal = torch.ones(S, S, dtype=torch.bool, device=hs.device).tril()
    for block in encoder.transformer.resblocks:
        mha = block.attn
        H, w = mha.num_heads, mha.embed_dim
        dh = w // H
        ap, as_ = block.ln_1(hp), block.ln_1(hs)
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = (mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None))
        heads = lambda t: t.view(*t.shape[:-1], H, dh).transpose(-3, -2)          # (..., L, w) -> (..., H, L, dh)
        q = heads(F.linear(as_, wq, bq)) * dh ** -0.5                              # (G, K, H, S, dh)
        kp, vp = heads(F.linear(ap, wk, bk)), heads(F.linear(ap, wv, bv))         # (G, H, P, dh)
        ks, vs = heads(F.linear(as_, wk, bk)), heads(F.linear(as_, wv, bv))       # (G, K, H, S, dh)
        sp = torch.einsum("gkhsd,ghpd->gkhsp", q, kp)
        ss = (q @ ks.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
        att = torch.softmax(torch.cat([sp, ss], dim=-1), dim=-1)
        out = torch.einsum("gkhsp,ghpd->gkhsd", att[..., :P], vp) + att[..., P:] @ vs
        out = mha.out_proj(out.transpose(-3, -2).reshape(G, K, S, w))
        hs = hs + block.ls_1(out)
        hs = hs + block.ls_2(block.mlp(block.ln_2(hs)))
        hp = block(hp, attn_mask=encoder.attn_mask[:P, :P])
    idx = eot.expand(G, K).to(hs.device)
    x = encoder.ln_final(hs.gather(2, idx[..., None, None].expand(G, K, 1, hs.shape[-1])).squeeze(2))
    if encoder.text_projection is not None:
        x = encoder.text_projection(x) if isinstance(encoder.text_projection, nn.Linear) else x @ encoder.text_projection
    return x


# ------------------------------------------------------------------------------------------ training

# Official settings (configs/trainers/MTCoOpHard/rn50_ep50.yaml = MTCoOp/vit_b16_ep50.yaml but RN50; Dassl defaults).
DEFAULTS: dict[str, Any] = {
    "sharing": "soft", "n_ctx": 16, "task_n_ctx": 4, "task_csc": False, "class_n_ctx": 0, "class_csc": False,
    "meta_net": "lin", "batch_size": 32, "epochs": 50, "cache_views": 1, "eval_chunk": 1024, "threads": 1,
    "train": {"optimizer": "sgd", "lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 1,
              "warmup_lr": 1e-5, "warmup_type": "constant", "schedule": "cosine", "schedule_unit": "epoch"},
}
LEARNER_KEYS = ("sharing", "n_ctx", "task_n_ctx", "task_csc", "class_n_ctx", "class_csc", "meta_net")


def option(cfg: dict, key: str) -> Any:
    return cfg[key] if cfg.get(key) is not None else DEFAULTS[key]


def variant_name(cfg: dict) -> str:
    """Record variant: the paper's letters (NA/CA/CS class branch + TA/TS task context), or coop_mt (hard)."""
    if option(cfg, "sharing") == "hard":
        return "coop_mt"
    cls = "na" if not option(cfg, "class_n_ctx") else ("cs" if option(cfg, "class_csc") else "ca")
    return cls + ("ts" if option(cfg, "task_csc") else "ta")


def task_specs(datasets: Sequence, task_names: dict[str, str]) -> list[TaskSpec]:
    """The multi-task set of `datasets` (Dataset objects), each named by `task_names[dataset.name]`."""
    missing = [d.name for d in datasets if d.name not in task_names]
    if missing:
        raise ValueError(f"no task name for {missing}: add them to the task_names option (dataset: name string)")
    return [TaskSpec(task_names[d.name], tuple(d.classnames)) for d in datasets]


def build_learner(bundle: ClipBundle, tasks: Sequence[TaskSpec], cfg: dict, seeds: Sequence[int] | None = None) -> SoftCPT:
    return SoftCPT(bundle, tasks, seeds=seeds, **{k: option(cfg, k) for k in LEARNER_KEYS})


@dataclass
class JointRun:
    """One joint multi-task run: the per-task Tasks (same shots and seed; their datasets hold the few-shot splits)."""
    tasks: list[Task]

    @property
    def shots(self) -> int | None:
        return self.tasks[0].shots

    @property
    def seed(self) -> int:
        return self.tasks[0].seed

    @property
    def label(self) -> str:
        return f"k{self.shots} s{self.seed}"


def joint_views(run: JointRun, cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The union of the run's tasks' cached training features: (V, N, D) normalised, task ids (N,), labels (N,)
    within each task."""
    feats, tasks, labels = [], [], []
    for t, task in enumerate(run.tasks):
        views = [task.features("train", transform="train", view=v) for v in range(int(option(cfg, "cache_views")))]
        feats.append(torch.stack([F.normalize(v["features"].float(), dim=-1) for v in views]))
        labels.append(views[0]["labels"])
        tasks.append(torch.full_like(views[0]["labels"], t))
    return torch.cat(feats, dim=1), torch.cat(tasks), torch.cat(labels)


def train_config(cfg: dict, run: JointRun) -> TrainConfig:
    """One joint run's schedule: `epochs` over the union of the tasks' few-shot sets (50 at every shot count)."""
    tcfg = TrainConfig.from_dict({**DEFAULTS["train"], **(cfg.get("train") or {}), "epochs": int(option(cfg, "epochs")),
                                  "seed": int(run.seed)})
    return with_schedule(tcfg, run.tasks[0])


def train_joint_many(runs: Sequence[JointRun], cfg: dict, out_dir=None, learner: SoftCPT | None = None,
                     eval_fn: Callable[[SoftCPT], torch.Tensor] | None = None, eval_every: int = 0,
                     desc: str | None = None) -> SoftCPT:
    """Train R joint multi-task runs (shot counts x seeds, or a study's schedules) as one batched model on cached
    image features; returns the R-run learner (run r = `runs[r]`). Each run keeps its own training set, seed,
    schedule and learning rate; the batched trainer makes this equal to R separate trainings."""
    bundle = runs[0].tasks[0].bundle
    if learner is None:
        specs = task_specs([t.dataset for t in runs[0].tasks], cfg["task_names"])
        learner = build_learner(bundle, specs, cfg, seeds=[r.seed for r in runs])
    if learner.num_runs != len(runs):
        raise ValueError(f"the learner holds {learner.num_runs} runs for {len(runs)} joint runs")
    data = [joint_views(r, cfg) for r in runs]
    dev = bundle.device
    feats = [f.to(dev) for f, _, _ in data]
    task_ids = [t.to(dev) for _, t, _ in data]
    labels = [y.to(dev) for _, _, y in data]
    batch_size = int(option(cfg, "batch_size"))
    schedules = [RunSchedule(train_config(cfg, r), y.numel(), batch_size, label=r.label) for r, y in zip(runs, labels)]
    scale = logit_scale(bundle)
    params = [p for p in learner.parameters() if p.requires_grad]

    def step(batches):
        live = [r for r, b in enumerate(batches) if b is not None]
        emb = learner.class_embeddings(torch.tensor(live, device=dev))
        losses, accs = torch.zeros(len(runs)), torch.zeros(len(runs))
        for j, r in enumerate(live):
            b = batches[r]
            V = feats[r].shape[0]
            view = torch.randint(V, (feats[r].shape[1],),
                                 generator=torch.Generator().manual_seed(schedules[r].cfg.seed * 7919 + b.epoch))
            idx = b.idx.to(dev)
            x, t, y = feats[r][view[b.idx].to(dev), idx], task_ids[r][idx], labels[r][idx]
            loss = learner.loss(x, t, y, emb[j], scale)
            losses = losses.index_put((torch.tensor([r]),), loss.reshape(1).float().cpu())
            with torch.no_grad():
                pred = learner.logits(x, t, emb[j], scale).argmax(-1)
                accs[r] = float((pred == y + torch.tensor(learner.offsets[:-1], device=dev)[t]).float().mean()) * 100
        return losses, {"acc": accs}

    evaluate_runs = None
    if eval_fn is not None:
        def evaluate_runs():
            with torch.no_grad():
                return eval_fn(learner)
    trainer = BatchedTrainer(params, schedules, out_dir, desc=desc or f"softcpt {variant_name(cfg)} x{len(runs)}")
    with torch_threads(option(cfg, "threads")):
        trainer.fit(step, evaluate_runs, eval_every)
    learner.train_history, learner.val_history = trainer.history, trainer.evals
    return learner


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def task_weights(learner: SoftCPT, chunk: int | None = None, runs: Sequence[int] | None = None
                 ) -> list[list[torch.Tensor] | None]:
    """[run][task] -> (C_t, D) text classifier of every run (or of `runs`; None for the others) and task."""
    out: list = []
    for r in range(learner.num_runs):
        if runs is not None and r not in runs:
            out.append(None)
            continue
        emb = learner.class_embeddings(torch.tensor([r], device=learner.class_task.device))[0].float().cpu()
        out.append([emb[learner.block(t)] for t in range(len(learner.tasks))])
    return out


def evaluate_run(learner: SoftCPT, run: JointRun, r: int = 0, split: str = "test",
                 weights: list[list[torch.Tensor]] | None = None) -> list[dict[str, float]]:
    """Metrics of run r on each of its tasks' `split`, each task scored only against its own classes."""
    from common.engine.protocols import eval_classifier
    weights = weights or task_weights(learner)
    return [eval_classifier(task, weights[r][t], scale=logit_scale(task.bundle), split=split)
            for t, task in enumerate(run.tasks)]


def save_learner(learner: SoftCPT, r: int, path) -> None:
    """Run r's learned tensors plus what rebuilds the learner (tasks, options), for `load_learner`."""
    torch.save({"state": {k: v[r:r + 1] for k, v in learner.trained_state().items()},
                "tasks": [(t.name, list(t.classnames)) for t in learner.tasks], "init_kwargs": learner.init_kwargs}, path)


def load_learner(path, bundle: ClipBundle) -> SoftCPT:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    with torch.random.fork_rng():
        learner = SoftCPT(bundle, [TaskSpec(n, tuple(c)) for n, c in blob["tasks"]], **blob["init_kwargs"])
    missing, unexpected = learner.load_state_dict(blob["state"], strict=False)
    if unexpected or [k for k in blob["state"] if k in missing]:
        raise ValueError(f"{path} does not match this SoftCPT learner: unexpected {unexpected[:5]}")
    return learner.to(bundle.device)


def parameter_count(learner: SoftCPT) -> int:
    """Trainable parameters of one run (the paper's table counts them)."""
    return sum(p[0].numel() for p in learner.parameters() if p.requires_grad)
