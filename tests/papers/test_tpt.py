"""TPT: the views (torchvision's crop, PIL's AugMix ops), the loss, the AdamW step, batched == per image ==
the per-view loop, the zero-shot equivalence at the initial prompt, and a seconds-long smoke run."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import papers.tpt.__main__ as tpt_main
from common.clip import zeroshot_classifier
from common.engine import load_records
from papers.coop.method import PromptLearner
from papers.tpt import method as M
from papers.tpt import views as V
from tests.fixtures.toy import TOY_CLASSES

NAMES = ["red square", "green circle", "blue triangle", "yellow star"]
SCALE = 100.0
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 255
    return TF.gaussian_blur(x, 5).round().to(torch.uint8)


def pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.permute(1, 2, 0).numpy())


def tensor(p: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(p)).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------------ views

def test_crops_are_torchvisions_random_resized_crop_and_flip():
    images = smooth_images(2, 40)
    d = V.draw_views(2, 12, seed=3)
    crops = V.crop_flip(images, d, 24)
    box = V.crop_boxes(d, 40, 40)
    assert d.flip.any() and not d.flip.all()
    for n in range(2):
        for v in range(12):
            top, left, h, w = box[n, v].tolist()
            assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 40
            ref = TF.resized_crop(images[n].float(), top, left, h, w, [24, 24], InterpolationMode.BICUBIC,
                                  antialias=True)
            ref = ref.flip(-1) if d.flip[n, v] else ref
            assert (ref.round().clamp(0, 255) - crops[n, v].float()).abs().max() <= 1   # rounding at .5
            p = pil(images[n]).crop((left, top, left + w, top + h)).resize((24, 24), Image.BICUBIC)
            p = ImageOps.mirror(p) if d.flip[n, v] else p
            assert (tensor(p).float() - crops[n, v].float()).abs().max() <= 1            # PIL's crop, to a level


def test_crop_boxes_follow_get_params_and_fall_back_to_the_centre():
    d = V.draw_views(50, 20, seed=0)
    box = V.crop_boxes(d, 64, 64).view(-1, 4).double()
    area, ratio = box[:, 2] * box[:, 3] / 64 ** 2, box[:, 3] / box[:, 2]
    assert area.min() > 0.05 and area.max() <= 1 and ratio.min() > 0.6 and ratio.max() < 1.6
    assert area.std() > 0.15                                      # scale (0.08, 1): crops of every size
    # no attempt fits (the whole area at aspect 3/4 is taller than the image): the central crop, whole image
    d.u_scale.fill_(1.0 - 1e-9)
    d.u_ratio.fill_(0.0)
    assert (V.crop_boxes(d, 64, 64) == torch.tensor([0, 0, 64, 64])).all()


def test_views_depend_on_the_seed_and_image_only_not_on_the_batch():
    b = V.draw_views(25, 8, seed=5)                     # a whole split's draws; a subset takes its rows
    assert torch.equal(V.draw_views(25, 8, seed=5).u_scale, b.u_scale) and torch.equal(V.draw_views(25, 8, 5).op, b.op)
    assert not torch.equal(V.draw_views(25, 8, seed=6).u_scale, b.u_scale)
    images = smooth_images(4)
    together = V.render_views(images, b.take(torch.tensor([3, 7, 11, 20])), 16, True, MEAN, STD)
    for j, i in enumerate((3, 7, 11, 20)):
        alone = V.render_views(images[j:j + 1], b.take(slice(i, i + 1)), 16, True, MEAN, STD)
        assert torch.allclose(together[j], alone[0], atol=1e-5)


def test_draws_follow_the_official_distributions():
    d = V.draw_views(200, 63, seed=1)
    assert torch.allclose(d.weights.sum(-1), torch.ones(200, 63))            # Dirichlet(1, 1, 1)
    assert set(d.depth.unique().tolist()) == {1, 2, 3}                       # np.random.randint(1, 4)
    assert set(d.op.unique().tolist()) == set(range(len(V.OPS)))
    assert d.level.min() >= 0.1 and d.level.max() < 1.0                      # sample_level(severity 1)
    assert abs(d.mix.mean().item() - 0.5) < 0.02                             # Beta(1, 1)


@pytest.mark.parametrize("op", V.OPS)
def test_augmix_ops_are_pils(op):
    x = V.crop_flip(smooth_images(2, 48), V.draw_views(2, 10, seed=2), 32).reshape(-1, 3, 32, 32)
    level = torch.linspace(0.1, 0.99, len(x))
    negate = torch.arange(len(x)) % 2 == 0
    ours = V.apply_op(op, x, level, negate)
    mismatched = 0
    for i in range(len(x)):
        p, lv, sign, S = pil(x[i]), float(level[i]), -1 if negate[i] else 1, 32
        ref = {"autocontrast": lambda: ImageOps.autocontrast(p), "equalize": lambda: ImageOps.equalize(p),
               "posterize": lambda: ImageOps.posterize(p, 4 - int(lv * 4 / 10)),
               "solarize": lambda: ImageOps.solarize(p, 256 - int(lv * 256 / 10)),
               "rotate": lambda: p.rotate(sign * int(lv * 30 / 10), resample=Image.BILINEAR),
               "shear_x": lambda: p.transform((S, S), Image.AFFINE, (1, sign * lv * 0.3 / 10, 0, 0, 1, 0),
                                              resample=Image.BILINEAR),
               "shear_y": lambda: p.transform((S, S), Image.AFFINE, (1, 0, 0, sign * lv * 0.3 / 10, 1, 0),
                                              resample=Image.BILINEAR),
               "translate_x": lambda: p.transform((S, S), Image.AFFINE, (1, 0, sign * int(lv * S / 3 / 10), 0, 1, 0),
                                                  resample=Image.BILINEAR),
               "translate_y": lambda: p.transform((S, S), Image.AFFINE, (1, 0, 0, 0, 1, sign * int(lv * S / 3 / 10)),
                                                  resample=Image.BILINEAR)}[op]()
        diff = (tensor(ref).int() - ours[i].int()).abs()
        assert diff.max() <= 1
        mismatched += int((diff > 0).sum())
    assert mismatched <= 0.002 * x.numel()          # float32 resampling: a rare pixel one level off


def test_augmix_mixes_the_chains_with_the_crop():
    crops = V.crop_flip(smooth_images(1), V.draw_views(1, 6, seed=4), 16)
    d = V.draw_views(1, 6, seed=4)
    d.mix.fill_(1.0)
    assert torch.allclose(V.augmix(crops, d), crops.float() / 255)          # m = 1: the plain crop
    d.mix.fill_(0.0)
    d.depth.fill_(1)
    d.op.fill_(V.OPS.index("posterize"))                                    # every chain: posterize to 4 bits
    assert torch.allclose(V.augmix(crops, d), (crops & 0xF0).float() / 255, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the loss

def test_confident_views_keep_the_lowest_entropy_int_n_rho():
    logits = torch.zeros(1, 20, 4)
    sharp = [3, 11, 17]
    for rank, i in enumerate(sharp):
        logits[0, i, 0] = 10.0 - rank                 # view 3 the most confident, then 11, then 17
    assert M.confident_views(logits, 0.1).tolist() == [[3, 11]]                 # int(20 * 0.1) = 2
    assert M.confident_views(logits, 0.15).tolist() == [[3, 11, 17]]            # int(3.0) = 3
    with pytest.raises(ValueError, match="keeps no view"):
        M.confident_views(logits, 0.04)


def test_marginal_entropy_is_the_entropy_of_the_mean_probability():
    logits = torch.randn(3, 6, 5, dtype=torch.float64) * 3
    p_bar = logits.softmax(-1).mean(1)
    assert torch.allclose(M.marginal_entropy(logits), -(p_bar * p_bar.log()).sum(-1))
    same = torch.tensor([[[2.0, 0.0, 0.0]] * 4])       # identical views: H(mean) = H(each)
    assert torch.allclose(M.marginal_entropy(same), M.entropy(same[:, 0]))


# ------------------------------------------------------------------------------------------------ the step

@pytest.fixture
def learner(tiny_vit):
    return PromptLearner(tiny_vit, NAMES, ctx_init="a photo of a")


def view_feats(B: int, N: int = 10, D: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, N, D, generator=g), dim=-1)


def test_initial_prompt_is_zero_shot_clip_with_a_photo_of_a(learner, tiny_vit):
    text = M.class_features(learner, learner.ctx.detach().unsqueeze(0))[0]
    zs = zeroshot_classifier(tiny_vit, NAMES, ["a photo of a {}."])
    assert torch.allclose(text, zs, atol=1e-5)
    feats = view_feats(3)
    at_init = M.tpt_predict(learner, learner.ctx, feats, SCALE, rho=0.2, steps=0)   # no step: zero-shot logits
    assert torch.allclose(at_init, SCALE * feats[:, 0] @ zs.t(), atol=1e-3)


def test_shared_prefix_text_equals_the_full_prompts(learner):
    ctx = learner.ctx.detach() + 0.05 * torch.randn(3, *learner.ctx.shape)
    full = torch.stack([learner.class_embeddings(c) for c in ctx])
    assert torch.allclose(M.class_features(learner, ctx), full, atol=1e-5)


def test_one_step_is_a_fresh_adamw_step_on_the_marginal_entropy(learner):
    feats, lr, wd = view_feats(1, N=20), 5e-3, 0.01
    ctx = learner.ctx.detach().clone().unsqueeze(0).requires_grad_(True)
    logits = SCALE * torch.einsum("bnd,bkd->bnk", feats, M.class_features(learner, ctx))
    keep = M.entropy(logits.detach()[0]).argsort()[:2]                         # int(20 * 0.1) = 2 views
    p_bar = logits[0, keep].softmax(-1).mean(0)
    (-(p_bar * p_bar.log()).sum()).backward()
    g = ctx.grad[0]
    # Adam's first step from a fresh state: m_hat = g, v_hat = g^2; AdamW decays the weights first
    expected = learner.ctx.detach() * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
    tuned = M.tpt_tune(learner, learner.ctx, feats, SCALE, rho=0.1, lr=lr, steps=1, weight_decay=wd)
    assert g.abs().max() > 0
    assert torch.allclose(tuned[0], expected, atol=1e-6)
    assert not torch.equal(tuned[0], learner.ctx.detach())


def test_batched_images_equal_one_at_a_time_and_nothing_else_learns(learner, tiny_vit):
    feats = view_feats(5, N=20)
    ctx0 = learner.ctx.detach().clone()
    batched = M.tpt_predict(learner, learner.ctx, feats, SCALE, rho=0.1, steps=2)
    alone = torch.cat([M.tpt_predict(learner, learner.ctx, feats[i:i + 1], SCALE, rho=0.1, steps=2)
                       for i in range(5)])
    assert torch.allclose(batched, alone, atol=1e-4) and torch.equal(batched.argmax(-1), alone.argmax(-1))
    assert torch.equal(learner.ctx.detach(), ctx0)                              # reset: the init is untouched
    assert all(p.grad is None for p in tiny_vit.model.parameters())             # CLIP stays frozen
    zs = M.tpt_predict(learner, learner.ctx, feats, SCALE, rho=0.1, steps=0)
    assert not torch.allclose(batched, zs, atol=1e-3)                           # the step changes the prediction


def test_views_are_selected_once_on_the_first_step(learner, monkeypatch):
    calls = []
    real = M.confident_views
    monkeypatch.setattr(M, "confident_views", lambda logits, rho: calls.append(1) or real(logits, rho))
    M.tpt_tune(learner, learner.ctx, view_feats(2, N=20), SCALE, rho=0.1, steps=3)
    assert len(calls) == 1


def test_the_batched_pipeline_equals_the_per_view_loop(tiny_rn):
    learner = PromptLearner(tiny_rn, NAMES, ctx_init="a photo of a")
    model, S = tiny_rn.model.eval(), tiny_rn.image_size
    images = smooth_images(3, 40, seed=1)
    draws = V.draw_views(3, 7, seed=9)
    test_feats = torch.randn(3, tiny_rn.embed_dim)
    for augmix in (False, True):
        feats = M.view_features(model, list(images), draws, test_feats, S, augmix, MEAN, STD)
        assert feats.shape == (3, 8, tiny_rn.embed_dim)
        batched = M.tpt_predict(learner, learner.ctx, feats, SCALE, rho=0.25)
        loop = M.tpt_loop(learner, learner.ctx, model, test_feats, list(images), draws, S, augmix, MEAN, STD, SCALE,
                          rho=0.25)
        assert torch.allclose(batched, loop, atol=1e-3) and torch.equal(batched.argmax(-1), loop.argmax(-1))


# ------------------------------------------------------------------------------------------------ protocol

def test_stratified_subset():
    from common.data import Datum
    items = [Datum(f"{i}.png", i % 4) for i in range(40)] + [Datum("x.png", 3)]
    idx = tpt_main.stratified(items, 10, seed=0)
    counts = np.bincount([items[i].label for i in idx], minlength=4)
    assert len(idx) == 10 and counts.max() - counts.min() <= 1 and idx == sorted(idx)
    assert idx == tpt_main.stratified(items, 10, seed=0) != tpt_main.stratified(items, 10, seed=1)
    assert tpt_main.stratified(items, None, 0) == list(range(41))


def smoke_args(tmp_path, bundle, **extra):
    from tests.papers.helpers import toy_overrides
    args = toy_overrides(tmp_path, bundle, {"shots": None, "xd_source": None, "datasets": "[toy_shift]", "n_views": 8,
                                            "selection": 0.25, "chunk": 3, "coop_init.epochs": 1,
                                            "ablation.backbones": "[tiny-vit]",
                                            "ablation.variants": "{rho1: {selection: 1.0}, views4: {n_views: 4}}",
                                            "reproduce.backbones": "{}", "benchmark.datasets": "[toy]",
                                            "benchmark.images": 3, "benchmark.out_dir": str(tmp_path), **extra})
    return args


def test_smoke_reproduce_and_benchmark(tmp_path, tiny_vit, capsys):
    args = smoke_args(tmp_path, tiny_vit, test_per_set=6)
    tpt_main.main(["reproduce"] + args)
    recs = load_records(paper="tpt")
    by = {(r["method"], r["dataset"], r["seed"]) for r in recs}
    assert {("tpt", "toy", 1), ("tpt", "toy_shift", 1), ("tpt_coop", "toy", 1), ("tpt_coop", "toy_shift", 1),
            ("coop", "toy_shift", 1), ("zeroshot_clip", "toy_shift", 0)} <= by
    assert {(r["variant"], r["dataset"]) for r in recs if r["method"] == "tpt" and r["variant"]} == \
        {(v, d) for v in ("rho1", "views4") for d in ("toy", "toy_shift")}     # ablations on the dg sets
    tc = [r for r in recs if r["method"] == "tpt_coop"]
    assert all(r["shots"] == 16 and r["source"] == "toy" and r["protocol"] == "test_time" for r in tc)
    assert all(r["n_test"] == 6 for r in recs) and len(TOY_CLASSES) == 4
    assert {r["group"] for r in recs} == {"domain_generalization"}             # toy_shift is a dg target here
    capsys.readouterr()
    tpt_main.main(["reproduce"] + args)                                          # finished runs are skipped
    assert "tpt" not in capsys.readouterr().out
    tpt_main.main(["benchmark"] + args)
    rows = json.loads((tmp_path / "benchmark.json").read_text())
    assert rows[0]["same_predictions"] and rows[0]["images"] == 3 and (tmp_path / "benchmark.png").is_file()


@pytest.mark.parametrize("override, message", [
    ("selection=0.01", "selection must be in (0, 1]"), ("n_views=1", "n_views must be >= 2"),
    ("coop_init.variant=m5_end", "unknown CoOp variant"), ("test_per_set=0", "test_per_set must be >= 1"),
    ("tpt_coop_on=[fewshot]", "tpt_coop_on: unknown"), ("shots=[16]", "does not use 'shots'"),
    ("ablation.variants={v: {n_views: 9}}", "must keep 2 <= n_views <= 8"),
    ("ablation.variants={v: {views: 4}}", "unknown options ['views']")])
def test_bad_input_is_one_line_before_any_work(tmp_path, tiny_vit, capsys, override, message):
    args = smoke_args(tmp_path, tiny_vit) + ["--set", override]
    with pytest.raises(SystemExit) as err:
        tpt_main.main(["reproduce"] + args)
    assert err.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in line and not load_records(paper="tpt")
