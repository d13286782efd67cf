import pytest
import torch
import torch.nn.functional as F

import papers.vt_clip.__main__ as vt_main
from common.clip import logit_scale, zeroshot_classifier
from common.data import build_dataset
from common.engine import cosine_logits, load_records
from common.engine.protocols import bundle_for
from common.engine.dense import dense_features, encode_global_and_dense
from papers.calip.method import Calip
from papers.vt_clip.method import VisualGuidedAttention, VTCLIP
from tests.papers.helpers import toy_overrides

NAMES = ["red square", "blue circle", "green star"]


def _feats(bundle, n=5):
    with torch.no_grad():  # as the feature cache does
        t = encode_global_and_dense(bundle.model.eval(), torch.randn(n, 3, bundle.image_size, bundle.image_size))
    return t[:, 0], t[:, 1:]


def _random_block(model: VTCLIP):
    with torch.no_grad():
        for p in model.block.parameters():
            p.normal_(0, 0.2)


def test_alpha_zero_is_zero_shot_clip_exactly(tiny_clip):
    T = zeroshot_classifier(tiny_clip, NAMES, ["a photo of a {}."], cache_dir=None)
    g, d = _feats(tiny_clip)
    zs = cosine_logits(g, T, logit_scale(tiny_clip))
    model = VTCLIP(T, alpha=0.0, logit_scale=logit_scale(tiny_clip), heads=4, zero_init=False).eval()
    _random_block(model)
    assert model.block(model.text_features, d).abs().sum() > 0  # the block is not trivially zero
    out = model(g, d)
    assert torch.allclose(out, zs, atol=1e-5) and torch.equal(out.argmax(-1), zs.argmax(-1))
    model.alpha = 0.5
    assert not torch.allclose(model(g, d), zs, atol=1e-3)


def test_zero_initialised_block_starts_at_zero_shot_for_any_alpha(tiny_rn):
    T = zeroshot_classifier(tiny_rn, NAMES, ["a photo of a {}."], cache_dir=None)
    g, d = _feats(tiny_rn)
    model = VTCLIP(T, alpha=0.7, logit_scale=logit_scale(tiny_rn), heads=4).eval()
    assert torch.equal(model.block(model.text_features, d), torch.zeros(5, 3, tiny_rn.embed_dim))
    assert torch.allclose(model(g, d), cosine_logits(g, T, logit_scale(tiny_rn)), atol=1e-5)


def test_attention_shapes_weights_and_per_image_texts():
    torch.manual_seed(0)
    block = VisualGuidedAttention(32, heads=4, zero_init=False).eval()
    text, tokens = torch.randn(6, 32), torch.randn(3, 9, 32)
    out, w = block.attention(text, tokens)
    assert out.shape == (3, 6, 32) and w.shape == (3, 4, 6, 9)
    assert torch.allclose(w.sum(-1), torch.ones(3, 4, 6), atol=1e-6)  # softmax over the image's locations
    assert block(text, tokens).shape == (3, 6, 32)
    # each image gets its own classifier: image 0 does not see image 1's tokens
    moved = tokens.clone()
    moved[1] += torch.randn(9, 32)  # (a constant shift would vanish in the LayerNorm)
    assert torch.allclose(block(text, moved)[0], block(text, tokens)[0], atol=1e-6)
    assert not torch.allclose(block(text, moved)[1], block(text, tokens)[1], atol=1e-4)
    with pytest.raises(ValueError, match="divisible"):
        VisualGuidedAttention(30, heads=4)
    with pytest.raises(ValueError, match="expected text"):
        block.attention(text[:, :16], tokens)


def test_key_mask_hides_tokens():
    torch.manual_seed(0)
    block = VisualGuidedAttention(16, heads=2, zero_init=False).eval()
    text, tokens = torch.randn(4, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[True, True, False, True, False], [True] * 5])
    _, w = block.attention(text, tokens, mask)
    assert torch.all(w[0, :, :, [2, 4]] == 0) and torch.allclose(w.sum(-1), torch.ones(2, 2, 4), atol=1e-6)
    changed = tokens.clone()
    changed[0, [2, 4]] = 100.0
    assert torch.allclose(block(text, changed, mask), block(text, tokens, mask), atol=1e-6)
    # one visible token: the attention returns exactly that token's projected value
    one = torch.zeros(2, 5, dtype=torch.bool)
    one[:, 3] = True
    out, _ = block.attention(text, tokens, one)
    single, _ = block.attention(text, tokens[:, 3:4])
    assert torch.allclose(out, single, atol=1e-6)
    with pytest.raises(ValueError, match="every token"):
        block.attention(text, tokens, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_mask"):
        block.attention(text, tokens, mask[:, :4])


def test_identity_block_is_calips_visual_guided_text_term(tiny_rn):
    """Identity projections, one head, no LayerNorm/FFN, scale s, no re-normalisation: VT-CLIP with ratio
    alpha is CALIP with beta2 = alpha, beta3 = 0 (the card's degenerate case)."""
    T = zeroshot_classifier(tiny_rn, NAMES, ["a photo of a {}."], cache_dir=None)
    g, d = _feats(tiny_rn)
    model = VTCLIP(T, alpha=0.8, logit_scale=100.0, normalize=False, heads=1, layer_norm=False, ffn=False,
                   attn_scale=2.0, dropout=0.0)
    with torch.no_grad():
        for lin in (model.block.q_proj, model.block.k_proj, model.block.v_proj, model.block.out_proj):
            lin.weight.copy_(torch.eye(tiny_rn.embed_dim))
            lin.bias.zero_()
    assert torch.allclose(model(g, d), Calip(T, beta2=0.8, beta3=0.0, logit_scale=100.0)(g, d), atol=1e-4)


def test_gradients_reach_only_the_block(tiny_rn):
    T = zeroshot_classifier(tiny_rn, NAMES, ["a photo of a {}."], cache_dir=None)
    g, d = _feats(tiny_rn, 6)
    model = VTCLIP(T, alpha=0.5, logit_scale=logit_scale(tiny_rn), heads=4)
    F.cross_entropy(model(g, d), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("block.") for n in names)
    assert model.block.out_proj.weight.grad.abs().sum() > 0  # zero-initialised, yet it learns
    assert not model.text_features.requires_grad
    assert all(p.grad is None for p in tiny_rn.model.parameters())


def test_reproduce_smoke_alpha_zero_run_equals_zero_shot(tmp_path, tiny_rn):
    args = toy_overrides(tmp_path, tiny_rn, {"train.epochs": 2, "shots": "[1]", "ablation.alphas": "[0.0]",
                                             "ablation.shots": "[2]", "block.heads": 2, "cache_views": 2})
    vt_main.main(["reproduce", *args])
    main = load_records(protocol="fewshot", method="vt_clip", variant="")
    assert [(r["shots"], r["seed"], r["metrics"]["alpha"]) for r in main] == [(1, 1, 0.5)]
    ab = load_records(protocol="fewshot", method="vt_clip", variant="alpha0.0")
    assert [(r["shots"], r["metrics"]["alpha"]) for r in ab] == [(2, 0.0)]
    # a trained alpha = 0 model is zero-shot CLIP on the cached test features
    ds = build_dataset("toy", tmp_path / "data")
    feats = dense_features(bundle_for({"arch": "tiny-rn", "pretrained": str(tmp_path / "tiny-rn.pt")}),
                           "toy", "test", ds.test)
    T = zeroshot_classifier(tiny_rn, ds.classnames, [ds.template])
    zs = (cosine_logits(feats["global"], T, 1.0).argmax(-1) == feats["labels"]).float().mean() * 100
    assert ab[0]["metrics"]["top1"] == pytest.approx(float(zs), abs=1e-3)
    assert not list((tmp_path / "runs").rglob("checkpoint.pt"))


def test_alpha_list_is_chosen_on_val(tmp_path, tiny_rn, monkeypatch):
    args = toy_overrides(tmp_path, tiny_rn, {"train.epochs": 1, "shots": "[2]", "alpha": "[0.0, 0.5]",
                                             "cache_views": 1, "block.heads": 2})
    seen = []
    real_top1 = vt_main.top1

    def spy(model, task, split):
        out = real_top1(model, task, split)
        seen.append((split, model.alpha, out["top1"]))
        return out

    monkeypatch.setattr(vt_main, "top1", spy)
    vt_main.main(["train", *args])
    assert [s[:2] for s in seen[:2]] == [("val", 0.0), ("val", 0.5)] and seen[2][0] == "test"
    best = 0.5 if seen[1][2] > seen[0][2] else 0.0  # ties keep the first listed ratio
    assert seen[2][1] == best
    assert load_records(method="vt_clip")[0]["metrics"]["alpha"] == best


def test_attention_equals_torch_multihead_attention():
    """Same weights in nn.MultiheadAttention (queries = the texts, repeated per image): same output."""
    torch.manual_seed(0)
    block = VisualGuidedAttention(32, heads=4, layer_norm=False, ffn=False, zero_init=False).eval()
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([block.q_proj.weight, block.k_proj.weight, block.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([block.q_proj.bias, block.k_proj.bias, block.v_proj.bias]))
        mha.out_proj.weight.copy_(block.out_proj.weight)
        mha.out_proj.bias.copy_(block.out_proj.bias)
    text, tokens = torch.randn(7, 32), torch.randn(3, 5, 32)
    mask = torch.rand(3, 5) > 0.3
    mask[:, 0] = True
    ref, ref_w = mha(text.expand(3, -1, -1), tokens, tokens, key_padding_mask=~mask, average_attn_weights=False)
    out, w = block.attention(text, tokens, mask)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(w, ref_w, atol=1e-6)
