"""PLOT: the Sinkhorn inner loop against POT, the plan's marginals, the exact reductions (N = 1; N = 1 with one
local feature = CoOp), gradients (through the similarities only, into the prompts only), and a smoke run."""
import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from common.engine import load_records
from papers.coop.method import PromptLearner, coop_logits
from papers.plot import __main__ as plot_main
from papers.plot.method import (PlotPromptLearner, ot_scores, plot_logits, prompt_features, sinkhorn)
from tests.papers.helpers import toy_overrides

NAMES = ["red square", "green_circle", "blue triangle"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _costs(shape, seed=0, dtype=torch.float64):
    """Costs 1 - cos with cosines ~ U(0.1, 0.35), the range of CLIP's local similarities."""
    g = torch.Generator().manual_seed(seed)
    return 1.0 - (0.1 + 0.25 * torch.rand(shape, generator=g, dtype=dtype))


@pytest.mark.parametrize("M,N", [(49, 4), (4, 4), (36, 2), (7, 1)])
def test_sinkhorn_matches_pot(M, N):
    """Run to convergence, the batched plans equal POT's `ot.sinkhorn` (same marginals, cost and reg) per problem."""
    cost = _costs((3, 5, M, N))
    T, it = sinkhorn(cost, eps=0.1, max_iter=5000, thresh=1e-14)
    assert T.shape == cost.shape and it > 1
    for i in range(3):
        for j in range(5):
            ref = ot.sinkhorn(np.full(M, 1 / M), np.full(N, 1 / N), cost[i, j].numpy(), 0.1,
                              numItermax=10000, stopThr=1e-13)
            assert np.abs(T[i, j].numpy() - ref).max() < 1e-5 * (1 / (M * N))  # relative to the plan's scale
            assert np.abs(T[i, j].numpy() - ref).max() < 1e-8


def test_official_stopping_rule_is_close_to_pot_and_stops_early():
    """With the official constants (100 iterations, mean |dr| < 1e-2) the plan is within 1e-4 of POT's converged one
    and the OT scores agree to 1e-5 (card: 3-9 iterations, |dT| ~ 1e-6..2e-5)."""
    M, N = 49, 4
    cost = _costs((8, M, N), seed=1)
    T, it = sinkhorn(cost)
    assert it < 100
    for i in range(8):
        ref = ot.sinkhorn(np.full(M, 1 / M), np.full(N, 1 / N), cost[i].numpy(), 0.1)
        assert np.abs(T[i].numpy() - ref).max() < 1e-4
        score, ref_score = float(((1 - cost[i]) * T[i]).sum()), float(((1 - cost[i].numpy()) * ref).sum())
        assert abs(score - ref_score) < 1e-5


def test_plan_marginals():
    """Columns (prompts) sum to 1/N exactly (c is updated last), rows (local features) to 1/M at convergence,
    and the plan has total mass 1 with positive entries; a non-uniform marginal is honoured too."""
    M, N = 6, 3
    cost = _costs((4, M, N), seed=2)
    T, _ = sinkhorn(cost, max_iter=1)                 # one iteration: columns already exact, rows not
    assert torch.allclose(T.sum(-2), torch.full((4, N), 1 / N, dtype=T.dtype), atol=1e-12)
    assert not torch.allclose(T.sum(-1), torch.full((4, M), 1 / M, dtype=T.dtype), atol=1e-9)
    T, _ = sinkhorn(cost, max_iter=2000, thresh=1e-15)
    assert torch.allclose(T.sum(-1), torch.full((4, M), 1 / M, dtype=T.dtype), atol=1e-10)
    assert torch.allclose(T.sum((-2, -1)), torch.ones(4, dtype=T.dtype), atol=1e-10) and (T > 0).all()
    a = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    T, _ = sinkhorn(cost[0], a=a, max_iter=2000, thresh=1e-15)
    assert torch.allclose(T.sum(-1), a, atol=1e-10)


def test_large_eps_gives_uniform_plan_and_mean_similarity():
    """eps -> inf: K -> 1, the plan -> 1/(MN) and the score -> the mean of all M*N similarities (= plan='uniform')."""
    sim = 1 - _costs((2, 5, 3), seed=3)
    s_big, T = ot_scores(sim, eps=1e6, max_iter=50, thresh=0)
    assert torch.allclose(T, torch.full_like(T, 1 / 15), atol=1e-7)
    s_uni, _ = ot_scores(sim, plan="uniform")
    assert torch.allclose(s_big, sim.mean((-2, -1)), atol=1e-7) and torch.allclose(s_uni, sim.mean((-2, -1)))


def test_score_gradient_is_the_plan_not_through_it():
    """The plan is computed without gradient (official): d score / d sim = T exactly. A plan differentiated
    through Sinkhorn would give a different gradient, so this pins the two-stage optimisation."""
    sim = (1 - _costs((2, 7, 4), seed=4)).requires_grad_()
    score, T = ot_scores(sim)
    score.sum().backward()
    assert torch.allclose(sim.grad, T, atol=0)
    assert not T.requires_grad


def test_plot_logits_match_a_hand_computation():
    """Logits of a tiny case against an explicit double loop over images, classes, local features and prompts."""
    g = torch.Generator().manual_seed(5)
    local, text = torch.randn(2, 3, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    logits = plot_logits(local, text, 10.0)
    fl, ft = F.normalize(local, dim=-1), F.normalize(text, dim=-1)
    sims = torch.zeros(2, 5, 3, 4)
    for b in range(2):
        for k in range(5):
            for m in range(3):
                for n in range(4):
                    sims[b, k, m, n] = fl[b, m] @ ft[n, k]
    T, _ = sinkhorn(1 - sims)                          # the batch's 10 problems together (one stopping test)
    for b in range(2):
        for k in range(5):
            assert torch.allclose(logits[b, k], 10.0 * (T[b, k] * sims[b, k]).sum(), atol=1e-5)


def test_permuting_prompts_leaves_logits_unchanged():
    g = torch.Generator().manual_seed(6)
    local, text = torch.randn(3, 5, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    assert torch.allclose(plot_logits(local, text, 100.0), plot_logits(local, text[[2, 0, 3, 1]], 100.0), atol=1e-4)


def test_one_prompt_is_mean_local_similarity_and_one_global_feature_is_coop(tiny_rn):
    """N = 1: the column marginal forces T = 1/M, so the logit is scale * mean_m cos(F_m, g) (not CoOp: CoOp scores
    the global feature). With N = 1 and M = 1 local feature equal to the global image feature, PLOT's logits are
    CoOp's cosine logits exactly, for the same context."""
    torch.manual_seed(0)
    plot = PlotPromptLearner(tiny_rn, NAMES, n_prompts=1, n_ctx=4)
    coop = PromptLearner(tiny_rn, NAMES, n_ctx=4)
    with torch.no_grad():
        coop.ctx.copy_(plot.ctx[0])
        text, coop_text = plot.class_embeddings(), coop.class_embeddings()
    assert text.shape == (1, 3, tiny_rn.embed_dim)
    assert torch.allclose(text[0], coop_text, atol=1e-5)
    g = torch.randn(6, tiny_rn.embed_dim)
    assert torch.allclose(plot_logits(g.unsqueeze(1), text, 100.0), coop_logits(g, coop_text, 100.0), atol=1e-4)
    local = torch.randn(6, 5, tiny_rn.embed_dim)
    mean_cos = 100.0 * torch.einsum("bmd,kd->bkm", F.normalize(local, dim=-1), text[0]).mean(-1)
    assert torch.allclose(plot_logits(local, text, 100.0), mean_cos, atol=1e-4)


def test_n_prompts_encode_like_separate_coop_prompts(tiny_vit):
    """Prompt n of PLOT's learner is CoOp's prompt with context ctx_n (shared-prefix encoding == full prompts)."""
    torch.manual_seed(1)
    plot = PlotPromptLearner(tiny_vit, NAMES, n_prompts=3, n_ctx=5)
    coop = PromptLearner(tiny_vit, NAMES, n_ctx=5)
    assert plot.ctx.shape == (3, 5, plot.encoder.width)
    with torch.no_grad():
        text = plot.class_embeddings()
        for n in range(3):
            assert torch.allclose(text[n], coop.class_embeddings(plot.ctx[n]), atol=1e-5)
        two = prompt_features(plot, torch.stack([plot.ctx, plot.ctx.flip(0)]))
    assert torch.allclose(two[0], text, atol=1e-5) and torch.allclose(two[1], text.flip(0), atol=1e-5)


def test_gradients_reach_only_the_prompts(tiny_rn):
    plot = PlotPromptLearner(tiny_rn, NAMES, n_prompts=2, n_ctx=4)
    assert [n for n, p in plot.named_parameters() if p.requires_grad] == ["ctx"]
    for p in tiny_rn.model.parameters():
        p.grad = None
    local = torch.randn(4, 3, tiny_rn.embed_dim)
    loss = F.cross_entropy(plot_logits(local, plot.class_embeddings(), 100.0), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert plot.ctx.grad is not None and plot.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_rn.model.parameters())
    # the moved learner keeps the context and type
    moved = plot.with_classnames(["a", "b"])
    assert isinstance(moved, PlotPromptLearner) and torch.equal(moved.ctx, plot.ctx) and moved.num_classes == 2


def test_batched_runs_train_like_separate_runs(tmp_path, tiny_vit):
    """Three runs (shots x seeds) trained as one batched model (their prompts encoded together, each run's Sinkhorn
    on its own batch) end where each ends alone: same contexts up to float rounding, same predictions."""
    from common.config import load_config
    from common.data import build_dataset, fewshot_split
    from common.engine.protocols import Task
    from common.engine.seed import seed_everything
    from papers.plot.method import build_learner, evaluate, train_plot_many
    args = toy_overrides(tmp_path, tiny_vit, {"batch_size": 4, "epochs": 3, "train.lr": 0.05, "train_pool": "full"})
    cfg = load_config(plot_main.CONFIG, "embedded", args[1::2])
    full = build_dataset("toy", tmp_path / "data")
    tasks = [Task(cfg, tiny_vit, fewshot_split(full, k, s), k, s, None) for k, s in [(1, 1), (2, 1), (2, 2)]]
    together = train_plot_many(tasks, cfg)
    for task, learner in zip(tasks, together):
        seed_everything(task.seed)
        alone = train_plot_many([task], cfg)[0]
        assert torch.allclose(alone.ctx, learner.ctx, atol=1e-5), (task.shots, task.seed)
        seed_everything(task.seed)
        init = build_learner(tiny_vit, task.dataset.classnames, cfg).ctx
        assert not torch.allclose(learner.ctx, init, atol=1e-3)      # training moved the prompts
        assert evaluate(alone, task)["top1"] == evaluate(learner, task)["top1"]


def test_reproduce_train_eval_smoke(tmp_path, tiny_rn, tiny_vit):
    """reproduce on both towers (N=4, the two ablations, CoOp baseline on the ViT), then eval matches the records."""
    from common.clip import save_clip_checkpoint
    vit = tmp_path / "tiny-vit.pt"
    save_clip_checkpoint(tiny_vit.model, vit)
    rn = tmp_path / "tiny-rn.pt"
    save_clip_checkpoint(tiny_rn.model, rn)
    args = toy_overrides(tmp_path, tiny_rn, {
        "epochs": 2, "batch_size": 4, "shots": "[1, 2]", "backbones": f"[tiny-rn={rn}, tiny-vit={vit}]",
        "reproduce.ablation.shots": "[1]", "reproduce.ablation.seeds": "[1]", "reproduce.ablation.backbones": "[tiny-rn]",
        "reproduce.coop_baseline": "[tiny-vit]", "reproduce.backbone_grid": "{tiny-vit: {shots: [1]}}"})
    plot_main.main(["reproduce", *args])
    got = sorted((r["method"], r["variant"], r["backbone"], r["shots"]) for r in load_records(protocol="fewshot"))
    assert got == [("coop", "m16_end", "tiny-vit", 1),
                   ("plot", "n1_m16", "tiny-rn", 1), ("plot", "n4_m16", "tiny-rn", 1), ("plot", "n4_m16", "tiny-rn", 2),
                   ("plot", "n4_m16", "tiny-vit", 1), ("plot", "n4_m16_uniform", "tiny-rn", 1)]
    rows = plot_main.main(["eval", *args])
    stored = {(r["shots"], r["seed"]): r["metrics"]["top1"]
              for r in load_records(paper="plot", variant="n4_m16", backbone="tiny-rn")}
    assert {(r["shots"], r["seed"]): round(r["top1"], 4) for r in rows} == stored
    assert not list((tmp_path / "runs").rglob("checkpoint.pt"))


@pytest.mark.parametrize("bad,needle", [("n_prompts=0", "n_prompts"), ("plan=greedy", "plan"), ("eps=0", "eps"),
                                        ("variant=n9", "unknown PLOT variant"), ("train_pool=all", "train_pool")])
def test_bad_options_are_one_line_errors(tmp_path, tiny_rn, capsys, bad, needle):
    args = toy_overrides(tmp_path, tiny_rn, {"epochs": 1})
    with pytest.raises(SystemExit) as exc:
        plot_main.main(["train", *args, "--set", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("metrics.json"))
