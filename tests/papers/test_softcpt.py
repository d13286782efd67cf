import json

import pytest
import torch
import torch.nn.functional as F

from common.clip.text import encode_prompts
from common.engine import load_records
from common.engine.seed import seed_everything
from papers.coop.method import PromptLearner
from papers.softcpt import __main__ as softcpt_main
from papers.softcpt.method import (SoftCPT, TaskSpec, encode_shared_prefix_lean, evaluate_run, parameter_count,
                                   train_joint_many, variant_name)
from tests.papers.helpers import toy_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = [TaskSpec("shape", ("red square", "green circle", "blue_triangle")),
         TaskSpec("satellite land use", ("forest", "river", "highway or road", "sea or lake", "pasture land")),
         TaskSpec("digit", ("0", "1"))]


def _freeze(bundle):
    for p in bundle.model.parameters():
        p.requires_grad_(False)


def test_shapes_and_parameter_counts(tiny_rn):
    """Meta-net output per task (NA: one M x d context per task, CA/CS: one per class), class features per task
    block, and the trainable-parameter counts of the paper's table: D*M*d + L*d (TA) or + T*L*d (TS)."""
    d, D, M, L, T, C = tiny_rn.model.token_embedding.weight.shape[1], tiny_rn.embed_dim, 16, 4, 3, 10
    nata = SoftCPT(tiny_rn, TASKS, seeds=[1, 2])
    assert nata.num_runs == 2 and nata.num_classes == C and nata.sizes == [3, 5, 2]
    assert nata.task_features().shape == (2, T, D)
    assert nata.contexts().shape == (2, T, M, d)
    assert nata.class_embeddings().shape == (2, C, D)
    assert parameter_count(nata) == D * M * d + L * d
    nats = SoftCPT(tiny_rn, TASKS, task_csc=True, seeds=[1])
    assert nats.task_ctx.shape == (1, T, L, d) and parameter_count(nats) == D * M * d + T * L * d
    cata = SoftCPT(tiny_rn, TASKS, class_n_ctx=4, seeds=[1])
    assert cata.contexts().shape == (1, C, M, d) and parameter_count(cata) == 2 * D * M * d + L * d + 4 * d
    csts = SoftCPT(tiny_rn, TASKS, class_n_ctx=4, class_csc=True, task_csc=True, seeds=[1])
    assert csts.class_ctx.shape == (1, C, 4, d) and csts.class_embeddings().shape == (1, C, D)
    hard = SoftCPT(tiny_rn, TASKS, sharing="hard", seeds=[1])
    assert parameter_count(hard) == M * d
    assert [variant_name(c) for c in ({}, {"task_csc": True}, {"class_n_ctx": 4}, {"class_n_ctx": 4, "class_csc": True},
                                      {"sharing": "hard"})] == ["nata", "nats", "cata", "csta", "coop_mt"]


def test_runs_draw_their_own_seeded_init(tiny_rn):
    both = SoftCPT(tiny_rn, TASKS, seeds=[1, 2])
    one = SoftCPT(tiny_rn, TASKS, seeds=[2])
    assert torch.equal(both.proj[1], one.proj[0]) and torch.equal(both.task_ctx[1], one.task_ctx[0])
    assert not torch.equal(both.proj[0], both.proj[1])
    assert both.proj.std().item() == pytest.approx(0.02, rel=0.05)


def _coop(bundle, names, ctx):
    coop = PromptLearner(bundle, names, n_ctx=ctx.shape[0])
    with torch.no_grad():
        coop.ctx.copy_(ctx)
    return coop


def test_one_task_reduces_to_coop(tiny_rn):
    """T = 1: hard sharing is CoOp's learner (same context -> same class features); soft sharing with W chosen so
    that f W = CoOp's context gives CoOp's class features and logits, whatever the task context u."""
    names = TASKS[0].classnames
    torch.manual_seed(0)
    ctx = torch.randn(16, tiny_rn.model.token_embedding.weight.shape[1]) * 0.02
    coop = _coop(tiny_rn, names, ctx)
    with torch.no_grad():
        ref = coop.class_embeddings()
        hard = SoftCPT(tiny_rn, TASKS[:1], sharing="hard", seeds=[1])
        hard.ctx.copy_(ctx[None])
        assert torch.allclose(hard.class_embeddings()[0], ref, atol=1e-5)
        soft = SoftCPT(tiny_rn, TASKS[:1], seeds=[1])
        f = soft.task_features()[0, 0]                                            # (D,)
        soft.proj.copy_((f[:, None] @ ctx.reshape(1, -1) / f.dot(f))[None])      # f W = vec(ctx)
        assert torch.allclose(soft.contexts()[0, 0], ctx, atol=1e-6)
        emb = soft.class_embeddings()[0]
        assert torch.allclose(emb, ref, atol=1e-5)
        x = torch.randn(4, tiny_rn.embed_dim)
        logits = soft.logits(x, torch.zeros(4, dtype=torch.long), emb, 100.0)
        assert torch.allclose(logits, 100.0 * F.normalize(x, dim=-1) @ ref.t(), atol=1e-3)


def test_zero_meta_net_gives_every_task_coops_zero_context(tiny_rn):
    """W = 0: every task's generated context is 0, i.e. hard sharing (CoOp-MT) with a zero context, and each task's
    block equals CoOp's learner on that task's classes with a zero context."""
    with torch.no_grad():
        soft = SoftCPT(tiny_rn, TASKS, seeds=[1])
        soft.proj.zero_()
        hard = SoftCPT(tiny_rn, TASKS, sharing="hard", seeds=[1])
        hard.ctx.zero_()
        emb = soft.class_embeddings()[0]
        assert torch.allclose(emb, hard.class_embeddings()[0], atol=1e-5)
        for t, task in enumerate(TASKS):
            coop = _coop(tiny_rn, task.classnames, torch.zeros(16, soft.encoder.width))
            assert torch.allclose(emb[soft.block(t)], coop.class_embeddings(), atol=1e-5)


def test_one_shared_task_name_collapses_soft_to_hard_sharing(tiny_rn):
    """If every task has the same name, NATA gives every task the same context (hard sharing reparameterised)."""
    same = [TaskSpec("task", t.classnames) for t in TASKS]
    with pytest.raises(ValueError, match="task names must differ"):
        SoftCPT(tiny_rn, same)
    with torch.no_grad():
        soft = SoftCPT(tiny_rn, [TaskSpec(f"task{i}", t.classnames) for i, t in enumerate(TASKS)], seeds=[1])
        ctx = soft.contexts()
        assert not torch.allclose(ctx[0, 0], ctx[0, 1])          # distinct names -> distinct contexts
        soft.task_prompts.token_suffix.copy_(soft.task_prompts.token_suffix[:1].expand_as(soft.task_prompts.token_suffix))
        soft.task_prompts.token_ids.copy_(soft.task_prompts.token_ids[:1].expand_as(soft.task_prompts.token_ids))
        ctx = soft.contexts()
        assert torch.allclose(ctx[0, 0], ctx[0, 1]) and torch.allclose(ctx[0, 0], ctx[0, 2])


def test_task_specific_context_with_equal_rows_is_task_shared(tiny_rn):
    with torch.no_grad():
        ta = SoftCPT(tiny_rn, TASKS, seeds=[1])
        ts = SoftCPT(tiny_rn, TASKS, task_csc=True, seeds=[1])
        ts.task_ctx.copy_(ta.task_ctx[:, None].expand_as(ts.task_ctx))
        ts.proj.copy_(ta.proj)
        assert torch.allclose(ts.class_embeddings(), ta.class_embeddings(), atol=1e-6)


@pytest.mark.parametrize("sharing", ["soft", "hard"])
def test_lean_shared_prefix_encoding_equals_full_prompts(tiny_clip, sharing):
    """The class features through the shared-prefix encoder equal the encoder on the full prompts: values and the
    gradients reaching the trained tensors, for unequal task sizes and several runs."""
    _freeze(tiny_clip)
    learner = SoftCPT(tiny_clip, TASKS, sharing=sharing, seeds=[1, 2])
    if not learner.grouped:
        pytest.skip("this tower has no shared-prefix path")
    w = torch.randn(2, learner.num_classes, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(0))
    (learner.class_embeddings() * w).sum().backward()
    fast = {n: p.grad.clone() for n, p in learner.named_parameters() if p.requires_grad}
    with torch.no_grad():
        fast_emb = learner.class_embeddings()
    learner.zero_grad()
    learner.grouped = False
    (learner.class_embeddings() * w).sum().backward()
    with torch.no_grad():
        assert torch.allclose(fast_emb, learner.class_embeddings(), atol=1e-5)
    for n, p in learner.named_parameters():
        if p.requires_grad:
            assert torch.allclose(fast[n], p.grad, rtol=1e-3, atol=1e-5 * p.grad.abs().max().item()), n
    # the lean encoder alone, against the full prompts
    cp = learner.class_prompts
    P = 1 + learner.n_ctx
    eot = cp.token_ids.argmax(-1) - P
    S = int(eot.max()) + 1
    ctx = torch.randn(3, learner.n_ctx, learner.encoder.width) * 0.02
    prompts = cp._assemble(ctx[:, None].expand(3, learner.num_classes, -1, -1))
    lean = encode_shared_prefix_lean(learner.encoder, prompts[:, 0, :P], prompts[:, :, P:P + S], eot)
    full = torch.stack([encode_prompts(learner.encoder, prompts[g], cp.token_ids) for g in range(3)])
    assert torch.allclose(lean, full, atol=1e-5)


def test_each_task_is_scored_only_over_its_own_classes(tiny_rn):
    """Logits of an image are -inf outside its task's block; the loss is the official sum over tasks of CE(sum) on
    the task's columns and images, divided by the batch size; a task's class features do not depend on the class
    names of the other tasks."""
    learner = SoftCPT(tiny_rn, TASKS, seeds=[1])
    emb = learner.class_embeddings()[0].detach()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, tiny_rn.embed_dim, generator=g)
    task = torch.tensor([0, 1, 2, 1, 0, 1, 2])
    label = torch.tensor([2, 4, 1, 0, 0, 3, 0])
    logits = learner.logits(x, task, emb, 50.0)
    for i, t in enumerate(task.tolist()):
        own = torch.zeros(learner.num_classes, dtype=torch.bool)
        own[learner.block(t)] = True
        assert torch.isinf(logits[i, ~own]).all() and torch.isfinite(logits[i, own]).all()
    expected = 0.0
    for t in range(3):
        rows = task == t
        block = 50.0 * F.normalize(x[rows], dim=-1) @ emb[learner.block(t)].t()
        expected += F.cross_entropy(block, label[rows], reduction="sum")
    assert learner.loss(x, task, label, emb, 50.0).item() == pytest.approx((expected / 7).item(), rel=1e-5)
    other = [TASKS[0], TaskSpec(TASKS[1].name, ("desert", "glacier", "city", "farm", "port")), TASKS[2]]
    moved = SoftCPT(tiny_rn, other, seeds=[1])
    with torch.no_grad():
        emb2 = moved.class_embeddings()[0]
    for t in (0, 2):
        assert torch.allclose(emb[learner.block(t)], emb2[moved.block(t)], atol=1e-6)
    assert not torch.allclose(emb[learner.block(1)], emb2[moved.block(1)], atol=1e-3)


@pytest.mark.parametrize("kw,names", [({}, {"task_ctx", "proj"}), ({"task_csc": True}, {"task_ctx", "proj"}),
                                      ({"class_n_ctx": 4}, {"task_ctx", "class_ctx", "proj"}),
                                      ({"sharing": "hard"}, {"ctx"})])
def test_gradients_reach_only_the_meta_net_and_contexts(tiny_rn, kw, names):
    learner = SoftCPT(tiny_rn, TASKS, seeds=[1], **kw)
    trainable = {n for n, p in learner.named_parameters() if p.requires_grad}
    assert trainable == names
    assert not any(p.requires_grad for p in tiny_rn.model.parameters())
    x = torch.randn(5, tiny_rn.embed_dim)
    loss = learner.loss(x, torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 1, 1, 2, 4]), learner.class_embeddings()[0], 100.)
    loss.backward()
    for n, p in learner.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in tiny_rn.model.parameters())


def _toy_runs(tmp_path, bundle, cells, extra=None):
    args = toy_overrides(tmp_path, bundle, {"datasets": "[toy, toy_shift]", **(extra or {})})
    from common.config import load_config
    cfg = load_config(softcpt_main.CONFIG, "embedded", args[1::2])
    cfg = {**softcpt_main.with_variant(cfg, "nata"), "task_names": {"toy": "toy colour", "toy_shift": "shifted colour"}}
    return cfg, softcpt_main.joint_runs(cfg, cells)


def test_batched_joint_runs_train_like_separate_runs_and_frozen_clip(tmp_path, tiny_rn):
    """Two joint runs (different shots and seeds, so different schedules) in one batched model end where each ends
    alone; CLIP's weights do not move; the loss goes down."""
    cfg, runs = _toy_runs(tmp_path, tiny_rn, [(1, 1), (2, 2)])
    cfg = {**cfg, "epochs": 3, "batch_size": 4, "train": {**cfg["train"], "lr": 0.05, "warmup_epochs": 1}}
    frozen = {k: v.clone() for k, v in tiny_rn.model.state_dict().items()}
    together = train_joint_many(runs, cfg)
    assert together.train_history[0][-1]["step"] != together.train_history[1][-1]["step"]
    for r, run in enumerate(runs):
        alone = train_joint_many([run], cfg)
        assert torch.allclose(alone.proj[0], together.proj[r], atol=1e-5)
        assert torch.allclose(alone.task_ctx[0], together.task_ctx[r], atol=1e-5)
        assert [m["top1"] for m in evaluate_run(alone, run, 0)] == [m["top1"] for m in evaluate_run(together, run, r)]
    assert all(torch.equal(v, tiny_rn.model.state_dict()[k]) for k, v in frozen.items())
    cfg2 = {**cfg, "epochs": 8}
    hist = train_joint_many(runs[1:], cfg2).train_history[0]
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_cli_train_eval_reproduce_smoke(tmp_path, tiny_rn, capsys):
    args = toy_overrides(tmp_path, tiny_rn, {"datasets": "[toy, toy_shift]", "epochs": 1, "shots": "[1]",
                                             "reproduce.variants": "[nata, coop_mt]"})
    softcpt_main.main(["reproduce", *args])
    recs = load_records(paper="softcpt")
    got = sorted({(r["method"], r["variant"], r["dataset"], r["shots"], r["seed"]) for r in recs})
    assert got == [("coop_mt", "m16_end_mt", "toy", 1, 1), ("coop_mt", "m16_end_mt", "toy_shift", 1, 1),
                   ("softcpt", "nata", "toy", 1, 1), ("softcpt", "nata", "toy_shift", 1, 1)]
    rec = [r for r in recs if r["variant"] == "nata"][0]
    assert rec["protocol"] == "fewshot" and rec["multitask"]["tasks"] == ["toy", "toy_shift"]
    assert rec["n_classes"] == 4 and 0 <= rec["metrics"]["top1"] <= 100
    rows = softcpt_main.main(["eval", *args])
    stored = {r["dataset"]: r["metrics"]["top1"] for r in recs if r["variant"] == "nata"}
    assert {r["dataset"]: round(r["top1"], 4) for r in rows} == stored
    softcpt_main.main(["train", *args, "--set", "variant=nats"])
    assert {r["dataset"] for r in load_records(paper="softcpt", variant="nats")} == {"toy", "toy_shift"}


@pytest.mark.parametrize("bad,msg", [(["--set", "variant=nope"], "unknown SoftCPT variant"),
                                     (["--set", "n_ctx=0"], "n_ctx"),
                                     (["--set", "task_names={toy: shared, toy_shift: shared}"],
                                      "must differ")])
def test_bad_options_get_one_line(tmp_path, tiny_rn, capsys, bad, msg):
    args = toy_overrides(tmp_path, tiny_rn, {"datasets": "[toy, toy_shift]"})
    with pytest.raises(SystemExit) as err:
        softcpt_main.main(["train", *args, *bad])
    assert err.value.code == 2
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and msg in out[0]
    assert not load_records(paper="softcpt")
