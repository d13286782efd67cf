import math

import pytest
import torch
import torch.nn.functional as F

import papers.vpt_variational.__main__ as vpt_main
from common.engine import load_records
from papers.coop.method import PromptLearner, coop_logits
from papers.vpt_variational.method import (ConditionalVPTPromptLearner, VPTPromptLearner, kl_to_standard_normal,
                                           log_predictive, reparameterise, vpt_logits_many, vpt_loss, vpt_loss_fn)
from tests.papers.helpers import toy_overrides

NAMES = ["red square", "green circle", "blue triangle", "yellow star"]
SCALE = 100.0

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kl_against_hand_computed_value():
    # mu = (1, 0), sigma^2 = (1, e): per dim 0.5 (s2 + mu^2 - 1 - log s2) = (0.5, 0.5 (e - 2)); mean over the 2 dims
    mu, logvar = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = (0.5 + 0.5 * (math.e - 2.0)) / 2
    assert kl_to_standard_normal(mu, logvar).item() == pytest.approx(expected, rel=1e-6)
    # the closed form equals torch.distributions on a random batch (the official code's route), mean over dims
    mu, logvar = torch.randn(3, 7), torch.randn(3, 7)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).mean(-1)
    torch.testing.assert_close(kl_to_standard_normal(mu, logvar), ref, atol=1e-6, rtol=1e-5)
    assert kl_to_standard_normal(torch.zeros(5), torch.zeros(5)).item() == 0.0    # q = prior


def test_log_mean_exp_loss_on_a_tiny_example():
    # L = 2 samples, B = 1 image, K = 2 classes, label 0
    logits = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])      # p(y=0) = 1/2 and 3/4
    mu, logvar = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    loss, logs = vpt_loss(logits, torch.tensor([0]), mu, logvar, kl_weight=0.001)
    nll = -math.log((0.5 + 0.75) / 2)                                     # log of the MEAN likelihood
    kl = (0.5 + 0.5 * (math.e - 2.0)) / 2
    assert logs["nll"] == pytest.approx(nll, rel=1e-6)
    assert loss.item() == pytest.approx(nll + 0.001 * kl, rel=1e-6)
    # not the mean of the log-likelihoods (a different objective)
    assert nll < -(math.log(0.5) + math.log(0.75)) / 2
    # the predictive is the log of the mean of the softmaxes
    pred = log_predictive(logits)
    torch.testing.assert_close(pred.exp(), torch.tensor([[0.625, 0.375]]))


def test_reparameterised_samples_have_the_posterior_moments():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.tensor([0.5, -2.0, 0.0]), torch.tensor([0.0, math.log(4.0), math.log(0.25)])
    r = reparameterise(mu, logvar, 20000, g)
    assert r.shape == (20000, 3)
    torch.testing.assert_close(r.mean(0), mu, atol=0.04, rtol=0)
    torch.testing.assert_close(r.var(0), logvar.exp(), atol=0, rtol=0.05)
    # differentiable in mu and logvar (the reparameterisation trick)
    mu.requires_grad_(True), logvar.requires_grad_(True)
    reparameterise(mu, logvar, 4, g).pow(2).sum().backward()
    assert mu.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=">= 1"):
        reparameterise(mu, logvar, 0)


def test_official_init_and_sigma_zero_is_coops_learner_and_zero_shot(tiny_clip):
    torch.manual_seed(0)
    vpt = VPTPromptLearner(tiny_clip, NAMES, n_samples=3)
    d = vpt.encoder.width
    assert vpt.n_ctx == 4 and vpt.mu.shape == (d,) and torch.all(vpt.mu == 0)
    assert torch.all((vpt.logvar >= 0) & (vpt.logvar < 1))                # official "std" = log-variance U[0, 1)
    coop = PromptLearner(tiny_clip, NAMES, ctx_init="a photo of a")
    torch.testing.assert_close(vpt.ctx, coop.ctx)
    feats = torch.randn(6, tiny_clip.embed_dim)
    with torch.no_grad():
        vpt.logvar.fill_(-60.0)                                             # sigma -> 0, mu = 0
        logits, _, _ = vpt.sampled_logits(feats, SCALE)
        ref = coop_logits(feats, coop.class_embeddings(), SCALE)
        assert logits.shape == (3, 6, len(NAMES))
        for l in range(3):
            torch.testing.assert_close(logits[l], ref, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(vpt.predict(feats, SCALE), F.log_softmax(ref, -1), atol=1e-4, rtol=1e-4)
        # CoOp at "a photo of a" is zero-shot CLIP with that template
        from common.clip import zeroshot_classifier
        zs = zeroshot_classifier(tiny_clip, NAMES, ["a photo of a {}."], cache_dir=None).float()
        torch.testing.assert_close(vpt.predict(feats, SCALE).argmax(-1), coop_logits(feats, zs, SCALE).argmax(-1))
        # with the official sigma (1..1.65) the samples do move the prompts
        vpt.logvar.uniform_(0, 1)
        moved, _, _ = vpt.sampled_logits(feats, SCALE)
        assert (moved - ref).abs().max() > 1e-2


def test_batched_sampled_prompts_equal_full_sequence_encoding(tiny_vit):
    torch.manual_seed(1)
    vpt = VPTPromptLearner(tiny_vit, NAMES, n_samples=4)
    r = reparameterise(vpt.mu, vpt.logvar, 4)
    ctx = vpt.sample_contexts(r)
    assert ctx.shape == (4, 4, vpt.encoder.width)
    torch.testing.assert_close(ctx[2, 3] - vpt.ctx[3], r[2])               # one residual added to EVERY token
    fast = vpt.encode_contexts(ctx)
    slow = torch.stack([vpt.class_embeddings(c) for c in ctx])
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_conditional_posterior_mlps_and_per_image_samples(tiny_vit):
    torch.manual_seed(2)
    cond = ConditionalVPTPromptLearner(tiny_vit, NAMES, n_samples=3)
    D, d = tiny_vit.embed_dim, cond.encoder.width
    lin = [m for m in cond.mu_net.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in lin] == [(D // 2, D), (D // 2, D // 2), (d, D // 2)]
    assert sum(isinstance(m, torch.nn.ELU) for m in cond.logvar_net.modules()) == 2
    feats = torch.randn(5, D)
    mu, logvar = cond.posterior(feats)
    assert mu.shape == logvar.shape == (5, d)
    torch.testing.assert_close(cond.posterior(3.0 * feats)[0], mu)           # reads the normalised embedding
    torch.manual_seed(3)
    logits, _, _ = cond.sampled_logits(feats, SCALE)
    assert logits.shape == (3, 5, len(NAMES))
    # image b's logits come from its own prompts: recompute image 1 alone with the same noise
    torch.manual_seed(3)
    eps = torch.randn(3, 5, d)
    r1 = mu[1] + eps[:, 1] * (0.5 * logvar[1]).exp()
    text = torch.stack([cond.class_embeddings(cond.ctx + r) for r in r1])
    ref = SCALE * torch.einsum("d,lkd->lk", F.normalize(feats[1], dim=-1), text)
    torch.testing.assert_close(logits[:, 1], ref, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("cls", [VPTPromptLearner, ConditionalVPTPromptLearner])
def test_gradients_reach_only_context_and_posterior(tiny_vit, cls):
    torch.manual_seed(0)
    learner = cls(tiny_vit, NAMES, n_samples=2)
    trained = {n.split(".")[0] for n, p in learner.named_parameters() if p.requires_grad}
    assert trained == ({"ctx", "mu", "logvar"} if cls is VPTPromptLearner else {"ctx", "mu_net", "logvar_net"})
    feats, labels = torch.randn(4, tiny_vit.embed_dim), torch.tensor([0, 1, 2, 3])
    (logits, post), = vpt_logits_many([learner], [feats], SCALE)
    vpt_loss_fn(learner, logits, labels, post)[0].backward()
    for n, p in learner.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in tiny_vit.model.parameters())


def test_with_classnames_and_save_load_keep_the_posterior(tmp_path, tiny_vit):
    from papers.coop.method import load_learner, save_learner
    torch.manual_seed(0)
    vpt = VPTPromptLearner(tiny_vit, NAMES, n_samples=5, eval_samples=7)
    with torch.no_grad():
        vpt.mu.add_(0.3)
    other = vpt.with_classnames(["pink moon", "grey hexagon"])
    torch.testing.assert_close(other.mu, vpt.mu) and torch.testing.assert_close(other.logvar, vpt.logvar)
    assert other.n_samples == 5 and other.eval_samples == 7
    save_learner(vpt, tmp_path / "p.pt")
    back = load_learner(tmp_path / "p.pt", tiny_vit, VPTPromptLearner)
    feats = torch.randn(3, tiny_vit.embed_dim)
    torch.testing.assert_close(back.predict(feats, SCALE), vpt.predict(feats, SCALE))   # seeded test samples


def test_bad_options_are_one_line_errors(tmp_path, tiny_vit, capsys):
    sets = toy_overrides(tmp_path, tiny_vit, {"n_samples": 0})
    with pytest.raises(SystemExit) as err:
        vpt_main.main(["train", *sets])
    assert err.value.code == 2
    msg = capsys.readouterr().err.strip().splitlines()
    assert len(msg) == 1 and "n_samples" in msg[0]
    with pytest.raises(SystemExit):
        vpt_main.main(["train", *toy_overrides(tmp_path, tiny_vit, {"posterior": "bayes"})])
    assert "posterior must be one of" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("metrics.json"))


def test_reproduce_smoke_on_toy(tmp_path, tiny_vit):
    sets = toy_overrides(tmp_path, tiny_vit, {"epochs": 2, "batch_size": 4, "b2n_shots": 2, "n_samples": 2,
                                              "train.lr": 0.05, "seeds": "[1, 2]"})
    sets += ["--set", "reproduce.base2novel=[{variant: ''}, {variant: coop}, {variant: l1}, "
                      "{variant: conditional, seeds: [1]}]"]
    vpt_main.main(["reproduce", *sets])
    b2n = load_records(paper="vpt_variational", protocol="base2novel")
    assert sorted({(r["method"], r["variant"]) for r in b2n}) == [
        ("coop", "m4_end_ctxv1"), ("vpt_variational", ""), ("vpt_variational", "conditional"),
        ("vpt_variational", "l1")]
    assert len(b2n) == 2 + 2 + 2 + 1
    assert all(set(r["metrics"]) == {"base", "novel", "hm"} for r in b2n)
    assert len(load_records(paper="vpt_variational", protocol="domain_generalization")) == 2 * 2
    assert len(load_records(paper="vpt_variational", protocol="cross_dataset")) == 2
    assert not list((tmp_path / "runs").rglob("checkpoint.pt"))
    # finished runs are skipped; eval prints the seed means of the records
    assert len(vpt_main.main(["eval", *sets])) >= 2


def test_token_scale_init_shifts_the_official_log_variance(tiny_vit):
    torch.manual_seed(0)
    off = VPTPromptLearner(tiny_vit, NAMES)
    torch.manual_seed(0)
    ts = VPTPromptLearner(tiny_vit, NAMES, logvar_init="token_scale")
    shift = math.log(ts.ctx.detach().var().item())
    assert shift < -5                                                      # the tiny tower's tokens are small
    torch.testing.assert_close(ts.logvar, off.logvar + shift)              # the same U[0, 1) draw, shifted
    sigma = (0.5 * ts.logvar).exp()
    assert torch.all(sigma >= ts.ctx.std() * 0.999) and torch.all(sigma < ts.ctx.std() * 1.65)
    torch.manual_seed(0)
    c_off = ConditionalVPTPromptLearner(tiny_vit, NAMES)
    torch.manual_seed(0)
    c_ts = ConditionalVPTPromptLearner(tiny_vit, NAMES, logvar_init="token_scale")
    f = torch.randn(3, tiny_vit.embed_dim)
    torch.testing.assert_close(c_ts.posterior(f)[1], c_off.posterior(f)[1] + shift, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="logvar_init"):
        VPTPromptLearner(tiny_vit, NAMES, logvar_init="zero")
