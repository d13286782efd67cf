import pytest
import torch
import torch.nn.functional as F

import papers.subpt.__main__ as sp_main
from common.config import load_config
from common.data import build_dataset, fewshot_split
from common.engine import load_records
from common.engine.protocols import Task
from papers.coop.method import PromptLearner, coop_logits, train_coop
from papers.subpt.method import (NflLoss, RecordingPromptLearner, attach_projection, ensemble_templates,
                                 learner_for, nfl_loss, project, steps_per_epoch, trajectory_basis, train_subpt)
from tests.papers.helpers import toy_overrides

NAMES = ["red square", "green circle", "blue triangle"]


def _proj_matrix(U):
    return U.t() @ U


def test_basis_of_a_hand_computed_trajectory():
    # iterates on a line through (1,1,1) with direction (1,2,2): the only principal direction is (1,2,2)/3
    W = torch.tensor([[1.0, 1.0, 1.0], [2.0, 3.0, 3.0], [4.0, 7.0, 7.0]])
    U = trajectory_basis(W, 1)
    assert U.shape == (1, 3)
    assert torch.allclose(U.abs(), torch.tensor([[1 / 3, 2 / 3, 2 / 3]]), atol=1e-6)
    # two directions in the plane z = 0 with unequal spread: first component along the larger one
    W2 = torch.tensor([[3.0, 0, 0], [-3.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])
    U2 = trajectory_basis(W2, 2)
    assert torch.allclose(U2.abs(), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), atol=1e-6)
    # PCA is translation invariant (the iterates are centred first)
    assert torch.allclose(_proj_matrix(trajectory_basis(W + 5.0, 1)), _proj_matrix(U), atol=1e-6)
    with pytest.raises(ValueError, match="rank"):
        trajectory_basis(W, 4)


def test_basis_matches_sklearn_pca_components():
    PCA = pytest.importorskip("sklearn.decomposition").PCA
    W = torch.randn(12, 40, generator=torch.Generator().manual_seed(0)).cumsum(0)  # a random walk
    U = trajectory_basis(W, 5)
    ref = torch.tensor(PCA(n_components=5, svd_solver="full").fit(W.numpy()).components_, dtype=torch.float32)
    assert torch.allclose(_proj_matrix(U), _proj_matrix(ref), atol=1e-5)
    assert torch.allclose(U @ U.t(), torch.eye(5), atol=1e-5)


def test_projection_is_idempotent_and_keeps_updates_in_the_subspace():
    U = trajectory_basis(torch.randn(8, 30).cumsum(0), 3)
    g = torch.randn(5, 6)  # any shape: flattened
    pg = project(g, U)
    assert torch.allclose(project(pg, U), pg, atol=1e-6)            # idempotent
    assert torch.allclose(pg - project(pg, U), torch.zeros_like(pg), atol=1e-6)
    assert torch.allclose(U @ pg.reshape(-1), U @ g.reshape(-1), atol=1e-5)  # U P g = U g
    h = torch.randn(5, 6)
    assert torch.dot(project(g, U).reshape(-1), h.reshape(-1)).item() == pytest.approx(
        torch.dot(g.reshape(-1), project(h, U).reshape(-1)).item(), abs=1e-5)  # symmetric
    full = trajectory_basis(torch.randn(4, 30), 30)
    assert torch.allclose(project(g, full), g, atol=1e-5)            # r = D: identity


def test_recorder_keeps_the_context_after_each_early_epoch(tiny_rn):
    torch.manual_seed(0)
    learner = RecordingPromptLearner(tiny_rn, NAMES, t_early=2, steps_per_epoch=2, n_ctx=2)
    opt = torch.optim.SGD([learner.ctx], lr=0.5)
    feats, labels = torch.randn(3, tiny_rn.embed_dim), torch.tensor([0, 1, 2])
    after = []
    for step in range(6):
        loss = F.cross_entropy(coop_logits(feats, learner.class_embeddings(), 100.0), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        after.append(learner.ctx.detach().reshape(-1).clone())
    traj = learner.recorded()
    assert torch.equal(traj[0], after[1]) and torch.equal(traj[1], after[3])  # after epochs 1 and 2
    assert int(learner.steps_seen) == 6
    assert steps_per_epoch(10, 4) == 2 and steps_per_epoch(3, 4) == 1 and steps_per_epoch(8, 4) == 2


def test_nfl_loss_hand_computed_and_gradient_only_into_the_shared_context(tiny_vit):
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert nfl_loss(t, z).item() == pytest.approx(0.5)  # (1 - 0 + 1 - 1) / 2
    learner = PromptLearner(tiny_vit, NAMES[:2], n_ctx=4)
    nfl = NflLoss(tiny_vit, learner, ["yellow star", "purple heart"], ["a photo of a {}."], weight=2.0)
    feats, labels = torch.randn(4, tiny_vit.embed_dim), torch.tensor([0, 1, 0, 1])
    w = learner.class_embeddings()
    logits = coop_logits(feats, w, 100.0)
    loss, logs = nfl(learner, logits, labels, w)
    extra = PromptLearner(tiny_vit, ["yellow star", "purple heart"], n_ctx=4)
    expected = F.cross_entropy(logits, labels) + 2.0 * nfl_loss(extra.class_embeddings(learner.ctx), nfl.targets)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert learner.ctx.grad.abs().sum() > 0 and nfl.extra.ctx.grad is None
    assert all(p.grad is None for p in tiny_vit.model.parameters())
    nfl.weight = 0.0
    assert nfl(learner, logits, labels, w)[0].item() == pytest.approx(F.cross_entropy(logits, labels).item())


def test_ensemble_templates_add_the_dataset_template_once():
    ds = type("D", (), {"meta": {"templates": ["a {}.", "a photo of a {}."]}, "template": "a photo of a {}."})()
    assert ensemble_templates(ds) == ["a {}.", "a photo of a {}."]
    ds.template = "{} texture."
    assert ensemble_templates(ds) == ["a {}.", "a photo of a {}.", "{} texture."]


def _task(tmp_path, bundle, **sets):
    base = {"n_ctx": 4, "epochs": 4, "batch_size": 4, "train.lr": 0.05, "t_early_by_shots": "{2: 3}",
            "rank_by_shots": "{2: 2}"}
    base.update(sets)
    cfg = load_config(sp_main.CONFIG, "embedded", toy_overrides(tmp_path, bundle, base)[1::2])
    ds = fewshot_split(build_dataset("toy", cfg["data_root"]), 2, 1)
    return cfg, ds


def test_full_rank_subpt_equals_coop(tmp_path, tiny_rn):
    cfg, ds = _task(tmp_path, tiny_rn)
    coop = train_coop(Task(cfg, tiny_rn, ds, 2, 1, tmp_path / "coop"), cfg, learner_for(
        Task(cfg, tiny_rn, ds, 2, 1, None), cfg))
    D = coop.ctx.numel()
    full = trajectory_basis(torch.randn(3, D), D)
    sub = train_subpt(Task(cfg, tiny_rn, ds, 2, 1, tmp_path / "sub"), cfg, basis=full)
    assert not torch.equal(coop.ctx, learner_for(Task(cfg, tiny_rn, ds, 2, 1, None), cfg).ctx)  # it trained
    assert torch.allclose(sub.ctx, coop.ctx, atol=1e-5)


def test_low_rank_updates_stay_in_the_subspace_without_weight_decay(tmp_path, tiny_rn):
    cfg, ds = _task(tmp_path, tiny_rn, **{"train.weight_decay": 0.0})
    task = Task(cfg, tiny_rn, ds, 2, 1, tmp_path / "sub")
    init = learner_for(task, cfg).ctx.detach().reshape(-1)
    D = init.numel()
    U = trajectory_basis(torch.randn(6, D).cumsum(0), 2)
    ctx = train_subpt(task, cfg, basis=U).ctx.detach().reshape(-1)
    delta = ctx - init
    assert delta.norm() > 1e-4
    assert (delta - project(delta, U)).norm() < 1e-5 * max(1.0, delta.norm().item())


def test_stage1_trajectory_feeds_the_subspace(tmp_path, tiny_rn):
    from papers.subpt.method import load_or_train_stage1, train_stage1, trajectory_file
    cfg, ds = _task(tmp_path, tiny_rn)
    task = Task(cfg, tiny_rn, ds, 2, 1, tmp_path / "stage1")
    learner, W = train_stage1(task, cfg)
    assert W.shape == (3, learner.ctx.numel()) and trajectory_file(task, cfg).is_file()
    assert torch.equal(load_or_train_stage1(task, cfg), W)
    assert not torch.equal(W[0], W[2])
    with pytest.raises(ValueError, match="t_early"):
        train_stage1(task, {**cfg, "t_early_by_shots": {2: 9}})


def test_projection_hook_checks_dimensions(tiny_rn):
    learner = PromptLearner(tiny_rn, NAMES, n_ctx=2)
    with pytest.raises(ValueError, match="dimension"):
        attach_projection(learner.ctx, torch.eye(3))


def test_novel_names_of_a_base_task(tmp_path, tiny_rn):
    from common.data import subsample_classes
    cfg, ds = _task(tmp_path, tiny_rn)
    base = Task(cfg, tiny_rn, subsample_classes(ds, "base"), 2, 1, None)
    assert sp_main.novel_classnames(base) == ["blue triangle", "yellow star"]
    assert sp_main.novel_classnames(Task(cfg, tiny_rn, ds, 2, 1, None)) is None


def test_reproduce_smoke_on_toy(tmp_path, tiny_rn):
    sets = toy_overrides(tmp_path, tiny_rn, {"n_ctx": 4, "epochs": 3, "batch_size": 4, "t_early_by_shots": "{2: 2}",
                                             "rank_by_shots": "{2: 1}", "shots": "[2]", "b2n_shots": 2, "dg_shots": 2,
                                             "nfl_source": "toy", "nfl_num_names": 2, "runs.fewshot": "[sub, coop]",
                                             "runs.base2novel": "[sub_nfl, nfl, cocoop]", "cocoop.epochs": 1, "cocoop.batch_size": 4, "runs.domain_generalization": "[sub]"})
    sp_main.main(["reproduce", *sets])
    assert len(sp_main.main(["eval", *sets])) == len(load_records(paper="subpt", protocol="fewshot"))
    few = load_records(paper="subpt", protocol="fewshot")
    assert sorted((r["method"], r["variant"]) for r in few) == [("coop", "m4_end"), ("subpt", "sub")]
    b2n = load_records(paper="subpt", protocol="base2novel")
    assert sorted((r["method"], r["variant"]) for r in b2n) == [("cocoop", ""), ("subpt", "nfl"), ("subpt", "sub_nfl")]
    assert all(set(r["metrics"]) == {"base", "novel", "hm"} for r in b2n)
    dg = load_records(paper="subpt", protocol="domain_generalization")
    assert sorted(r["dataset"] for r in dg) == ["toy", "toy_shift"]
    # one stage-1 trajectory per (task, stage-1 kind): few-shot CoOp (reused by DG) and base CoOp + NFL
    assert len(list((tmp_path / "runs" / "subpt" / "_trajectories").glob("*.pt"))) == 2
