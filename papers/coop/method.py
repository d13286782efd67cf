"""CoOp's prompt learner: M learnable context vectors in front of (or around) each class name.

Prompt of class k (class token "end"): [SOS] [V]_1 .. [V]_M [CLASS_k] . [EOS]. The SOS prefix and the
"CLASS . EOS pad" suffix are frozen token embeddings (buffers); only the context is learned, either
shared by all classes (unified) or one per class (class-specific context, CSC). Initialised from a
phrase ("a photo of a"), M = its word count and the context = its first M token embeddings (the official
rule, `init_phrase`); the prompts are exactly the tokenised "a photo of a {class}.", so CoOp starts at
zero-shot CLIP.

Training (`train_coop`) runs on cached frozen image features; the text encoder runs every step because
the gradient reaches the context through it. `evaluate` encodes the K prompts once and scores cached
test features; a learner moves to other class names (novel classes, shifted or other datasets) with
`with_classnames`, as the official `load_model` drops the class-name buffers.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import ClipBundle, PromptTextEncoder, logit_scale, tokenize
from common.clip.text import encode_prompts, encode_shared_prefix, shared_prefix_supported
from common.engine import TrainConfig, Trainer, index_batches, items_digest
from common.engine.protocols import Task, eval_classifier
from common.engine import convergence
from common.engine.convergence import with_schedule
from common.engine.seed import seed_everything
from common.engine.threads import torch_threads

POSITIONS = ("end", "middle", "front")
PROMPT_FILE = "prompt.pt"   # learned prompt kept in each run's checkpoint folder


def init_phrase(ctx_init: str) -> tuple[str, int]:
    """(phrase, M) of a context init phrase, by the official rule (CoOp and CoCoOp `PromptLearner`):
    underscores read as spaces and M = the number of WORDS, `len(ctx_init.split(" "))`; the context is then
    the first M token embeddings after SOS. When the phrase has more BPE pieces than words ("itap of a" ->
    it|ap|of|a, M = 3), the remaining pieces stay frozen between the context and the class name, so the
    initial prompt is still exactly the tokenised phrase. Runs of whitespace count as one separator here
    (the official `split(" ")` would count an empty word)."""
    phrase = " ".join(ctx_init.replace("_", " ").split())
    if not phrase:
        raise ValueError(f"ctx_init {ctx_init!r} has no words: give a phrase ('a photo of a') or '' for random init")
    return phrase, len(phrase.split(" "))


class PromptLearner(nn.Module):
    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], n_ctx: int = 16, ctx_init: str | None = None,
                 csc: bool = False, class_token_position: str = "end", init_std: float = 0.02):
        super().__init__()
        if class_token_position not in POSITIONS:
            raise ValueError(f"class_token_position must be one of {POSITIONS}, got {class_token_position!r}")
        if not classnames:
            raise ValueError("PromptLearner needs at least one class name")
        self.encoder = PromptTextEncoder(bundle.model)
        self.bundle = bundle
        self.init_kwargs = dict(n_ctx=n_ctx, ctx_init=ctx_init, csc=csc, class_token_position=class_token_position,
                                init_std=init_std)
        names = [c.replace("_", " ") for c in classnames]
        embed = self.encoder.token_embedding
        device = embed.weight.device  # token ids must sit where the (possibly CUDA) embedding is
        with torch.no_grad():
            n_fixed = 0   # pieces of the init phrase past the M learned ones (frozen, in the suffix)
            if ctx_init:
                ctx_init, n_ctx = init_phrase(ctx_init)
                init_ids = tokenize(bundle, [ctx_init], device=device)
                n_fixed = int(init_ids.argmax(-1).item()) - 1 - n_ctx   # BPE pieces between SOS and EOT, minus M
                ctx = embed(init_ids)[0, 1:1 + n_ctx].clone()
                if csc:  # the official code ignores CSC with an init phrase; we honour it: every class starts equal
                    ctx = ctx.unsqueeze(0).repeat(len(names), 1, 1)
                prefix_text = ctx_init
            else:
                if n_ctx < 1:
                    raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
                shape = (len(names), n_ctx, self.encoder.width) if csc else (n_ctx, self.encoder.width)
                ctx = torch.empty(shape).normal_(0, init_std).to(device)  # drawn on the CPU: same init everywhere
                prefix_text = " ".join(["X"] * n_ctx)
            token_ids = tokenize(bundle, [f"{prefix_text} {name}." for name in names], device=device)
            embedding = embed(token_ids)
            name_lens = [int(tokenize(bundle, [n]).argmax(-1).item()) - 1 for n in names]
        self.ctx = nn.Parameter(ctx.to(self.encoder.dtype))
        self.n_ctx, self.n_fixed, self.csc, self.position = n_ctx, n_fixed, csc, class_token_position
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)         # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:].clone(), persistent=False)  # [fixed] CLASS . EOS
        self.register_buffer("token_order", self._token_order(name_lens, token_ids.shape[1]), persistent=False)
        self.name_lens = name_lens
        self.classnames = list(names)

    def _token_order(self, name_lens: list[int], length: int) -> torch.Tensor:
        """(K, L) positions that turn the "end" layout [SOS][ctx][fixed][CLASS . EOS pad] into this position's
        layout: middle = [SOS][ctx[:M/2]][CLASS][ctx[M/2:]][fixed][. EOS pad], front = [SOS][CLASS][ctx][fixed]
        [. EOS pad]. `fixed` = the init phrase's frozen pieces past M (`init_phrase`), kept with the context:
        the official code slices the class name at offset 0 of its suffix and would cut them into the name."""
        M, h, f = self.n_ctx, self.n_ctx // 2, self.n_fixed
        rows = []
        for n in name_lens:
            sos, ctx, fixed = [0], list(range(1, 1 + M)), list(range(1 + M, 1 + M + f))
            cls, rest = list(range(1 + M + f, 1 + M + f + n)), list(range(1 + M + f + n, length))
            order = {"end": sos + ctx + fixed + cls + rest, "middle": sos + ctx[:h] + cls + ctx[h:] + fixed + rest,
                     "front": sos + cls + ctx + fixed + rest}[self.position]
            rows.append(order)
        return torch.tensor(rows, dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def _assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """(*, K, L, d) prompts from per-class context (*, K, M, d)."""
        lead = ctx.shape[:-3]
        prefix = self.token_prefix.expand(*lead, -1, -1, -1)
        suffix = self.token_suffix.expand(*lead, -1, -1, -1)
        x = torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=-2)
        if self.position == "end":
            return x
        order = self.token_order.view(*(1,) * len(lead), *self.token_order.shape, 1).expand(*x.shape)
        return x.gather(-2, order)

    def construct_prompts(self, ctx: torch.Tensor) -> torch.Tensor:
        """(K, L, d) prompt embeddings from context (M, d) or (K, M, d)."""
        K = self.num_classes
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(K, -1, -1)
        return self._assemble(ctx)

    def construct_prompts_batched(self, ctx: torch.Tensor) -> torch.Tensor:
        """(B, K, L, d) prompts from one context per image (B, M, d), shared by the K classes (CoCoOp)."""
        B, M, d = ctx.shape
        return self._assemble(ctx.unsqueeze(1).expand(B, self.num_classes, M, d))

    def forward(self) -> torch.Tensor:
        return self.construct_prompts(self.ctx)

    def class_embeddings(self, ctx: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
        """Normalised text features (K, D) of the prompts; gradients flow to the context."""
        prompts = self.construct_prompts(self.ctx if ctx is None else ctx)
        return F.normalize(encode_prompts(self.encoder, prompts, self.token_ids, chunk), dim=-1)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The learned tensors (context, and whatever a subclass trains); never CLIP's frozen weights."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def with_classnames(self, classnames: Sequence[str]) -> "PromptLearner":
        """The same learned prompt for other class names (novel classes, shifted or other datasets).

        A unified context transfers to any names; class-specific context (CSC) only to names it was
        trained on (its rows are picked by name), as context is tied to its class (official issue #69)."""
        names = [c.replace("_", " ") for c in classnames]
        if names == self.classnames:
            return self
        state = self.trained_state()
        if self.csc:
            missing = [n for n in names if n not in self.classnames]
            if missing:
                raise ValueError(f"class-specific context cannot move to classes it was not trained on: "
                                 f"{missing[:5]}; use unified context (csc=false) for novel or other-dataset classes")
            state["ctx"] = state["ctx"][[self.classnames.index(n) for n in names]]
        with torch.random.fork_rng():  # a fresh random init must not move the caller's RNG stream
            new = type(self)(self.bundle, names, **self.init_kwargs)
        new.load_state_dict(state, strict=False)
        new.train(self.training)
        return new


def coop_logits(image_features: torch.Tensor, class_embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP head: logit_scale * cos(image, class prompt)."""
    return logit_scale * F.normalize(image_features, dim=-1) @ class_embeddings.t()


# --------------------------------------------------------------------------------------------- training

# Official CoOp settings (configs/trainers/CoOp/rn50*.yaml, Dassl defaults); a config key overrides them.
DEFAULTS: dict[str, Any] = {
    "n_ctx": 16, "ctx_init": "", "csc": False, "class_token_position": "end", "batch_size": 32,
    "epochs": None, "epochs_by_shots": {"1": 50, "2": 100, "4": 100, "8": 200, "16": 200}, "epochs_by_dataset": {},
    "min_steps": 0,
    "cache_views": 1, "eval_chunk": 1024, "threads": 1,
    "train": {"optimizer": "sgd", "lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 1,
              "warmup_lr": 1e-5, "warmup_type": "constant", "schedule": "cosine", "schedule_unit": "epoch"},
}


def option(cfg: dict, key: str) -> Any:
    """`cfg[key]`, or CoOp's official value when the config does not set it."""
    return cfg[key] if cfg.get(key) is not None else DEFAULTS[key]


def variant_name(cfg: dict) -> str:
    """Run-record variant of a CoOp setting: m{M}_{position}[_csc][_ctxv1] (ctxv1 = "a photo of a" init,
    the official config suffix; another init phrase gives _init). M is the learner's: the phrase's word count."""
    raw = option(cfg, "ctx_init") or ""
    init, m = init_phrase(raw) if raw else ("", option(cfg, "n_ctx"))   # the learner's rule: any phrase given counts
    name = f"m{m}_{option(cfg, 'class_token_position')}" + ("_csc" if option(cfg, "csc") else "")
    return name + ("_ctxv1" if init == "a photo of a" else "_init" if init else "")


def build_learner(bundle: ClipBundle, classnames: Sequence[str], cfg: dict) -> PromptLearner:
    return PromptLearner(bundle, classnames, n_ctx=option(cfg, "n_ctx"), ctx_init=option(cfg, "ctx_init") or None,
                         csc=bool(option(cfg, "csc")), class_token_position=option(cfg, "class_token_position"))


def base_name(dataset_name: str) -> str:
    """`emb_objects[base]` -> `emb_objects` (base/novel subsets keep their dataset's schedule)."""
    return dataset_name.split("[")[0]


def epochs_for(cfg: dict, task: Task, n_train: int | None = None) -> int:
    """Official schedule: 50 epochs at 1 shot, 100 at 2-4, 200 at 8-16; ImageNet 50 at every shot count.
    A fixed `epochs` is taken as it is; a scheduled count is raised to give at least `min_steps` optimiser
    steps when the training-set size is known: a short epoch budget with a large batch would otherwise give
    a 16-shot 10-class set a handful of steps."""
    min_steps = int(option(cfg, "min_steps") or 0)
    if min_steps < 0:
        raise ValueError(f"min_steps must be >= 0, got {min_steps}")
    if cfg.get("epochs"):
        return int(cfg["epochs"])
    epochs = _scheduled_epochs(cfg, task)
    if min_steps and n_train:
        per_epoch = len(index_batches(int(n_train), int(option(cfg, "batch_size")), 0, 0, shuffle=False))
        epochs = max(epochs, math.ceil(min_steps / per_epoch))
    return epochs


def _scheduled_epochs(cfg: dict, task: Task) -> int:
    by_ds = option(cfg, "epochs_by_dataset") or {}
    if base_name(task.dataset.name) in by_ds:
        return int(by_ds[base_name(task.dataset.name)])
    by_shots = {int(k): int(v) for k, v in option(cfg, "epochs_by_shots").items()}
    if task.shots is None:
        raise ValueError("CoOp trains on a few-shot split: the task has no shot count and no `epochs` is set")
    fitting = [k for k in sorted(by_shots) if k >= task.shots]
    return by_shots[fitting[0] if fitting else max(by_shots)]


def train_config(cfg: dict, task: Task, epochs: int | None = None, n_train: int | None = None) -> TrainConfig:
    return TrainConfig.from_dict({**DEFAULTS["train"], **(cfg.get("train") or {}),
                                  "epochs": epochs or epochs_for(cfg, task, n_train), "seed": int(task.seed)})


def train_views(task: Task, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached features of the augmented training views, normalised: (V, N, D) and labels (N,)."""
    views = [task.features("train", transform="train", view=v) for v in range(int(option(cfg, "cache_views")))]
    feats = torch.stack([F.normalize(v["features"].float(), dim=-1) for v in views])
    return feats, views[0]["labels"]


def feature_batches(feats: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
    """`batches(epoch)` for the Trainer: shuffled index batches, each image in a random cached view;
    a pure function of (seed, epoch) so a resumed run sees the same batches."""
    V, N, _ = feats.shape

    def batches(epoch: int):
        view = torch.randint(V, (N,), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        return [(feats[view[idx], idx], labels[idx]) for idx in index_batches(N, batch_size, seed, epoch)]
    return batches


LossFn = Callable[[PromptLearner, torch.Tensor, torch.Tensor, torch.Tensor], Any]


def train_coop(task: Task, cfg: dict, learner: PromptLearner | None = None, loss_fn: LossFn | None = None,
               desc: str | None = None) -> PromptLearner:
    """Train CoOp's context on `task` (its few-shot train split) and return the learner (one run of
    `train_coop_many`).

    Reads from `cfg` (official CoOp values when absent): n_ctx, ctx_init, csc, class_token_position,
    batch_size, epochs / epochs_by_shots / epochs_by_dataset, cache_views, train (TrainConfig fields),
    threads (intra-op threads while training; 0 = unchanged).
    `loss_fn(learner, logits, labels, class_embeddings) -> loss | (loss, logs)` replaces cross-entropy
    (papers that add a regulariser to CoOp use it). Checkpoints go to `task.out_dir` (exact resume).
    A learner whose parameters carry gradient hooks (SubPT's projection and trajectory) trains on the
    single-run Trainer, where those hooks run as written."""
    if learner is not None and has_grad_hooks(learner):
        return train_coop_single(task, cfg, learner, loss_fn, desc)
    return train_coop_many([task], cfg, None if learner is None else [learner],
                           None if loss_fn is None else [loss_fn], desc=desc, out_dir=task.out_dir)[0]


def has_grad_hooks(module: nn.Module) -> bool:
    """Whether a trainable parameter has a gradient hook (the batched path trains stacked copies, not them)."""
    return any(getattr(p, "_post_accumulate_grad_hooks", None) or getattr(p, "_backward_hooks", None)
               for p in module.parameters() if p.requires_grad)


def train_coop_single(task: Task, cfg: dict, learner: PromptLearner, loss_fn: LossFn | None = None,
                      desc: str | None = None) -> PromptLearner:
    """One CoOp run on the single-run Trainer (the learner's own parameters, so their hooks run)."""
    feats, labels = train_views(task, cfg)
    feats, labels = feats.to(task.bundle.device), labels.to(task.bundle.device)
    tcfg = with_schedule(train_config(cfg, task, n_train=labels.numel()), task)
    scale = logit_scale(task.bundle)
    trainer = Trainer(learner, tcfg, task.out_dir, desc=desc or f"coop {task.dataset.name} k{task.shots}")

    def step(batch):
        x, y = batch
        text = learner.class_embeddings()
        logits = coop_logits(x, text, scale)
        out = F.cross_entropy(logits, y) if loss_fn is None else loss_fn(learner, logits, y, text)
        loss, logs = out if isinstance(out, tuple) else (out, {})
        return loss, {"acc": float((logits.argmax(-1) == y).float().mean()) * 100, **logs}

    on_epoch_end = convergence.epoch_validation(task, lambda: evaluate(learner, task, split="val")["top1"])
    with torch_threads(option(cfg, "threads")):  # tiny per-step ops: extra threads only synchronise
        history = trainer.fit(step, feature_batches(feats, labels, int(option(cfg, "batch_size")), tcfg.seed),
                              on_epoch_end)
    return convergence.keep_history(learner, history)


def train_coop_many(tasks: Sequence[Task], cfg: dict, learners: Sequence[PromptLearner] | None = None,
                    loss_fns: Sequence[LossFn] | None = None, desc: str | None = None, out_dir=None,
                    eval_fn: Callable | None = None, eval_every: int = 0, build: Callable | None = None,
                    logits_many: Callable | None = None, schedule: Callable | None = None,
                    batch_size: int | None = None, evaluate_fn: Callable | None = None,
                    views: Callable | None = None) -> list[PromptLearner]:
    """Train CoOp-style learners on several tasks at once, as one batched model (common.engine.batched):
    each run keeps its own data, seed, schedule and learning rate, and ends where it would end alone.

    Every trainable tensor of the learners is stacked on a leading run axis; the learners' own methods
    (and `loss_fns`) see their run's slice. Prompts that share SOS + a unified context before the class
    name (the paper's default layout) are encoded with the shared-prefix encoder, all runs in one pass.
    `eval_fn(learners) -> (R,)` (optional, every `eval_every` steps): a convergence record per run.
    Methods built on CoOp pass their own `build(bundle, classnames, cfg)`, `logits_many(learners, xs, scale) ->
    [(logits, text features)]` (CoCoOp: per-image prompts), `schedule(task, n_train) -> TrainConfig` and
    `batch_size`, and `evaluate_fn(learner, task, split=...)` for a convergence study's validation curve;
    `views(task, cfg) -> ((V, N, ...) features, (N,) labels)` replaces the cached global training views (PLOT:
    the local features of each image), a batch being the rows of one view as `train_views` gives them."""
    from common.engine.batched import RunSchedule, fit_stacked, stack_trainable
    if learners is None:
        learners = []
        for t in tasks:   # the protocol seeds each run before building it: the same initial context
            seed_everything(t.seed)
            learners.append((build or build_learner)(t.bundle, t.dataset.classnames, cfg))
    learners = list(learners)
    if any(has_grad_hooks(l) for l in learners):
        raise ValueError("train_coop_many trains stacked copies of the parameters: a learner with gradient hooks "
                         "needs train_coop_single")
    bundle = tasks[0].bundle
    data = [(views or train_views)(t, cfg) for t in tasks]
    feats = [f.to(bundle.device) for f, _ in data]
    labels = [y.to(bundle.device) for _, y in data]
    schedule = schedule or (lambda t, n: train_config(cfg, t, n_train=n))
    schedule_of = lambda t, n: with_schedule(schedule(t, n), t)    # a convergence study's per-run budget
    batch_size = int(batch_size or option(cfg, "batch_size"))
    runs = [RunSchedule(schedule_of(t, y.numel()), y.numel(), batch_size, label=f"{t.dataset.name} k{t.shots} s{t.seed}")
            for t, y in zip(tasks, labels)]
    if eval_fn is None and any(t.extra.get("on_eval") for t in tasks):   # a convergence study's validation curve
        score = evaluate_fn or evaluate
        eval_fn = lambda ls: torch.tensor([score(l, t, split="val")["top1"] if t.extra.get("on_eval") else 0.0
                                           for l, t in zip(ls, tasks)])
        eval_every = eval_every or convergence.eval_every(max(r.total_steps for r in runs))
    logits_many = logits_many or coop_logits_many
    stacked = stack_trainable(learners)
    scale = logit_scale(bundle)
    views: dict[tuple, torch.Tensor] = {}

    def batch_of(r: int, b) -> tuple[torch.Tensor, torch.Tensor]:
        """As `feature_batches`: each image in the cached view drawn for (seed, epoch)."""
        V, N = feats[r].shape[:2]
        key = (r, b.epoch)
        if key not in views:
            views.clear() if len(views) > 4 * len(tasks) else None
            views[key] = torch.randint(V, (N,), generator=torch.Generator().manual_seed(runs[r].cfg.seed * 7919 + b.epoch))
        return feats[r][views[key][b.idx], b.idx], labels[r][b.idx]

    def step(batches):
        live = [r for r, b in enumerate(batches) if b is not None]
        losses, accs = torch.zeros(len(tasks)), torch.zeros(len(tasks))
        with bound(learners, stacked, live):
            xy = [batch_of(r, batches[r]) for r in live]
            outs = logits_many([learners[r] for r in live], [x for x, _ in xy], scale)
            for (logits, text), (x, y), r in zip(outs, xy, live):
                out = F.cross_entropy(logits, y) if loss_fns is None else loss_fns[r](learners[r], logits, y, text)
                loss, _ = out if isinstance(out, tuple) else (out, {})
                losses = losses.index_put((torch.tensor([r]),), loss.reshape(1).float())
                accs[r] = float((logits.argmax(-1) == y).float().mean()) * 100
        return losses, {"acc": accs}

    evaluate_runs = None
    if eval_fn is not None:
        def evaluate_runs():
            with torch.no_grad(), bound(learners, stacked, range(len(tasks))):
                return eval_fn(learners)
    return fit_stacked(learners, stacked, runs, step, evaluate_runs, eval_every, out_dir,
                       desc or f"coop x{len(tasks)} {tasks[0].dataset.name}", option(cfg, "threads"))


@contextmanager
def bound(learners: Sequence[nn.Module], stacked: dict[str, torch.Tensor], runs) -> Any:
    """Let each learner's own code run on its slice of the stacked parameters: its parameter attributes are
    replaced by views `stacked[name][r]` (gradients reach the stacked tensor), and restored afterwards."""
    saved = []
    try:
        for r in runs:
            for n, w in stacked.items():
                mod_name, _, attr = n.rpartition(".")
                mod = learners[r].get_submodule(mod_name) if mod_name else learners[r]
                saved.append((mod, attr, mod._parameters.pop(attr)))
                setattr(mod, attr, w[r])
        yield
    finally:
        for mod, attr, param in reversed(saved):
            delattr(mod, attr)
            mod._parameters[attr] = param


def coop_logits_many(learners: Sequence[PromptLearner], xs: Sequence[torch.Tensor], scale: float) -> list[tuple]:
    """[(logits, class embeddings)] of several runs' batches; their prompts are encoded together."""
    return [(coop_logits(x, text, scale), text) for x, text in zip(xs, run_class_embeddings(learners))]


def run_class_embeddings(learners: Sequence[PromptLearner]) -> list[torch.Tensor]:
    """Each learner's `class_embeddings()`; learners with the plain CoOp layout (unified context, class token
    at the end) and the same class names are encoded together through the shared-prefix encoder."""
    out: dict[int, torch.Tensor] = {}
    groups: dict[tuple, list[int]] = {}
    for i, l in enumerate(learners):
        if shares_prefix(l):
            groups.setdefault((id(l.encoder.transformer), tuple(l.classnames)), []).append(i)
        else:
            out[i] = l.class_embeddings()
    for members in groups.values():
        first = learners[members[0]]
        P = 1 + first.n_ctx
        eot = first.token_ids.argmax(-1) - P
        S = int(eot.max()) + 1
        prefix = torch.cat([first.token_prefix[:1].expand(len(members), -1, -1),
                            torch.stack([learners[i].ctx for i in members]).to(first.token_prefix.dtype)], dim=1)
        suffix = first.token_suffix[:, :S].unsqueeze(0).expand(len(members), -1, -1, -1)
        feats = F.normalize(encode_shared_prefix(first.encoder, prefix, suffix, eot), dim=-1)
        for j, i in enumerate(members):
            out[i] = feats[j]
    return [out[i] for i in range(len(learners))]


def shares_prefix(learner: PromptLearner) -> bool:
    """CoOp's default layout, encoded with its own `class_embeddings` (no subclass override)."""
    return (type(learner).class_embeddings is PromptLearner.class_embeddings and not learner.csc
            and learner.position == "end" and learner.ctx.dim() == 2 and shared_prefix_supported(learner.encoder))


@torch.no_grad()
def class_weights(learner: PromptLearner, classnames: Sequence[str], chunk: int | None = None) -> torch.Tensor:
    """(K, D) text classifier of the learned prompt for `classnames`."""
    target = learner.with_classnames(classnames)
    was = target.training
    target.eval()
    weights = target.class_embeddings(chunk=chunk)
    target.train(was)
    return weights


def evaluate(learner: PromptLearner, task: Task, split: str = "test", chunk: int | None = None) -> dict[str, float]:
    """Top-1 (and mean per-class) of the learned prompt on `task`'s split, with `task`'s own class names."""
    chunk = chunk or int(option(task.cfg, "eval_chunk"))
    with torch_threads(option(task.cfg, "threads")):
        weights = class_weights(learner, task.dataset.classnames, chunk).float().cpu()  # features live on CPU
    return eval_classifier(task, weights, split=split)


def save_learner(learner: PromptLearner, path) -> None:
    """Learned tensors plus what rebuilds the learner (class names, options), for `load_learner`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": learner.trained_state(), "classnames": learner.classnames,
                "init_kwargs": learner.init_kwargs, "type": type(learner).__name__}, path)


def load_learner(path, bundle: ClipBundle, cls: type[PromptLearner] = PromptLearner) -> PromptLearner:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if blob.get("type", cls.__name__) != cls.__name__:
        raise ValueError(f"{path} holds a {blob['type']}, not a {cls.__name__}")
    with torch.random.fork_rng():
        learner = cls(bundle, blob["classnames"], **blob["init_kwargs"])
    missing, unexpected = learner.load_state_dict(blob["state"], strict=False)
    if unexpected or [k for k in blob["state"] if k in missing]:
        raise ValueError(f"{path} does not match {cls.__name__}: unexpected {unexpected[:5]}")
    return learner.to(bundle.device)


class Fitter:
    """`fit(task)` for the protocols: trains once per (config, dataset sample, seed) in this process, so the
    16-shot source model of domain generalisation / cross-dataset reuses an identical earlier training.
    `many(tasks)` trains the missing ones together (`train_many`, a batched model) when the method has one."""

    def __init__(self, cfg: dict, train_fn: Callable[[Task, dict], PromptLearner] | None = None,
                 train_many: Callable[[list[Task], dict], list[PromptLearner]] | None = None):
        self.cfg, self.train_fn = cfg, train_fn or train_coop
        self.train_many = train_many if train_many is not None else (
            (lambda tasks, cfg: train_coop_many(tasks, cfg, out_dir=tasks[0].extra.get("group_dir")))
            if train_fn is None else None)
        self.memo: dict[str, PromptLearner] = {}

    def _key(self, task: Task) -> str:
        return json.dumps([self.cfg, task.dataset.name, items_digest(task.dataset.train), task.shots, task.seed],
                          sort_keys=True, default=str)

    def __call__(self, task: Task) -> PromptLearner:
        return self.many([task])[0]

    def many(self, tasks: list[Task]) -> list[PromptLearner]:
        todo = [t for t in tasks if self._key(t) not in self.memo]
        if todo:
            if self.train_many is not None and len(todo) > 1:
                learners = self.train_many(todo, self.cfg)
            else:
                learners = []
                for t in todo:          # as the protocols did before calling fit: each run starts seeded
                    seed_everything(t.seed)
                    learners.append(self.train_fn(t, self.cfg))
            for t, learner in zip(todo, learners):
                self.memo[self._key(t)] = learner
        for task in tasks:
            if task.out_dir is not None:
                Path(task.out_dir).mkdir(parents=True, exist_ok=True)
                save_learner(self.memo[self._key(task)], Path(task.out_dir) / PROMPT_FILE)
        return [self.memo[self._key(t)] for t in tasks]

    def batched(self, evaluate_fn: Callable[[Any, Task], dict[str, float]]):
        """This fitter as a protocols.BatchedFit (one batched model per dataset)."""
        from common.engine.protocols import BatchedFit
        return BatchedFit(self.many, evaluate_fn)
