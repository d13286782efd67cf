import math

import pytest
import torch
import torch.nn.functional as F

import papers.lasp.__main__ as lasp_main
from common.clip import zeroshot_classifier
from common.config import load_config
from common.data import build_dataset, fewshot_split, subsample_classes
from common.engine import TrainConfig, load_records
from common.engine.protocols import Task
from papers.coop.method import PromptLearner, coop_logits, train_coop
from papers.lasp.method import (GroupLRTrainer, LaspLoss, LaspModel, LaspPromptLearner, recalibrated_visual,
                                split_templates, text_to_text_loss, train_lasp, vit_from_tokens, vit_tokens)
from tests.papers.helpers import toy_overrides

BASE, NOVEL = ["red square", "green circle"], ["blue triangle", "yellow star"]


def test_text_to_text_loss_against_a_hand_computed_example():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])           # learned class embeddings w_0, w_1
    t = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])         # one template: t_0, t_1
    # template class j is a sample classified by the learned w_i: logits_j = (<t_j, w_0>, <t_j, w_1>)
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-0.2))) / 2
    assert text_to_text_loss(w, t, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # the other softmax axis (learned prompts classified by the templates) gives another value here
    other = (math.log(1 + math.exp(0.6 - 1.0)) + math.log(1 + math.exp(-0.8))) / 2
    assert abs(other - expected) > 1e-2
    # two templates average over (l, j); scale multiplies the logits
    t2 = torch.cat([t, t.flip(1)])
    flipped = (math.log(1 + math.exp(0.8 - 0.6)) + math.log(1 + math.exp(1.0))) / 2
    assert text_to_text_loss(w, t2, 1.0).item() == pytest.approx((expected + flipped) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="templates"):
        text_to_text_loss(w, t[0], 1.0)


def test_at_init_prompts_are_zero_shot_and_the_loss_is_tt_of_the_zero_shot_embeddings(tiny_vit):
    learner = LaspPromptLearner(tiny_vit, BASE, bias=True)
    zs = zeroshot_classifier(tiny_vit, BASE, ["a photo of a {}."], cache_dir=None)
    with torch.no_grad():
        assert torch.allclose(learner.class_embeddings(), zs, atol=1e-5)
        loss = LaspLoss(tiny_vit, learner, BASE, ["a photo of a {}.", "{} texture."], weight=5.0, noise_std=0)
        tex = zeroshot_classifier(tiny_vit, BASE, ["{} texture."], cache_dir=None)
        expected = text_to_text_loss(zs, torch.stack([zs, tex]), loss.scale)
        assert loss.tt_loss(learner).item() == pytest.approx(expected.item(), rel=1e-4)


def test_zero_weight_is_coop_loss_and_coop_training(tmp_path, tiny_vit):
    learner = LaspPromptLearner(tiny_vit, BASE)
    loss = LaspLoss(tiny_vit, learner, BASE, weight=0.0)
    feats, labels = torch.randn(4, tiny_vit.embed_dim), torch.tensor([0, 1, 1, 0])
    w = learner.class_embeddings()
    logits = coop_logits(feats, w, 100.0)
    assert loss(learner, logits, labels, w)[0].item() == pytest.approx(F.cross_entropy(logits, labels).item())
    # whole training: the coop variant (weight 0, no re-calibration) is CoOp M=4 "a photo of a"
    cfg = lasp_main.with_variant(_cfg(tmp_path, tiny_vit), "coop")
    ds = fewshot_split(build_dataset("toy", cfg["data_root"]), 2, 1)
    ours = train_lasp(Task(cfg, tiny_vit, ds, 2, 1, tmp_path / "a"), cfg, ds.classnames)
    ref = train_coop(Task(cfg, tiny_vit, ds, 2, 1, tmp_path / "b"), cfg,
                     PromptLearner(tiny_vit, ds.classnames, ctx_init="a photo of a"))
    assert not torch.equal(ref.ctx, PromptLearner(tiny_vit, ds.classnames, ctx_init="a photo of a").ctx)
    assert torch.allclose(ours.ctx, ref.ctx, atol=1e-6)


def test_virtual_classes_only_in_the_text_to_text_loss(tiny_vit):
    learner = LaspPromptLearner(tiny_vit, BASE)
    with torch.no_grad():
        learner.ctx.add_(torch.randn_like(learner.ctx))
    plain = LaspLoss(tiny_vit, learner, BASE, ["a photo of a {}."], noise_std=0)
    virtual = LaspLoss(tiny_vit, learner, BASE + NOVEL, ["a photo of a {}."], noise_std=0)
    assert learner.classnames == BASE and learner.class_embeddings().shape[0] == 2  # the image head: base only
    assert virtual.layout.classnames == BASE + NOVEL and virtual.targets[0].shape[:2] == (1, 4)
    with torch.no_grad():
        assert virtual.tt_loss(learner).item() != pytest.approx(plain.tt_loss(learner).item(), rel=1e-3)
    feats, labels = torch.randn(3, tiny_vit.embed_dim), torch.tensor([0, 1, 0])
    w = learner.class_embeddings()
    logits = coop_logits(feats, w, 100.0)
    assert logits.shape == (3, 2)
    total, logs = virtual(learner, logits, labels, w)
    assert total.item() == pytest.approx(logs["vl"] + 5.0 * logs["tt"], rel=1e-5)


def test_bias_enters_both_losses_before_normalisation(tiny_vit):
    learner = LaspPromptLearner(tiny_vit, BASE, bias=True)
    with torch.no_grad():
        learner.bias.normal_()
        raw = PromptLearner(tiny_vit, BASE, ctx_init="a photo of a")
        f = raw.encoder(raw.construct_prompts(raw.ctx), raw.token_ids)
        assert torch.allclose(learner.class_embeddings(), F.normalize(f + learner.bias, dim=-1), atol=1e-5)


def test_groups_split_templates_and_combine_by_normalised_mean(tiny_vit):
    assert split_templates(list("abcde"), 2) == [["a", "b", "c"], ["d", "e"]]
    with pytest.raises(ValueError, match="groups"):
        split_templates(["a"], 2)
    torch.manual_seed(0)
    learner = LaspPromptLearner(tiny_vit, BASE, ctx_init=None, n_ctx=2, groups=2)
    assert learner.ctx.shape == (2, 2, learner.encoder.width)
    loss = LaspLoss(tiny_vit, learner, BASE, ["a photo of a {}.", "a {}.", "{} texture."], noise_std=0)
    assert [t.shape[0] for t in loss.targets] == [2, 1]
    with torch.no_grad():
        g = learner.group_embeddings()
        assert torch.allclose(learner.class_embeddings(), F.normalize(g[0] + g[1], dim=-1), atol=1e-6)
        expected = (text_to_text_loss(g[0], loss.targets[0], loss.scale)
                    + text_to_text_loss(g[1], loss.targets[1], loss.scale)) / 2
        assert loss.tt_loss(learner).item() == pytest.approx(expected.item(), rel=1e-5)


def test_noise_on_template_embeddings_is_optional_and_seeded(tiny_vit):
    learner = LaspPromptLearner(tiny_vit, BASE)
    noisy = LaspLoss(tiny_vit, learner, BASE, ["a photo of a {}."], noise_std=0.05, noise_prob=1.0)
    clean = LaspLoss(tiny_vit, learner, BASE, ["a photo of a {}."], noise_std=0.0)
    with torch.no_grad():
        torch.manual_seed(3)
        a = noisy.tt_loss(learner).item()
        torch.manual_seed(3)
        assert noisy.tt_loss(learner).item() == a
        assert a != clean.tt_loss(learner).item()


def test_vit_tail_on_cached_block_inputs_is_encode_image(tiny_vit):
    x = torch.randn(3, 3, tiny_vit.image_size, tiny_vit.image_size)
    visual = tiny_vit.model.visual
    with torch.no_grad():
        assert torch.allclose(vit_from_tokens(visual, vit_tokens(visual, x)), tiny_vit.model.encode_image(x),
                              atol=1e-5)
    with pytest.raises(ValueError, match="ViT"):
        from common.clip import load_clip
        recalibrated_visual(load_clip("tiny-rn", "random"))


def test_only_the_documented_parameters_train(tiny_vit):
    learner = LaspPromptLearner(tiny_vit, BASE, bias=True)
    model = LaspModel(learner, recalibrated_visual(tiny_vit))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    ln = {n for n in names if n.startswith("visual.")}
    blocks = len(tiny_vit.model.visual.transformer.resblocks)
    assert names - ln == {"learner.ctx", "learner.bias"}
    assert ln == {f"visual.transformer.resblocks.{i}.{m}.{w}" for i in range(blocks) for m in ("ln_1", "ln_2")
                  for w in ("weight", "bias")}
    loss = LaspLoss(tiny_vit, learner, BASE + NOVEL, ["a photo of a {}."])
    x = torch.randn(2, 3, tiny_vit.image_size, tiny_vit.image_size)
    w = learner.class_embeddings()
    logits = coop_logits(vit_from_tokens(model.visual, vit_tokens(tiny_vit.model.visual, x)), w, 100.0)
    loss(learner, logits, torch.tensor([0, 1]), w)[0].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == names
    assert all(p.grad is None for p in tiny_vit.model.parameters())  # the shared CLIP is never touched
    assert all(p.requires_grad is False for p in tiny_vit.model.visual.parameters())


def test_layernorm_group_gets_a_tenth_of_the_lr_after_warmup(tiny_vit):
    learner = LaspPromptLearner(tiny_vit, BASE, bias=True)
    model = LaspModel(learner, recalibrated_visual(tiny_vit))
    cfg = TrainConfig(epochs=4, lr=0.03, warmup_epochs=1, warmup_lr=1e-5)
    trainer = GroupLRTrainer(model, cfg, None, model.param_groups(0.1))
    trainer._set_lr(0)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-5, 1e-5]
    lr = trainer._set_lr(2)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([lr, 0.1 * lr])


def _cfg(tmp_path, bundle, **extra):
    sets = {"epochs": 2, "batch_size": 4, "b2n_shots": 2, "train.warmup_epochs": 1, "dataset_overrides": "{}"}
    sets.update(extra)
    return load_config(lasp_main.CONFIG, "embedded", toy_overrides(tmp_path, bundle, sets)[1::2])


def test_novel_names_for_virtual_classes(tmp_path, tiny_vit):
    cfg = _cfg(tmp_path, tiny_vit)
    ds = subsample_classes(fewshot_split(build_dataset("toy", cfg["data_root"]), 2, 1), "base")
    assert lasp_main.novel_classnames(Task(cfg, tiny_vit, ds, 2, 1, None)) == NOVEL
    over = lasp_main.for_dataset({"epochs": 25, "train": {"lr": 1, "warmup_epochs": 3},
                                  "dataset_overrides": {"dtd": {"epochs": 50, "train": {"warmup_epochs": 5}}}}, "dtd[base]")
    assert over["epochs"] == 50 and over["train"] == {"lr": 1, "warmup_epochs": 5}


def test_reproduce_smoke_on_toy(tmp_path, tiny_vit):
    sets = toy_overrides(tmp_path, tiny_vit, {"epochs": 2, "batch_size": 4, "b2n_shots": 2, "train.warmup_epochs": 1})
    lasp_main.main(["reproduce", *sets])
    assert len(lasp_main.main(["eval", *sets])) == len(load_records(paper="lasp", protocol="base2novel"))
    recs = load_records(paper="lasp", protocol="base2novel")
    assert sorted((r["method"], r["variant"]) for r in recs) == [("coop", "m4_end_ctxv1"), ("lasp", "lasp"),
                                                                 ("lasp", "lasp_rp"), ("lasp", "lasp_v")]
    assert all(set(r["metrics"]) == {"base", "novel", "hm"} for r in recs)
