import copy

import pytest
import torch

import papers.wise_ft.__main__ as wise
from common.clip import logit_scale, zeroshot_classifier
from common.config import load_config
from common.data import build_dataset
from common.engine import load_records
from papers.wise_ft.method import (alpha_grid, alpha_name, class_projection, finetune_end_to_end, finetune_linear,
                                   interpolate, mean_std, state_of, zeroshot_head, zeroshot_model)
from tests.fixtures.toy import TOY_CLASSES
from tests.papers.helpers import toy_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


TEMPLATES = ["a photo of a {}.", "a {} object."]
E2E = {"epochs": 1, "lr": 1e-3, "batch_size": 4, "weight_decay": 0.1, "warmup_steps": 1, "grad_clip": 1.0,
       "label_smoothing": 0.0, "crop_scale": [0.9, 1.0], "num_workers": 0}


def _perturbed(theta: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 7) for k, v in theta.items()}


def test_endpoints_reproduce_every_tensor_exactly(tiny_rn):
    """alpha = 0 is the zero-shot model and alpha = 1 the fine-tuned one, bit for bit, BatchNorm counters included."""
    zs = zeroshot_model(tiny_rn, TOY_CLASSES, TEMPLATES)
    theta0 = state_of(zs)
    theta1 = _perturbed(theta0)
    assert any(not v.is_floating_point() for v in theta0.values())  # RN towers carry integer buffers
    for alpha, ref in ((0.0, theta0), (1.0, theta1)):
        out = interpolate(theta0, theta1, alpha)
        assert out.keys() == ref.keys()
        assert all(torch.equal(out[k], ref[k]) and out[k].dtype == ref[k].dtype for k in ref)
        model = copy.deepcopy(zs)
        model.load_state_dict(out)
        assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_interpolation_is_linear_in_between(tiny_rn):
    theta0 = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "n": torch.tensor(2)}
    theta1 = {"w": torch.tensor([[3.0, 2.0], [-1.0, 0.0]]), "n": torch.tensor(6)}
    out = interpolate(theta0, theta1, 0.25)  # by hand: 0.75 * theta0 + 0.25 * theta1
    assert torch.equal(out["w"], torch.tensor([[1.5, 2.0], [2.0, 3.0]]))
    assert out["n"].item() == 3 and out["n"].dtype == torch.int64
    # on a real model: the midpoint of every float tensor, and equal steps along the path
    zs = state_of(zeroshot_model(tiny_rn, TOY_CLASSES, TEMPLATES))
    ft = _perturbed(zs, seed=1)
    mid, q1, q3 = (interpolate(zs, ft, a) for a in (0.5, 0.25, 0.75))
    for k, v in zs.items():
        if v.is_floating_point():
            assert torch.allclose(mid[k], (v + ft[k]) / 2, atol=1e-6)
            assert torch.allclose(mid[k] - q1[k], q3[k] - mid[k], atol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        interpolate(theta0, theta1, 1.5)
    with pytest.raises(ValueError, match="keys"):
        interpolate(theta0, {"w": theta1["w"]}, 0.5)


def test_alpha_grid_and_names():
    grid = alpha_grid(0.05)
    assert len(grid) == 21 and grid[0] == 0.0 and grid[-1] == 1.0 and 0.5 in grid and 0.15 in grid
    assert [alpha_name(a) for a in alpha_grid(0.5)] == ["0", "0.5", "1"]
    with pytest.raises(ValueError):
        alpha_grid(0.3)


def test_zeroshot_model_is_zero_shot_clip(tiny_clip):
    """theta_0 = exp(logit_scale) * cos(image, text classifier): the temperature lives in the head."""
    model = zeroshot_model(tiny_clip, TOY_CLASSES, TEMPLATES)
    images = torch.randn(3, 3, tiny_clip.image_size, tiny_clip.image_size)
    w = zeroshot_classifier(tiny_clip, TOY_CLASSES, TEMPLATES, cache_dir=None)
    with torch.no_grad():
        feats = torch.nn.functional.normalize(tiny_clip.model.encode_image(images), dim=-1)
        ref = logit_scale(tiny_clip) * feats @ w.t()
        assert torch.allclose(model(images), ref, atol=1e-4)
    assert torch.equal(model.head.bias, torch.zeros(len(TOY_CLASSES)))
    assert not any(k.startswith(("transformer", "token_embedding")) for k in model.state_dict())  # no text tower


def test_e2e_trains_tower_and_head_only(tmp_path, tiny_vit):
    toy_overrides(tmp_path, tiny_vit)  # writes the toy data
    ds = build_dataset("toy", tmp_path / "data")
    before_clip = copy.deepcopy(tiny_vit.model.state_dict())
    zs = zeroshot_model(tiny_vit, ds.classnames, TEMPLATES)
    theta0 = state_of(zs)
    ft = finetune_end_to_end(zs, ds.train, E2E, tiny_vit.image_size, *mean_std(tiny_vit), seed=1,
                             out_dir=tmp_path / "ckpt")
    theta1 = state_of(ft)
    assert all(torch.equal(v, theta0[k]) for k, v in zs.state_dict().items())  # theta_0 untouched
    assert all(torch.equal(v, tiny_vit.model.state_dict()[k]) for k, v in before_clip.items())  # CLIP (text too)
    changed = {k for k in theta0 if not torch.equal(theta0[k], theta1[k])}
    assert "head.weight" in changed and "head.bias" in changed
    assert any(k.startswith("visual.") for k in changed)
    assert (tmp_path / "ckpt" / "checkpoint.pt").is_file()
    # a second call resumes from the finished checkpoint: same weights, no training
    again = finetune_end_to_end(zs, ds.train, E2E, tiny_vit.image_size, *mean_std(tiny_vit), seed=1,
                                out_dir=tmp_path / "ckpt")
    assert all(torch.equal(v, theta1[k]) for k, v in state_of(again).items())


def test_lc_trains_head_only_and_weight_ensemble_is_logit_ensemble(tiny_rn):
    torch.manual_seed(0)
    head0 = zeroshot_head(tiny_rn, TOY_CLASSES, TEMPLATES)
    feats, labels = torch.randn(16, tiny_rn.embed_dim), torch.arange(4).repeat(4)
    opts = {"epochs": 5, "lr": 1e-2, "batch_size": 8, "weight_decay": 0.1, "warmup_steps": 0}
    head1 = finetune_linear(head0, feats, labels, opts, seed=1)
    assert not torch.equal(head0.weight, head1.weight) and not torch.equal(head0.bias, head1.bias)
    assert [n for n, _ in head1.named_parameters()] == ["weight", "bias"]  # the tower is not in the LC model
    test = torch.randn(10, tiny_rn.embed_dim)
    for alpha in (0.0, 0.3, 1.0):
        mixed = copy.deepcopy(head0)
        mixed.load_state_dict(interpolate(state_of(head0), state_of(head1), alpha))
        with torch.no_grad():
            assert torch.allclose(mixed(test), (1 - alpha) * head0(test) + alpha * head1(test), atol=1e-5)


def test_class_projection():
    assert class_projection(["a", "b", "c"], ["a", "b", "c"]) is None
    assert class_projection(["a", "b", "c"], ["c", "a"]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="not classes"):
        class_projection(["a", "b"], ["a", "z"])


def test_reproduce_smoke(tmp_path, tiny_vit):
    sets = toy_overrides(tmp_path, tiny_vit, {"datasets": None, "shots": None, "xd_source": None,  # unused by WiSE-FT
                                              "seeds": "[1]", "dg_shots": 2, "e2e.epochs": 1, "e2e.batch_size": 4,
                                              "lc.epochs": 2, "alpha_step": 0.5, "figure_dir": str(tmp_path)})
    wise._STATES.clear()
    wise.main(["reproduce", *sets])
    recs = load_records(paper="wise_ft", protocol="domain_generalization")
    got = {(r["variant"], r["dataset"]) for r in recs}
    assert got == {(f"{k}_a{a}", d) for k in ("e2e", "lc") for a in ("0", "0.5", "1") for d in ("toy", "toy_shift")}
    assert all(r["source"] == "toy" and r["shots"] == 2 for r in recs)
    zs = {r["dataset"]: r["metrics"]["top1"] for r in recs if r["variant"] in ("e2e_a0",)}
    assert zs == {r["dataset"]: r["metrics"]["top1"] for r in recs if r["variant"] == "lc_a0"}  # both start at theta_0
    assert (tmp_path / "wiseft_curve_embedded_tiny-vit.png").stat().st_size > 1000
    assert wise.eval_all(load_config(wise.CONFIG, "embedded", sets[1::2])) == []  # finished runs are skipped
