import pytest
import torch
import torch.nn.functional as F

import papers.upt.__main__ as upt_main
from common.clip import tokenize, zeroshot_classifier
from common.config import load_config
from common.engine import load_records
from papers.upt.method import UPTLearner, UnifiedTransform, logits_many, parameter_count
from tests.papers.helpers import toy_overrides

NAMES = ["red square", "green circle", "blue triangle", "yellow star"]
SCALE = 100.0

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n=3, seed=0):
    return torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


def zero_shot_logits(bundle, x, template="a photo of a {}."):
    zs = zeroshot_classifier(bundle, NAMES, [template], cache_dir=None)
    return SCALE * F.normalize(bundle.model.encode_image(x), dim=-1) @ zs.t(), zs


def official_image_features(learner: UPTLearner, x: torch.Tensor) -> torch.Tensor:
    """The official `VisionTransformer.forward_prompt`: [CLS, P_v, patches] after the positional embedding, then
    ln_pre over the whole sequence, the blocks, ln_post(CLS) @ proj."""
    v = learner.bundle.model.visual
    t = v.conv1(x)
    t = t.reshape(t.shape[0], t.shape[1], -1).permute(0, 2, 1)
    t = torch.cat([v.class_embedding.reshape(1, 1, -1).expand(len(x), -1, -1), t], 1) + v.positional_embedding
    p = learner.visual_prompts().unsqueeze(0).expand(len(x), -1, -1)
    t = v.ln_pre(torch.cat([t[:, :1], p, t[:, 1:]], 1))
    for block in v.transformer.resblocks:
        t = block(t)
    return v.ln_post(t[:, 0]) @ v.proj


@pytest.fixture
def upt(tiny_vit):
    torch.manual_seed(0)
    return UPTLearner(tiny_vit, NAMES, mode="upt").eval()


def test_zero_length_visual_prompts_and_the_phrase_give_zero_shot_clip(tiny_vit):
    """No visual tokens and the text context set to the embeddings of "a photo of a": exactly zero-shot CLIP
    (the placeholder layout is the tokenised hand-crafted prompt). With 4 visual tokens the image features move."""
    x = images(4)
    with torch.no_grad():
        ref, zs = zero_shot_logits(tiny_vit, x)
        torch.manual_seed(0)
        learner = UPTLearner(tiny_vit, NAMES, mode="upt", n_vis=0).eval()
        ids = tokenize(tiny_vit, [f"a photo of a {n}." for n in NAMES])
        assert torch.equal(learner.text.token_ids, ids)
        text = learner.class_embeddings(ctx=learner.text.ctx)
        assert torch.allclose(text, zs, atol=1e-5)
        assert torch.allclose(learner.logits(x, SCALE, text), ref, atol=1e-4)
        assert learner.visual_prompts() is None and learner.proj is None
        torch.manual_seed(0)
        full = UPTLearner(tiny_vit, NAMES, mode="upt").eval()
        assert not torch.allclose(full.logits(x, SCALE, text), ref, atol=1e-2)


def test_vpt_without_tokens_is_zero_shot_clip_with_the_dataset_template(tiny_vit):
    x = images(3)
    with torch.no_grad():
        ref, _ = zero_shot_logits(tiny_vit, x, "a {} object.")
        learner = UPTLearner(tiny_vit, NAMES, mode="vpt", n_vis=0, template="a {} object.")
        assert parameter_count(learner) == 0
        assert torch.allclose(learner.logits(x, SCALE), ref, atol=1e-4)
        prompted = UPTLearner(tiny_vit, NAMES, mode="vpt", n_vis=4, template="a {} object.")
        assert parameter_count(prompted) == 4 * 128
        assert not torch.allclose(prompted.logits(x, SCALE), ref, atol=1e-2)


def test_image_features_equal_the_official_forward_prompt(upt):
    """Prompts inserted after ln_pre by the shared hook (ln_pre applied to them) == the official insertion before
    ln_pre (ln_pre acts per token)."""
    x = images(3)
    with torch.no_grad():
        ref = F.normalize(official_image_features(upt, x), dim=-1)
        assert torch.allclose(upt.image_features(x), ref, atol=1e-5)


def test_official_transform_is_per_token_and_the_mixing_one_is_not(tiny_vit):
    """Official layout (sequence-first MHA on a (1, T, d) tensor): every token attends to itself only, so the
    attention output is out_proj(W_v u + b_v) and the text prompts do not depend on the visual half of U;
    `upt_mix` attends over the tokens, so they do."""
    torch.manual_seed(0)
    t = UnifiedTransform(128, 1, 0.1, mix=False).eval()
    u = torch.randn(8, 128)
    attn = t.self_attn
    w_v, b_v = attn.in_proj_weight[256:], attn.in_proj_bias[256:]
    per_token = attn.out_proj(F.linear(u, w_v, b_v))
    src = t.norm1(u + per_token)
    expected = src + t.linear2(F.relu(t.linear1(t.norm2(src))))
    assert torch.allclose(t(u), expected, atol=1e-5)
    for mode, mixes in (("upt", False), ("upt_mix", True)):
        torch.manual_seed(0)
        learner = UPTLearner(tiny_vit, NAMES, mode=mode).eval()
        grad = torch.autograd.grad(learner.text_prompts().sum(), learner.unified)[0]
        assert grad[:4].abs().sum() > 0
        assert (grad[4:].abs().sum() > 0) == mixes, mode


def test_shared_transform_receives_gradients_from_both_towers(tiny_vit):
    """The text loss reaches U and T (not the visual projection); an image-only loss reaches U, T and the
    projection: both towers train the shared parameters. CLIP stays frozen."""
    torch.manual_seed(0)
    learner = UPTLearner(tiny_vit, NAMES, mode="upt").eval()
    shared = ["unified"] + [f"transform.{n}" for n, _ in learner.transform.named_parameters()]
    text_grads = torch.autograd.grad(learner.class_embeddings().sum(), [learner.get_parameter(n) for n in shared]
                                     + list(learner.proj.parameters()), allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in text_grads[:len(shared)])
    assert all(g is None for g in text_grads[len(shared):])
    tiny_vit.model.zero_grad(set_to_none=True)
    learner.image_features(images(2)).sum().backward()
    for n, p in learner.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in tiny_vit.model.parameters())
    assert {n.split(".")[0] for n, p in learner.named_parameters() if p.requires_grad} == {"unified", "transform", "proj"}


def test_parameter_counts(tiny_vit):
    d_t = d_v = 128

    def formula(d_t, d_v, m=4, n=4):
        attn = 3 * d_t * d_t + 3 * d_t + d_t * d_t + d_t
        return (m + n) * d_t + attn + 4 * d_t + 2 * (d_t * d_t + d_t) + d_v * d_t + d_v

    assert parameter_count(UPTLearner(tiny_vit, NAMES, mode="upt")) == formula(d_t, d_v)
    assert parameter_count(UPTLearner(tiny_vit, NAMES, mode="upt_mix")) == formula(d_t, d_v)
    assert formula(512, 768) == 1_976_064          # the official ViT-B/16 count (card, official issue #1)
    assert parameter_count(UPTLearner(tiny_vit, NAMES, mode="upt_sep")) == 4 * d_t + 4 * d_v


def test_batched_logits_equal_each_runs_own(tiny_vit):
    """One image-tower pass over several runs' images, each with its own prompts == each run alone."""
    torch.manual_seed(0)
    runs = [UPTLearner(tiny_vit, NAMES, mode="upt").eval() for _ in range(3)]
    xs = [images(2, seed=i) for i in range(3)]
    with torch.no_grad():
        batched = logits_many(runs, xs, SCALE)
        for learner, x, (lg, text) in zip(runs, xs, batched):
            assert torch.allclose(lg, learner.logits(x, SCALE), atol=1e-4)
            assert torch.allclose(text, learner.class_embeddings(), atol=1e-6)


def test_two_dropout_masks_in_training_none_at_evaluation(upt):
    upt.train()
    torch.manual_seed(1)
    a = upt.transform(upt.unified)
    b = upt.transform(upt.unified)
    assert not torch.allclose(a, b)
    upt.eval()
    assert torch.equal(upt.transform(upt.unified), upt.transform(upt.unified))


def test_resnet_and_bad_modes_are_refused(tiny_rn, tiny_vit):
    with pytest.raises(ValueError, match="ViT"):
        UPTLearner(tiny_rn, NAMES, mode="upt")
    with pytest.raises(ValueError, match="mode must be one of"):
        UPTLearner(tiny_vit, NAMES, mode="unified")
    assert UPTLearner(tiny_rn, NAMES, mode="upt", n_vis=0).visual_prompts() is None   # text-only works anywhere


def test_official_config_values():
    cfg = load_config(upt_main.CONFIG, "real")
    assert (cfg["arch"], cfg["n_ctx"], cfg["ctx_init"], cfg["batch_size"], cfg["dropout"]) == \
        ("ViT-B-16", 4, "a photo of a", 32, 0.1)
    assert cfg["train"]["lr"] == 0.002 and cfg["train"]["warmup_epochs"] == 1 and cfg["epochs_by_shots"]["16"] == 200
    assert cfg["coop"]["variant"] == "m4_end_ctxv1" and cfg["vpt"]["n_vis"] == 4


def test_bad_options_fail_in_one_line_before_work(tmp_path, tiny_vit, capsys):
    args = toy_overrides(tmp_path, tiny_vit)
    for bad, word in (("mode=unified", "mode must be one of"), ("dropout=1.5", "dropout must be"),
                      ("reproduce.methods=[clip]", "unknown method"), ("coop.variant=m99", "coop.variant"),
                      ("reproduce.protocols=[base2novel]", "unknown protocol")):
        with pytest.raises(SystemExit) as err:
            upt_main.main(["reproduce", *args, "--set", bad])
        assert err.value.code == 2
        msg = capsys.readouterr().err.strip().splitlines()
        assert len(msg) == 1 and word in msg[0], msg
    assert not (tmp_path / "runs" / "upt").exists()


def test_train_eval_reproduce_smoke(tmp_path, tiny_vit):
    args = toy_overrides(tmp_path, tiny_vit, {"epochs": 2, "batch_size": 4, "shots": "[2]",
                                              "reproduce.ablation.methods": "[upt_mix]", "reproduce.shots": "null",
                                              "reproduce.datasets": "null", "reproduce.ablation.datasets": "null",
                                              "reproduce.ablation.shots": "null",
                                              "reproduce.dg_methods": "[upt, vpt_shallow, coop]"})
    upt_main.main(["reproduce", *args])
    recs = load_records(paper="upt")
    assert sorted({(r["protocol"], r["method"], r["dataset"]) for r in recs}) == [
        ("domain_generalization", "coop", "toy"), ("domain_generalization", "coop", "toy_shift"),
        ("domain_generalization", "upt", "toy"), ("domain_generalization", "upt", "toy_shift"),
        ("domain_generalization", "vpt_shallow", "toy"), ("domain_generalization", "vpt_shallow", "toy_shift"),
        ("fewshot", "coop", "toy"), ("fewshot", "upt", "toy"), ("fewshot", "upt_mix", "toy"),
        ("fewshot", "vpt_shallow", "toy")]
    few = {r["method"]: r for r in recs if r["protocol"] == "fewshot"}
    assert few["upt"]["backbone"] == "tiny-vit" and few["upt"]["variant"] == "" and few["upt"]["shots"] == 2
    assert few["coop"]["variant"] == "m4_end_ctxv1" and few["coop"]["config"]["arch"] == "tiny-vit"
    assert few["vpt_shallow"]["config"]["mode"] == "vpt" and few["vpt_shallow"]["config"]["n_vis"] == 4
    rows = upt_main.main(["eval", *args])
    assert [round(r["top1"], 4) for r in rows] == [few["upt"]["metrics"]["top1"]]


def test_runs_trained_together_equal_each_run_alone(tmp_path, tiny_vit):
    """The batched trainer (stacked prompts and transforms, one image-tower pass per step) ends where each run ends
    alone (dropout off: its masks come from one shared random stream)."""
    from common.data import build_dataset, fewshot_split
    from common.engine.protocols import Task
    from papers.upt.method import fit_many
    from tests.fixtures.toy import write_toy
    write_toy(tmp_path, "toy")
    data = build_dataset("toy", tmp_path)
    cfg = {"mode": "upt", "n_ctx": 4, "ctx_init": "a photo of a", "dropout": 0.0, "epochs": 2, "batch_size": 4,
           "train": {"lr": 0.05, "warmup_epochs": 0}, "threads": 1, "eval_batch_size": 64}
    tasks = lambda: [Task(cfg, tiny_vit, fewshot_split(data, k, s), k, s, None) for k, s in ((2, 1), (1, 2))]
    together = fit_many(tasks(), cfg)
    alone = [fit_many([t], cfg)[0] for t in tasks()]
    for a, b in zip(together, alone):
        sa, sb = a.trained_state(), b.trained_state()
        assert set(sa) == set(sb) and all(torch.allclose(sa[n], sb[n], atol=1e-5) for n in sa)
    assert not torch.allclose(together[0].unified, together[1].unified)
