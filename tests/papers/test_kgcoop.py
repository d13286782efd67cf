import math

import pytest
import torch
import torch.nn.functional as F

import papers.kgcoop.__main__ as kg_main
from common.engine import load_records
from papers.coop.method import PromptLearner, coop_logits
from papers.kgcoop.method import KgLoss, anchor_template, kg_distance, kg_regulariser
from tests.papers.helpers import toy_overrides

NAMES = ["red square", "green circle", "blue triangle"]


def test_regulariser_against_hand_computed_values():
    # two classes in 2-D: w1 at 0 degrees vs anchor at 90 degrees, w2 equal to its anchor
    w = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    a = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    # ||w1 - a1||^2 = 2, ||w2 - a2||^2 = 0 -> paper L_kg = mean = 1; code form = 1 - mean cos = 1 - (0 + 1)/2
    assert kg_distance(w, a).item() == pytest.approx(1.0)
    assert kg_regulariser(w, a, "paper").item() == pytest.approx(1.0)
    assert kg_regulariser(w, a, "code").item() == pytest.approx(0.5)
    # 60 degrees apart: ||a-b||^2 = 2 - 2 cos 60 = 1
    b = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)]])
    assert kg_distance(torch.tensor([[1.0, 0.0]]), b).item() == pytest.approx(1.0, abs=1e-6)
    # on unit vectors the code term is exactly half the paper's (issue #6): random check
    x, y = F.normalize(torch.randn(7, 16), dim=-1), F.normalize(torch.randn(7, 16), dim=-1)
    assert torch.allclose(kg_regulariser(x, y, "code"), kg_distance(x, y) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="form"):
        kg_regulariser(x, y, "l1")


def test_zero_at_init_with_the_photo_template_and_not_with_another(tiny_clip):
    learner = PromptLearner(tiny_clip, NAMES, ctx_init="a photo of a")
    kg = KgLoss(tiny_clip, NAMES, "a photo of a {}.")
    feats = torch.randn(6, tiny_clip.embed_dim)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        w = learner.class_embeddings()
        assert torch.allclose(w, kg.anchors, atol=1e-5)
        logits = coop_logits(feats, w, 100.0)
        loss, logs = kg(learner, logits, labels, w)
        assert logs["kg"] < 1e-5 and loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-4)
    other = KgLoss(tiny_clip, NAMES, "a photo of a {}, a type of texture.")
    assert kg_regulariser(w, other.anchors).item() > 1e-3


def test_loss_is_ce_plus_weighted_regulariser_and_weight_zero_is_coop(tiny_vit):
    torch.manual_seed(0)
    learner = PromptLearner(tiny_vit, NAMES, ctx_init="a photo of a")
    with torch.no_grad():
        learner.ctx.add_(0.05 * torch.randn_like(learner.ctx))
    kg = KgLoss(tiny_vit, NAMES, "a centered satellite photo of {}.", weight=8.0)
    feats, labels = torch.randn(5, tiny_vit.embed_dim), torch.tensor([0, 1, 2, 1, 0])
    w = learner.class_embeddings()
    logits = coop_logits(feats, w, 100.0)
    ce = F.cross_entropy(logits, labels)
    expected = ce + 8.0 * (1 - F.cosine_similarity(w, kg.anchors, dim=-1).mean())
    assert kg(learner, logits, labels, w)[0].item() == pytest.approx(expected.item(), rel=1e-5)
    paper = KgLoss(tiny_vit, NAMES, "a centered satellite photo of {}.", weight=4.0, form="paper")
    assert paper(learner, logits, labels, w)[0].item() == pytest.approx(expected.item(), rel=1e-5)
    kg.weight = 0.0
    assert kg(learner, logits, labels, w)[0].item() == pytest.approx(ce.item(), rel=1e-6)


def test_gradient_only_into_the_context(tiny_clip):
    learner = PromptLearner(tiny_clip, NAMES, ctx_init="a photo of a")
    kg = KgLoss(tiny_clip, NAMES, "a photo of a {}, a type of texture.")
    feats, labels = torch.randn(4, tiny_clip.embed_dim), torch.tensor([0, 1, 2, 0])
    w = learner.class_embeddings()
    kg(learner, coop_logits(feats, w, 100.0), labels, w)[0].backward()
    assert [n for n, p in learner.named_parameters() if p.requires_grad] == ["ctx"]
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_clip.model.parameters())
    assert not kg.anchors.requires_grad


def test_training_lowers_the_regulariser_relative_to_coop(tmp_path, tiny_vit):
    """Same data, seed and schedule: the KG weight keeps the learned embeddings nearer the anchors."""
    from common.config import load_config
    from common.data import build_dataset, fewshot_split
    from common.engine.protocols import Task
    from papers.kgcoop.method import train_kgcoop
    import papers.kgcoop.__main__ as m
    cfg = load_config(m.CONFIG, "embedded", toy_overrides(tmp_path, tiny_vit, {"epochs": 4, "batch_size": 4,
                                                                                "train.lr": 0.05})[1::2])
    ds = fewshot_split(build_dataset("toy", cfg["data_root"]), 2, 1)
    dist = {}
    for w in (0.0, 8.0):
        task = Task(cfg, tiny_vit, ds, 2, 1, tmp_path / f"w{w}")
        learner = train_kgcoop(task, cfg, weight=w)
        anchors = KgLoss(tiny_vit, ds.classnames, anchor_template(ds)).anchors
        with torch.no_grad():
            dist[w] = kg_distance(learner.class_embeddings(), anchors).item()
    assert dist[8.0] < dist[0.0]


def test_batched_runs_equal_separate_runs(tmp_path, tiny_vit, one_thread):
    """The protocols train a dataset's seeds as one batched model: each run ends where it ends alone."""
    from common.config import load_config
    from common.data import build_dataset, fewshot_split
    from common.engine.protocols import Task
    from common.engine.seed import seed_everything
    from papers.kgcoop.method import train_kgcoop, train_kgcoop_many
    import papers.kgcoop.__main__ as m
    cfg = load_config(m.CONFIG, "embedded", toy_overrides(tmp_path, tiny_vit, {"epochs": 3, "batch_size": 4,
                                                                                "train.lr": 0.05})[1::2])
    data = build_dataset("toy", cfg["data_root"])
    tasks = [Task(cfg, tiny_vit, fewshot_split(data, k, s), k, s, None) for k, s in [(2, 1), (2, 2), (1, 1)]]
    together = train_kgcoop_many(tasks, cfg)
    for t, learner in zip(tasks, together):
        seed_everything(t.seed)
        alone = train_kgcoop(t, cfg)
        torch.testing.assert_close(learner.ctx, alone.ctx, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(together[0].ctx, together[1].ctx)   # the runs did differ


def test_anchor_templates_follow_the_official_code():
    d = lambda name, t="a photo of a {}.": type("D", (), {"name": name, "template": t})()
    assert anchor_template(d("dtd")) == "a photo of a {}, a type of texture."   # not CoOp's "{} texture."
    assert anchor_template(d("eurosat[new]")) == "a centered satellite photo of {}."
    assert anchor_template(d("emb_fine", "a photo of a {}, a toy.")) == "a photo of a {}, a toy."


def test_reproduce_smoke_on_toy(tmp_path, tiny_vit):
    sets = toy_overrides(tmp_path, tiny_vit, {"epochs": 2, "batch_size": 4, "protocol_overrides.fewshot.batch_size": 4,
                                              "b2n_shots": 2, "dg_shots": 2, "fewshot_shots": "[1]"})
    kg_main.main(["reproduce", *sets])
    assert len(kg_main.main(["eval", *sets])) == len(load_records(paper="kgcoop", protocol="base2novel"))
    b2n = load_records(paper="kgcoop", protocol="base2novel")
    assert sorted((r["method"], r["variant"]) for r in b2n) == [("coop", "m4_end_ctxv1"), ("kgcoop", "")]
    assert all(set(r["metrics"]) == {"base", "novel", "hm"} for r in b2n)
    assert len(load_records(paper="kgcoop", protocol="fewshot")) == 2
    dg = load_records(paper="kgcoop", protocol="domain_generalization")
    assert sorted({r["dataset"] for r in dg}) == ["toy", "toy_shift"] and len(dg) == 4
    assert not list((tmp_path / "runs").rglob("checkpoint.pt"))
