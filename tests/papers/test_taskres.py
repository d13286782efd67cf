import pytest
import torch
import torch.nn.functional as F

import papers.taskres.__main__ as tr
import papers.zeroshot_clip.__main__ as zs
from common.clip import logit_scale, zeroshot_classifier
from common.config import load_config
from common.engine import TrainConfig, cosine_logits, load_records
from papers.clip_adapter.method import raw_text_features, train_on_views
from papers.taskres.method import (TaskRes, TextProjection, load_text_projection, pooled_text_states, project,
                                   train_text_projection)
from tests.papers.helpers import toy_overrides

NAMES = ["red square", "green circle", "blue triangle"]
TEMPLATES = ["a photo of a {}.", "a {} object."]


def test_init_is_zero_shot_exactly(tiny_rn):
    base = raw_text_features(tiny_rn, NAMES, ["a photo of a {}."])
    scale = logit_scale(tiny_rn)
    feats = torch.randn(5, tiny_rn.embed_dim)
    ref = scale * F.normalize(feats, dim=-1) @ F.normalize(base, dim=-1).t()
    for residual in ("text", "image"):
        model = TaskRes(base, scale, alpha=0.5, residual=residual)
        assert torch.count_nonzero(model.residual) == 0
        assert torch.equal(model(feats), ref)
    # the project's zero-shot head (one template)
    zsw = zeroshot_classifier(tiny_rn, NAMES, ["a photo of a {}."], cache_dir=None)
    assert torch.allclose(ref, cosine_logits(feats, zsw, scale), atol=1e-3)


def test_base_averages_unnormalised_template_features(tiny_rn):
    base = raw_text_features(tiny_rn, NAMES, TEMPLATES)
    with torch.no_grad():
        per = tiny_rn.model.encode_text(tiny_rn.tokenizer([t.format(c) for c in NAMES for t in TEMPLATES]))
    per = per.view(3, 2, -1)
    assert torch.allclose(base, per.mean(1), atol=1e-5)
    # which is not CLIP's ensembling (normalise each template first) when the template norms differ
    clip_style = F.normalize(F.normalize(per, dim=-1).mean(1), dim=-1)
    if not torch.allclose(per.norm(dim=-1)[:, 0], per.norm(dim=-1)[:, 1], rtol=1e-3):
        assert not torch.allclose(F.normalize(base, dim=-1), clip_style, atol=1e-6)


def test_classifier_is_t_plus_alpha_x():
    base = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    m = TaskRes(base, 10.0, alpha=0.5)
    with torch.no_grad():
        m.residual.copy_(torch.tensor([[0.0, 2.0], [-2.0, 0.0]]))
    assert torch.equal(m.classifier(), torch.tensor([[1.0, 1.0], [-1.0, 2.0]]))
    f = torch.tensor([[3.0, 0.0]])
    expected = 10.0 * torch.tensor([[1 / 2 ** 0.5, -1 / 5 ** 0.5]])
    assert torch.allclose(m(f), expected, atol=1e-6)
    assert torch.allclose(m(f, torch.tensor([1])), expected[:, 1:], atol=1e-6)   # a target's subset of classes
    img = TaskRes(base, 10.0, alpha=0.5, residual="image")
    assert img.residual.shape == (1, 2)
    with torch.no_grad():
        img.residual.copy_(torch.tensor([[0.0, 6.0]]))
    # f + 0.5 * [0, 6] = [3, 3] -> cos with [1, 0] and [0, 2]
    assert torch.allclose(img(f), 10.0 * torch.tensor([[2 ** -0.5, 2 ** -0.5]]), atol=1e-6)


def test_residual_scale_hand_computed():
    base = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    m = TaskRes(base, 1.0, alpha=0.5)
    with torch.no_grad():
        m.residual.copy_(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    # ||0.5 x_k|| / ||t_k|| = 1/5 and 2/2 -> mean 0.6 -> 60 %
    assert m.residual_scale() == pytest.approx(60.0)


def test_gradients_reach_only_the_residual(tiny_rn):
    base = raw_text_features(tiny_rn, NAMES, ["a photo of a {}."])
    model = TaskRes(base, logit_scale(tiny_rn))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["residual"]
    F.cross_entropy(model(torch.randn(6, tiny_rn.embed_dim)), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert model.residual.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_rn.model.parameters())
    adapter = TaskRes(base, 100.0, form="adapter")
    assert sorted(n for n, _ in adapter.named_parameters()) == ["phi.fc.0.weight", "phi.fc.2.weight"]
    with pytest.raises(ValueError, match="text classifier only"):
        TaskRes(base, 100.0, residual="image", form="direct")


def test_enhanced_base_starts_from_the_regular_base_and_trains_the_projection(tiny_rn, tmp_path):
    states = pooled_text_states(tiny_rn, NAMES, TEMPLATES)
    proj = tiny_rn.model.text_projection.detach()
    assert torch.allclose(project(states, proj), raw_text_features(tiny_rn, NAMES, TEMPLATES), atol=1e-5)
    tp = TextProjection(states, proj, 100.0)
    assert [n for n, p in tp.named_parameters() if p.requires_grad] == ["projection"]
    torch.manual_seed(0)
    y = torch.arange(3).repeat_interleave(4)
    views = [torch.randn(12, tiny_rn.embed_dim)]
    tcfg = TrainConfig(epochs=3, lr=1e-2, optimizer="adam", warmup_epochs=0, checkpoint_every=3)
    before = {n: p.clone() for n, p in tiny_rn.model.named_parameters()}
    new_base = train_text_projection(tiny_rn, states, views, y, tcfg, 8, threads=1)
    assert new_base.shape == (3, tiny_rn.embed_dim) and not torch.allclose(new_base, project(states, proj))
    assert all(torch.equal(p, before[n]) for n, p in tiny_rn.model.named_parameters())   # CLIP untouched
    # an official strong_base checkpoint stores the projection as a Linear weight (D, W)
    w = torch.randn(tiny_rn.embed_dim, states.shape[-1])
    torch.save({"state_dict": {"weight": w}, "epoch": 50}, tmp_path / "model.pth.tar")
    assert torch.equal(load_text_projection(tmp_path / "model.pth.tar"), w.t())
    torch.save({"weights": w}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="enhanced-base"):
        load_text_projection(tmp_path / "bad.pt")


def test_training_moves_only_the_residual_and_fits():
    torch.manual_seed(0)
    base = torch.randn(3, 8)
    y = torch.arange(3).repeat_interleave(6)
    centers = torch.randn(3, 8) * 3
    views = [centers[y] + torch.randn(18, 8) for _ in range(2)]
    model = TaskRes(base, 30.0, alpha=0.5)
    before = (model(views[1]).argmax(-1) == y).float().mean()
    tcfg = TrainConfig(epochs=150, lr=0.1, optimizer="adam", warmup_epochs=1, checkpoint_every=150)
    hist = train_on_views(model, views, y, tcfg, batch_size=256, threads=1)
    assert torch.equal(model.base, base)
    after = (model(views[1]).argmax(-1) == y).float().mean()
    assert hist[-1]["loss"] < hist[0]["loss"] and after > before and after > 0.9


def test_settings_layering():
    cfg = load_config(tr.CONFIG, "real")
    assert tr.settings(cfg, "oxford_flowers", "")["alpha"] == 1.0
    assert tr.settings(cfg, "imagenet", "")["lr"] == 2e-4
    assert tr.settings(cfg, "dtd", "")["lr"] == 2e-3 and tr.settings(cfg, "dtd", "")["alpha"] == 0.5
    assert tr.settings(cfg, "dtd", "a0.1")["alpha"] == 0.1
    assert tr.settings(cfg, "dtd", "", "domain_generalization")["lr"] == 2e-4
    assert [tr.epochs_for(cfg, k, "fewshot") for k in (1, 2, 4, 8, 16)] == [100, 100, 100, 200, 200]
    assert tr.epochs_for(cfg, 16, "domain_generalization") == 200
    bad = load_config(tr.CONFIG, "real", ["ablations={x: {beta: 1}}"])
    with pytest.raises(ValueError, match="beta"):
        tr.settings(bad, "dtd", "x")


def test_base_prompts_use_the_class_names_verbatim_as_official(tmp_path, tiny_rn, monkeypatch):
    """Official trainers/taskres.py formats `classnames` unchanged into CUSTOM_TEMPLATES ("a photo of a
    american_bulldog, a type of pet."), where CoOp's data layer cleans them for the other methods."""
    from common.data import build_dataset, fewshot_split
    from common.engine.protocols import Task
    from tests.fixtures.real_layouts import make

    root = make("oxford_pets", tmp_path / "DATA")
    ds = fewshot_split(build_dataset("oxford_pets", root), 1, 1)
    assert "american bulldog" in ds.classnames                      # the data layer's (CoOp's) cleaned names
    cfg = {**load_config(tr.CONFIG, "embedded", ["cache_views=1", "train.epochs=1"]), "shots": [1]}
    seen = []
    monkeypatch.setattr(tr, "raw_text_features", lambda b, names, templates: seen.append(
        [t.format(c) for c in names for t in templates]) or raw_text_features(b, names, templates))
    model = tr.fit(Task(cfg, tiny_rn, ds, 1, 1, None), "")
    assert "a photo of a american_bulldog, a type of pet." in seen[0]
    assert model.classnames == ds.classnames                        # rows still matched by the cleaned names
    assert torch.equal(model.base, raw_text_features(tiny_rn, ["abyssinian", "american_bulldog", "great_pyrenees",
                                                                "yorkshire_terrier"], [ds.template]).to(model.base))
    clean = Task({**cfg, "clean_classnames": True}, tiny_rn, ds, 1, 1, None)
    assert tr.prompt_names(clean) == ds.classnames
    with pytest.raises(ValueError, match="clean_classnames"):
        tr.check_options({**cfg, "clean_classnames": "no"})


def test_reproduce_smoke_and_base_is_zero_shot(tmp_path, tiny_rn):
    args = toy_overrides(tmp_path, tiny_rn, {"shots": "[1]", "cache_views": 1, "dg_shots": 1,
                                             "epochs_by_shots": "{1: 2}", "dg.epochs": 2, "enhanced.epochs": 2,
                                             "ablations": "{image: {residual: image}}", "ablation_shots": "[1]"})
    tr.main(["reproduce", *args])
    few = {r["variant"]: r for r in load_records(protocol="fewshot", method="taskres")}
    assert set(few) == {"", "enhanced", "image"}
    assert {"top1", "base_top1", "difficulty", "residual_pct"} <= set(few[""]["metrics"])
    dg = load_records(protocol="domain_generalization", method="taskres")
    expected = {(d, v) for d in ("toy", "toy_shift") for v in ("", "enhanced")}
    assert {(r["dataset"], r["variant"]) for r in dg} == expected
    assert not list((tmp_path / "runs").glob("taskres/_checkpoints/**/checkpoint.pt"))   # no stale resume state
    # the regular base alone is zero-shot CLIP with the dataset's template: same top-1 as the baseline's record
    zs.main(["eval", *toy_overrides(tmp_path, tiny_rn)])
    ref = next(r for r in load_records(protocol="zeroshot", dataset="toy") if r["variant"] == "single")
    assert few[""]["metrics"]["base_top1"] == pytest.approx(ref["metrics"]["top1"], abs=1e-3)


def test_cost_command_times_an_epoch(tmp_path):
    row = tr.main(["cost", "--set", "cost={dim: 16, classes: 4, shots: 4, epochs: 3}"])
    assert row["samples"] == 16 and row["epoch_ms_median"] >= 0
    assert next((tmp_path / "runs").glob("taskres/cost/*.json")).is_file()
