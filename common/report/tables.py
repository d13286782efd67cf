"""Grouping run records into series and formatting them as Markdown tables (deterministic output)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .records import (aggregate, average_cells, dedupe, field_value, metric_of, norm, seed_std,
                      _shot_key)

# Metrics shown per protocol, in order (matched with norm(); other metrics are shown when none match).
PRIMARY = {"fewshot": ["top1"], "zeroshot": ["top1"], "domain_generalization": ["top1"],
           "cross_dataset": ["top1"], "base2novel": ["base", "novel", "hm"], "multilabel": ["mAP"],
           "segmentation": ["mIoU"], "test_time": ["top1"], "unsupervised": ["top1"]}
TRANSFER = ("domain_generalization", "cross_dataset")
METRIC_NAMES = {"top1": "top-1 accuracy (%)", "base": "base-class accuracy (%)",
                "novel": "novel-class accuracy (%)", "hm": "harmonic mean of base and novel (%)",
                "map": "mAP (%)", "miou": "mIoU (%)"}


def fmt(x: float | None, nd: int = 2) -> str:
    if x is None:
        return "—"
    s = f"{x:.{nd}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def fmt_pm(mean: float | None, std: float | None) -> str:
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    right = right or [False] * len(header)
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def metric_title(metric: str) -> str:
    return METRIC_NAMES.get(norm(metric), metric)


@dataclass(frozen=True, order=True)
class Key:
    """Identity of one series of runs (everything but dataset and seed)."""
    method: str
    variant: str
    shots: Any
    source: str          # training source of transfer runs ("" otherwise)

    def label(self) -> str:
        return self.method + (f" ({self.variant})" if self.variant else "")


@dataclass
class Group:
    key: Key
    cells: dict[str, dict[int, dict]] = field(default_factory=dict)   # dataset -> seed -> metrics
    papers: set = field(default_factory=set)

    def datasets(self) -> list[str]:
        return sorted(self.cells)

    def has(self, dataset: str, metric: str) -> bool:
        return dataset in self.cells and all(metric_of(m, metric) is not None for m in self.cells[dataset].values())

    def stat(self, dataset: str, metric: str) -> tuple[float, float | None, int]:
        seeds = self.cells[dataset]
        vals = [seeds[s] for s in sorted(seeds)]
        return aggregate(vals, metric), seed_std([metric_of(m, metric) for m in vals]), len(vals)

    def average(self, datasets: Sequence[str], metric: str) -> tuple[float, float | None]:
        """Seed-first then dataset mean; std over seeds of the per-seed averages when every dataset has
        the same seeds (otherwise no std is shown)."""
        cells = [[self.cells[d][s] for s in sorted(self.cells[d])] for d in datasets]
        mean = average_cells(cells, metric)
        seedsets = {tuple(sorted(self.cells[d])) for d in datasets}
        std = None
        if len(seedsets) == 1 and len(next(iter(seedsets))) >= 2:
            per_seed = [average_cells([[self.cells[d][s]] for d in datasets], metric)
                        for s in next(iter(seedsets))]
            std = seed_std(per_seed)
        return mean, std


def method_rank(methods_order: Sequence[str]):
    order = {norm(m): i for i, m in enumerate(methods_order)}
    return lambda key: (order.get(norm(key.method), len(order)), key.method, key.variant,
                        _shot_key(key.shots), key.source)


def group_records(records: Sequence[dict], prefer_paper: str | None = None) -> dict[Key, Group]:
    """Group records (already filtered to one profile, protocol and backbone) into series."""
    recs, _ = dedupe(records, prefer_paper)
    groups: dict[Key, Group] = {}
    for r in recs:
        src = field_value(r, "source") if r["protocol"] in TRANSFER else ""
        key = Key(r["method"], field_value(r, "variant"), r.get("shots"), src)
        g = groups.setdefault(key, Group(key))
        g.cells.setdefault(r["dataset"], {})[int(r["seed"])] = r["metrics"]
        g.papers.add(r["paper"])
    return groups


def metrics_for(protocol: str, records: Sequence[dict]) -> list[str]:
    present = sorted({m for r in records for m in r["metrics"]})
    by_norm = {norm(m): m for m in present}
    chosen = [by_norm[norm(m)] for m in PRIMARY.get(protocol, []) if norm(m) in by_norm]
    if protocol == "base2novel" and "hm" not in chosen and {"base", "novel"} <= set(present):
        chosen.append("hm")
    return chosen or present


def dataset_order(groups: Sequence[Group]) -> list[str]:
    """Sources first (transfer protocols), then the other datasets, each alphabetical."""
    all_ds = sorted({d for g in groups for d in g.cells})
    sources = sorted({g.key.source for g in groups if g.key.source})
    return [d for d in sources if d in all_ds] + [d for d in all_ds if d not in sources]


@dataclass
class Table:
    protocol: str
    metric: str
    header: list[str]
    rows: list[list[str]]
    right: list[bool]
    common: list[str]             # datasets the average is taken over
    notes: list[str]


def series_table(groups: Sequence[Group], protocol: str, metric: str) -> Table:
    """Rows = series, columns = datasets + the average over datasets common to all rows.

    Transfer protocols average the target datasets only ("Target avg"); the source is its own column."""
    groups = [g for g in groups if any(g.has(d, metric) for d in g.cells)]
    datasets = dataset_order(groups)
    transfer = protocol in TRANSFER
    sources = {g.key.source for g in groups if g.key.source}
    avg_pool = [d for d in datasets if not (transfer and d in sources)]
    common = [d for d in avg_pool if all(g.has(d, metric) for g in groups)]
    show_variant = any(g.key.variant for g in groups)
    show_shots = any(g.key.shots is not None for g in groups)
    seeded_max = max((len(g.cells[d]) for g in groups if g.key.shots is not None for d in g.cells), default=0)
    header = ["method"] + (["k"] if show_shots else []) + (["source"] if transfer and len(sources) > 1 else [])
    header += datasets + (["Target avg" if transfer else "Avg"] if len(avg_pool) > 1 or transfer else [])
    rows, short = [], False
    for g in groups:
        row = [g.key.label() if show_variant else g.key.method]
        if show_shots:
            row.append("—" if g.key.shots is None else str(g.key.shots))
        if transfer and len(sources) > 1:
            row.append(g.key.source or "—")
        for d in datasets:
            if not g.has(d, metric):
                row.append("—")
                continue
            m, s, n = g.stat(d, metric)
            cell = fmt_pm(m, s)
            if g.key.shots is not None and n < seeded_max:
                cell += f" ({n})"
                short = True
            row.append(cell)
        if header[-1] in ("Avg", "Target avg"):
            row.append(fmt_pm(*g.average(common, metric)) if common else "—")
        rows.append(row)
    notes = []
    if header[-1] in ("Avg", "Target avg") and common != avg_pool:
        left = [d for d in avg_pool if d not in common]
        notes.append(f"{header[-1]} over the datasets every row has: {', '.join(common) or 'none'} "
                     f"(left out: {', '.join(left)}).")
    if short:
        notes.append(f"(n): only n seeds ran for that cell (the others have {seeded_max}); mean over those.")
    n_label = 1 + show_shots + (transfer and len(sources) > 1)
    right = [False] * n_label + [True] * (len(header) - n_label)
    return Table(protocol, metric, header, rows, right, common, notes)


def render_table(t: Table) -> str:
    out = md_table(t.header, t.rows, t.right)
    if t.notes:
        out += "\n\n" + "\n".join(f"{n}" for n in t.notes)
    return out
