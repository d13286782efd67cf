import json
import math

import pytest
import torch
import torch.nn.functional as F

import papers.cavpt.__main__ as cavpt_main
from common.config import load_config
from common.engine import load_records
from papers.cavpt.method import ClassAwarePrompt, DPTLearner, dpt_loss, evaluate, parameter_count
from papers.coop.method import PromptLearner
from tests.papers.helpers import toy_overrides

NAMES = ["red square", "green circle", "blue triangle", "yellow star", "white ring", "black cross"]
SCALE = 100.0

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n=3, seed=0):
    return torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


def zero_shot_image(bundle, x):
    with torch.no_grad():
        return bundle.model.encode_image(x)


@pytest.fixture
def dpt(tiny_vit):
    torch.manual_seed(0)
    return DPTLearner(tiny_vit, NAMES, cpn=3, vpt_tokens=4, kv_tokens=5)


def test_without_visual_prompts_the_logits_are_coops(tiny_vit):
    """No VPT tokens and K = 0 class-aware prompts (the switch that disables CAVPT): the prediction is CoOp's
    logits with the same context, exactly."""
    torch.manual_seed(0)
    learner = DPTLearner(tiny_vit, NAMES, vpt_tokens=0, cpn=0)
    torch.manual_seed(0)
    coop = PromptLearner(tiny_vit, NAMES, n_ctx=16)
    assert torch.equal(learner.text.ctx, coop.ctx)
    x = images(4)
    with torch.no_grad():
        ref = SCALE * F.normalize(tiny_vit.model.encode_image(x), dim=-1) @ coop.class_embeddings().t()
        out = learner(x, zero_shot_image(tiny_vit, x), SCALE)
    assert torch.allclose(out["logits"], ref, atol=1e-4)
    assert out["aux"] is None and out["indices"] is None


def test_text_features_are_the_coop_prompts_encoded(dpt):
    """The shared-prefix path equals the text encoder on the full CoOp prompts."""
    from common.clip.text import encode_prompts
    with torch.no_grad():
        ref = encode_prompts(dpt.text.encoder, dpt.text(), dpt.text.token_ids)
        assert torch.allclose(dpt.text_features(), ref, atol=1e-4)


def test_cross_attention_is_softmax_qk_over_sqrt_d_times_v(tiny_vit):
    """O = W_v softmax((W_q q)(W_k X)^T / sqrt(32)) X, computed element by element."""
    torch.manual_seed(0)
    block = ClassAwarePrompt(tiny_vit.embed_dim, 16, n_classes=5, kv_tokens=3, attn_dim=32)
    q, kv = torch.randn(2, 4, 16), torch.randn(2, 7, 16)
    with torch.no_grad():
        out, attn = block.attention(q, kv)
    Wq, Wk, Wv = block.wq.weight.detach(), block.wk.weight.detach(), block.wv.weight.detach()
    for b in range(2):
        for i in range(4):
            scores = torch.tensor([float((Wq @ q[b, i]) @ (Wk @ kv[b, j])) / math.sqrt(32) for j in range(7)])
            a = torch.exp(scores - scores.max())
            a = a / a.sum()
            assert torch.allclose(attn[b, i], a, atol=1e-5)
            mixed = sum(a[j] * kv[b, j] for j in range(7))
            assert torch.allclose(out[b, i], Wv @ mixed, atol=1e-5)


def test_class_aware_prompts_and_aux_logits(tiny_vit):
    """Keys/values = the block input plus the learnable tokens; p = LN2(O + q), aux = Cls(LN1(O)), q = Phi(z)."""
    torch.manual_seed(0)
    block = ClassAwarePrompt(tiny_vit.embed_dim, 16, n_classes=5, kv_tokens=3)
    z, x = torch.randn(2, 4, tiny_vit.embed_dim), torch.randn(2, 7, 16)
    p, aux = block(z, x)
    q = block.query(z)
    o, _ = block.attention(q, torch.cat([x, block.kv.expand(2, -1, -1)], 1))
    assert torch.allclose(p, block.ln_out(o + q), atol=1e-6)
    assert torch.allclose(aux, block.classifier(block.ln_aux(o)), atol=1e-6)
    assert p.shape == (2, 4, 16) and aux.shape == (2, 4, 5)


def official_image_features(learner: DPTLearner, x: torch.Tensor, zs: torch.Tensor):
    """The official ImageEncoder_VPTD / Transformer_VPTD forward: VPT tokens appended AFTER the patches of blocks
    1..L-1 (not normalised) and removed after each block; the top block gets the K class-aware prompts, made from
    the detached block input and the learned text features of the zero-shot top-K classes."""
    v = learner.bundle.model.visual
    t = v.conv1(x).flatten(2).transpose(1, 2)
    t = v.ln_pre(torch.cat([v.class_embedding.expand(len(x), 1, -1), t], 1) + v.positional_embedding)
    blocks = v.transformer.resblocks
    n_v = learner.vpt.shape[1]
    for i in range(learner.n_vpt):
        t = blocks[i](torch.cat([t, learner.vpt[i].expand(len(x), -1, -1)], 1))[:, :-n_v]
    logits = F.normalize(zs, dim=-1) @ learner.zs_text.t()
    idx = torch.sort(logits, descending=True).indices[:, :learner.cpn]
    text = learner.text_features()
    p, _ = learner.cavpt[0](text[idx], t)
    t = blocks[-1](torch.cat([t, p], 1))[:, :-learner.cpn]
    return v.ln_post(t[:, 0]) @ v.proj, idx


def test_forward_matches_the_official_token_order(dpt, tiny_vit):
    x = images(3)
    zs = zero_shot_image(tiny_vit, x)
    with torch.no_grad():
        ref, idx = official_image_features(dpt, x, zs)
        out = dpt(x, zs, SCALE)
        text = F.normalize(dpt.text_features(), dim=-1)
    assert torch.equal(out["indices"], idx)
    assert torch.allclose(out["logits"], SCALE * F.normalize(ref, dim=-1) @ text.t(), atol=1e-4)
    assert torch.allclose(out["logits_fixed_text"], SCALE * F.normalize(ref, dim=-1) @ dpt.zs_text.t(), atol=1e-4)
    assert torch.allclose(out["logits_zs_img"], SCALE * F.normalize(zs, dim=-1) @ text.t(), atol=1e-4)
    assert out["aux"].shape == (3, 1, 3, len(NAMES))


def test_selection_is_the_zero_shot_top_k_and_k_is_clipped(tiny_vit):
    learner = DPTLearner(tiny_vit, NAMES[:2], cpn=10)
    assert learner.cpn == 2                 # official: CPN clipped to the class count
    x = images(4)
    zs = zero_shot_image(tiny_vit, x)
    order = (F.normalize(zs, dim=-1) @ learner.zs_text.t()).argsort(-1, descending=True)
    assert torch.equal(learner.select(zs), order[:, :2])


def test_vlp_has_vpt_in_every_block_and_no_cavpt(tiny_vit):
    vlp = DPTLearner(tiny_vit, NAMES, mode="vlp", vpt_tokens=10)
    dpt = DPTLearner(tiny_vit, NAMES, mode="dpt", vpt_tokens=10)
    assert vlp.vpt.shape == (4, 10, 128) and len(vlp.cavpt) == 0
    assert dpt.vpt.shape == (3, 10, 128) and len(dpt.cavpt) == 1


def test_gradients_reach_only_prompts_and_the_generator(dpt, tiny_vit):
    x = images(4)
    y = torch.tensor([0, 1, 2, 3])
    out = dpt(x, zero_shot_image(tiny_vit, x), SCALE)
    loss, _ = dpt_loss(out, y, guidance=True, alpha=0.3)
    loss.backward()
    trained = {n for n, p in dpt.named_parameters() if p.requires_grad}
    assert trained == {"text.ctx", "vpt"} | {f"cavpt.0.{n}" for n, _ in dpt.cavpt[0].named_parameters()}
    assert all(p.grad is None for p in tiny_vit.model.parameters()), "CLIP must stay frozen"
    for n, p in dpt.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert parameter_count(dpt) == sum(p.numel() for n, p in dpt.named_parameters() if n in trained)


def test_keys_values_are_detached(dpt, tiny_vit):
    """The auxiliary loss alone never reaches the VPT tokens (the class-aware branch reads X detached), but it
    reaches the CoOp context through the queries."""
    x = images(4)
    out = dpt(x, zero_shot_image(tiny_vit, x), SCALE)
    out["aux"].sum().backward()
    assert dpt.vpt.grad is None or dpt.vpt.grad.abs().sum() == 0
    assert dpt.text.ctx.grad.abs().sum() > 0


def test_loss_against_hand_computed_values():
    torch.manual_seed(0)
    n, K, C = 3, 2, 4
    out = {"logits": torch.randn(n, C), "logits_zs_img": torch.randn(n, C), "logits_fixed_text": torch.randn(n, C),
           "aux": torch.randn(n, 1, K, C), "indices": torch.tensor([[1, 0], [2, 3], [0, 1]])}
    y = torch.tensor([0, 1, 1])

    def ce(logits, label):
        return -torch.log_softmax(logits, -1)[label]
    base = sum(ce(out["logits"][i], y[i]) for i in range(n)) / n
    s1 = sum(ce(out["logits_zs_img"][i], y[i]) for i in range(n)) / n
    s2 = sum(ce(out["logits_fixed_text"][i], y[i]) for i in range(n)) / n
    # prompts whose selected class is the label: image 0 slot 1 (class 0), image 2 slot 1 (class 1)
    aux = (ce(out["aux"][0, 0, 1], 0) + ce(out["aux"][2, 0, 1], 1)) / 2
    loss, _ = dpt_loss(out, y, guidance=True, alpha=0.3)
    assert torch.allclose(loss, s1 + s2 + 0.1 * base + 0.3 * aux, atol=1e-6)
    loss, _ = dpt_loss(out, y, guidance=False, alpha=0.3)
    assert torch.allclose(loss, base + 0.3 * aux, atol=1e-6)
    loss, _ = dpt_loss(out, y, guidance=False, alpha=0.0)
    assert torch.allclose(loss, base, atol=1e-6)
    out["indices"] = torch.tensor([[2, 3], [0, 2], [2, 3]])      # no prompt of the true class: no aux term
    loss, _ = dpt_loss(out, y, guidance=False, alpha=0.3)
    assert torch.allclose(loss, base, atol=1e-6)


def test_other_classes_keep_the_prompts_and_drop_the_aux_head(dpt):
    novel = dpt.with_classnames(["purple hexagon", "orange moon"], "a photo of a {}, a shape.")
    assert novel.num_classes == 2 and novel.cpn == 2 and novel.template == "a photo of a {}, a shape."
    assert torch.equal(novel.text.ctx, dpt.text.ctx) and torch.equal(novel.vpt, dpt.vpt)
    assert torch.equal(novel.cavpt[0].query.weight, dpt.cavpt[0].query.weight)
    assert torch.equal(novel.cavpt[0].kv, dpt.cavpt[0].kv)
    assert novel.cavpt[0].classifier.weight.shape == (2, 128)


def test_official_config_values():
    cfg = load_config(cavpt_main.CONFIG, "real")
    assert (cfg["arch"], cfg["n_ctx"], cfg["vpt_tokens"], cfg["cavpt_layers"], cfg["cpn"], cfg["epochs"]) == \
        ("ViT-B-32", 16, 10, 1, 10, 60)
    assert (cfg["alpha"], cfg["gkg_fraction"], cfg["text_lr"], cfg["batch_size"]) == (0.3, 0.5, 0.002, 32)
    assert cfg["train"]["lr"] == 0.01 and cfg["train"]["warmup_epochs"] == 10 and cfg["text_warmup_epochs"] == 1
    assert load_config(cavpt_main.CONFIG, "embedded")["arch"] == "tiny-vit"


def test_bad_options_fail_in_one_line_before_work(tmp_path, tiny_vit, tiny_rn, capsys):
    args = toy_overrides(tmp_path, tiny_vit)
    for bad, word in (("mode=vpt", "mode must be one of"), ("cpn=-1", "cpn must be"),
                      ("gkg_fraction=2.0", "gkg_fraction"), ("reproduce.protocols=[zeroshot]", "unknown protocol")):
        with pytest.raises(SystemExit) as err:
            cavpt_main.main(["reproduce", *args, "--set", bad])
        assert err.value.code == 2
        msg = capsys.readouterr().err.strip().splitlines()
        assert len(msg) == 1 and word in msg[0], msg
    with pytest.raises(SystemExit):
        cavpt_main.main(["train", *toy_overrides(tmp_path, tiny_rn)])
    msg = capsys.readouterr().err.strip().splitlines()
    assert len(msg) == 1 and "ViT" in msg[0], msg
    assert not (tmp_path / "runs" / "cavpt").exists()


def test_train_eval_reproduce_smoke(tmp_path, tiny_vit):
    args = toy_overrides(tmp_path, tiny_vit, {"epochs": 2, "batch_size": 4, "b2n_shots": 2, "cpn": 2,
                                              "reproduce.fewshot.shots": "[1]", "reproduce.ablation.shots": "[2]",
                                              "reproduce.ablation.methods": "[vlp, cavpt_noaux]",
                                              "reproduce.protocols": "[fewshot, ablation, base2novel, domain_generalization]"})
    cavpt_main.main(["reproduce", *args])
    recs = load_records(paper="cavpt")
    assert sorted({(r["protocol"], r["method"], r["shots"]) for r in recs}) == [
        ("base2novel", "cavpt", 2), ("base2novel", "coop", 2), ("domain_generalization", "cavpt", 2), ("domain_generalization", "coop", 2),
        ("fewshot", "cavpt", 1), ("fewshot", "cavpt", 2), ("fewshot", "cavpt_noaux", 2), ("fewshot", "coop", 1),
        ("fewshot", "coop", 2), ("fewshot", "vlp", 2)]
    coop = [r for r in recs if r["method"] == "coop"][0]
    assert coop["variant"] == "m16_end" and coop["backbone"] == "tiny-vit"
    b2n = [r for r in recs if r["protocol"] == "base2novel"][0]
    assert set(b2n["metrics"]) == {"base", "novel", "hm"}
    logs = list((tmp_path / "runs" / "cavpt").rglob("train_log.json"))
    assert logs and all(len(json.loads(p.read_text())) == 2 for p in logs if "coop" not in str(p))
    rows = cavpt_main.main(["train", *args, "--set", "shots=[2]", "--set", "force=true"])
    assert [r["method"] for r in rows] == ["cavpt"]
    again = cavpt_main.main(["eval", *args, "--set", "shots=[2]"])
    assert [round(r["top1"], 4) for r in again] == [rows[0]["metrics"]["top1"]]


def test_evaluate_matches_per_image_logits(dpt, tiny_vit, tmp_path):
    """Batched evaluation = argmax of each image's own logits."""
    from common.data import build_dataset
    from common.engine.protocols import Task
    from papers.cavpt.method import pixels
    from tests.fixtures.toy import write_toy
    write_toy(tmp_path, "toy")
    ds = build_dataset("toy", tmp_path)
    task = Task({"eval_batch_size": 3, "threads": 1}, tiny_vit, ds, None, 1, None)
    learner = dpt.with_classnames(ds.classnames, ds.template)
    top1 = evaluate(learner, task)["top1"]
    data = pixels(task, "test")
    zs = task.features("test")["features"]
    with torch.no_grad():
        pred = torch.stack([learner(x[None], z[None], SCALE)["logits"][0] for x, z in zip(data["images"], zs)])
    assert top1 == pytest.approx(100 * float((pred.argmax(-1) == data["labels"]).float().mean()), abs=1e-6)
