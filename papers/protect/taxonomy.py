"""Class taxonomies for taxonomic open-set (TOS) classification: the tree, its node prompts' names, and
random tree cuts (ProTeCt, `loader/treelibs.py`, `loader/hierdata.py`, `models/treecut_generator.py`).

A taxonomy is built from a child -> parent mapping whose leaves are the dataset's classes. Nodes are
numbered in depth-first pre-order with the root left out: the root is never a label (every label set, every
tree cut, lies strictly below it), so node j is column j of the node scores and row j of the node prompts.
`parent[j] = -1` marks a child of the root. Children are ordered by the smallest class index below them, so
the leaves come out in the dataset's class order whenever the tree allows it.

A tree cut is a label set: the frontier of the nodes left *expanded*. The official sampler keeps every
internal node but the root with probability 1 - p (collapses it with probability p) and expands a node only
if it and all its ancestors were kept; the cut is every node whose ancestors are all expanded and that is
not itself expanded (a leaf or a collapsed node). Each leaf then falls under exactly one cut node.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

VIRTUAL_ROOT = "<root>"


def prompt_name(name: str) -> str:
    """A node's name as written in its prompt (official `prepro_node_name`: digits dropped - WordNet-style
    ids like 'crane_2' - a trailing '_' dropped, '_' -> space)."""
    out = re.sub(r"[0-9]", "", name)
    out = out[:-1] if out.endswith("_") else out
    return out.replace("_", " ").strip() or name


@dataclass(frozen=True)
class TreeCut:
    """One label set: `nodes` (pre-order node indices) and `leaf_to_cut[k]`, the position in `nodes` of the
    cut node that contains leaf class k."""

    nodes: torch.Tensor
    leaf_to_cut: torch.Tensor

    def key(self) -> tuple[int, ...]:
        return tuple(self.nodes.tolist())


class Taxonomy:
    """A rooted tree over the classes of a dataset."""

    def __init__(self, parent_of: Mapping[str, str], classnames: Sequence[str]):
        classnames = list(classnames)
        if not classnames:
            raise ValueError("a taxonomy needs at least one class")
        if len(set(classnames)) != len(classnames):
            raise ValueError("class names must be unique to place them in a taxonomy")
        parent_of = {str(c): str(p) for c, p in dict(parent_of).items()}
        if not parent_of:
            raise ValueError("the hierarchy is empty: give a child -> parent mapping over the class names")
        missing = [c for c in classnames if c not in parent_of]
        if missing:
            raise ValueError(f"{len(missing)} class(es) are not in the hierarchy (no parent given): {missing[:5]}")
        if VIRTUAL_ROOT in parent_of:
            raise ValueError(f"{VIRTUAL_ROOT!r} is reserved for the virtual root")
        children: dict[str, list[str]] = {}
        for c, p in parent_of.items():
            if c == p:
                raise ValueError(f"node {c!r} is its own parent")
            children.setdefault(p, []).append(c)
        inner_classes = [c for c in classnames if c in children]
        if inner_classes:
            raise ValueError(f"classes must be leaves of the hierarchy, but these have children: {inner_classes[:5]}")
        # keep only the part of the tree above the classes (a hierarchy file may cover more classes)
        class_index = {c: i for i, c in enumerate(classnames)}
        first_class: dict[str, int] = {}
        for c in classnames:
            node, seen = c, set()
            while node in parent_of:
                if node in seen:
                    raise ValueError(f"the hierarchy has a cycle through {node!r}")
                seen.add(node)
                first_class[node] = min(first_class.get(node, len(classnames)), class_index[c])
                node = parent_of[node]
            first_class[node] = min(first_class.get(node, len(classnames)), class_index[c])
        roots = sorted({n for n in first_class if n not in parent_of}, key=lambda n: first_class[n])
        # one top node is the root; several top nodes hang below a virtual root
        root = roots[0] if len(roots) == 1 else VIRTUAL_ROOT
        kids = {n: sorted([c for c in children.get(n, []) if c in first_class], key=lambda c: first_class[c])
                for n in first_class}
        if root == VIRTUAL_ROOT:
            kids[VIRTUAL_ROOT] = roots
        self.root = root
        self.mapping = {n: parent_of[n] for n in first_class if n in parent_of}  # the pruned child -> parent

        names: list[str] = []
        parent: list[int] = []
        stack = [(c, -1) for c in reversed(kids[root])]
        while stack:  # pre-order
            node, up = stack.pop()
            idx = len(names)
            names.append(node)
            parent.append(up)
            stack.extend((c, idx) for c in reversed(kids[node]))
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.classnames = classnames
        self.parent = torch.tensor(parent, dtype=torch.long)
        self.children: list[list[int]] = [[] for _ in names]
        for j, up in enumerate(parent):
            if up >= 0:
                self.children[up].append(j)
        self.top = [j for j, up in enumerate(parent) if up == -1]
        self.leaf_nodes = torch.tensor([self.index[c] for c in classnames], dtype=torch.long)
        # internal nodes, the root first (-1): the NCL classifiers / HCA checkpoints
        self.internal = [-1] + [j for j in range(len(names)) if self.children[j]]
        self.collapsible = self.internal[1:]  # the root is always expanded

        n, K = len(names), len(classnames)
        contains = torch.zeros(n, K, dtype=torch.bool)     # node j contains leaf class k
        path = torch.full((K, len(self.internal)), -1, dtype=torch.long)  # child of internal i on k's path
        slot = {node: i for i, node in enumerate(self.internal)}
        for k, leaf in enumerate(self.leaf_nodes.tolist()):
            node = leaf
            while node != -1:
                contains[node, k] = True
                up = parent[node]
                path[k, slot[up]] = node
                node = up
        self.contains = contains
        self.path_child = path
        # ancestors among the collapsible nodes: node j needs all of them expanded to appear in a cut
        col = {node: i for i, node in enumerate(self.collapsible)}
        anc = torch.zeros(n, len(self.collapsible))
        for j in range(n):
            up = parent[j]
            while up != -1:
                anc[j, col[up]] = 1.0
                up = parent[up]
        self._strict_anc = anc
        self._self_col = torch.tensor([col.get(j, -1) for j in range(n)], dtype=torch.long)
        # (C, C) over collapsible nodes: row i marks i and its collapsible ancestors (official `dependence`)
        self._dependence = anc[torch.tensor(self.collapsible, dtype=torch.long)] + torch.eye(len(self.collapsible))

    # ------------------------------------------------------------------------------------------------ info
    @classmethod
    def from_json(cls, path: str | Path, classnames: Sequence[str]) -> "Taxonomy":
        """A taxonomy from a JSON file holding a {child: parent} mapping over node names."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"hierarchy file {path} does not exist (expected JSON {{child: parent}})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"hierarchy file {path} is not valid JSON: {err}") from err
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ValueError(f"hierarchy file {path} must hold one JSON object mapping child name -> parent name")
        return cls(data, classnames)

    @property
    def num_nodes(self) -> int:
        return len(self.names)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def prompt_names(self) -> list[str]:
        return [prompt_name(n) for n in self.names]

    def ancestors(self, node: int) -> list[int]:
        """Ancestors of `node`, its parent first, the root excluded."""
        out, up = [], int(self.parent[node])
        while up != -1:
            out.append(up)
            up = int(self.parent[up])
        return out

    def depth(self) -> int:
        """Levels below the root (1 for a flat label set)."""
        return max(len(self.ancestors(int(j))) + 1 for j in self.leaf_nodes)

    def num_cuts(self) -> int:
        """How many distinct tree cuts exist (the root always expanded)."""
        def count(j: int) -> int:
            if not self.children[j]:
                return 1
            prod = 1
            for c in self.children[j]:
                prod *= count(c)
            return 1 + prod
        total = 1
        for j in self.top:
            total *= count(j)
        return total

    # ------------------------------------------------------------------------------------------------ cuts
    def cut_from_expanded(self, expanded: torch.Tensor) -> TreeCut:
        """The cut of a boolean vector over `collapsible` nodes that is closed under ancestors (an expanded
        node's ancestors are expanded)."""
        expanded = expanded.to(torch.float32)
        anc_ok = self._strict_anc @ expanded == self._strict_anc.sum(1)
        self_exp = torch.zeros(self.num_nodes, dtype=torch.bool)
        has = self._self_col >= 0
        self_exp[has] = expanded[self._self_col[has]].bool()
        nodes = torch.nonzero(anc_ok & ~self_exp).flatten()
        leaf_to_cut = self.contains[nodes].to(torch.int64).argmax(dim=0)
        return TreeCut(nodes, leaf_to_cut)

    def sample_cut(self, p: float, generator: torch.Generator | None = None) -> TreeCut:
        """A random cut: each collapsible node is kept with probability 1 - p and expanded only if it and
        all its ancestors were kept. p = 0 gives the leaves, p = 1 the root's children."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"collapse probability must be in [0, 1], got {p}")
        keep = (torch.rand(len(self.collapsible), generator=generator) >= p).float()
        expanded = self._dependence @ keep == self._dependence.sum(1)
        return self.cut_from_expanded(expanded)

    def leaf_cut(self) -> TreeCut:
        """The cut of all leaves (nothing collapsed)."""
        return self.cut_from_expanded(torch.ones(len(self.collapsible)))

    def sample_eval_cuts(self, rates: Sequence[float] = (0.9, 0.7, 0.5, 0.3, 0.1), per_rate: int = 5,
                         seed: int = 100, max_tries: int = 10000) -> list[tuple[float, TreeCut]]:
        """The fixed evaluation cuts (official `sample_treecuts.py --multi`): `per_rate` cuts at each collapse
        rate, in the given order, each distinct from every cut drawn before. When a small tree has no new cut
        left (or none turned up in `max_tries` draws at a rate), repeats are allowed so the list keeps its length."""
        gen = torch.Generator().manual_seed(seed)
        total = self.num_cuts()
        seen: set[tuple[int, ...]] = set()
        out: list[tuple[float, TreeCut]] = []
        for p in rates:
            got, tries = 0, 0
            while got < per_rate:
                cut = self.sample_cut(p, gen)
                tries += 1
                if cut.key() not in seen or len(seen) >= total or tries > max_tries:
                    seen.add(cut.key())
                    out.append((float(p), cut))
                    got += 1
        return out


def cuts_to_json(tax: Taxonomy, cuts: list[tuple[float, TreeCut]], **info) -> dict:
    """The evaluation cuts as JSON: node names (not indices) so the file stays readable and checkable."""
    return {**info, "nodes": tax.names, "parents": tax.parent.tolist(), "classes": tax.classnames,
            "cuts": [{"p": p, "labels": [tax.names[j] for j in c.nodes.tolist()],
                      "leaf_to_cut": c.leaf_to_cut.tolist()} for p, c in cuts]}


def cuts_from_json(tax: Taxonomy, data: dict) -> list[tuple[float, TreeCut]]:
    """Read cuts written by `cuts_to_json`; the file must describe this very taxonomy."""
    if (data.get("nodes"), data.get("parents"), data.get("classes")) != \
            (tax.names, tax.parent.tolist(), tax.classnames):
        raise ValueError("the stored tree cuts were drawn on another taxonomy (nodes, parents or classes differ)")
    out = []
    for c in data["cuts"]:
        nodes = torch.tensor([tax.index[n] for n in c["labels"]], dtype=torch.long)
        cut = TreeCut(nodes, torch.tensor(c["leaf_to_cut"], dtype=torch.long))
        if not torch.equal(cut.leaf_to_cut, tax.contains[nodes].to(torch.int64).argmax(0)) \
                or not torch.equal(tax.contains[nodes].sum(0), torch.ones(tax.num_classes, dtype=torch.long)):
            raise ValueError("a stored tree cut is not a partition of the leaves of this taxonomy")
        out.append((float(c["p"]), cut))
    return out
