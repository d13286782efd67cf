import json

import pytest
import torch
import torch.nn.functional as F

import papers.maple.__main__ as maple_main
from common.clip import tokenize, zeroshot_classifier
from common.config import load_config
from common.engine import load_records
from papers.maple.method import MaPLeLearner, evaluate, parameter_count
from tests.papers.helpers import toy_overrides

NAMES = ["red square", "green circle", "blue triangle", "yellow star"]
SCALE = 100.0

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n=3, seed=0):
    return torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


def official_image_features(learner: MaPLeLearner, x: torch.Tensor) -> torch.Tensor:
    """The official VisionTransformer_MaPLe forward: prompts appended AFTER the patch tokens, ln_pre over the whole
    sequence, the last b tokens overwritten by F_i(P_i) before blocks 1..J-1, CLS -> ln_post -> proj."""
    v = learner.bundle.model.visual
    t = v.conv1(x)
    t = t.reshape(t.shape[0], t.shape[1], -1).permute(0, 2, 1)
    t = torch.cat([v.class_embedding.reshape(1, 1, -1).expand(len(x), -1, -1), t], 1) + v.positional_embedding
    prompts = learner.visual_prompt_list()
    b = learner.n_ctx
    t = v.ln_pre(torch.cat([t, prompts[0].unsqueeze(0).expand(len(x), -1, -1)], 1))
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i < len(prompts):
            t = torch.cat([t[:, :-b], prompts[i].unsqueeze(0).expand(len(x), -1, -1)], 1)
        t = block(t)
    return v.ln_post(t[:, 0]) @ v.proj


def official_text_features(learner: MaPLeLearner) -> torch.Tensor:
    """The official TextEncoder with compound prompts: full-length sequences, positions 1..b overwritten by P_i
    before text blocks 1..J-1, EOT pooling."""
    enc = learner.encoder
    x = learner.text_input() + enc.positional_embedding
    deep = learner.text_prompts()[1:]
    b = learner.n_ctx
    for i, block in enumerate(enc.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, :1], deep[i - 1].unsqueeze(0).expand(len(x), -1, -1), x[:, 1 + b:]], 1)
        x = block(x, attn_mask=enc.attn_mask)
    x = enc.ln_final(x)[torch.arange(len(x)), learner.token_ids.argmax(-1)]
    return x @ enc.text_projection


@pytest.fixture
def maple(tiny_vit):
    torch.manual_seed(0)
    return MaPLeLearner(tiny_vit, NAMES, mode="maple", n_ctx=2, depth=3)


def test_depth_zero_is_exactly_zero_shot_clip(tiny_vit):
    """No prompts at all: the image features are encode_image's and the text is the hand-crafted prompt."""
    learner = MaPLeLearner(tiny_vit, NAMES, depth=0)
    assert parameter_count(learner) == 0
    x = images(4)
    with torch.no_grad():
        zs = zeroshot_classifier(tiny_vit, NAMES, ["a photo of a {}."], cache_dir=None)
        ref = SCALE * F.normalize(tiny_vit.model.encode_image(x), dim=-1) @ zs.t()
        assert torch.allclose(learner.logits(x, SCALE), ref, atol=1e-4)


def test_first_layer_text_is_a_photo_of_a_with_two_learnable_slots(maple, tiny_vit):
    """N_CTX=2 and CTX_INIT "a photo of a" (issue #32): P_0 = the embeddings of "a photo", "of a {class}." fixed;
    the layer-0 text input is exactly the tokenised hand-crafted prompt."""
    ids = tokenize(tiny_vit, [f"a photo of a {n}." for n in NAMES])
    emb = maple.encoder.token_embedding(ids)
    assert maple.ctx.shape == (2, maple.encoder.width)
    assert torch.equal(maple.ctx.detach(), emb[0, 1:3])
    assert torch.equal(maple.text_input().detach(), emb)
    assert torch.equal(maple.token_ids, ids)
    with pytest.raises(ValueError, match="longer than ctx_init"):
        MaPLeLearner(tiny_vit, NAMES, n_ctx=5, depth=1)


def test_depth_one_language_prompts_reproduce_zero_shot_logits(tiny_vit):
    """J=1 without visual prompts is CoOp with 2 slots from "a photo": zero-shot logits at init. With visual
    prompts (MaPLe J=1) the image features move, so the logits differ: the check can fail."""
    x = images(5)
    with torch.no_grad():
        zs = zeroshot_classifier(tiny_vit, NAMES, ["a photo of a {}."], cache_dir=None)
        ref = SCALE * F.normalize(tiny_vit.model.encode_image(x), dim=-1) @ zs.t()
        torch.manual_seed(0)
        lang = MaPLeLearner(tiny_vit, NAMES, mode="language", depth=1)
        assert torch.allclose(lang.class_embeddings(), zs, atol=1e-5)
        assert torch.allclose(lang.logits(x, SCALE), ref, atol=1e-4)
        torch.manual_seed(0)
        shallow = MaPLeLearner(tiny_vit, NAMES, mode="maple", depth=1)
        assert torch.allclose(shallow.class_embeddings(), zs, atol=1e-5)   # text side still zero-shot
        assert not torch.allclose(shallow.logits(x, SCALE), ref, atol=1e-2)


def test_image_features_equal_the_official_token_order(maple):
    """Prompts after CLS (the shared hook) == prompts after the patches with ln_pre over them (official)."""
    x = images(3)
    with torch.no_grad():
        ours = maple.image_features(x)
        ref = F.normalize(official_image_features(maple, x), dim=-1)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_text_features_equal_the_official_compound_prompt_encoder(maple):
    with torch.no_grad():
        maple.ctx.add_(0.1 * torch.randn_like(maple.ctx))
        ref = F.normalize(official_text_features(maple), dim=-1)
        assert torch.allclose(maple.class_embeddings(), ref, atol=1e-5)


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_deep_prompts_replace_the_prompt_tokens_up_to_depth(tiny_vit, tower):
    """Before block i < J the b prompt slots hold exactly P_i (text) / F_i(P_i) (vision): the previous block's
    outputs there are discarded, not accumulated; blocks >= J see the propagated outputs instead."""
    torch.manual_seed(0)
    learner = MaPLeLearner(tiny_vit, NAMES, depth=3)
    b = learner.n_ctx
    blocks = (learner.encoder.transformer if tower == "text" else tiny_vit.model.visual.transformer).resblocks
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
             for i, blk in enumerate(blocks)]
    try:
        with torch.no_grad():
            learner.class_embeddings() if tower == "text" else learner.image_features(images(2))
            expected = learner.text_prompts() if tower == "text" else learner.visual_prompt_list()
    finally:
        for h in hooks:
            h.remove()
    for i in range(len(blocks)):
        slots = seen[i][:, 1:1 + b]      # text: after SOS; vision (the hook's layout): after CLS
        if i == 0 and tower == "vision":
            target = tiny_vit.model.visual.ln_pre(expected[0])
        elif i == 0:
            target = expected[0]
        else:
            target = expected[i] if i < 3 else None
        if target is None:
            assert not torch.allclose(slots, expected[2].expand_as(slots), atol=1e-3)   # propagated, not P_2
        else:
            pos = learner.encoder.positional_embedding[1:1 + b] if tower == "text" and i == 0 else 0
            assert torch.allclose(slots, (target + pos).expand_as(slots), atol=1e-6), (tower, i)


def test_gradients_reach_only_prompts_and_couplings(maple, tiny_vit):
    tiny_vit.model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(maple.logits(images(4), SCALE), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    trained = {n for n, p in maple.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trained} == {"ctx", "deep_text", "coupling"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in maple.named_parameters() if n in trained)
    assert all(p.grad is None for p in tiny_vit.model.parameters())


def test_coupling_carries_the_image_loss_into_the_language_prompts(tiny_vit):
    """MaPLe: a loss on the image features alone moves the language prompts (through F_i); IVLP: it does not."""
    x = images(3)
    torch.manual_seed(0)
    maple = MaPLeLearner(tiny_vit, NAMES, mode="maple", depth=3)
    maple.image_features(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in maple.text_prompts())
    torch.manual_seed(0)
    ivlp = MaPLeLearner(tiny_vit, NAMES, mode="ivlp", depth=3)
    ivlp.image_features(x).sum().backward()
    assert all(p.grad is None for p in ivlp.text_prompts())
    assert all(p.grad.abs().sum() > 0 for p in ivlp.visual_prompts)


def test_parameter_counts_of_the_designs(tiny_vit):
    d_t, d_v, b, J = 128, 128, 2, 3
    count = lambda **kw: parameter_count(MaPLeLearner(tiny_vit, NAMES, **kw))
    assert count(mode="maple", depth=J) == J * (d_t * d_v + d_v) + J * b * d_t   # ViT-B/16, J=9: 3,555,072
    assert 9 * (512 * 768 + 768) + 9 * 2 * 512 == 3_555_072
    assert count(mode="ivlp", depth=J) == J * b * (d_t + d_v)
    assert count(mode="vpt", depth=J) == J * b * d_v
    assert count(mode="language", depth=J) == J * b * d_t
    with pytest.raises(ValueError, match="depth must be in"):
        MaPLeLearner(tiny_vit, NAMES, depth=5)     # tiny-vit has 4 layers per tower


def test_deep_couplings_start_as_copies_of_one_linear(maple):
    """Official: F_0 its own Linear, F_1..F_{J-1} deep copies of one Linear (identical at init)."""
    w = [f.weight for f in maple.coupling]
    assert torch.equal(w[1], w[2]) and not torch.equal(w[0], w[1])
    assert w[1].data_ptr() != w[2].data_ptr()


def test_novel_classes_keep_the_learned_state(maple):
    novel = maple.with_classnames(["purple hexagon", "orange moon"])
    assert novel.num_classes == 2 and torch.equal(novel.ctx, maple.ctx)
    assert all(torch.equal(a, b) for a, b in zip(novel.coupling.parameters(), maple.coupling.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(novel.deep_text, maple.deep_text))


def test_official_config_values():
    cfg = load_config(maple_main.CONFIG, "real")
    assert (cfg["arch"], cfg["n_ctx"], cfg["ctx_init"], cfg["depth"], cfg["batch_size"], cfg["epochs"]) == \
        ("ViT-B-16", 2, "a photo of a", 9, 4, 5)
    assert cfg["train"]["lr"] == 0.0035 and cfg["train"]["warmup_epochs"] == 1 and cfg["train"]["warmup_lr"] == 1e-5
    assert cfg["transfer"] == {"depth": 3, "epochs": 2, "lr": 0.0026}
    emb = load_config(maple_main.CONFIG, "embedded")
    assert emb["arch"] == "tiny-vit" and emb["depth"] == 3 and emb["transfer"]["depth"] == 1


def test_bad_options_fail_in_one_line_before_work(tmp_path, tiny_vit, capsys):
    args = toy_overrides(tmp_path, tiny_vit)
    for bad, word in (("mode=vision", "mode must be one of"), ("depth=9", "depth must be in"),
                      ("reproduce.protocols=[fewshot]", "unknown protocol")):
        with pytest.raises(SystemExit) as err:
            maple_main.main(["reproduce", *args, "--set", bad])
        assert err.value.code == 2
        msg = capsys.readouterr().err.strip().splitlines()
        assert len(msg) == 1 and word in msg[0], msg
    assert not (tmp_path / "runs" / "maple").exists()


def test_train_eval_reproduce_smoke(tmp_path, tiny_vit):
    args = toy_overrides(tmp_path, tiny_vit, {"epochs": 2, "batch_size": 4, "b2n_shots": 2, "depth": 2,
                                              "transfer.epochs": 1, "reproduce.ablation.methods": "[ivlp, vpt_deep]"})
    maple_main.main(["reproduce", *args])
    recs = load_records(paper="maple")
    assert sorted({(r["protocol"], r["method"], r["dataset"]) for r in recs}) == [
        ("base2novel", "ivlp", "toy"), ("base2novel", "maple", "toy"), ("base2novel", "vpt_deep", "toy"),
        ("cross_dataset", "maple", "toy"), ("domain_generalization", "maple", "toy"),
        ("domain_generalization", "maple", "toy_shift")]
    b2n = [r for r in recs if r["protocol"] == "base2novel" and r["method"] == "maple"][0]
    assert set(b2n["metrics"]) == {"base", "novel", "hm"} and b2n["backbone"] == "tiny-vit"
    assert b2n["config"]["depth"] == 2 and b2n["variant"] == "depth2"   # not the profile's J=3
    xd = [r for r in recs if r["protocol"] == "cross_dataset"][0]
    assert xd["config"]["depth"] == 1 and xd["config"]["epochs"] == 1
    logs = list((tmp_path / "runs" / "maple").rglob("train_log.json"))
    assert logs and all(len(json.loads(p.read_text())) in (1, 2) for p in logs)
    rows = maple_main.main(["eval", *args])
    assert [(round(r["base"], 4), round(r["new"], 4)) for r in rows] == [(b2n["metrics"]["base"],
                                                                          b2n["metrics"]["novel"])]


def test_evaluate_matches_per_image_logits(maple, tiny_vit, tmp_path):
    """Batched evaluation = argmax of each image's own logits (no per-sample loop in the code under test)."""
    from common.data import build_dataset
    from common.engine.protocols import Task
    from tests.fixtures.toy import write_toy
    write_toy(tmp_path, "toy")
    ds = build_dataset("toy", tmp_path)
    task = Task({"eval_batch_size": 3, "threads": 1}, tiny_vit, ds, None, 1, None)
    top1 = evaluate(maple, task)["top1"]
    from papers.maple.method import pixels
    data = pixels(task, "test")
    with torch.no_grad():
        pred = torch.stack([maple.logits(x[None], SCALE)[0] for x in data["images"]]).argmax(-1)
    assert top1 == pytest.approx(100 * float((pred == data["labels"]).float().mean()), abs=1e-6)
