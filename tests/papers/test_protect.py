"""ProTeCt: taxonomy and tree cuts, the two losses against hand-computed values, gradients, and a toy smoke.

The toy taxonomy over the toy classes (red square 0, green circle 1, blue triangle 2, yellow star 3):

    shape -+- angular(0) -+- polygon(1) -+- red square(2)
           |              |              +- blue triangle(3)
           |              +- yellow star(4)
           +- curved(5) --+- green circle(6)
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import papers.protect.__main__ as pt_main
from common.data import Dataset
from common.engine import load_records
from papers.coop.method import PromptLearner
from papers.protect.method import NodeIndex, ProTeCt, dynamic_treecut_loss, node_centric_loss
from papers.protect.taxonomy import VIRTUAL_ROOT, Taxonomy, cuts_from_json, cuts_to_json, prompt_name
from tests.fixtures.toy import TOY_CLASSES
from tests.papers.helpers import toy_overrides

TREE = {"red square": "polygon", "blue triangle": "polygon", "polygon": "angular", "yellow star": "angular",
        "angular": "shape", "green circle": "curved", "curved": "shape"}


@pytest.fixture
def tax():
    return Taxonomy(TREE, TOY_CLASSES)


def _all_cuts(tax):
    """Every cut, from every closed-under-ancestors expansion of the collapsible nodes (angular, polygon, curved)."""
    out = {}
    for bits in range(8):
        exp = torch.tensor([(bits >> i) & 1 for i in range(3)], dtype=torch.float32)
        if exp[1] and not exp[0]:   # polygon expanded needs angular expanded
            continue
        cut = tax.cut_from_expanded(exp)
        out[cut.key()] = cut
    return out


# ------------------------------------------------------------------------------------------- taxonomy
def test_taxonomy_structure(tax):
    assert tax.root == "shape"
    assert tax.names == ["angular", "polygon", "red square", "blue triangle", "yellow star", "curved", "green circle"]
    assert tax.parent.tolist() == [-1, 0, 1, 1, 0, -1, 5]
    assert tax.leaf_nodes.tolist() == [2, 6, 3, 4]
    assert tax.internal == [-1, 0, 1, 5] and tax.collapsible == [0, 1, 5]
    assert tax.ancestors(3) == [1, 0] and tax.ancestors(0) == [] and tax.depth() == 3
    assert tax.num_cuts() == 6 == len(_all_cuts(tax))
    assert prompt_name("crane_2") == "crane" and prompt_name("sea_lion") == "sea lion"


def test_taxonomy_prunes_unused_branches_adds_a_virtual_root_and_rejects_bad_trees():
    t = Taxonomy({"a": "x", "b": "x", "c": "y", "unused": "z"}, ["a", "c", "b"])
    assert t.root == VIRTUAL_ROOT and t.names == ["x", "a", "b", "y", "c"] and t.top == [0, 3]
    assert "z" not in t.names and "unused" not in t.names
    with pytest.raises(ValueError, match="not in the hierarchy"):
        Taxonomy({"a": "x"}, ["a", "b"])
    with pytest.raises(ValueError, match="must be leaves"):
        Taxonomy({"a": "x", "b": "a"}, ["a", "b"])
    with pytest.raises(ValueError, match="cycle"):
        Taxonomy({"a": "x", "x": "y", "y": "x"}, ["a"])


def test_every_cut_is_a_partition_of_the_leaves(tax):
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for p in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        for _ in range(50):
            cut = tax.sample_cut(p, gen)
            cover = tax.contains[cut.nodes]                  # (cut, classes)
            assert cover.sum(0).tolist() == [1, 1, 1, 1]     # every leaf in exactly one cut node
            assert all(cover[cut.leaf_to_cut[k], k] for k in range(4))
            seen.add(cut.key())
    assert seen == set(_all_cuts(tax))                       # and the sampler reaches every cut
    assert tax.sample_cut(0.0).key() == (2, 3, 4, 6) == tax.leaf_cut().key()
    assert tax.sample_cut(1.0).key() == (0, 5)


def test_collapse_follows_the_official_dependence(tax):
    # polygon kept but angular collapsed: polygon cannot be expanded, the cut is {angular, ...}
    keep_angular_off = tax.cut_from_expanded(torch.tensor([0.0, 0.0, 1.0]))
    assert [tax.names[j] for j in keep_angular_off.nodes] == ["angular", "green circle"]
    assert keep_angular_off.leaf_to_cut.tolist() == [0, 1, 0, 0]
    # the leaf cut needs all three collapsible nodes kept: probability (1 - p)^3
    gen = torch.Generator().manual_seed(1)
    p, n = 0.3, 2000
    hits = sum(tax.sample_cut(p, gen).key() == (2, 3, 4, 6) for _ in range(n))
    assert abs(hits / n - (1 - p) ** 3) < 0.04
    # the top cut {angular, curved}: both top nodes collapsed, p^2
    hits = sum(tax.sample_cut(p, gen).key() == (0, 5) for _ in range(n))
    assert abs(hits / n - p ** 2) < 0.04


def test_eval_cuts_are_fixed_and_round_trip(tax):
    cuts = tax.sample_eval_cuts(seed=100)
    assert len(cuts) == 25 and [p for p, _ in cuts] == [r for r in (0.9, 0.7, 0.5, 0.3, 0.1) for _ in range(5)]
    assert [c.key() for _, c in cuts] == [c.key() for _, c in tax.sample_eval_cuts(seed=100)]
    # only 6 cuts exist: the first six are distinct, then repeats keep the length
    assert len({c.key() for _, c in cuts[:6]}) == 6
    data = json.loads(json.dumps(cuts_to_json(tax, cuts, seed=100)))
    back = cuts_from_json(tax, data)
    assert [(p, c.key(), c.leaf_to_cut.tolist()) for p, c in back] == \
        [(p, c.key(), c.leaf_to_cut.tolist()) for p, c in cuts]
    other = Taxonomy({**TREE, "yellow star": "polygon"}, TOY_CLASSES)
    with pytest.raises(ValueError, match="another taxonomy"):
        cuts_from_json(other, data)
    big = Taxonomy({**{f"leaf{i}": f"mid{i % 6}" for i in range(24)}, **{f"mid{i}": f"top{i % 3}" for i in range(6)}},
                   [f"leaf{i}" for i in range(24)])
    assert len({c.key() for _, c in big.sample_eval_cuts()}) == 25   # enough cuts: all distinct


# --------------------------------------------------------------------------------------------- losses
def _logits():
    #                       ang pol red blue star cur circ
    return torch.tensor([[2., 1., 3., 1., 0., 0., 5.],     # red square
                         [1., 0., 0., 0., 0., 1., 0.]])    # green circle


def test_node_centric_loss_by_hand(tax):
    labels = torch.tensor([0, 1])
    # root: both samples (angular 2 vs curved 0 for the square; 1 vs 1 for the circle, target curved);
    # angular, polygon: the square only; curved: the circle, one child -> CE 0.
    root = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    angular = math.log(1 + math.exp(-1))
    polygon = math.log(1 + math.exp(-2))
    expected = (root + angular + polygon + 0.0) / 4
    assert node_centric_loss(_logits(), labels, NodeIndex(tax)).item() == pytest.approx(expected, rel=1e-6)
    # nodes without samples are left out of the mean: squares only -> curved is skipped
    only_square = (math.log(1 + math.exp(-2)) + angular + polygon) / 3
    assert node_centric_loss(_logits()[:1], labels[:1], NodeIndex(tax)).item() == pytest.approx(only_square, rel=1e-6)


def _ncl_reference(logits, labels, tax):
    """The official loop: one CE per internal node over the samples below it, then the mean."""
    losses = []
    for node in tax.internal:
        kids = tax.top if node == -1 else tax.children[node]
        rows = [b for b, y in enumerate(labels.tolist()) if node == -1 or tax.contains[node, y]]
        if not rows:
            continue
        target = [kids.index(int(tax.path_child[labels[b], tax.internal.index(node)])) for b in rows]
        losses.append(F.cross_entropy(logits[rows][:, kids], torch.tensor(target)))
    return torch.stack(losses).mean()


def test_node_centric_loss_matches_the_per_node_loop(tax):
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        logits = torch.randn(9, 7, generator=gen) * 3
        labels = torch.randint(0, 4, (9,), generator=gen)
        assert node_centric_loss(logits, labels, NodeIndex(tax)).item() == \
            pytest.approx(_ncl_reference(logits, labels, tax).item(), rel=1e-5)


def test_dynamic_treecut_loss_by_hand(tax):
    cut = tax.cut_from_expanded(torch.tensor([1.0, 0.0, 0.0]))     # {polygon, yellow star, curved}
    assert [tax.names[j] for j in cut.nodes] == ["polygon", "yellow star", "curved"]
    assert cut.leaf_to_cut.tolist() == [0, 2, 0, 1]
    # square -> polygon: logits (1, 0, 0); circle -> curved: logits (0, 0, 1); both CE = log(e + 2) - 1
    dtl = dynamic_treecut_loss(_logits(), torch.tensor([0, 1]), cut)
    assert dtl.item() == pytest.approx(math.log(math.e + 2) - 1, rel=1e-6)


def test_dtl_without_collapse_is_the_leaf_ce(tax):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 7, generator=gen)
    labels = torch.randint(0, 4, (12,), generator=gen)
    leaf_ce = F.cross_entropy(logits[:, tax.leaf_nodes], labels)
    assert dynamic_treecut_loss(logits, labels, tax.sample_cut(0.0)).item() == pytest.approx(leaf_ce.item(), rel=1e-6)


class FixedPrompts(nn.Module):
    """A stand-in prompt learner (any module with class_embeddings() works, e.g. MaPLe's later)."""

    def __init__(self, n, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, d, generator=torch.Generator().manual_seed(0)))

    def class_embeddings(self):
        return F.normalize(self.w, dim=-1)


def test_total_loss_is_dtl_plus_lambda_ncl_and_the_baseline_is_leaf_ce(tax):
    feats = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    model = ProTeCt(tax, FixedPrompts(7, 8), scale=10.0, lam=0.5, collapse_p=0.5)
    torch.manual_seed(7)
    loss, logs = model.loss(feats, labels)
    torch.manual_seed(7)
    cut = tax.sample_cut(0.5)
    logits = 10.0 * F.normalize(feats, dim=-1) @ model.prompt.class_embeddings().t()
    expected = dynamic_treecut_loss(logits, labels, cut) + 0.5 * node_centric_loss(logits, labels, model.index)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(logs) == {"dtl", "ncl"}
    base = ProTeCt(tax, model.prompt, scale=10.0, lam=0.0, collapse_p=0.0)
    leaf_ce = F.cross_entropy(logits[:, tax.leaf_nodes], labels)
    assert base.loss(feats, labels)[0].item() == pytest.approx(leaf_ce.item(), rel=1e-6)
    with pytest.raises(ValueError, match="prompts"):
        ProTeCt(tax, PromptLearnerStub(5), scale=1.0)


class PromptLearnerStub(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.num_classes = n


def test_gradients_only_into_the_prompt_context(tax, tiny_vit):
    prompt = PromptLearner(tiny_vit, tax.prompt_names, n_ctx=16)
    model = ProTeCt(tax, prompt, scale=float(tiny_vit.model.logit_scale.exp()), lam=0.5, collapse_p=0.1)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt.ctx"]
    feats = torch.randn(5, tiny_vit.embed_dim)
    model.loss(feats, torch.tensor([0, 1, 2, 3, 1]))[0].backward()
    assert prompt.ctx.grad is not None and prompt.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_vit.model.parameters())
    # node prompts score any label set: the leaf columns are CoOp's classifier over the class names
    coop = PromptLearner(tiny_vit, TOY_CLASSES, n_ctx=16)
    with torch.no_grad():
        coop.ctx.copy_(prompt.ctx)
        assert torch.allclose(model.node_embeddings()[tax.leaf_nodes], coop.class_embeddings(), atol=1e-5)


def test_node_embeddings_through_the_shared_prefix_equal_the_full_prompts(tax, tiny_vit):
    """The cheap path (SOS + context encoded once, then each node name's tokens) gives the full encoder's numbers,
    gradients included."""
    prompt = PromptLearner(tiny_vit, tax.prompt_names, n_ctx=16)
    model = ProTeCt(tax, prompt, scale=float(tiny_vit.model.logit_scale.exp()))
    fast, full = model.node_embeddings(), prompt.class_embeddings()
    assert torch.allclose(fast, full, atol=1e-5)
    g_fast, = torch.autograd.grad(fast.sum(), prompt.ctx)
    g_full, = torch.autograd.grad(full.sum(), prompt.ctx)
    assert torch.allclose(g_fast, g_full, atol=1e-4)


# ---------------------------------------------------------------------------------------- entry point
def test_missing_hierarchy_is_a_clear_error(tmp_path, tiny_vit, capsys):
    ds = Dataset("plain", list(TOY_CLASSES), "a photo of a {}.", [], [], [])
    with pytest.raises(ValueError, match="--set hierarchy="):
        pt_main.taxonomy_for({"hierarchy": None}, ds)
    sets = toy_overrides(tmp_path, tiny_vit, {"tax_datasets": "[toy]"})
    with pytest.raises(SystemExit) as stop:  # the CLI: one line naming the problem and the fix
        pt_main.main(["train", "--profile", "real", *sets])
    assert stop.value.code == 2
    assert "error: dataset toy has no label hierarchy" in capsys.readouterr().err


def test_reproduce_smoke_on_toy(tmp_path, tiny_vit):
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps(TREE))
    # the hierarchy is given for the source only: the shifted domain (same classes) borrows its tree
    sets = toy_overrides(tmp_path, tiny_vit, {"hierarchy": f"{{toy: {tree}}}", "shots": "[2]", "train.epochs": 1,
                                              "batch_size": 8, "ablation": "true"})
    pt_main.main(["reproduce", *sets])
    recs = load_records(paper="protect", protocol="taxonomic")
    runs = [("coop", "protect_baseline"), ("protect", ""), ("protect", "dtl_only"), ("protect", "ncl_only"),
            ("zeroshot_clip", "single")]
    for ds in ("toy", "toy_shift"):
        got = [r for r in recs if r["dataset"] == ds]
        assert sorted((r["method"], r["variant"]) for r in got) == runs
        assert all(r["source"] == "toy" for r in got)
    for r in recs:
        m = r["metrics"]
        assert {"leaf", "hca", "mta", "mta_p09", "mta_p01"} <= set(m)
        assert m["hca"] <= m["leaf"] + 1e-9 and 0 <= m["mta"] <= 100
    base = next(r for r in recs if r["method"] == "coop")
    assert base["config"]["lam"] == 0.0 and base["config"]["collapse_p"] == 0.0
    for ds in ("toy", "toy_shift"):
        cuts = json.loads((tmp_path / f"runs/protect/taxonomic/embedded/{ds}/treecuts_25.json").read_text())
        assert len(cuts["cuts"]) == 25 and cuts["seed"] == 100 and cuts["possible_cuts"] == 6
    assert not list((tmp_path / "runs").rglob("checkpoint.pt"))
    # a second run skips finished work
    mtime = {r["_path"]: Path(r["_path"]).stat().st_mtime for r in recs}
    assert pt_main.main(["eval", *sets]) == []
    assert all(Path(p).stat().st_mtime == t for p, t in mtime.items())
