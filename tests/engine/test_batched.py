"""Batched training of independent runs: equal to separate runs (torch's optimisers, the single-run Trainer)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engine import TrainConfig, Trainer, index_batches
from common.engine.batched import (BatchedTrainer, RunSchedule, StackedOptimizer, clip_per_run, masked_mean,
                                   pad_batches, scatter_runs, stack_parameters)

D, K = 6, 4


def problem(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(K, (n,), generator=g)


RUNS = [  # (n_train, batch, epochs, lr, seed): different sizes, schedules and learning rates
    (40, 8, 3, 0.1, 1), (13, 8, 5, 0.05, 2), (7, 8, 4, 0.2, 3), (64, 16, 2, 0.1, 4)]


def separate(opt: str, clip=None, wd=5e-4, schedule_unit="epoch"):
    outs = []
    for n, bs, ep, lr, seed in RUNS:
        x, y = problem(seed, n)
        model = nn.Linear(D, K, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.full((K, D), 0.01) * seed)
        cfg = TrainConfig(epochs=ep, lr=lr, optimizer=opt, weight_decay=wd, warmup_epochs=1, warmup_lr=lr / 10,
                          seed=seed, grad_clip=clip, schedule_unit=schedule_unit)
        tr = Trainer(model, cfg)

        def step(b, x=x, y=y, model=model):
            return F.cross_entropy(model(x[b]), y[b])
        tr.fit(step, lambda e, n=n, bs=bs, seed=seed: index_batches(n, bs, seed, e))
        outs.append(model.weight.detach().clone())
    return outs


def batched(opt: str, clip=None, wd=5e-4, schedule_unit="epoch", stop_after=None, out_dir=None):
    data = [problem(seed, n) for n, _, _, _, seed in RUNS]
    W = stack_parameters([torch.full((K, D), 0.01) * seed for *_, seed in RUNS])
    runs = [RunSchedule(TrainConfig(epochs=ep, lr=lr, optimizer=opt, weight_decay=wd, warmup_epochs=1,
                                    warmup_lr=lr / 10, seed=seed, grad_clip=clip, schedule_unit=schedule_unit),
                        n, bs, label=f"run{seed}") for n, bs, ep, lr, seed in RUNS]

    def step(batches):
        idx, mask, live = pad_batches(batches)
        x = torch.stack([data[r][0][idx[i]] for i, r in enumerate(live)])          # (A, B, D)
        y = torch.stack([data[r][1][idx[i]] for i, r in enumerate(live)])
        logits = torch.einsum("abd,akd->abk", x, W[live])
        ce = F.cross_entropy(logits.reshape(-1, K), y.reshape(-1), reduction="none").view(len(live), -1)
        return scatter_runs(masked_mean(ce, mask), live, len(RUNS)), {}

    tr = BatchedTrainer([W], runs, out_dir)
    tr.fit(step, max_steps=stop_after)
    return W, tr, step, runs


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_batched_runs_equal_separate_runs(opt):
    want = separate(opt)
    W, tr, _, runs = batched(opt)
    for r, w in enumerate(want):
        assert torch.allclose(W[r].detach(), w, atol=1e-6, rtol=1e-5), (opt, r)
    assert [len(h) for h in tr.history] == [r.cfg.epochs for r in runs]
    assert [h[-1]["step"] for h in tr.history] == [r.total_steps for r in runs]


def test_per_run_clipping_and_iteration_schedule():
    want = separate("sgd", clip=0.05, schedule_unit="iter")
    W, *_ = batched("sgd", clip=0.05, schedule_unit="iter")
    for r, w in enumerate(want):
        assert torch.allclose(W[r].detach(), w, atol=1e-6, rtol=1e-5)


def test_clip_per_run_matches_torch():
    g = torch.randn(3, 5, 4)
    p = nn.Parameter(torch.zeros(3, 5, 4))
    p.grad = g.clone()
    norms = clip_per_run([p], 1.0, torch.tensor([True, True, False]))
    for r in range(2):
        q = nn.Parameter(torch.zeros(5, 4))
        q.grad = g[r].clone()
        n = torch.nn.utils.clip_grad_norm_([q], 1.0)
        assert torch.allclose(p.grad[r], q.grad) and norms[r] == pytest.approx(float(n), rel=1e-6)
    assert torch.equal(p.grad[2], g[2])                      # an inactive run's gradient is untouched


def test_interrupted_batched_training_resumes_exactly(tmp_path):
    W_full, *_ = batched("adam")
    W_part, tr, step, runs = batched("adam", stop_after=7, out_dir=tmp_path)
    assert tr.t == 7
    tr._save()                                                # as a kill after the step-7 checkpoint would leave
    W3, tr3, *_ = batched("adam", out_dir=tmp_path)           # a fresh process picks the checkpoint up
    assert tr3.resumed_at == 7
    assert torch.allclose(W3, W_full, atol=1e-6)


def test_stacked_optimizer_refuses_mixed_optimizers():
    p = nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="share optimizer"):
        StackedOptimizer([p], [TrainConfig(optimizer="sgd"), TrainConfig(optimizer="adam")])
    with pytest.raises(ValueError, match="runs on its first axis"):
        StackedOptimizer([p], [TrainConfig()] * 3)


def test_finished_runs_stay_frozen():
    W, tr, _, runs = batched("sgd")
    short = min(range(len(runs)), key=lambda r: runs[r].total_steps)
    assert tr.opt.steps[short] == runs[short].total_steps and tr.opt.steps.max() == tr.total


class _Head(nn.Module):
    """A small adapter-like module with a per-run buffer (the class text features)."""

    def __init__(self, text: torch.Tensor):
        super().__init__()
        self.register_buffer("text", text)
        self.fc = nn.Sequential(nn.Linear(D, 3, bias=False), nn.ReLU(), nn.Linear(3, D, bias=False))
        self.scale = 10.0

    def forward(self, x):
        f = F.normalize(x + 0.5 * self.fc(x), dim=-1)
        return self.scale * f @ F.normalize(self.text, dim=-1).t()


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_fit_modules_equals_separate_trainers(opt):
    from common.engine.batched import fit_modules
    specs = [(40, 8, 3, 0.1, 1), (12, 8, 4, 0.05, 2), (24, 8, 2, 0.2, 3)]
    def make(seed):
        torch.manual_seed(seed)
        return _Head(torch.randn(K, D, generator=torch.Generator().manual_seed(100 + seed)))
    views = [[problem(seed, n)[0], problem(seed + 50, n)[0]] for n, *_, seed in specs]   # two cached views
    labels = [problem(seed, n)[1] for n, *_, seed in specs]
    cfgs = [TrainConfig(epochs=ep, lr=lr, optimizer=opt, seed=seed, warmup_epochs=0) for n, bs, ep, lr, seed in specs]
    together = [make(s) for *_, s in specs]
    fit_modules(together, views, labels, cfgs, 8)
    for (n, bs, ep, lr, seed), m, v, y, cfg in zip(specs, together, views, labels, cfgs):
        alone = make(seed)
        Trainer(alone, cfg).fit(lambda b, alone=alone, y=y: F.cross_entropy(alone(b[0]), b[1]),
                                lambda e, v=v, y=y, n=n, seed=seed: [(v[e % 2][i], y[i]) for i in index_batches(n, 8, seed, e)])
        for (name, p), q in zip(alone.named_parameters(), m.parameters()):
            assert torch.allclose(p, q, atol=1e-5), (opt, seed, name, float((p - q).abs().max()))
