import json
import math

import pytest
import torch
import torch.nn.functional as F

import papers.tip_adapter.__main__ as tip
from common.data import build_dataset, fewshot_split
from common.config import load_config
from common.engine import TrainConfig, load_records, lr_at
from common.engine.protocols import Task
from papers.tip_adapter.method import (TipAdapterF, build_cache, cache_logits, grid_values, search_alpha_beta,
                                       tip_logits, train_tip_f)
from tests.papers.helpers import toy_overrides


def _toy_problem(seed=0, n_cls=3, shots=4, dim=8, n_val=12):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(n_cls, dim, generator=g), dim=-1)
    y = torch.arange(n_cls).repeat_interleave(shots)
    views = [centers[y] + 0.3 * torch.randn(len(y), dim, generator=g) for _ in range(3)]
    yv = torch.arange(n_cls).repeat(n_val // n_cls)
    xv = F.normalize(centers[yv] + 0.5 * torch.randn(len(yv), dim, generator=g), dim=-1)
    w = F.normalize(centers + 0.8 * torch.randn(n_cls, dim, generator=g), dim=-1)
    return views, y, xv, yv, w


def test_alpha_zero_is_zero_shot_exactly():
    views, y, xv, _, w = _toy_problem()
    keys, values = build_cache(views, y, 3)
    zs = 100.0 * xv @ w.t()
    for beta in (0.1, 5.5, 50.0):
        assert torch.equal(tip_logits(xv, keys, values, w, 0.0, beta), zs)
    assert not torch.equal(tip_logits(xv, keys, values, w, 1.0, 5.5), zs)


def test_cache_logits_hand_computed():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    values = F.one_hot(torch.tensor([0, 1, 1]), 2).float()
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f = torch.tensor([[1.0, 0.0]])
    beta, alpha = 2.0, 3.0
    # affinities 1, 0, 0.6 -> exp(-2 * (1 - a)) = 1, e^-2, e^-0.8; class 0 gets the first, class 1 the others
    expected_cache = torch.tensor([[1.0, math.exp(-2.0) + math.exp(-0.8)]])
    assert torch.allclose(cache_logits(f @ keys.t(), values, beta), expected_cache, atol=1e-6)
    expected = torch.tensor([[100.0 + alpha * 1.0, 0.0 + alpha * (math.exp(-2.0) + math.exp(-0.8))]])
    assert torch.allclose(tip_logits(f, keys, values, w, alpha, beta), expected, atol=1e-5)


def test_cache_keys_average_raw_views_then_normalise():
    v1, v2 = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    keys, values = build_cache([v1, v2], torch.tensor([1]), 3)
    assert torch.allclose(keys, torch.tensor([[2.0, 1.0]]) / math.sqrt(5.0))   # not the mean of normalised views
    assert torch.equal(values, torch.tensor([[0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="labels"):
        build_cache([v1], torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="same images"):
        build_cache([v1, torch.zeros(2, 2)], torch.tensor([0]), 3)


def test_search_matches_the_official_loop():
    views, y, xv, yv, w = _toy_problem(seed=3)
    keys, values = build_cache(views, y, 3)
    scale, steps = (7.0, 3.0), (12, 5)
    s = search_alpha_beta(xv, yv, xv @ keys.t(), values, w, scale, steps)
    # the official grid and loop: beta outer, alpha inner, strict > keeps the first best
    betas = [i * (scale[0] - 0.1) / steps[0] + 0.1 for i in range(steps[0])]
    alphas = [i * (scale[1] - 0.1) / steps[1] + 0.1 for i in range(steps[1])]
    assert torch.allclose(grid_values(*[scale[0], steps[0]]), torch.tensor(betas, dtype=torch.float64))
    best, pair = 0.0, (0.0, 0.0)
    for i, b in enumerate(betas):
        for j, a in enumerate(alphas):
            acc = float((tip_logits(xv, keys, values, w, a, b).argmax(-1) == yv).double().mean() * 100)
            assert s.acc[i, j] == pytest.approx(acc)
            if acc > best:
                best, pair = acc, (b, a)
    assert (s.beta, s.alpha, s.best) == pytest.approx((pair[0], pair[1], best))
    chunked = search_alpha_beta(xv, yv, xv @ keys.t(), values, w, scale, steps, max_elems=7)   # tiny chunks
    assert torch.equal(chunked.acc, s.acc) and (chunked.beta, chunked.alpha) == (s.beta, s.alpha)
    with pytest.raises(ValueError, match="validation"):
        search_alpha_beta(xv[:0], yv[:0], xv[:0] @ keys.t(), values, w, scale, steps)


def test_tip_f_trains_only_the_keys_and_starts_at_tip_adapter():
    views, y, xv, yv, w = _toy_problem(seed=1)
    keys, values = build_cache(views, y, 3)
    model = TipAdapterF(keys, values, w, alpha=1.17, beta=5.5)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["keys"]
    assert torch.equal(model.keys.detach(), keys)
    assert torch.equal(model(xv), tip_logits(xv, keys, values, w, 1.17, 5.5))   # step 0 == Tip-Adapter
    loss = F.cross_entropy(model(F.normalize(views[0], dim=-1)), y)
    loss.backward()
    assert model.keys.grad is not None and model.keys.grad.abs().sum() > 0
    assert all(b.grad is None for b in model.buffers())


def test_tip_f_training_keeps_the_best_validation_epoch(tmp_path):
    views, y, xv, yv, w = _toy_problem(seed=2)
    keys, values = build_cache(views, y, 3)
    model = TipAdapterF(keys, values, w, alpha=2.0, beta=1.0)
    tcfg = TrainConfig(epochs=6, lr=0.05, optimizer="adamw", weight_decay=0.01, warmup_epochs=0,
                       schedule_unit="iter", checkpoint_every=3)
    hist = train_tip_f(model, views, y, xv, yv, tcfg, batch_size=4, out_dir=tmp_path, threads=1)
    vals = [h["val_top1"] for h in hist]
    assert len(vals) == 6 and float(model.best_val) == pytest.approx(max(vals))
    assert torch.equal(model.keys.detach(), model.best_keys)
    assert not torch.equal(model.keys.detach(), keys)   # trained (lr 0.05 moves them)
    assert torch.equal(model.values, values) and torch.equal(model.clip_weights, w)
    with pytest.raises(ValueError, match="validation"):
        train_tip_f(TipAdapterF(keys, values, w, 1.0, 1.0), views, y, xv[:0], yv[:0], tcfg)


def test_tip_f_keeps_the_first_of_tied_validation_epochs(monkeypatch):
    """Ties are common on small val sets: every epoch scores 200/3 % here (2 of 3 right). The official strict `>`
    keeps the first epoch; a float32 best (66.6666641 < 66.6666667) took every later tie as an improvement."""
    import papers.tip_adapter.method as tip_method

    views, y, xv, yv, w = _toy_problem(seed=2)
    keys, values = build_cache(views, y, 3)
    model = TipAdapterF(keys, values, w, alpha=2.0, beta=1.0)
    seen, tie = [], float(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64).mean() * 100)   # as `top1`: 66.666...

    def tied_top1(logits, labels):
        seen.append(model.keys.detach().clone())   # the keys this epoch is scored with
        return tie

    monkeypatch.setattr(tip_method, "top1", tied_top1)
    tcfg = TrainConfig(epochs=3, lr=0.05, optimizer="adamw", warmup_epochs=0, schedule_unit="iter")
    hist = train_tip_f(model, views, y, xv, yv, tcfg, batch_size=4, threads=1)
    assert [h["val_top1"] for h in hist] == [tie] * 3 and len(seen) == 3
    assert not torch.equal(seen[0], seen[2])                  # the epochs differ, so the choice matters
    assert torch.equal(model.keys.detach(), seen[0])          # the first of the tied epochs is kept
    assert model.best_val.item() == tie                       # stored without rounding


def test_iteration_cosine_matches_torch_cosine_annealing():
    """-F's schedule: CosineAnnealingLR(T_max = epochs * iterations) stepped every iteration."""
    tcfg = TrainConfig(epochs=3, lr=1e-3, optimizer="adamw", warmup_epochs=0, schedule_unit="iter")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3 * 4)
    for s in range(12):
        assert lr_at(tcfg, s // 4 + (s % 4) / 4) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()


def test_validation_falls_back_to_held_out_train_images(tmp_path, tiny_rn):
    args = toy_overrides(tmp_path, tiny_rn)
    ds = build_dataset("toy", tmp_path / "data")
    few = fewshot_split(ds, 2, 1)
    cfg = {"data_root": str(tmp_path / "data")}
    task = Task(cfg, tiny_rn, few.with_splits(val=[]), 2, 1, None)
    held = tip.validation_items(task)
    assert len(held) == 2 * 4 and not {d.impath for d in held} & {d.impath for d in few.train}
    assert {d.impath for d in held} <= {d.impath for d in ds.train}   # never the test split
    assert tip.validation_items(Task(cfg, tiny_rn, few, 2, 1, None)) == few.val
    assert args


def test_target_classes_must_be_source_classes():
    assert tip.class_index(["a", "b", "c"], ["c", "a"]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="not source classes"):
        tip.class_index(["a", "b"], ["z"])


def test_reproduce_smoke(tmp_path, tiny_rn):
    fig = tmp_path / "heat.png"
    args = toy_overrides(tmp_path, tiny_rn, {"shots": "[1]", "cache_views": 2, "train.epochs": 2, "dg_shots": 1,
                                             "search_step": "[10, 5]", "figure": str(fig)})
    tip.main(["reproduce", *args])
    few = load_records(protocol="fewshot", method="tip_adapter")
    assert sorted(r["variant"] for r in few) == ["", "tip_f"]
    assert all({"top1", "alpha", "beta"} <= set(r["metrics"]) for r in few)
    dg = load_records(protocol="domain_generalization", method="tip_adapter")
    assert {(r["dataset"], r["variant"]) for r in dg} == {(d, v) for d in ("toy", "toy_shift") for v in ("", "tip_f")}
    grid = json.loads(next((tmp_path / "runs").glob("tip_adapter/fewshot/**/k1-seed1/search_grid.json")).read_text())
    assert len(grid["acc"]) == 10 and len(grid["acc"][0]) == 5
    assert fig.is_file() and fig.stat().st_size > 1000
    assert tip.train(__import__("common.config", fromlist=["x"]).load_config(tip.CONFIG, "embedded", args[1::2])) == []


def test_cost_command_times_an_epoch(tmp_path):
    row = tip.main(["cost", "--set", "cost={dim: 16, classes: 4, shots: 4, epochs: 3}"])
    assert row["samples"] == 16 and row["epoch_ms_median"] >= 0
    assert next((tmp_path / "runs").glob("tip_adapter/cost/*.json")).is_file()


def test_clip_scale_is_official_100_or_the_models_temperature(tiny_rn):
    from common.clip import logit_scale
    assert tip.clip_scale(Task({"clip_scale": 100.0}, tiny_rn, None, 1, 1, None)) == 100.0
    assert tip.clip_scale(Task({"clip_scale": None}, tiny_rn, None, 1, 1, None)) == pytest.approx(logit_scale(tiny_rn))
    assert load_config(tip.CONFIG, "real")["clip_scale"] == 100.0 and load_config(tip.CONFIG)["clip_scale"] is None


def test_a_convergence_schedule_sets_tip_f_epochs_and_lr(tmp_path, tiny_rn):
    """The budget study trains Tip-Adapter-F at the schedule its task carries (epochs, lr), not the config's."""
    args = toy_overrides(tmp_path, tiny_rn, {"cache_views": 2, "train.epochs": 5, "search_step": "[4, 2]"})
    cfg = load_config(tip.CONFIG, "embedded", args[1::2])
    few = fewshot_split(build_dataset("toy", tmp_path / "data"), 2, 1)
    histories = {}
    for epochs, lr in ((1, 1e-3), (3, 1e-1)):
        task = Task(cfg, tiny_rn, few, 2, 1, None)
        task.extra["schedule"] = {"epochs": epochs, "lr": lr}
        state = tip.fit(task, finetune=True)
        histories[epochs] = state["history"]
        assert len(state["history"]) == epochs and state["history"][0]["lr"] == pytest.approx(lr)
    assert tip.fit(Task(cfg, tiny_rn, few, 2, 1, None), finetune=False)["history"] == []
