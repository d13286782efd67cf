import pytest
import torch
import torch.nn.functional as F

import papers.clip_adapter.__main__ as ca
from common.clip import logit_scale, zeroshot_classifier
from common.config import load_config
from common.engine import TrainConfig, cosine_logits, load_records
from papers.clip_adapter.method import Adapter, ClipAdapter, blend, raw_text_features, train_on_views
from tests.papers.helpers import toy_overrides

NAMES = ["red square", "green circle", "blue triangle"]


@pytest.mark.parametrize("branch", ["visual", "text", "both"])
def test_ratio_zero_is_zero_shot_exactly(tiny_rn, branch):
    text = raw_text_features(tiny_rn, NAMES, ["a photo of a {}."])
    scale = logit_scale(tiny_rn)
    torch.manual_seed(0)
    model = ClipAdapter(text, scale, branch=branch, ratio=0.0)
    for p in model.parameters():                     # whatever the adapter weights
        torch.nn.init.normal_(p, std=1.0)
    feats = torch.randn(7, tiny_rn.embed_dim)
    zs = scale * F.normalize(feats, dim=-1) @ F.normalize(text, dim=-1).t()
    assert torch.equal(model(feats), zs)
    # and it is the project's zero-shot CLIP head (per-template normalised classifier, CLIP temperature)
    ref = cosine_logits(feats, zeroshot_classifier(tiny_rn, NAMES, ["a photo of a {}."], cache_dir=None), scale)
    assert torch.allclose(model(feats), ref, atol=1e-3)


def test_adapter_is_the_official_bottleneck():
    a = Adapter(16, reduction=4)
    kinds = [type(m).__name__ for m in a.fc]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU"]
    assert a.fc[0].weight.shape == (4, 16) and a.fc[2].weight.shape == (16, 4)
    assert a.fc[0].bias is None and a.fc[2].bias is None
    assert sum(p.numel() for p in a.parameters()) == 2 * 16 * 16 // 4
    assert (a(torch.randn(5, 16)) >= 0).all()        # the output ReLU of the released code


def test_blend_hand_computed():
    a = Adapter(2, reduction=1)
    with torch.no_grad():
        a.fc[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        a.fc[2].weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    x = torch.tensor([[3.0, 4.0]])
    # relu([3, -4]) = [3, 0]; [3, 0] @ W2^T = [6, 3]; relu -> [6, 3]; 0.2 * [6, 3] + 0.8 * [3, 4] = [3.6, 3.8]
    assert torch.allclose(blend(x, a, 0.2), torch.tensor([[3.6, 3.8]]))
    assert torch.allclose(blend(x, a, 1.0), torch.tensor([[6.0, 3.0]]))   # ratio 1: adapter only


def test_gradients_reach_only_the_adapters(tiny_rn):
    text = raw_text_features(tiny_rn, NAMES, ["a photo of a {}."])
    model = ClipAdapter(text, logit_scale(tiny_rn), branch="both", ratio=0.2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["visual.fc.0.weight", "visual.fc.2.weight", "text.fc.0.weight", "text.fc.2.weight"]
    feats = torch.randn(6, tiny_rn.embed_dim)
    F.cross_entropy(model(feats), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in tiny_rn.model.parameters())
    assert ClipAdapter(text, 100.0).text is None and ClipAdapter(text, 100.0, branch="text").visual is None
    with pytest.raises(ValueError, match="branch"):
        ClipAdapter(text, 100.0, branch="image")
    with pytest.raises(ValueError, match="ratio"):
        ClipAdapter(text, 100.0, ratio=1.5)


def test_raw_text_features_are_the_unnormalised_template_mean(tiny_rn):
    temps = ["a photo of a {}.", "a {} object."]
    ours = raw_text_features(tiny_rn, NAMES, temps)
    with torch.no_grad():
        ref = torch.stack([tiny_rn.model.encode_text(tiny_rn.tokenizer([t.format(c) for t in temps])).mean(0)
                           for c in NAMES])
    assert torch.allclose(ours, ref, atol=1e-5)


def test_training_on_views_learns_a_separable_task():
    torch.manual_seed(0)
    d, n_cls = 16, 3
    text = torch.randn(n_cls, d)
    centers = torch.randn(n_cls, d) * 3
    y = torch.arange(n_cls).repeat_interleave(8)
    views = [centers[y] + torch.randn(len(y), d) for _ in range(2)]
    model = ClipAdapter(text, 30.0, ratio=0.6)
    before = (model(views[0]).argmax(-1) == y).float().mean()
    tcfg = TrainConfig(epochs=30, lr=0.05, optimizer="sgd", warmup_epochs=1, checkpoint_every=30)
    hist = train_on_views(model, views, y, tcfg, batch_size=8, threads=1)
    after = (model(views[1]).argmax(-1) == y).float().mean()
    assert hist[-1]["loss"] < hist[0]["loss"] and after > before and after > 0.9


def test_reproduce_smoke(tmp_path, tiny_rn):
    args = toy_overrides(tmp_path, tiny_rn, {"shots": "[1]", "cache_views": 2, "train.epochs": 2, "dg_shots": 1,
                                             "ablations": "{text: {branch: text}}", "ablation_shots": "[1]"})
    ca.main(["reproduce", *args])
    few = load_records(protocol="fewshot", method="clip_adapter")
    assert sorted(r["variant"] for r in few) == ["", "text"]
    dg = load_records(protocol="domain_generalization", method="clip_adapter")
    assert {r["dataset"] for r in dg} == {"toy", "toy_shift"}
    cfg = load_config(ca.CONFIG, "embedded", ["ablations={bad: {colour: red}}"])
    with pytest.raises(ValueError, match="colour"):
        ca.settings(cfg, "bad")


def test_cost_command_times_an_epoch(tmp_path):
    row = ca.main(["cost", "--set", "cost={dim: 16, classes: 4, shots: 4, epochs: 3}"])
    assert row["samples"] == 16 and row["epoch_ms_median"] >= 0
    assert next((tmp_path / "runs").glob("clip_adapter/cost/*.json")).is_file()
