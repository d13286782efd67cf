"""ProTeCt: prompt tuning for taxonomic open-set classification (Wu, Ho, Vasconcelos, CVPR 2024).

Every node of the class taxonomy (internal or leaf, the root excepted) gets a text prompt from one prompt
learner (CoOp here: "[SOS] v_1..v_16 <node name>. [EOS]" with a shared context), so any label set drawn from
the tree can be scored: logit(x, n) = exp(t) cos(f(x), g(n)). On top of the leaf classifier ProTeCt trains
the prompts with two losses over the node logits of a batch:

- Dynamic Treecut Loss: a random tree cut Y_cut per step (collapse rate p), cross-entropy over the cut's
  nodes with each leaf mapped to its cut ancestor, L_DTL = CE(softmax_{c in Y_cut} l_c(x), anc_cut(y)).
  With p = 0 nothing collapses and it is the ordinary leaf CE.
- Node-Centric Loss: for every internal node n (root included) with samples of the batch below it, CE over
  n's children with the child on the sample's path as target, averaged over the batch samples below n and
  then over those nodes: L_NCL = 1/|N'| sum_{n in N'} CE_n.

Total L = L_DTL + lambda * L_NCL (official `engine.py`); the CoOp baseline is leaf CE only (lambda = 0,
p = 0). Only the prompt context is trained; CLIP stays frozen.

The prompt learner is a component: any module whose `class_embeddings()` gives one normalised text feature
per taxonomy node (in `Taxonomy.names` order). A method whose image features depend on its prompts (MaPLe)
overrides `ProTeCt.node_logits` to encode images itself; the losses only see node logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import metrics
from papers.coop.method import coop_logits, run_class_embeddings

from .taxonomy import Taxonomy, TreeCut


class NodeIndex(nn.Module):
    """The taxonomy as padded index tensors (buffers follow the module to its device)."""

    def __init__(self, tax: Taxonomy):
        super().__init__()
        width = max(len(tax.top), *(len(tax.children[j]) for j in tax.internal[1:])) if tax.internal[1:] \
            else len(tax.top)
        kids = torch.zeros(len(tax.internal), width, dtype=torch.long)
        mask = torch.zeros(len(tax.internal), width, dtype=torch.bool)
        for i, node in enumerate(tax.internal):
            ch = tax.top if node == -1 else tax.children[node]
            kids[i, :len(ch)] = torch.tensor(ch)
            mask[i, :len(ch)] = True
        # target of sample with leaf k at internal node i: position of its path child among i's children
        pos = torch.full_like(tax.path_child, -1)
        for i, node in enumerate(tax.internal):
            ch = tax.top if node == -1 else tax.children[node]
            lookup = {c: r for r, c in enumerate(ch)}
            col = tax.path_child[:, i]
            pos[:, i] = torch.tensor([lookup.get(int(c), -1) for c in col])
        self.register_buffer("child_index", kids, persistent=False)
        self.register_buffer("child_mask", mask, persistent=False)
        self.register_buffer("child_target", pos, persistent=False)
        self.register_buffer("leaf_nodes", tax.leaf_nodes.clone(), persistent=False)


def node_centric_loss(logits: torch.Tensor, labels: torch.Tensor, index: NodeIndex) -> torch.Tensor:
    """L_NCL from node logits (B, n_nodes): per internal node, the batch-mean CE over its children of the
    samples below it; then the mean over internal nodes that have at least one such sample."""
    grouped = logits[:, index.child_index]                                   # (B, I, W)
    grouped = grouped.masked_fill(~index.child_mask, float("-inf"))
    target = index.child_target[labels]                                   # (B, I), -1 off the path
    below = target >= 0
    logp = F.log_softmax(grouped, dim=-1)
    ce = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, I)
    ce = torch.where(below, ce, torch.zeros_like(ce))
    count = below.sum(0)
    used = count > 0
    return (ce.sum(0)[used] / count[used]).mean()


def dynamic_treecut_loss(logits: torch.Tensor, labels: torch.Tensor, cut: TreeCut) -> torch.Tensor:
    """L_DTL: CE over the nodes of `cut`, each leaf label mapped to the cut node above it."""
    nodes, mapping = cut.nodes.to(logits.device), cut.leaf_to_cut.to(logits.device)
    return F.cross_entropy(logits[:, nodes], mapping[labels])


class ProTeCt(nn.Module):
    """Node prompts + the ProTeCt objective. `lam` = 0 and `collapse_p` = 0 give the leaf-CE baseline."""

    def __init__(self, taxonomy: Taxonomy, prompt: nn.Module, scale: float, lam: float = 0.5,
                 collapse_p: float = 0.1):
        super().__init__()
        if lam < 0:
            raise ValueError(f"lambda (NCL weight) must be >= 0, got {lam}")
        if not 0.0 <= collapse_p < 1.0:
            raise ValueError(f"collapse probability must be in [0, 1), got {collapse_p}")
        num = getattr(prompt, "num_classes", None)
        if num is not None and num != taxonomy.num_nodes:
            raise ValueError(f"the prompt learner has {num} prompts but the taxonomy {taxonomy.num_nodes} nodes: "
                             f"build it over `taxonomy.prompt_names`")
        self.taxonomy, self.prompt = taxonomy, prompt
        self.scale, self.lam, self.collapse_p = float(scale), float(lam), float(collapse_p)
        self.index = NodeIndex(taxonomy)

    def node_embeddings(self) -> torch.Tensor:
        """(n_nodes, D) normalised node prompts; CoOp's layout goes through the shared-prefix encoder (the SOS and
        context states once, then each node name's few tokens: the same numbers, a fraction of the cost)."""
        return run_class_embeddings([self.prompt])[0]

    def node_logits(self, image_features: torch.Tensor, node_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_nodes) scaled cosine logits against every node prompt."""
        w = self.node_embeddings() if node_embeddings is None else node_embeddings
        return coop_logits(image_features, w, self.scale)

    def sample_cut(self) -> TreeCut:
        """This step's cut (global torch RNG, so a resumed run draws the same cuts)."""
        if self.collapse_p == 0:
            return self.taxonomy.leaf_cut()
        return self.taxonomy.sample_cut(self.collapse_p)

    def loss(self, image_features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = self.node_logits(image_features)
        dtl = dynamic_treecut_loss(logits, labels, self.sample_cut())
        logs = {"dtl": dtl.detach()}
        if self.lam == 0:
            return dtl, logs
        ncl = node_centric_loss(logits, labels, self.index)
        logs["ncl"] = ncl.detach()
        return dtl + self.lam * ncl, logs


@torch.no_grad()
def taxonomic_metrics(scores: torch.Tensor, labels: torch.Tensor, taxonomy: Taxonomy,
                      cuts: list[tuple[float, TreeCut]]) -> dict[str, float]:
    """Leaf accuracy, HCA, MTA over the fixed cuts, and MTA per collapse rate (`mta_p09` = rate 0.9)."""
    out = {"leaf": metrics.leaf_accuracy(scores, labels, taxonomy.leaf_nodes),
           "hca": metrics.hierarchical_consistent_accuracy(scores, labels, taxonomy.parent, taxonomy.leaf_nodes)}
    per_cut = [(p, metrics.tree_cut_accuracy(scores, labels, c.nodes, c.leaf_to_cut)) for p, c in cuts]
    out["mta"] = sum(a for _, a in per_cut) / len(per_cut)
    for p in dict.fromkeys(p for p, _ in per_cut):
        accs = [a for q, a in per_cut if q == p]
        out[f"mta_p{round(p * 10):02d}"] = sum(accs) / len(accs)
    return out
