"""DenseCLIP: the score map against a hand-computed sum, context-aware prompting at gamma 0, the prompt layout
against CLIP's own text encoder, the attention pool on all tokens, losses and schedule against hand-computed
values, gradients only where the paper trains, the cached-view regime against the tower, and seconds-long smoke
runs of the entry point (frozen tower on a toy set, fine-tuned tower on an ADE20K-layout fixture)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.clip import tokenize
from common.clip.text import PromptTextEncoder, encode_text
from common.engine import load_records
from papers.denseclip import __main__ as dc
from papers.denseclip.method import (FIXED_TEMPLATE, ClassPrompts, ContextDecoder, DenseCLIP, FPNHead,
                                     context_aware_update, denseclip_loss, poly_lr, score_map, seg_loss)
from papers.denseclip.segment import FeatureBank, augment, rescale_size, slide_logits
from tests.papers.helpers import toy_overrides
from tests.papers.test_maskclip import write_toy_seg

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["red", "green", "blue"]


# ------------------------------------------------------------------------------------------ score maps
def test_score_map_is_the_cosine_of_every_pixel_with_every_class():
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 5, 3, 4, generator=g), torch.randn(6, 5, generator=g)
    s = score_map(z, t)
    assert s.shape == (2, 6, 3, 4)
    for b in range(2):
        for k in range(6):
            for i in range(3):
                for j in range(4):
                    v = z[b, :, i, j]
                    want = float((v @ t[k]) / (v.norm() * t[k].norm()))
                    assert abs(float(s[b, k, i, j]) - want) < 1e-5
    tb = torch.randn(2, 6, 5, generator=g)          # per-image class embeddings (after context-aware prompting)
    assert torch.allclose(score_map(z, tb)[1], score_map(z[1:], tb[1])[0], atol=1e-6)


# ----------------------------------------------------------------------------- context-aware prompting
def test_gamma_zero_leaves_text_unchanged_and_gamma_scales_the_decoder_output():
    torch.manual_seed(0)
    dec = ContextDecoder(visual_dim=16, width=8, heads=2, layers=2, dropout=0.0).eval()
    t, vis = torch.randn(5, 16), torch.randn(3, 7, 16)
    out0 = context_aware_update(t, vis, dec, torch.zeros(16))
    assert out0.shape == (3, 5, 16) and torch.equal(out0, t.expand(3, -1, -1))
    g = torch.full((16,), 1e-4)
    out = context_aware_update(t, vis, dec, g)
    assert torch.allclose(out - t, 1e-4 * dec(t.expand(3, -1, -1), vis), atol=1e-6)
    assert (out - t).abs().max() > 0 and (out - t).abs().max() < 1e-3     # tiny residual at initialisation
    # the decoder sees the image: different visual context, different update
    assert not torch.allclose(dec(t.expand(3, -1, -1), vis)[0], dec(t.expand(3, -1, -1), vis.flip(0))[0])


def test_decoder_queries_attend_to_each_other_and_the_memory_only():
    """Permuting the memory tokens leaves the update unchanged (cross-attention is a set operation)."""
    torch.manual_seed(1)
    dec = ContextDecoder(visual_dim=16, width=8, heads=2, layers=3, dropout=0.0).eval()
    t, vis = torch.randn(1, 4, 16), torch.randn(1, 6, 16)
    assert torch.allclose(dec(t, vis), dec(t, vis[:, torch.randperm(6)]), atol=1e-5)


# ---------------------------------------------------------------------------------------------- text side
def test_learned_prompt_layout_matches_clips_encoder_on_the_same_tokens(tiny_rn):
    """With the 8 context vectors set to the token embeddings of 8 words, the class embedding equals CLIP's
    encode_text of "<8 words> <name>" (no template, no period): SOS, context, name, EOT at name EOT + 8."""
    cp = ClassPrompts(tiny_rn, NAMES, "learned", n_ctx=8, class_len=5)
    words = "one two three four five six seven eight"
    ids = tokenize(tiny_rn, [words])
    assert int(ids.argmax(-1)) == 9                          # 8 single-token words
    with torch.no_grad():
        cp.ctx.copy_(cp.encoder.embed(ids)[0, 1:9])
        got = cp()
        want = encode_text(PromptTextEncoder(tiny_rn.model), tokenize(tiny_rn, [f"{words} {n}" for n in NAMES]))
    assert torch.allclose(got, want, atol=1e-5)
    name_eot = tokenize(tiny_rn, NAMES).argmax(-1)
    assert torch.equal(cp.token_ids.argmax(-1), name_eot + 8)


def test_fixed_prompt_is_zero_shot_text_and_context_init_is_truncated_normal(tiny_rn):
    cp = ClassPrompts(tiny_rn, NAMES, "fixed")
    with torch.no_grad():
        want = tiny_rn.model.encode_text(tokenize(tiny_rn, [FIXED_TEMPLATE.format(n) for n in NAMES]))
        assert torch.allclose(cp(), want, atol=1e-5)
    assert not any(p.requires_grad for p in cp.parameters())                 # nothing learned
    torch.manual_seed(0)
    learned = ClassPrompts(tiny_rn, NAMES, "learned", n_ctx=8, init_std=1.0)
    assert float(learned.ctx.detach().abs().max()) <= 2.0 and 0.6 < float(learned.ctx.detach().std()) < 1.0   # trunc_normal_(std 1, +-2)
    with pytest.raises(ValueError, match="class_len"):
        ClassPrompts(tiny_rn, ["a very long class name with many words"], "learned", class_len=5)


def test_pre_model_context_is_per_image(tiny_rn):
    torch.manual_seed(0)
    m = DenseCLIP(tiny_rn, NAMES, "pre_model", fpn_channels=16, decoder_width=16, freeze_backbone=True).eval()
    feats, g, z = m.backbone(torch.randn(2, 3, 64, 64))
    vc = torch.cat([g.unsqueeze(1), z.flatten(2).transpose(1, 2)], 1)
    t = m.text_embeddings(vc)
    assert t.shape == (2, 3, tiny_rn.embed_dim) and not torch.allclose(t[0], t[1])
    ctx = m.prompter(vc)
    with torch.no_grad():
        single = m.text(ctx[1:2])
    assert torch.allclose(single[0], t[1], atol=1e-5)


# ---------------------------------------------------------------------------------------------- image side
def test_attention_pool_on_all_tokens_gives_the_global_embedding(tiny_rn):
    m = DenseCLIP(tiny_rn, NAMES, "post", fpn_channels=16, decoder_width=16, freeze_backbone=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, g, z = m.backbone(x)
        assert torch.allclose(g, tiny_rn.model.encode_image(x), atol=1e-5)
        assert [f.shape[-1] for f in feats] == [16, 8, 4, 2] and z.shape == (2, tiny_rn.embed_dim, 2, 2)
        # a larger input: positions resized bilinearly, a 4x4 grid of dense embeddings
        feats2, _, z2 = m.backbone(torch.randn(1, 3, 128, 128))
        assert z2.shape[-2:] == (4, 4)


def test_vit_pyramid_and_embeddings(tiny_vit):
    m = DenseCLIP(tiny_vit, NAMES, "post", fpn_channels=16, decoder_width=16, freeze_backbone=True).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        feats, g, z = m.backbone(x)
        assert [f.shape[-1] for f in feats] == [12, 6, 3, 1]        # strides 4, 8, 16, 32 of a 6x6 patch-8 grid
        assert torch.allclose(g, tiny_vit.model.encode_image(x), atol=1e-5)
        out = m(x)
    assert out["logits"].shape == (2, 3, 12, 12) and out["score_map"].shape == (2, 3, 6, 6)
    assert m.score_concat_index == 1                                  # the patch grid's own level


def test_fpn_head_outputs_stride_four():
    head = FPNHead(8, 5, [4, 8, 16, 32])
    feats = [torch.randn(2, 8, 16 // (2 ** i), 16 // (2 ** i)) for i in range(4)]
    assert head(feats).shape == (2, 5, 16, 16)
    assert [sum(isinstance(m, torch.nn.Conv2d) for m in h.modules()) for h in head.scale_heads] == [1, 1, 2, 3]


# --------------------------------------------------------------------------------------- what is trained
@pytest.mark.parametrize("variant, frozen", [("post", True), ("post", False), ("baseline", False), ("fixed", True)])
def test_gradients_only_where_the_paper_trains(tiny_rn, variant, frozen):
    torch.manual_seed(0)
    m = DenseCLIP(tiny_rn, NAMES, variant, fpn_channels=16, decoder_width=16, freeze_backbone=frozen)
    m.train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    loss, _ = denseclip_loss(m(x), y, 0.4 if m.aux else 0.0, 0.07)
    loss.backward()
    named = dict(m.named_parameters())
    text = [n for n in named if n.startswith("text.encoder.")]
    assert all(named[n].grad is None and not named[n].requires_grad for n in text)      # text tower frozen (x 0)
    backbone = [n for n in named if n.startswith("backbone.")]
    if frozen:
        assert all(named[n].grad is None for n in backbone)
    else:
        assert any(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in backbone)
    for n in ("neck.lateral.3.weight", "head.conv_seg.weight"):
        assert named[n].grad.abs().sum() > 0
    if variant == "post":
        assert named["text.ctx"].grad.abs().sum() > 0 and named["gamma"].grad.abs().sum() > 0
        assert named["context_decoder.out_proj.1.weight"].grad.abs().sum() > 0
    if variant == "baseline":
        assert not hasattr(m, "text") and m.backbone.visual.attnpool is None
    if variant == "fixed":
        assert not hasattr(m.text, "ctx")
    assert all(not p.requires_grad for p in tiny_rn.model.parameters())       # the shared bundle is untouched


def test_param_groups_follow_the_official_paramwise_cfg(tiny_rn):
    m = DenseCLIP(tiny_rn, NAMES, "post", fpn_channels=16, decoder_width=16)
    groups = m.param_groups(1e-4, 1e-4, 0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(m.backbone.visual.conv1.weight)]["lr"] == pytest.approx(1e-5)
    assert by_id[id(m.backbone.visual.bn1.weight)]["weight_decay"] == 0.0
    assert by_id[id(m.head.conv_seg.weight)]["lr"] == pytest.approx(1e-4)
    assert by_id[id(m.head.conv_seg.weight)]["weight_decay"] == pytest.approx(1e-4)
    assert id(m.text.encoder.token_embedding.weight) not in by_id
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in m.parameters())


# ----------------------------------------------------------------------------------- losses, schedule
def test_seg_loss_ignores_255_averages_all_pixels_and_upsamples_bilinearly():
    logits = torch.tensor([[[[2.0]], [[0.0]]]])                    # (1, 2, 1, 1): upsampled to a constant 2x2
    target = torch.tensor([[[0, 1], [255, 255]]])
    # mmseg 0.19: ignored pixels count 0 and the mean runs over all 4 pixels
    want = 0.25 * (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (math.exp(2) + 1)))
    assert float(seg_loss(logits, target)) == pytest.approx(want, rel=1e-6)
    assert float(seg_loss(logits, torch.full((1, 2, 2), 255))) == 0.0


def test_total_loss_is_head_plus_weighted_score_map_term():
    g = torch.Generator().manual_seed(0)
    out = {"logits": torch.randn(2, 3, 4, 4, generator=g), "score_map": torch.rand(2, 3, 2, 2, generator=g)}
    y = torch.randint(0, 3, (2, 8, 8), generator=g)
    total, logs = denseclip_loss(out, y, 0.4, 0.07)
    want = seg_loss(out["logits"], y) + 0.4 * seg_loss(out["score_map"] / 0.07, y)
    assert float(total) == pytest.approx(float(want), rel=1e-6) and set(logs) == {"loss_seg", "loss_aux"}
    only, _ = denseclip_loss(out, y, 0.0, 0.07)
    assert float(only) == pytest.approx(float(seg_loss(out["logits"], y)), rel=1e-6)


def test_poly_schedule_with_linear_warmup():
    assert poly_lr(1e-4, 0, 100) == pytest.approx(1e-4)
    assert poly_lr(1e-4, 50, 100) == pytest.approx((1e-4 - 1e-6) * 0.5 ** 0.9 + 1e-6)
    assert poly_lr(1e-4, 100, 100) == pytest.approx(1e-6)
    assert poly_lr(1e-4, 0, 100, warmup_iters=10) == pytest.approx(1e-4 * 1e-6)
    assert poly_lr(1e-4, 5, 100, warmup_iters=10) == pytest.approx(
        ((1e-4 - 1e-6) * 0.95 ** 0.9 + 1e-6) * (1 - 0.5 * (1 - 1e-6)))


# ------------------------------------------------------------------------------------- data regimes
def test_cached_flip_view_is_the_tower_on_the_flipped_image(tiny_rn):
    torch.manual_seed(0)
    m = DenseCLIP(tiny_rn, NAMES, "post", fpn_channels=16, decoder_width=16, freeze_backbone=True)
    x = torch.randn(3, 3, 64, 64)
    bank = FeatureBank(m, x, flip=True)
    feats, g, z = bank.gather(torch.tensor([0, 2]), torch.tensor([1, 0]))
    with torch.no_grad():
        f_flip, g_flip, z_flip = m.backbone(x[:1].flip(-1))
        f_2, _, _ = m.backbone(x[2:3])
    assert torch.allclose(feats[0][0], f_flip[0][0], atol=1e-5) and torch.allclose(g[0], g_flip[0], atol=1e-5)
    assert torch.allclose(z[0], z_flip[0], atol=1e-5) and torch.allclose(feats[3][1], f_2[3][0], atol=1e-5)
    m.train()
    assert not m.backbone.visual.training          # a frozen tower keeps its BatchNorm statistics


def test_augment_and_slide_inference():
    import random as _r
    from PIL import Image
    im = Image.fromarray(np.full((40, 60, 3), 128, np.uint8))
    mask = np.zeros((40, 60), np.int64)
    mask[:, 30:] = 1
    x, y = augment(im, mask, (120, 40), 32, _r.Random(0), (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and set(np.unique(y.numpy())) <= {0, 1, 255}
    assert rescale_size(60, 40, (2048, 512)) == (768, 512)

    class Const(torch.nn.Module):
        num_classes = 2

        def forward(self, img):
            return {"logits": img[:, :2]}
    img = torch.randn(1, 3, 50, 70)
    out = slide_logits(Const(), img, crop=32, stride=20)
    assert torch.allclose(out, img[:, :2], atol=1e-6)          # averaging identical overlapping windows


# -------------------------------------------------------------------------------------------- entry point
def _args(tmp_path, bundle, extra=None):
    write_toy_seg(tmp_path / "data")
    return toy_overrides(tmp_path, bundle, {"datasets": "[toy_seg]", "shots": None, "dg_source": None,
                                            "dg_targets": None, "xd_source": None, "seeds": "[1, 2]",
                                            "train.epochs": 2, "figure_images": 2, "batch_size": 2,
                                            "figure_dir": str(tmp_path / "figs"), **(extra or {})})


def test_reproduce_smoke_records_variants_and_figure(tmp_path, tiny_rn):
    ckpt = tmp_path / "tiny-rn.pt"
    args = _args(tmp_path, tiny_rn, {"reproduce_backbones": f"{{tiny-rn: {ckpt}}}",
                                     "variants": "[post, no_context, pre_model, fixed, no_aux, baseline]",
                                     "model.decoder_width": 16, "model.fpn_channels": 16})
    dc.main(["reproduce", *args])
    recs = load_records(paper="denseclip", protocol="segmentation")
    assert len(recs) == 6 * 2 and {r["seed"] for r in recs} == {1, 2}
    assert {(r["method"], r["variant"]) for r in recs} == {("clip_fpn", "")} | {
        ("denseclip", v) for v in ("post", "no_context", "pre_model", "fixed", "no_aux")}
    for r in recs:
        m = r["metrics"]
        assert 0 <= m["miou"] <= 100 and r["n_classes"] == 3 and r["frozen_backbone"] is True
        assert ("miou_score_map" in m) == (r["method"] == "denseclip") and r["train"]["steps"] == 2
    post = [r for r in recs if r["variant"] == "post"]
    assert all(r["gamma_mean"] is not None for r in post)
    assert (tmp_path / "figs" / "overlays_embedded_toy_seg_tiny-rn.png").is_file()
    assert dc.main(["eval", *args[:-2], "--set", "variants=[post, baseline]"]) == []     # finished runs skipped


def test_seeds_are_deterministic(tmp_path, tiny_rn):
    args = _args(tmp_path, tiny_rn, {"variants": "[post]", "seeds": "[1]", "model.decoder_width": 16,
                                     "model.fpn_channels": 16})
    dc.main(["train", *args])
    first = load_records(paper="denseclip")[0]["metrics"]
    dc.main(["train", *args, "--set", "force=true"])
    assert load_records(paper="denseclip")[0]["metrics"] == first


@pytest.mark.parametrize("override, message", [
    ("variants=[post, nope]", "variants"),
    ("model.decoder_heads=3", "divisible"),
    ("tau=0", "tau"),
    ("convergence_lr_factors=[3, 10]", "including 1"),
    ("datasets=[toy]", "no segmentation masks"),
    ("shots=[1]", "does not use"),
    ("train.lr=-1", "lr"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, tiny_rn, capsys, override, message):
    args = _args(tmp_path, tiny_rn)
    if override.startswith("datasets=[toy]"):
        from tests.fixtures.toy import write_toy
        write_toy(tmp_path / "data", "toy")
    with pytest.raises(SystemExit) as exc:
        dc.main(["train", *args, "--set", override])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert load_records(paper="denseclip") == []


def test_real_profile_fine_tunes_the_tower_on_an_ade20k_fixture(tmp_path, tiny_rn):
    from common.clip import save_clip_checkpoint
    from tests.fixtures import real_layouts as rl
    root = tmp_path / "DATA"
    rl.make_ade20k(root)
    ckpt = save_clip_checkpoint(tiny_rn.model, tmp_path / "rn.pt")
    sets = {"arch": "tiny-rn", "pretrained": str(ckpt), "data_root": str(root), "seeds": "[1]", "train.epochs": 1,
            "batch_size": 2, "crop_size": 64, "train_scale": "[128, 64]", "test_stride": 48, "workers": 1,
            "model.decoder_width": 16, "model.fpn_channels": 16, "model.class_len": 8}
    dc.main(["train", "--profile", "real", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    recs = load_records(paper="denseclip", profile="real")
    assert {(r["method"], r["variant"]) for r in recs} == {("denseclip", "post"), ("clip_fpn", "")}
    assert all(r["n_classes"] == 150 and r["frozen_backbone"] is False for r in recs)
    assert json.loads(json.dumps(recs[0]["metrics"]))["miou"] >= 0


def test_convergence_study_records_lr_grid_budgets_and_val_curve(tmp_path, tiny_rn, monkeypatch):
    real = {"train": {"epochs": 4, "lr": 1e-4}}
    monkeypatch.setattr(dc, "load_config", lambda path, profile: real)
    out = tmp_path / "convergence.json"
    args = _args(tmp_path, tiny_rn, {"convergence_lr_factors": "[1, 10]", "convergence_out": str(out),
                                     "model.decoder_width": 16, "model.fpn_channels": 16})
    dc.main(["convergence", *args])
    rec = json.loads(out.read_text())
    assert rec["budgets"] == [1, 2, 4] and set(rec["mean_val_by_lr"]) == {"1.0", "10.0"}
    assert rec["justified_epochs"] in (1, 2, 4) and rec["lr"] in (1e-4, 1e-3)
    curve = rec["datasets"]["toy_seg"]["val_curve"]
    assert curve and curve[-1]["step"] == 4 * 1        # 2 train images at batch 2: one step per epoch
