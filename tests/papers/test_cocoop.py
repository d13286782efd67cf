import json

import pytest
import torch
import torch.nn.functional as F

import papers.cocoop.__main__ as cocoop_main
from common.clip import zeroshot_classifier
from common.config import load_config
from common.engine import load_records
from papers.cocoop.method import CoCoOpPromptLearner, cocoop_loss
from tests.papers.helpers import toy_overrides

NAMES = ["red square", "green circle", "blue triangle", "yellow star"]
SCALE = 100.0


pytestmark = pytest.mark.usefixtures("one_thread")


def official_loop_logits(learner: CoCoOpPromptLearner, feats: torch.Tensor) -> torch.Tensor:
    """The official CustomCLIP.forward: one image at a time, full 77-style sequences, no truncation."""
    f = feats / feats.norm(dim=-1, keepdim=True)
    ctx_shifted = learner.ctx.unsqueeze(0) + learner.meta_net(f).unsqueeze(1)
    rows = []
    for ctx_i, f_i in zip(ctx_shifted, f):
        text = learner.encoder(learner.construct_prompts(ctx_i), learner.token_ids)
        text = text / text.norm(dim=-1, keepdim=True)
        rows.append(SCALE * f_i @ text.t())
    return torch.stack(rows)


@pytest.fixture
def learner(tiny_vit):
    torch.manual_seed(0)
    pl = CoCoOpPromptLearner(tiny_vit, NAMES)
    with torch.no_grad():  # a trained-looking state: the conditional token is not negligible
        pl.ctx.add_(0.05 * torch.randn_like(pl.ctx))
        pl.meta_net.linear2.weight.mul_(20)
    return pl


def test_meta_net_shape_and_parameter_count(tiny_vit, learner):
    D, d = tiny_vit.embed_dim, learner.encoder.width
    assert learner.meta_net.linear1.weight.shape == (D // 16, D)
    assert learner.meta_net.linear2.weight.shape == (d, D // 16)
    assert learner.n_ctx == 4 and learner.ctx.shape == (4, d)
    trained = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    assert trained == D * (D // 16) + D // 16 + (D // 16) * d + d + 4 * d  # ViT-B/16: 33,312 + 2,048 = 35,360
    assert {n.split(".")[0] for n, p in learner.named_parameters() if p.requires_grad} == {"ctx", "meta_net"}


def test_batched_logits_equal_the_official_per_image_loop(learner, tiny_vit):
    feats = torch.randn(5, tiny_vit.embed_dim)
    ref = official_loop_logits(learner, feats)
    assert torch.allclose(learner.logits(feats, SCALE), ref, atol=1e-4)
    assert (ref.std(0) > 1e-3).any()  # image-dependent prompts really differ per image


def test_batched_gradients_equal_mean_of_batch1_gradients(learner, tiny_vit):
    """Batch of B with mean CE == the average of the B official batch-1 steps' gradients."""
    feats, labels = torch.randn(4, tiny_vit.embed_dim), torch.tensor([0, 1, 2, 3])
    params = [p for p in learner.parameters() if p.requires_grad]
    loss, _ = cocoop_loss(learner, feats, labels, SCALE)
    batched = torch.autograd.grad(loss, params)
    per_image = [torch.autograd.grad(F.cross_entropy(official_loop_logits(learner, feats[i:i + 1]), labels[i:i + 1]),
                                     params) for i in range(4)]
    ref_loss = torch.stack([F.cross_entropy(official_loop_logits(learner, feats[i:i + 1]), labels[i:i + 1])
                            for i in range(4)]).mean()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    for g, *gs in zip(batched, *per_image):
        mean = torch.stack(gs).mean(0)
        assert g.abs().sum() > 0
        assert torch.allclose(g, mean, atol=1e-4 * float(mean.abs().max()), rtol=1e-4)   # float32 sums over 512-d


def test_batch_invariance_and_chunking(learner, tiny_vit):
    feats = torch.randn(7, tiny_vit.embed_dim)
    with torch.no_grad():
        together = learner.logits(feats, SCALE)
        alone = torch.cat([learner.logits(feats[i:i + 1], SCALE) for i in range(7)])
        chunked = learner.logits(feats, SCALE, max_prompts=2 * len(NAMES))  # 2 images per chunk
        tiny_chunks = learner.logits(feats, SCALE, max_prompts=1)          # never below one image
    for other in (alone, chunked, tiny_chunks):
        assert torch.allclose(together, other, atol=1e-4)


def test_zero_meta_net_is_coop_m4_is_zero_shot(tiny_clip):
    torch.manual_seed(0)
    pl = CoCoOpPromptLearner(tiny_clip, NAMES)
    feats = torch.randn(6, tiny_clip.embed_dim)
    zs = zeroshot_classifier(tiny_clip, NAMES, ["a photo of a {}."], cache_dir=None)
    expected = SCALE * F.normalize(feats, dim=-1) @ zs.t()
    with torch.no_grad():
        assert not torch.allclose(pl.logits(feats, SCALE), expected, atol=1e-2)  # default init: pi != 0
        pl.meta_net.linear2.weight.zero_()
        pl.meta_net.linear2.bias.zero_()
        assert torch.allclose(pl.logits(feats, SCALE), expected, atol=1e-3)
        # ... and equals CoOp with the same (M=4, "a photo of a") context, for every image
        coop = F.normalize(feats, dim=-1) @ pl.class_embeddings().t() * SCALE
        assert torch.allclose(pl.logits(feats, SCALE), coop, atol=1e-3)


def test_gradients_reach_ctx_and_meta_net_only(learner, tiny_vit):
    tiny_vit.model.zero_grad(set_to_none=True)
    loss, _ = cocoop_loss(learner, torch.randn(3, tiny_vit.embed_dim), torch.tensor([0, 1, 3]), SCALE)
    loss.backward()
    assert learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.meta_net.parameters())
    assert all(p.grad is None for p in tiny_vit.model.parameters())


def test_novel_classes_keep_the_learned_state(learner, tiny_vit):
    novel = learner.with_classnames(["purple hexagon", "orange moon"])
    assert isinstance(novel, CoCoOpPromptLearner) and novel.num_classes == 2
    assert torch.equal(novel.ctx, learner.ctx)
    assert all(torch.equal(a, b) for a, b in zip(novel.meta_net.parameters(), learner.meta_net.parameters()))
    with pytest.raises(ValueError, match="class-specific"):
        CoCoOpPromptLearner(tiny_vit, NAMES, csc=True)


def test_official_config_values():
    cfg = load_config(cocoop_main.CONFIG, "real")
    assert (cfg["arch"], cfg["batch_size"], cfg["epochs"], cfg["n_ctx"], cfg["ctx_init"]) == \
        ("ViT-B-16", 1, 10, 4, "a photo of a")
    assert cfg["train"]["lr"] == 0.002 and cfg["train"]["warmup_lr"] == 1e-5 and cfg["b2n_shots"] == 16
    assert load_config(cocoop_main.CONFIG, "embedded")["arch"] == "tiny-vit"


def test_train_eval_reproduce_smoke(tmp_path, tiny_vit):
    args = toy_overrides(tmp_path, tiny_vit, {"epochs": 2, "batch_size": 4, "b2n_shots": 2,
                                              "eval_max_prompts": 8})
    cocoop_main.main(["reproduce", *args])
    recs = load_records(paper="cocoop")
    assert sorted({(r["protocol"], r["dataset"]) for r in recs}) == [
        ("base2novel", "toy"), ("cross_dataset", "toy"), ("domain_generalization", "toy"),
        ("domain_generalization", "toy_shift")]
    b2n = [r for r in recs if r["protocol"] == "base2novel"][0]
    assert set(b2n["metrics"]) == {"base", "novel", "hm"} and b2n["backbone"] == "tiny-vit"
    log = list((tmp_path / "runs" / "cocoop").rglob("train_log.json"))
    assert log and len(json.loads(log[0].read_text())[0]["epochs"]) == 2    # one run, its two epochs
    rows = cocoop_main.main(["eval", *args])
    assert [(round(r["base"], 4), round(r["new"], 4)) for r in rows] == [(b2n["metrics"]["base"],
                                                                          b2n["metrics"]["novel"])]


def test_cost_rows(tiny_vit):
    from papers.cocoop.method import step_cost
    rows = step_cost(tiny_vit, 3, [1, 2], repeats=1)
    assert [r["batch"] for r in rows] == [1, 2] and all(r["coop_step_ms"] > 0 and r["cocoop_step_ms"] > 0 for r in rows)
