"""DualCoOp: the ASL loss against hand computation, the dual-prompt 2-way softmax, region aggregation on a tiny
map, unknown-label masking, the region tokens of the ResNet value path, gradients only into the prompts, batched
training equal to separate runs, and a seconds-long train + zeroshot + eval smoke run on a tiny random CLIP."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.data import Dataset, Datum, register_dataset
from common.engine import TrainConfig
from common.metrics import mean_average_precision
from papers.dualcoop.fit import build_models, train_many
from papers.dualcoop.method import (DualPrompt, asl_loss, encode_regions, global_logits, partial_labels,
                                    positive_probability, region_logits)

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["red square", "green circle", "blue triangle"]


def two_way(s_neg, s_pos):
    """(1, 2, C) logits from per-class negative and positive logits."""
    return torch.tensor([[s_neg, s_pos]], dtype=torch.float64)


# ------------------------------------------------------------------------------------------- ASL
def test_asl_matches_a_hand_computation():
    # class 0: S+ = ln 3, S- = 0 -> p = 0.75, y = 1: -(1 - 0.75)^1 ln 0.75
    # class 1: S+ = S- = 0 -> p = 0.5, y = 0: p_m = 0.45, -(0.45^2) ln(1 - 0.45)
    # class 2: unknown (-1): nothing
    logits = two_way([0.0, 0.0, 5.0], [math.log(3.0), 0.0, -2.0])
    y = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    hand = -(0.25 * math.log(0.75)) - (0.45 ** 2 * math.log(0.55))
    assert asl_loss(logits, y).item() == pytest.approx(hand, abs=1e-9)
    assert hand == pytest.approx(0.0719205 + 0.1210620, abs=1e-6)


def test_asl_reduces_to_bce_without_focusing_or_clip():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 2, (4, 5), generator=g).double()
    y[0, 1] = y[2, 3] = -1
    p = positive_probability(logits)
    keep = y >= 0
    bce = F.binary_cross_entropy(p[keep], y[keep], reduction="sum")
    assert asl_loss(logits, y, gamma_neg=0, gamma_pos=0, clip=0).item() == pytest.approx(bce.item(), rel=1e-9)
    # with the official gammas and clip the loss is different (the check can fail)
    assert abs(asl_loss(logits, y).item() - bce.item()) > 1e-3


def test_asl_focusing_weights_carry_no_gradient():
    """Positive entry, gamma+ = 1: L = -(1-p) log p with (1-p) constant, so dL/dS+ = -(1-p)(1-p); differentiating
    through the weight too would add p log p (1-p)."""
    s = torch.tensor([[[0.3], [1.1]]], dtype=torch.float64, requires_grad=True)   # (1, 2, 1): S-, S+
    asl_loss(s, torch.tensor([[1.0]], dtype=torch.float64)).backward()
    p = torch.sigmoid(torch.tensor(1.1 - 0.3, dtype=torch.float64)).item()
    assert s.grad[0, 1, 0].item() == pytest.approx(-(1 - p) ** 2, abs=1e-9)
    assert s.grad[0, 0, 0].item() == pytest.approx((1 - p) ** 2, abs=1e-9)


def test_unknown_labels_change_nothing():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, 0, -1, 0], [0, -1, 1, 1], [-1, -1, 0, 1]], dtype=torch.float64)

    def grad_of(logits):
        x = logits.clone().requires_grad_(True)
        loss = asl_loss(x, y)
        loss.backward()
        return loss.detach(), x.grad

    l1, g1 = grad_of(base)
    moved = base.clone()
    moved[y.unsqueeze(1).expand_as(moved) == -1] += 7.0       # any logits at unknown entries
    l2, g2 = grad_of(moved)
    assert torch.allclose(l1, l2) and torch.allclose(g1, g2)
    unknown = (y == -1).unsqueeze(1).expand_as(g1)
    assert torch.all(g1[unknown] == 0) and torch.any(g1[~unknown] != 0)
    # an observed label that becomes unknown removes exactly its own term
    y2 = y.clone()
    y2[0, 0] = -1
    single = asl_loss(base[:1, :, :1], y[:1, :1])
    assert asl_loss(base, y).item() == pytest.approx(asl_loss(base, y2).item() + single.item(), rel=1e-12)


# ------------------------------------------------------------------------------------------- logits
def test_dual_probability_is_the_two_way_softmax():
    s_neg, s_pos = torch.randn(6, 3), torch.randn(6, 3) * 4
    logits = torch.stack([s_neg, s_pos], dim=1)
    p = positive_probability(logits)
    assert torch.allclose(p, torch.exp(s_pos) / (torch.exp(s_pos) + torch.exp(s_neg)), atol=1e-6)
    assert torch.allclose(p, torch.sigmoid(s_pos - s_neg), atol=1e-6)


def test_region_aggregation_on_a_tiny_map_by_hand():
    # three regions in 2-D (one unnormalised), one class: t+ = e1, t- = e2
    regions = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]], dtype=torch.float64)
    t_pos = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    t_neg = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    c = 1 / math.sqrt(2)
    cos_pos, cos_neg = [1.0, 0.0, c], [0.0, 1.0, c]
    e = [math.exp(20 * v) for v in cos_pos]
    w = [v / sum(e) for v in e]
    s_pos = 5 * sum(wi * 20 * ci for wi, ci in zip(w, cos_pos))
    s_neg = 5 * sum(wi * 20 * ci for wi, ci in zip(w, cos_neg))
    out = region_logits(regions, t_pos, t_neg)
    assert out.shape == (1, 2, 1)
    assert out[0, 1, 0].item() == pytest.approx(s_pos, rel=1e-12)
    assert out[0, 0, 0].item() == pytest.approx(s_neg, rel=1e-12)
    # the negative branch uses the positive weights: the region most like t- (index 1) has weight ~e^-20
    assert s_neg < 100 * c
    # one region: the aggregation is 100 x cosine, i.e. the global head
    one = regions[:, 2:]
    assert torch.allclose(region_logits(one, t_pos, t_neg), global_logits(one[:, 0], t_pos, t_neg))


def test_resnet_region_tokens_keep_the_mean_token(tiny_rn):
    """Index 0 = c_proj(v_proj(mean(F) + pos_0)); the map is affine in its input, so it also equals the mean of the
    location tokens plus W_c W_v (pos_0 - mean_j pos_j) (positions resized when the map is larger)."""
    model = tiny_rn.model
    pool = model.visual.attnpool
    x = torch.randn(2, 3, 2 * tiny_rn.image_size, 2 * tiny_rn.image_size)
    with torch.no_grad():
        out = encode_regions(model, x)
        from common.clip.visual import resnet_dense_features, resnet_feature_map
        fmap = resnet_feature_map(model, x)
        h, w = fmap.shape[-2:]
        dense = resnet_dense_features(pool, fmap)
        assert out.shape == (2, 1 + h * w, pool.c_proj.out_features) and h * w > pool.positional_embedding.shape[0] - 1
        assert torch.allclose(out[:, 1:], dense, atol=1e-5)
        side = int(round((pool.positional_embedding.shape[0] - 1) ** 0.5))
        c = fmap.shape[1]
        pos = F.interpolate(pool.positional_embedding[1:].reshape(1, side, side, c).permute(0, 3, 1, 2), size=(h, w),
                            mode="bicubic", align_corners=False).reshape(c, h * w).t()
        lin = pool.c_proj.weight @ pool.v_proj.weight
        expect = dense.mean(1) + lin @ (pool.positional_embedding[0] - pos.mean(0))
        assert torch.allclose(out[:, 0], expect, atol=1e-4)


# ------------------------------------------------------------------------------------------- prompts
def test_gradients_reach_only_the_prompts(tiny_clip):
    model = DualPrompt(tiny_clip, NAMES, n_ctx_pos=3, n_ctx_neg=2, csc=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"pos.ctx", "neg.ctx"}
    assert model.pos.ctx.shape[:2] == (3, 3) and model.neg.ctx.shape[:2] == (3, 2)
    regions = torch.randn(4, 5, tiny_clip.embed_dim)
    y = torch.tensor([[1, 0, -1], [0, 0, 1], [1, 1, 0], [-1, 0, 1]], dtype=torch.float32)
    asl_loss(model(regions), y).backward()
    assert model.pos.ctx.grad is not None and model.pos.ctx.grad.abs().sum() > 0
    assert model.neg.ctx.grad is not None and model.neg.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_clip.model.parameters())


def test_single_prompt_is_a_threshold_on_the_positive_logit(tiny_rn):
    model = DualPrompt(tiny_rn, NAMES, n_ctx_pos=2, single=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"pos.ctx", "threshold"}
    with torch.no_grad():
        model.threshold.fill_(3.0)
        regions = torch.randn(2, 5, tiny_rn.embed_dim)
        t_pos, _ = model.text_features()
        s = region_logits(regions, t_pos, t_pos)[:, 1]
        assert torch.allclose(positive_probability(model(regions)), torch.sigmoid(s - 3.0), atol=1e-6)


def test_unified_prompts_move_to_unseen_classes_csc_do_not(tiny_rn):
    model = DualPrompt(tiny_rn, NAMES, n_ctx_pos=2, n_ctx_neg=2, csc=False)
    with torch.no_grad():
        model.pos.ctx.add_(1.0)
    moved = model.with_classnames(["yellow star", "red square"])
    assert torch.equal(moved.pos.ctx, model.pos.ctx) and torch.equal(moved.neg.ctx, model.neg.ctx)
    with torch.no_grad():   # the moved model's "red square" prompt equals the original's
        assert torch.allclose(moved.text_features()[0][1], model.text_features()[0][0], atol=1e-5)
    with pytest.raises(ValueError, match="class-specific"):
        DualPrompt(tiny_rn, NAMES, n_ctx_pos=2, n_ctx_neg=2, csc=True).with_classnames(["yellow star"])


def test_partial_labels_are_nested_and_near_the_proportion():
    y = (torch.rand(400, 10, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    kept = {pp: partial_labels(y, pp, seed=1) >= 0 for pp in (0.1, 0.5, 0.9)}
    for pp, k in kept.items():
        assert abs(k.float().mean().item() - pp) < 0.03
    assert torch.all(kept[0.5][kept[0.1]]) and torch.all(kept[0.9][kept[0.5]])
    p = partial_labels(y, 0.5, seed=1)
    assert torch.equal(p[kept[0.5]], y[kept[0.5]]) and torch.all(p[~kept[0.5]] == -1)
    assert not torch.equal(partial_labels(y, 0.5, seed=2), p)


def test_batched_runs_equal_separate_runs(tiny_rn):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 5, tiny_rn.embed_dim, generator=g)
    y = (torch.rand(12, 3, generator=g) < 0.4).float()
    targets = [partial_labels(y, 0.5, 1), partial_labels(y, 0.9, 2)]
    cfgs = [TrainConfig(epochs=2, lr=0.5, seed=s, warmup_epochs=0) for s in (1, 2)]
    loss = {"gamma_neg": 2, "gamma_pos": 1, "clip": 0.05, "eps": 1e-6, "loss_w": 1.0}
    build = lambda: DualPrompt(tiny_rn, NAMES, n_ctx_pos=2, n_ctx_neg=2, csc=True)
    together = train_many(build_models(build, [1, 2]), feats, targets, cfgs, 4, loss, val=(feats, y), val_runs=[1])
    for r, s in enumerate((1, 2)):
        alone = train_many(build_models(build, [s]), feats, targets[r:r + 1], cfgs[r:r + 1], 4, loss)[0]
        assert torch.allclose(alone.pos.ctx, together[r].pos.ctx, atol=1e-5)
        assert torch.allclose(alone.neg.ctx, together[r].neg.ctx, atol=1e-5)
    # the validation curve: run 1's final point is the trained prompts' mAP, run 0 is not validated
    t_pos, t_neg = alone.text_features()
    final = mean_average_precision(positive_probability(alone.logits(feats, t_pos, t_neg)).float(), y)
    assert together[1].val_history[-1]["val"] == pytest.approx(final, abs=1e-3)
    assert len(together[1].val_history) > 1 and all(e["val"] == 0 for e in together[0].val_history)
    assert not torch.allclose(together[0].pos.ctx, build_models(build, [1])[0].pos.ctx)   # it trained


# ------------------------------------------------------------------------------------------- smoke
ML_CLASSES = ["red square", "green circle", "blue triangle", "yellow star"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 20)]


def write_toy_ml(root: Path, per_split=(12, 6, 8), size: int = 32) -> None:
    rng = np.random.default_rng(0)
    folder = root / "toy_ml"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = {}
    for split, n in zip(("train", "val", "test"), per_split):
        rows[split] = []
        for i in range(n):
            labels = sorted(rng.choice(4, size=int(rng.integers(1, 3)), replace=False).tolist())
            arr = np.zeros((size, size, 3))
            for j, c in enumerate(labels):
                arr[:, j * size // 2:(j + 1) * size // 2] = COLOURS[c]
            arr = np.clip(arr + rng.normal(0, 20, arr.shape), 0, 255).astype(np.uint8)
            path = folder / "images" / f"{split}_{i}.png"
            Image.fromarray(arr).save(path)
            rows[split].append([str(path), labels])
    (folder / "labels.json").write_text(json.dumps(rows))


@register_dataset("toy_ml")
def _build_toy_ml(root: Path) -> Dataset:
    rows = json.loads((Path(root) / "labels.json").read_text())
    splits = {s: [Datum(p, t[0], ML_CLASSES[t[0]], targets=tuple(t)) for p, t in v] for s, v in rows.items()}
    return Dataset("toy_ml", list(ML_CLASSES), "a photo of a {}.", splits["train"], splits["val"], splits["test"],
                   meta={"multilabel": True})


def test_smoke_train_zeroshot_eval(tmp_path, tiny_rn):
    from common.config import load_config
    from common.engine.runs import load_records
    from papers.dualcoop.__main__ import CONFIG, eval_, reproduce
    from tests.papers.helpers import toy_overrides
    write_toy_ml(tmp_path / "data")
    sets = toy_overrides(tmp_path, tiny_rn, {"datasets": "[toy_ml]", "dg_source": None, "dg_targets": None,
                                             "xd_source": None, "shots": None,
                                             "label_proportions": "[50, 90]", "ablations.label_proportions": "[50]",
                                             "batch_size": 6, "train.epochs": 2, "n_ctx_pos": 2, "n_ctx_neg": 2,
                                             "zsl.n_ctx_pos": 2, "zsl.n_ctx_neg": 2, "linear_probe.steps": 5,
                                             "eval_batch_size": 16})
    cfg = load_config(CONFIG, "embedded", [s for s in sets if s != "--set"])
    cfg["zsl"]["unseen"] = {"toy_ml": ["yellow star"]}
    reproduce(cfg)
    recs = load_records(paper="dualcoop")
    got = {(r["method"], r["variant"], r["dataset"], r["shots"]) for r in recs}
    for pp in (50, 90):
        assert ("dualcoop", "", "toy_ml", pp) in got and ("linear_probe", "partial_bce", "toy_ml", pp) in got
    assert {("dualcoop", "single", "toy_ml", 50), ("dualcoop", "global", "toy_ml", 50),
            ("zeroshot_clip", "single", "toy_ml", None), ("dualcoop", "", "toy_ml[zsl]", None),
            ("dualcoop", "", "toy_ml[gzsl]", None), ("zeroshot_clip", "single", "toy_ml[zsl]", None)} <= got
    assert all(0 <= r["metrics"]["mAP"] <= 100 for r in recs)
    zsl = [r for r in recs if r["dataset"] == "toy_ml[zsl]" and r["method"] == "dualcoop"][0]
    assert zsl["n_classes"] == 1 and "F1@3" in zsl["metrics"]
    rescored = eval_(cfg)
    stored = {(r["shots"], r["seed"]): r["metrics"]["mAP"] for r in recs
              if r["method"] == "dualcoop" and r["variant"] == "" and r["dataset"] == "toy_ml"}
    for row in rescored:
        assert row["mAP"] == pytest.approx(stored[(row["label_percent"], row["seed"])], abs=1e-3)


def test_bad_options_are_one_line_errors(tmp_path, tiny_rn, capsys):
    from papers.dualcoop.__main__ import main
    from tests.papers.helpers import toy_overrides
    write_toy_ml(tmp_path / "data")
    sets = toy_overrides(tmp_path, tiny_rn, {"datasets": "[toy_ml]", "dg_source": None, "dg_targets": None,
                                             "xd_source": None, "shots": None, "label_proportions": "[0, 50]"})
    with pytest.raises(SystemExit) as err:
        main(["train"] + sets)
    assert err.value.code == 2
    msg = capsys.readouterr().err.strip().splitlines()
    assert len(msg) == 1 and "label_proportions" in msg[0]
    with pytest.raises(SystemExit) as err:
        main(["train"] + toy_overrides(tmp_path, tiny_rn, {"datasets": "[toy_ml]", "dg_source": None,
                                                          "dg_targets": None, "xd_source": None, "shots": "[1]"}))
    assert err.value.code == 2 and "shots" in capsys.readouterr().err


def test_single_prompt_threshold_starts_at_the_mean_logit_and_learns(tiny_rn):
    from papers.dualcoop.fit import _run_text, init_thresholds
    from common.engine.batched import stack_parameters
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(10, 5, tiny_rn.embed_dim, generator=g) + 3.0     # features share a direction: S+ far from 0
    y = (torch.rand(10, 3, generator=g) < 0.4).float()
    build = lambda: DualPrompt(tiny_rn, NAMES, n_ctx_pos=2, single=True)
    model = build_models(build, [1])[0]
    stacked = {n: stack_parameters([p]) for n, p in model.named_parameters() if p.requires_grad}
    init_thresholds(model, stacked, feats)
    (t_pos, _, _), = _run_text(model, stacked, [0])
    s = region_logits(feats, t_pos, t_pos)[:, 1]
    assert stacked["threshold"][0].item() == pytest.approx(s.mean().item(), rel=1e-5) and abs(s.mean().item()) > 1
    loss = {"gamma_neg": 2, "gamma_pos": 1, "clip": 0.05, "eps": 1e-6, "loss_w": 1.0}
    before = model.pos.ctx.detach().clone()
    out = train_many([model], feats, [y], [TrainConfig(epochs=2, lr=0.5, seed=1, warmup_epochs=0)], 5, loss)[0]
    assert not torch.allclose(out.pos.ctx, before)
