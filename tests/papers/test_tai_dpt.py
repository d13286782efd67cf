"""TaI-DPT: caption label parsing (nouns, plurals, synonyms, compounds first) on hand-written captions, the corpus
with its template sentences, the ranking loss against hand computation, the local (token / location) aggregation
by hand and its padding mask, prompts initialised from the template giving exactly zero-shot CLIP's scores, the
caption token features, the no-position image features, gradients only into the two contexts, batched runs equal to
separate runs, the min-max ensemble, and a seconds-long train + partial + eval smoke run on a tiny random CLIP."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.engine import TrainConfig
from papers.tai_dpt.fit import build_models, train_many
from papers.tai_dpt.method import (DoubleGrainedPrompt, LabelParser, caption_corpus, encode_caption_tokens,
                                   encode_image_global_dense, ensemble, gather_tokens, global_scores, lemmatize,
                                   local_scores, merged_scores, minmax, predict, ranking_loss, trainable_names)

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["red square", "green circle", "blue triangle"]


# ------------------------------------------------------------------------------------------- label parsing
def test_lemmatize_plural_nouns():
    assert [lemmatize(w) for w in ["stars", "boxes", "benches", "butterflies", "buses", "glass", "leaves", "fish",
                                   "t-shirts", "cup", "bus"]] == \
        ["star", "box", "bench", "butterfly", "bus", "glass", "leaf", "fish", "t-shirt", "cup", "bus"]


def world_parser():
    from papers.tai_dpt.__main__ import world_synonyms
    classes = ["circle", "semicircle", "crescent", "cup", "t-shirt", "fish", "star", "lightning bolt"]
    return classes, LabelParser(world_synonyms(classes, exclude=["top"]))


@pytest.mark.parametrize("caption, expected", [
    ("A photo of two red stars on a beach.", ["star"]),
    ("three mugs and a moon", ["cup", "crescent"]),                 # synonyms, plural
    ("a half circle", ["semicircle"]),                               # compound cut before "circle"
    ("a half circle and two circles", ["circle", "semicircle"]),
    ("a tee, cartoon style", ["t-shirt"]),
    ("some T-shirts among other things", ["t-shirt"]),
    ("#star #red #beach", ["star"]),
    ("a striped fish and a bolt", ["fish", "lightning bolt"]),
    ("two lightning bolts", ["lightning bolt"]),
    ("a starry night at the top", []),                               # whole words only; "top" excluded
    ("a red shape on a blue background", []),
])
def test_parser_labels_hand_written_captions(caption, expected):
    classes, parser = world_parser()
    assert sorted(classes[i] for i in parser.labels(caption)) == sorted(expected)


def test_parser_refuses_a_synonym_of_two_classes():
    with pytest.raises(ValueError, match="two classes"):
        LabelParser([["cup", "mug"], ["mugs"]])


def test_corpus_drops_empty_captions_and_adds_single_label_sentences():
    parser = LabelParser([["square"], ["circle", "ring"]])
    texts, y, n = caption_corpus(["a square", "nothing here", "rings and a square"], ["square", "circle"], parser,
                                 templates=["a sketch of a {}."], n_default=2)
    assert n == 2
    assert texts == ["a square", "rings and a square", "a photo of a square.", "a photo of a square.",
                     "a sketch of a square.", "a photo of a circle.", "a photo of a circle.", "a sketch of a circle."]
    assert y.tolist() == [[1, 0], [1, 1], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]]


# ------------------------------------------------------------------------------------------- scores and loss
def test_ranking_loss_matches_a_hand_computation():
    # sample 1: positive 0 (s 2.0) vs negatives 1 (0.5), 2 (1.2): max(0, 1-2+0.5) + max(0, 1-2+1.2) = 0 + 0.2
    # sample 2: positives 1 (0.3), 2 (-0.4) vs negative 0 (0.0): (1-0.3+0) + (1+0.4+0) = 0.7 + 1.4
    s = torch.tensor([[2.0, 0.5, 1.2], [0.0, 0.3, -0.4]], dtype=torch.float64)
    y = torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.float64)
    assert ranking_loss(s, y).item() == pytest.approx((0.2 + 2.1) / 2, abs=1e-12)
    # margin 0: only sample 2's pair (2, 0) is mis-ordered: max(0, 0 + 0.4 + 0) = 0.4
    assert ranking_loss(s, y, margin=0.0).item() == pytest.approx(0.4 / 2, abs=1e-12)
    # a sample with no negative (or no positive) adds nothing but still counts in the mean
    y2 = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.float64)
    assert ranking_loss(s, y2).item() == pytest.approx(0.2 / 2, abs=1e-12)


def test_local_aggregation_by_hand_and_padding_mask():
    t = torch.eye(2, dtype=torch.float64)                                # class prompts along the axes
    toks = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    c = [1.0, 0.0, 1 / math.sqrt(2)]                                     # cos to class 0 per token
    w = torch.softmax(torch.tensor(c, dtype=torch.float64) * 2.0, 0)
    hand0 = 4.0 * float((w * torch.tensor(c, dtype=torch.float64)).sum())
    out = local_scores(toks, t, tau=2.0)
    assert out[0, 0].item() == pytest.approx(hand0, abs=1e-12)
    valid = torch.tensor([[True, True, False]])
    moved = toks.clone()
    moved[0, 2] = torch.tensor([5.0, -3.0])                             # anything at a padding position
    a, b = local_scores(toks, t, 2.0, valid), local_scores(moved, t, 2.0, valid)
    assert torch.allclose(a, b)
    w2 = torch.softmax(torch.tensor([1.0, 0.0], dtype=torch.float64) * 2.0, 0)
    assert a[0, 0].item() == pytest.approx(4.0 * float(w2[0]), abs=1e-12)
    assert global_scores(toks[:, 2], t)[0].tolist() == pytest.approx([4 / math.sqrt(2)] * 2)
    assert merged_scores(torch.tensor([2.0]), torch.tensor([4.0])).item() == 3.0


def test_minmax_ensemble_uses_one_min_and_max_per_matrix():
    a = torch.tensor([[0.0, 2.0], [4.0, 1.0]])
    b = torch.tensor([[10.0, 30.0], [20.0, 50.0]])
    assert minmax(a).tolist() == [[0.0, 0.5], [1.0, 0.25]]
    out = ensemble(a, b, 0.9)
    # minmax(b) = [[0, 0.5], [0.25, 1]]
    assert out.flatten().tolist() == pytest.approx([0.0, 0.1 * 0.5 + 0.9 * 0.5, 0.1 + 0.9 * 0.25, 0.1 * 0.25 + 0.9])


# ------------------------------------------------------------------------------------------- model
def test_prompts_from_the_template_give_zero_shot_scores(tiny_clip):
    from common.clip import zeroshot_classifier
    model = DoubleGrainedPrompt(tiny_clip, NAMES, ctx_init="a photo of a")
    t_g, t_l = model.text_features()
    zs = zeroshot_classifier(tiny_clip, NAMES, ["a photo of a {}."], cache_dir=None).float()
    assert torch.allclose(t_g, zs, atol=1e-5) and torch.allclose(t_l, zs, atol=1e-5)
    u = torch.randn(5, tiny_clip.embed_dim)
    clip_logits = 100.0 * F.normalize(u, dim=-1) @ zs.t()                # CLIP's zero-shot logits
    assert torch.allclose(global_scores(u, t_g), clip_logits * 4.0 / 100.0, atol=1e-4)
    feats = torch.cat([u[:, None], torch.randn(5, 4, tiny_clip.embed_dim)], 1)
    assert torch.allclose(predict(model, feats)["global"], clip_logits * 0.04, atol=1e-4)


def test_random_init_contexts_are_two_independent_draws(tiny_rn):
    torch.manual_seed(0)
    model = DoubleGrainedPrompt(tiny_rn, NAMES, n_ctx=4)
    assert trainable_names(model) == ["glob.ctx", "loc.ctx"]
    assert model.glob.ctx.shape == (4, model.encoder.width)
    assert not torch.allclose(model.glob.ctx, model.loc.ctx)
    assert 0.01 < float(model.glob.ctx.detach().std()) < 0.03


def test_caption_token_features(tiny_clip):
    from common.clip.text import PromptTextEncoder
    texts = ["a red square.", "two green circles and a blue triangle on a beach", "star"]
    ids = tiny_clip.tokenizer(texts)
    enc = PromptTextEncoder(tiny_clip.model)
    f = encode_caption_tokens(enc, ids, batch_size=2)
    with torch.no_grad():
        ref = F.normalize(tiny_clip.model.encode_text(ids).float(), dim=-1)
    assert torch.allclose(f["eot"], ref, atol=1e-5)
    assert f["length"].tolist() == (ids != 0).sum(1).tolist()
    toks, valid = gather_tokens(f, torch.tensor([2, 0]))
    assert toks.shape[:2] == valid.shape and valid.sum(1).tolist() == [f["length"][2], f["length"][0]]
    # the EOT position of a caption's token sequence is its global feature (the local branch sees it too)
    last = int(f["length"][0]) - 1
    assert torch.allclose(toks[1, last], f["eot"][0], atol=1e-6)


def test_image_features_skip_the_positional_embedding(tiny_rn):
    from common.clip.visual import attention_pool_tokens, resnet_feature_map
    x = torch.randn(2, 3, tiny_rn.image_size, tiny_rn.image_size)
    with torch.no_grad():
        out = encode_image_global_dense(tiny_rn.model, x)
        pool = tiny_rn.model.visual.attnpool
        fmap = resnet_feature_map(tiny_rn.model, x)
        tokens = fmap.flatten(2).transpose(1, 2)
        hand = F.linear(F.linear(tokens, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight, pool.c_proj.bias)
        usual = tiny_rn.model.encode_image(x)
    h = fmap.shape[2] * fmap.shape[3]
    assert out.shape == (2, 1 + h, tiny_rn.embed_dim)
    assert torch.allclose(out[:, 1:], hand, atol=1e-5)
    assert torch.allclose(out[:, 0], attention_pool_tokens(pool, fmap, with_position=False)[:, 0], atol=1e-6)
    assert not torch.allclose(out[:, 0], usual, atol=1e-3)               # CLIP's pooled output uses positions


def test_gradients_reach_only_the_two_contexts(tiny_clip):
    model = DoubleGrainedPrompt(tiny_clip, NAMES, n_ctx=3)
    D = tiny_clip.embed_dim
    s_g, s_l = model.forward_text(torch.randn(4, D), torch.randn(4, 6, D), torch.ones(4, 6, dtype=torch.bool))
    y = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]])
    (ranking_loss(s_g, y) + ranking_loss(s_l, y)).backward()
    assert model.glob.ctx.grad is not None and model.loc.ctx.grad is not None
    assert model.glob.ctx.grad.abs().sum() > 0 and model.loc.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_clip.model.parameters())
    assert trainable_names(model) == ["glob.ctx", "loc.ctx"]


def _text_feats(bundle, n=24, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = bundle.embed_dim
    length = torch.randint(2, L + 1, (n,), generator=g)
    toks = F.normalize(torch.randn(int(length.sum()), D, generator=g), dim=-1)
    start = torch.cat([torch.zeros(1, dtype=torch.long), length.cumsum(0)[:-1]])
    eot = toks[start + length - 1]
    y = (torch.rand(n, len(NAMES), generator=g) < 0.4).float()
    y[y.sum(1) == 0, 0] = 1
    return {"eot": eot, "tokens": toks, "start": start, "length": length}, y


def test_batched_runs_equal_separate_runs(tiny_rn):
    text, y = _text_feats(tiny_rn)
    build = lambda: DoubleGrainedPrompt(tiny_rn, NAMES, n_ctx=2)
    cfgs = [TrainConfig(epochs=2, lr=0.05, seed=s, warmup_epochs=0) for s in (1, 2)]
    subsets = [torch.arange(24), torch.arange(0, 24, 2)]
    together = train_many(build_models(build, [1, 2]), text, y, subsets, cfgs, batch_size=8)
    for r, s in enumerate((1, 2)):
        alone = train_many(build_models(build, [s]), text, y, [subsets[r]], [cfgs[r]], batch_size=8)[0]
        assert torch.allclose(alone.glob.ctx, together[r].glob.ctx, atol=1e-5)
        assert torch.allclose(alone.loc.ctx, together[r].loc.ctx, atol=1e-5)
    assert not torch.allclose(together[0].glob.ctx, build_models(build, [1])[0].glob.ctx)   # it trained


def test_training_lowers_the_ranking_loss(tiny_rn):
    text, y = _text_feats(tiny_rn, n=32, seed=3)
    build = lambda: DoubleGrainedPrompt(tiny_rn, NAMES, n_ctx=2)
    m = train_many(build_models(build, [1]), text, y, [torch.arange(32)],
                   [TrainConfig(epochs=15, lr=0.5, seed=1, warmup_epochs=0)], batch_size=32)[0]
    losses = [h["loss"] for h in m.train_history]
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------- smoke
CAPTIONS = ["a red square and a green circle.", "two blue triangles", "a green circle on a beach",
            "red squares, blue triangle and a green circle", "a yellow star", "nothing at all",
            "A Photo Of A Blue Triangle.", "green circles"]


def _overrides(tmp_path, tiny_rn, extra=None):
    from tests.papers.helpers import toy_overrides
    from tests.papers.test_dualcoop import write_toy_ml
    write_toy_ml(tmp_path / "data")
    cap = tmp_path / "captions.txt"
    cap.write_text("\n".join(CAPTIONS))
    sets = {"datasets": "[toy_ml]", "dg_source": None, "dg_targets": None, "xd_source": None, "shots": None,
            "captions_file": str(cap), "n_ctx": 2, "batch_size": 8, "train.epochs": 2, "templates": "none",
            "n_default": 1, "caption_fractions": "[0.5]", "partial.label_proportions": "[50]",
            "eval_batch_size": 16, "seeds": "[1, 2]"}
    sets.update(extra or {})
    return toy_overrides(tmp_path, tiny_rn, sets)


def test_smoke_train_partial_eval(tmp_path, tiny_rn, monkeypatch):
    from common.config import load_config
    from common.engine.runs import load_records
    from papers.dualcoop.__main__ import CONFIG as DUAL_CONFIG
    from papers.tai_dpt.__main__ import CONFIG, eval_, reproduce
    sets = _overrides(tmp_path, tiny_rn)
    cfg = load_config(CONFIG, "embedded", [s for s in sets if s != "--set"])
    real_load = load_config

    def small_dual(path, profile, overrides=None):     # keep DualCoOp's smoke run seconds-long
        d = real_load(path, profile, overrides)
        if str(path) == str(DUAL_CONFIG):
            d.update(batch_size=6, n_ctx_pos=2, n_ctx_neg=2)
            d["train"]["epochs"] = 2
        return d
    monkeypatch.setattr("papers.tai_dpt.__main__.load_config", small_dual)
    reproduce(cfg)
    recs = load_records(paper="tai_dpt")
    got = {(r["method"], r["variant"], r["shots"], r["seed"]) for r in recs}
    for s in (1, 2):
        assert {("tai_dpt", "", None, s), ("tai_dpt", "global", None, s), ("tai_dpt", "local", None, s),
                ("tai_dpt", "captions50", None, s), ("zeroshot_clip", "single", None, s),
                ("zeroshot_clip", "nopos", None, s), ("dualcoop", "", 50, s), ("tai_dpt", "dualcoop_ens", 50, s)} <= got
    assert all(0 <= r["metrics"]["mAP"] <= 100 for r in recs)
    main_rec = [r for r in recs if r["method"] == "tai_dpt" and r["variant"] == "" and r["seed"] == 1][0]
    assert main_rec["n_captions"] == 7 and "val_mAP" in main_rec["metrics"]
    rescored = eval_(cfg)
    stored = {r["seed"]: r["metrics"]["mAP"] for r in recs if r["method"] == "tai_dpt" and r["variant"] == ""}
    for row in rescored:
        assert row["merged"] == pytest.approx(stored[row["seed"]], abs=1e-3)


def test_bad_options_are_one_line_errors(tmp_path, tiny_rn, capsys):
    from papers.tai_dpt.__main__ import main
    for extra, word in (({"merge_rate": 1.5}, "merge_rate"), ({"captions_file": str(tmp_path / "none.json")}, "captions_file"),
                        ({"partial.label_proportions": "[0, 50]"}, "label_proportions"), ({"shots": "[1]"}, "shots")):
        with pytest.raises(SystemExit) as err:
            main(["train"] + _overrides(tmp_path, tiny_rn, extra))
        assert err.value.code == 2
        msg = capsys.readouterr().err.strip().splitlines()
        assert len(msg) == 1 and word in msg[0], msg
