import pytest
import torch
import torch.nn.functional as F

import papers.mvlpt.__main__ as mvlpt_main
from common.data import build_dataset
from common.engine import load_records
from common.engine.protocols import Task
from papers.mvlpt.method import (MultiTask, build_family, multitask_logits, target_learners, train_source,
                                 transfer)
from tests.fixtures.toy import write_toy
from tests.papers.helpers import toy_overrides

NAMES = ["red square", "green circle", "blue triangle", "yellow star"]
pytestmark = pytest.mark.usefixtures("one_thread")

UPT_CFG = {"mode": "upt", "n_ctx": 4, "ctx_init": "a photo of a", "dropout": 0.1}
VPT_CFG = {"mode": "vpt", "n_vis": 4, "ctx_init": "a photo of a", "dropout": 0.1}
COOP_CFG = {"n_ctx": 16, "ctx_init": "", "class_token_position": "middle"}


class _D:   # the fields MultiTask reads from a dataset
    def __init__(self, name, classnames, template="a photo of a {}."):
        self.name, self.classnames, self.template = name, classnames, template

    @property
    def num_classes(self):
        return len(self.classnames)


def test_union_label_space_and_per_task_scoring():
    mt = MultiTask.of([_D("a", ["x", "y"]), _D("b", ["p", "q", "r"]), _D("c", ["z"])])
    assert mt.offsets == [0, 2, 5] and mt.sizes == [2, 3, 1] and mt.num_classes == 6
    torch.manual_seed(0)
    logits = torch.randn(7, 6)
    tasks = torch.tensor([0, 1, 2, 1, 0, 2, 1])
    local = torch.tensor([1, 2, 0, 0, 0, 0, 1])
    labels = local + torch.tensor(mt.offsets)[tasks]
    ours = F.cross_entropy(multitask_logits(logits, tasks, mt, "task"), labels, reduction="none")
    own = torch.stack([F.cross_entropy(logits[i, mt.offsets[t]:mt.offsets[t] + mt.sizes[t]][None], local[i:i + 1], reduction="none")[0]
                       for i, t in enumerate(tasks.tolist())])
    assert torch.allclose(ours, own, atol=1e-6)              # each task's softmax over its own classes only
    assert ours[2] == 0                                        # a one-class task is certain
    union = F.cross_entropy(multitask_logits(logits, tasks, mt, "union"), labels, reduction="none")
    assert torch.equal(union, F.cross_entropy(logits, labels, reduction="none")) and not torch.allclose(union, ours)
    with pytest.raises(ValueError, match="label_space"):
        multitask_logits(logits, tasks, mt, "joint")


@pytest.mark.parametrize("family,cfg", [("upt", UPT_CFG), ("vpt", VPT_CFG), ("coop", COOP_CFG)])
def test_source_prompt_is_the_targets_initialisation_exactly(tiny_vit, family, cfg):
    """The target learner (other class names) starts from every trained tensor of the source prompt, bit for bit;
    the from-scratch learner of the same seed does not."""
    torch.manual_seed(3)
    source = build_family(family, tiny_vit, NAMES + ["purple moon"], cfg, ["a photo of a {}.", "a {} shape."], [4, 1])
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(0.5)
    tasks = [Task({}, tiny_vit, _D("t", ["orange heart", "grey cross"]), 2, s, None) for s in (1, 2)]
    inits = target_learners(family, source, tasks, cfg)
    scratch = target_learners(family, None, tasks, cfg)
    src = {n: p for n, p in source.named_parameters() if p.requires_grad}
    for learner, fresh in zip(inits, scratch):
        got = {n: p for n, p in learner.named_parameters() if p.requires_grad}
        assert set(got) == set(src) and all(torch.equal(got[n], src[n]) for n in src)
        assert not all(torch.equal(v, src[n]) for n, v in fresh.named_parameters() if v.requires_grad)
        assert learner.classnames == ["orange heart", "grey cross"]
    if family == "upt":
        with torch.no_grad():
            source.eval(), inits[0].eval()
            assert torch.equal(source.visual_prompts(), inits[0].visual_prompts())
            assert torch.equal(source.text_prompts(), inits[0].text_prompts())


def test_transfer_refuses_another_family(tiny_vit):
    with pytest.raises(ValueError, match="do not match"):
        transfer(build_family("upt", tiny_vit, NAMES, UPT_CFG), build_family("vpt", tiny_vit, NAMES, VPT_CFG))


def test_vpt_union_text_uses_each_tasks_template(tiny_vit):
    from common.clip import zeroshot_classifier
    learner = build_family("vpt", tiny_vit, NAMES + ["purple moon"], VPT_CFG, ["a photo of a {}.", "a {} shape."], [4, 1])
    ref = torch.cat([zeroshot_classifier(tiny_vit, NAMES, ["a photo of a {}."], cache_dir=None),
                     zeroshot_classifier(tiny_vit, ["purple moon"], ["a {} shape."], cache_dir=None)])
    assert torch.allclose(learner.class_embeddings(), ref, atol=1e-6)


def test_multitask_batches_mix_tasks_and_score_each_on_its_classes(tmp_path, tiny_vit, monkeypatch):
    """Stage 1 on two tasks: batches draw from both, and every step's loss is the per-task cross-entropy."""
    write_toy(tmp_path, "toy")
    write_toy(tmp_path, "toy_shift", seed=1)
    cfg = {"epochs": 1, "batch_size": 8, "train": {"warmup_epochs": 0, "lr": 1e-12}, "eval_batch_size": 64,
           "threads": 1, **UPT_CFG}
    tasks = [Task(cfg, tiny_vit, build_dataset(n, tmp_path), 4, 1, None) for n in ("toy", "toy_shift")]
    import papers.mvlpt.method as m
    seen = []
    real = m.multitask_logits

    def spy(logits, tids, mt, space):
        seen.append((tids.clone(), real(logits, tids, mt, space)))
        return seen[-1][1]
    monkeypatch.setattr(m, "multitask_logits", spy)
    learner, mt = train_source("upt", tasks, cfg)
    assert mt.num_classes == 8 and learner.num_classes == 8
    tids = torch.cat([t for t, _ in seen])
    assert set(tids.tolist()) == {0, 1} and any(len(set(t.tolist())) == 2 for t, _ in seen)
    for t, lg in seen:
        finite = torch.isfinite(lg)
        assert torch.equal(finite, mt.allowed(t))


def test_bad_options_fail_in_one_line(tmp_path, tiny_vit, capsys):
    args = toy_overrides(tmp_path, tiny_vit, {"sources": "[toy]", "targets": "[toy_shift]"})
    for bad, word in (("targets=[toy]", "overlap"), ("families=[clip]", "unknown family"),
                      ("label_space=joint", "label_space"), ("source.shots=0", "source.shots")):
        with pytest.raises(SystemExit) as err:
            mvlpt_main.main(["reproduce", *args, "--set", bad])
        assert err.value.code == 2
        msg = capsys.readouterr().err.strip().splitlines()
        assert len(msg) == 1 and word in msg[0], msg
    assert not (tmp_path / "runs" / "mvlpt").exists()


def test_reproduce_smoke(tmp_path, tiny_vit):
    args = toy_overrides(tmp_path, tiny_vit, {"sources": "[toy]", "targets": "[toy_shift]", "epochs": 2,
                                              "source.shots": 2, "shots": "[1]",
                                              "reproduce.shots": "null"})
    mvlpt_main.main(["reproduce", *args])
    recs = load_records(paper="mvlpt")
    assert sorted({(r["method"], r["dataset"]) for r in recs}) == [
        ("coop", "toy_shift"), ("mcoop", "toy_shift"), ("mcoop_source", "toy"), ("mupt", "toy_shift"),
        ("mupt_source", "toy"), ("mvpt", "toy_shift"), ("mvpt_source", "toy")]
    by = {r["method"]: r for r in recs}
    assert by["mupt"]["init"] == "multitask" and by["mupt"]["sources"] == ["toy"]
    assert by["mcoop"]["variant"] == by["coop"]["variant"] == "m16_middle"
    assert by["mupt"]["config"]["arch"] == "tiny-vit" and by["mupt"]["shots"] == 1
    rows = mvlpt_main.main(["eval", *args])
    assert {(r["family"], r["dataset"]) for r in rows} == {("coop", "toy"), ("vpt", "toy"), ("upt", "toy")}
    src = {(r["family"]): r["top1"] for r in rows}
    assert round(src["upt"], 4) == by["mupt_source"]["metrics"]["top1"]


def test_source_stage_convergence_study_and_its_budget(tmp_path, tiny_vit, monkeypatch):
    """The study trains the text family's multitask source stage at each lr and budget and records the mean of the
    source tasks' val top-1; `source.budget` then sets that stage's epochs and lr (and names its prompt folder)."""
    args = toy_overrides(tmp_path, tiny_vit, {"sources": "[toy]", "targets": "[toy_shift]", "source.shots": 2})
    monkeypatch.setattr(mvlpt_main, "OFFICIAL_SOURCE", {"epochs": 2, "lr": 0.002})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "papers" / "mvlpt").mkdir(parents=True)
    record = mvlpt_main.main(["convergence", *args])
    assert record["method"] == "mcoop_source" and record["budgets"] == [1, 2] and record["lr_factors"] == [1, 3, 10]
    assert set(record["datasets"]) == {"toy"} and record["justified_epochs"] in (1, 2)
    rows = record["datasets"]["toy"]["lr_grid"]
    assert [r["lr"] for r in rows] == pytest.approx([0.002, 0.006, 0.02]) and all(0 <= r["val"] <= 100 for r in rows)
    assert record["datasets"]["toy"]["val_curve"]                       # the official-budget run's curve
    assert (tmp_path / "papers" / "mvlpt" / "convergence.json").is_file()
    cfg = {"source": {"budget": {"coop": {"epochs": 7, "lr": 0.05}}}}
    fcfg = mvlpt_main.source_config(cfg, "coop", {"epochs": None, "train": {"lr": 0.02, "momentum": 0.9}})
    assert fcfg == {"epochs": 7, "train": {"lr": 0.05, "momentum": 0.9}}
    assert mvlpt_main.source_config(cfg, "upt", {"epochs": None}) == {"epochs": None}
