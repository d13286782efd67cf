"""Pretraining of the tiny CLIPs: the contrastive step learns, checkpoints load back with load_clip."""
from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from common.clip import load_clip
from common.data.synthetic import pretrain as P
from common.data.synthetic.captions import captions


@pytest.fixture(scope="module")
def batch16():
    images, infos = P.render_pool(16, seed=0, progress=False)
    return images, captions(infos, 0)


def _trainable(arch):
    torch.manual_seed(0)
    b = load_clip(arch, "random")
    for p in b.model.parameters():
        p.requires_grad_(True)
    return b


@pytest.mark.parametrize("arch", ["tiny-rn", "tiny-vit"])
def test_contrastive_steps_decrease_loss_and_checkpoint_round_trips(arch, batch16, tmp_path):
    images, caps = batch16
    b = _trainable(arch)
    model = b.model.train()
    opt = torch.optim.AdamW(P.param_groups(model, 0.1), lr=1e-3)
    x, tok = P.to_model_input(images, b.image_size), b.tokenizer(caps)
    losses = [P.train_step(model, opt, P.SharedCaptionClipLoss(), x, tok) for _ in range(8)]
    assert losses[0] > math.log(16) * 0.9, "random init starts near chance (log batch)"
    assert losses[-1] < losses[0] - 0.3, losses
    assert float(model.logit_scale.exp()) <= 100 + 1e-4
    model.eval()
    path = tmp_path / f"{arch}.pt"
    from common.clip import save_clip_checkpoint
    save_clip_checkpoint(model, path)
    loaded = load_clip(arch, path)
    with torch.no_grad():
        assert torch.allclose(loaded.model.encode_image(x), model.encode_image(x), atol=1e-5)
        assert torch.allclose(loaded.model.encode_text(tok), model.encode_text(tok), atol=1e-5)


def test_shared_caption_loss_is_clip_loss_for_unique_captions_and_unicl_for_repeats():
    torch.manual_seed(0)
    fi, ft = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(14.0)
    unique = torch.arange(6)[:, None].repeat(1, 5)
    ours = P.SharedCaptionClipLoss()(fi, ft, scale, tokens=unique)
    assert torch.allclose(ours, open_clip.ClipLoss()(fi, ft, scale), atol=1e-6)
    # captions 0 and 1 identical: each of those images has two positive texts with weight 1/2 (and vice versa)
    tok = unique.clone()
    tok[1] = tok[0]
    logits = scale * fi @ ft.T
    target = torch.eye(6)
    target[0, :2] = target[1, :2] = 0.5
    by_hand = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean())
    assert torch.allclose(P.SharedCaptionClipLoss()(fi, ft, scale, tokens=tok), by_hand, atol=1e-6)
    assert not torch.allclose(by_hand, ours)


def test_model_input_matches_eval_transform(batch16):
    """The tensor path used in pretraining sees (almost) what preprocess_val makes of the saved PNG."""
    from PIL import Image
    images, _ = batch16
    b = load_clip("tiny-vit", "random")  # 32 px: the resize path
    ours = P.to_model_input(images[:4], b.image_size)
    theirs = torch.stack([b.preprocess_val(Image.fromarray(im)) for im in images[:4]])
    assert ours.shape == theirs.shape
    assert F.cosine_similarity(ours.flatten(1), theirs.flatten(1)).min() > 0.98


def test_lr_schedule_warmup_then_cosine():
    assert P.lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert P.lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert P.lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert P.lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert P.lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-9)


def test_pretrain_writes_loadable_checkpoints_for_both_archs(tmp_path):
    rn = tmp_path / "ck" / "tiny-rn.pt"
    log = P.pretrain("tiny-rn", rn, steps=2, batch=8, lr=1e-3, wd=0.1, warmup=1, pool=16, seed=0, eval_n=16,
                     progress=False, amp="fp32", curriculum=0.5)
    assert tuple(log["warmup_distribution"]["groups"]) == (1.0,) and log["curriculum"] == 0.5
    assert rn.is_file() and json.loads((tmp_path / "ck" / "tiny-rn.pt.json").read_text())["steps"] == 2
    assert len(log["loss"]) == 2 and all(np.isfinite(log["loss"]))
    load_clip("tiny-rn", rn)
    vit = tmp_path / "ck" / "tiny-vit.pt"
    log = P.pretrain("tiny-vit", vit, steps=2, batch=8, lr=1e-3, wd=0.1, warmup=1, pool=16, seed=1, distill=1.0,
                     teacher=str(rn), eval_n=16, progress=False, amp="fp32")
    assert log["teacher"] == str(rn)
    student, teacher = load_clip("tiny-vit", vit), load_clip("tiny-rn", rn)
    # the student starts from the teacher's text tower: after 2 small steps they are still close
    a = student.model.token_embedding.weight
    t = teacher.model.token_embedding.weight
    assert F.cosine_similarity(a.flatten(), t.flatten(), dim=0) > 0.9
    with pytest.raises(ValueError, match="curriculum"):
        P.pretrain("tiny-rn", rn, steps=1, batch=8, lr=1e-3, wd=0.1, warmup=1, pool=8, seed=0, curriculum=1.0, progress=False)
    with pytest.raises(ValueError, match="teacher"):
        P.pretrain("tiny-vit", vit, steps=1, batch=8, lr=1e-3, wd=0.1, warmup=1, pool=8, seed=1, distill=1.0,
                   progress=False)
    if not torch.cuda.is_available():  # the GPU option (recipe sweeps) names what is missing
        with pytest.raises(RuntimeError, match="no CUDA GPU.*--device cpu"):
            P.pretrain("tiny-rn", rn, steps=1, batch=8, lr=1e-3, wd=0.1, warmup=1, pool=8, seed=0, progress=False,
                       device="cuda")


def test_fixed_temperature_and_the_student_recipe(tmp_path):
    """logit_scale > 0 fixes the temperature (not trained); the student recipe keeps the teacher's text tower
    frozen (only the image tower moves), distils on the world's everyday stream and matches the teacher's
    zero-shot distribution over the world's concepts."""
    rn = tmp_path / "tiny-rn.pt"
    P.pretrain("tiny-rn", rn, steps=2, batch=8, lr=1e-3, wd=0.1, warmup=1, pool=16, seed=0, eval_n=16,
               progress=False, amp="fp32", logit_scale=100.0)
    teacher = load_clip("tiny-rn", rn)
    assert float(teacher.model.logit_scale.exp()) == pytest.approx(100.0)
    vit = tmp_path / "tiny-vit.pt"
    log = P.pretrain("tiny-vit", vit, steps=2, batch=8, lr=1e-2, wd=0.1, warmup=1, pool=16, seed=1, distill=1.0,
                     teacher=str(rn), eval_n=16, progress=False, amp="fp32", logit_scale=100.0, bank_distill=1.0,
                     freeze_text=True, student_stream=True)
    assert log["freeze_text"] and log["student_stream"] and log["bank_distill"] == 1.0
    assert log["distribution"]["styles"] == P.STUDENT_DIST.styles
    student = load_clip("tiny-vit", vit)
    for name in ("token_embedding.weight", "text_projection", "ln_final.weight", "transformer.resblocks.0.mlp.c_fc.weight"):
        assert torch.equal(student.model.state_dict()[name], teacher.model.state_dict()[name]), name
    with pytest.raises(ValueError, match="freeze_text keeps a teacher"):
        P.pretrain("tiny-vit", vit, steps=1, batch=8, lr=1e-3, wd=0.1, warmup=1, pool=8, seed=1, freeze_text=True,
                   progress=False)


def test_concept_bank_distillation_is_zero_for_the_teacher_itself():
    """The KL term compares the student's and the teacher's zero-shot distributions: zero when they agree."""
    torch.manual_seed(0)
    b = load_clip("tiny-rn", "random")
    bank = P.concept_bank(b.model, b.tokenizer, torch.device("cpu"))
    assert bank.shape[1] == b.embed_dim and torch.allclose(bank.norm(dim=-1), torch.ones(len(bank)))
    f = F.normalize(torch.randn(4, b.embed_dim), dim=-1)
    p = F.softmax(100 * f @ bank.T, -1)
    assert float(F.kl_div(F.log_softmax(100 * f @ bank.T, -1), p, reduction="batchmean")) == pytest.approx(0, abs=1e-5)
