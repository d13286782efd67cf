import math

import pytest
import torch
import torchvision.transforms.functional as TF

import papers.svl_adapter.__main__ as svl
from common.config import load_config
from common.data import build_dataset
from common.engine import load_records
from common.engine.cache import FeatureCache
from common.engine.evaluate import classification_metrics
from common.engine.protocols import Task, eval_classifier
from papers.svl_adapter.method import (AdapterMLP, confidence_lambda, fit_adapter, fuse, lambda_grid, pseudo_labels,
                                       tune_lambda)
from papers.svl_adapter.ssl import (SimCLRAugment, TinyResNet, adjust_brightness, adjust_contrast, adjust_hue,
                                    adjust_saturation, nt_xent, pretrain_simclr, ssl_features)
from papers.zeroshot_clip.method import zeroshot_weights
from tests.fixtures.toy import write_toy
from tests.papers.helpers import toy_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = {"ssl.epochs": 1, "ssl.batch_size": 8, "ssl.res": 16, "ssl.load_size": 16, "ssl.width": 4, "feature_res": 16,
        "adapter.epochs": 3, "pseudo_label.per_class": 2, "shots": "[1]", "datasets": "[toy]"}


def test_nt_xent_against_hand_computed_values():
    e = math.e
    # two images whose two views coincide: each row sees its positive at cos 1, two negatives at cos 0
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert nt_xent(z, z.clone(), 0.5).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), abs=1e-6)
    # views a=[1,0], b=[1,0] | a'=[0,1], b'=[1,0], tau = 1; rows (positive: the other view):
    # a: -log(e^0 / (e^1 + e^0 + e^1));  b: -log(e^1 / (e^1 + e^0 + e^1));  a': -log(1 / 3);  b': like b
    z1, z2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    hand = (math.log(1 + 2 * e) + 2 * (math.log(1 + 2 * e) - 1) + math.log(3)) / 4
    assert nt_xent(z1, z2, 1.0).item() == pytest.approx(hand, abs=1e-6)
    assert nt_xent(3 * z1, 0.5 * z2, 1.0).item() == pytest.approx(hand, abs=1e-6)  # cosine: scale-free
    with pytest.raises(ValueError):
        nt_xent(z1, z2[:1], 1.0)


def test_confidence_lambda_against_hand_computed_value():
    # softmax rows: [3/4, 1/4] -> 0.75; [1/2, 1/2] -> 0.5; [1/5, 4/5] -> 0.8
    logits = torch.tensor([[math.log(3), 0.0], [0.0, 0.0], [0.0, math.log(4)]])
    assert confidence_lambda(logits) == pytest.approx((0.75 + 0.5 + 0.8) / 3, abs=1e-6)


@pytest.mark.parametrize("space", ["prob", "logit"])
def test_lambda_one_is_zero_shot_and_zero_is_the_ssl_classifier(space):
    torch.manual_seed(0)
    clip, ssl = 30 * torch.randn(50, 6), torch.randn(50, 6)
    one, zero = fuse(clip, ssl, 1.0, space), fuse(clip, ssl, 0.0, space)
    ref_clip = clip.softmax(-1) if space == "prob" else clip
    ref_ssl = ssl.softmax(-1) if space == "prob" else ssl
    assert torch.equal(one, ref_clip) and torch.equal(zero, ref_ssl)
    assert torch.equal(one.argmax(-1), clip.argmax(-1)) and torch.equal(zero.argmax(-1), ssl.argmax(-1))
    mid = fuse(clip, ssl, 0.3, space)
    assert torch.allclose(mid, 0.3 * ref_clip + 0.7 * ref_ssl)
    with pytest.raises(ValueError):
        fuse(clip, ssl, 1.2, space)


def test_tune_lambda_on_val_with_ties_to_clip():
    assert lambda_grid(0.25) == [1.0, 0.75, 0.5, 0.25, 0.0]
    labels = torch.tensor([0, 1, 1])
    clip = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0]])   # CLIP: 1/3 right
    ssl = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])    # SSL: all right
    # p_clip(y=0) ~ 0.9933, p_ssl(y=0) ~ 0.8808 / 0.1192:
    # rows 2 and 3 flip once lambda < 0.7616 / (0.7616 + 0.9866) = 0.4357
    assert tune_lambda(clip, ssl, labels, step=0.05) == pytest.approx(0.4)
    assert tune_lambda(clip, clip, labels, step=0.05) == 1.0          # all lambdas tie: keep CLIP
    assert tune_lambda(clip, clip, torch.tensor([1, 1, 1]), 0.05) == 1.0  # all wrong: lambda = 1
    with pytest.raises(ValueError, match="validation"):
        tune_lambda(clip[:0], ssl[:0], labels[:0])


def test_pseudo_labels_rare_class_takes_its_best_image_even_from_another_class():
    """Official generate_clip_pseudolabels.py: a never-predicted class takes its most probable image among all
    images (`pred_df`, not only the unpicked ones); the class that had picked it loses it (no replacement)."""
    probs = torch.tensor([[0.50, 0.10, 0.40],    # class 0's best pick, and class 2's most probable image
                          [0.60, 0.30, 0.10],    # class 0's second pick
                          [0.45, 0.35, 0.20],    # class 0, third (not picked at per_class=2)
                          [0.10, 0.80, 0.10],
                          [0.20, 0.70, 0.10]])
    idx, lab = pseudo_labels(probs.log(), per_class=2)
    assert dict(zip(idx.tolist(), lab.tolist())) == {0: 2, 1: 0, 3: 1, 4: 1}   # class 0 keeps only image 1
    assert idx.tolist() == sorted(idx.tolist())
    # two never-predicted classes never share an image: class 2 (index order) first, class 1 its next best
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.6, 0.25, 0.15]])
    idx, lab = pseudo_labels(probs.log(), per_class=2)
    assert dict(zip(idx.tolist(), lab.tolist())) == {0: 2, 1: 1}
    idx, lab = pseudo_labels(torch.tensor([[2.0, 0.0, 0.0]]), per_class=2)   # more classes than images
    assert dict(zip(idx.tolist(), lab.tolist())) == {0: 1}


def test_adapter_and_simclr_batches_keep_the_last_partial_batch(monkeypatch, tmp_path):
    """Official loaders are DataLoader(shuffle=True) without drop_last: every sample is seen every epoch."""
    import papers.svl_adapter.method as svl_method
    import papers.svl_adapter.ssl as svl_ssl

    b = svl_method.all_batches(10, 4, seed=3, epoch=2)
    assert [len(i) for i in b] == [4, 4, 2] and sorted(torch.cat(b).tolist()) == list(range(10))
    assert torch.equal(torch.cat(b), torch.cat(svl_method.index_batches(10, 10, 3, 2)))   # the engine's shuffle
    seen = []

    def spy(n, bs, seed, epoch):
        out = svl_method.index_batches(n, n, seed, epoch)[0].split(bs)
        seen.append(sorted(torch.cat(out).tolist()))
        return list(out)

    monkeypatch.setattr(svl_method, "all_batches", spy)
    fit_adapter(torch.randn(10, 6), torch.arange(2).repeat(5), 2, {"hidden": 4, "epochs": 2, "batch_size": 4,
                                                                    "lr": 1e-2}, seed=1)
    assert seen == [list(range(10))] * 2
    monkeypatch.setattr(svl_ssl, "all_batches", spy)
    seen.clear()
    opts = {"arch": "resnet_tiny", "init": "scratch", "width": 4, "layers": [1, 1, 1, 1], "stem_stride": 1,
            "res": 16, "epochs": 1, "batch_size": 4, "lr_mult": 0.3, "weight_decay": 5e-4, "temperature": 0.5,
            "proj_hidden": 16, "proj_dim": 8, "crop_scale": [0.2, 1.0], "color_strength": 0.5}
    pretrain_simclr(torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8), opts, seed=1)
    assert seen == [list(range(7))]


def test_ssl_features_are_extracted_at_feature_res_not_the_simclr_size(monkeypatch):
    """Official: SimCLR trains on 112 px crops (ssl_pretraining.py --im_res 112), features are extracted at
    feature_extraction.py's --im_res, default 224."""
    real = load_config(svl.CONFIG, "real")
    assert (real["ssl"]["res"], real["feature_res"]) == (112, 224)
    got = {}
    monkeypatch.setattr(svl, "ssl_encoder", lambda cfg, name: (None, "enc"))
    monkeypatch.setattr(svl, "ssl_features", lambda enc, name, split, items, res, encoder_id: got.update(res=res))
    svl._ssl_feats(real, "toy", "test", [])
    assert got["res"] == 224
    with pytest.raises(ValueError, match="feature_res"):
        svl._check({**real, "feature_res": 0})


def test_pseudo_labels_pick_most_confident_and_cover_every_class():
    logits = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1],
                                     [0.1, 0.8, 0.1], [0.4, 0.35, 0.25]]))
    idx, lab = pseudo_labels(logits, per_class=2)
    # class 0 predicted for 0, 1, 2, 4 -> top-2 = 0 (0.9), 2 (0.7); class 1 -> 3; class 2 never predicted:
    # its most probable remaining image is 4 (0.25 > 0.1 of image 1)
    assert dict(zip(idx.tolist(), lab.tolist())) == {0: 0, 2: 0, 3: 1, 4: 2}


def test_batched_colour_ops_match_torchvision():
    torch.manual_seed(0)
    x, f, h = torch.rand(3, 3, 8, 8), torch.tensor([0.6, 1.0, 1.4]), torch.tensor([-0.1, 0.0, 0.07])
    for ours, ref, arg in ((adjust_brightness, TF.adjust_brightness, f), (adjust_contrast, TF.adjust_contrast, f),
                           (adjust_saturation, TF.adjust_saturation, f), (adjust_hue, TF.adjust_hue, h)):
        want = torch.stack([ref(x[i], float(arg[i])) for i in range(3)])
        assert torch.allclose(ours(x, arg), want, atol=1e-5), ours.__name__


def test_augment_views_are_random_and_well_formed():
    aug = SimCLRAugment(16, scale=(0.2, 1.0))
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    v1, v2 = aug(images), aug(images)
    assert v1.shape == (6, 3, 16, 16) and not torch.allclose(v1, v2)
    boxes = aug.crop_boxes(1000, 32, 32, torch.Generator().manual_seed(0))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 32 ** 2
    assert area.max() <= 1 + 1e-6 and area.min() >= 0.2 * 0.75 - 1e-6  # clipped sides can only shrink it
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 32 + 1e-4).all()


def test_simclr_trains_encoder_and_features_are_cached(tmp_path):
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    opts = {"arch": "resnet_tiny", "init": "scratch", "width": 4, "layers": [1, 1, 1, 1], "stem_stride": 1,
            "res": 16, "epochs": 1, "batch_size": 6, "lr_mult": 0.3, "weight_decay": 5e-4, "temperature": 0.5,
            "proj_hidden": 16, "proj_dim": 8, "crop_scale": [0.2, 1.0], "color_strength": 0.5}
    torch.manual_seed(1)
    init = TinyResNet(4).state_dict()
    model = pretrain_simclr(images, opts, seed=1, out_dir=tmp_path / "ssl")
    assert any(not torch.equal(v, init[k]) for k, v in model.encoder.state_dict().items() if v.is_floating_point())
    assert not any(p.requires_grad for p in model.parameters())
    write_toy(tmp_path / "data", "toy")
    ds = build_dataset("toy", tmp_path / "data")
    cache = FeatureCache(tmp_path / "feats")
    a = ssl_features(model.encoder, "toy", "test", ds.test, 16, cache=cache)
    b = ssl_features(model.encoder, "toy", "test", ds.test, 16, cache=cache)
    assert cache.misses == 1 and cache.hits == 1 and torch.equal(a["features"], b["features"])
    assert a["features"].shape == (len(ds.test), model.encoder.feature_dim)


def test_adapter_is_the_only_trained_part():
    torch.manual_seed(0)
    feats, labels = torch.randn(12, 10), torch.arange(3).repeat(4)
    ad = fit_adapter(feats, labels, 3, {"hidden": 8, "epochs": 30, "batch_size": 4, "lr": 1e-2}, seed=1)
    assert isinstance(ad, AdapterMLP) and [n for n, _ in ad.named_parameters()] == [
        "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert (ad(feats).argmax(-1) == labels).float().mean() > 0.9  # it fits its K-shot set
    assert isinstance(AdapterMLP(10, 3, hidden=0).net, torch.nn.Linear)


def test_reproduce_smoke_and_lambda_one_matches_zeroshot_clip(tmp_path, tiny_rn):
    sets = toy_overrides(tmp_path, tiny_rn, FAST)
    svl._RESULTS.clear()
    svl.main(["reproduce", *sets])
    few = load_records(paper="svl_adapter", protocol="fewshot")
    assert {(r["variant"], r["shots"]) for r in few} == {(v, 1) for v in ("tuned", "conf", "ssl")}
    assert all(0 <= r["metrics"]["lambda"] <= 1 for r in few)
    assert [r["variant"] for r in load_records(paper="svl_adapter", protocol="zeroshot")] == ["pseudo"]
    cfg = load_config(svl.CONFIG, "embedded", sets[1::2])
    assert svl.evaluate(cfg) == []  # finished runs are skipped
    # lambda = 1 reproduces the zeroshot_clip baseline's number on the same task
    task = Task(cfg, svl.bundle_for(cfg), build_dataset("toy", cfg["data_root"]), None, 1, None)
    clip = svl._clip_test(cfg, task, "test")
    ours = classification_metrics(fuse(clip, torch.zeros_like(clip), 1.0, cfg["fusion"]), clip.new_tensor(
        [d.label for d in task.dataset.test]).long())
    assert ours == eval_classifier(task, zeroshot_weights(task.bundle, task.dataset, "single"))
