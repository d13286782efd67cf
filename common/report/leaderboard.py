"""``reports/leaderboard.md``: every method that has run, per protocol and backbone, on a shared grid.

Fairness rule: within one table every method is averaged over the same cells, the (dataset, shots, seed)
cells that all listed methods ran (seed is ignored for runs without training data, shots = null, whose
single seed is arbitrary). So that one incomplete run does not shrink everybody's grid, the grid is the
set of cells more than half of the methods ran, and a method missing part of it is listed under the table
(with what it lacks) instead of in it.

Rows never ranked: runs whose setting was chosen on the test split (record field ``selected_on: test``, e.g.
CALIP's official ``test_oracle`` search) are listed under their table, not in it. Hyperparameter sweeps
(records with a ``sweep`` field: WiSE-FT's alphas, CLIP-Adapter's ratios, TaskRes's alphas) collapse to the
method's default setting (``sweep.default: true``) and its validation-chosen one (``selected_on: val``); every
setting is in ``leaderboard_sweeps.md``, linked from the main page.

Also written: ``leaderboard.json`` (flat ``protocol/backbone/method/column -> value``, for ``dvc metrics``),
``plots/fewshot.json`` (average few-shot curve per method, zero-shot at shots 0, for ``dvc plots``) and PNG figures.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from common.engine.runs import load_records

from . import figures
from .records import (PROTOCOLS, _shot_key, aggregate, dedupe, field_value, harmonic, is_seeded, metric_of,
                      seed_std)
from .render import EMBEDDED_CAVEAT
from .tables import TRANSFER, fmt_pm, md_table, metric_title, metrics_for

MAX_DATASET_COLUMNS = 8


@dataclass(frozen=True)
class Entry:
    """A leaderboard row: one method setting (few-shot rows span shot counts)."""
    method: str
    variant: str
    source: str
    shots: Any          # None for fewshot rows (shots are columns there)

    def __lt__(self, other: "Entry") -> bool:
        # a method may have rows with and without a shot count in one protocol (DualCoOp's zero-shot and
        # partial-label multi-label runs): the row without one sorts first
        key = lambda e: (e.method, e.variant, e.source, -1 if e.shots is None else e.shots)
        return key(self) < key(other)

    def label(self) -> str:
        s = self.method + (f" ({self.variant})" if self.variant else "")
        return s + (f", k={self.shots}" if self.shots is not None else "")

    def slug(self) -> str:
        return self.method + (f"-{self.variant}" if self.variant else "") + \
            (f"-k{self.shots}" if self.shots is not None else "")


@dataclass
class Runs:
    """One entry's runs: (dataset, shots column) -> {seed: [metrics]}. ``seeded`` is False for runs without
    training shots and one seed per cell, whose seed is arbitrary: they match any seed of the grid."""
    cells: dict[tuple, dict[Any, list]]
    seeded: bool


def _cells(records: Sequence[dict], protocol: str, metric: str) -> dict[Entry, Runs]:
    out: dict[Entry, Runs] = {}
    for r in records:
        if metric_of(r["metrics"], metric) is None:
            continue
        src = field_value(r, "source") if protocol in TRANSFER else ""
        shots = r.get("shots")
        e = Entry(r["method"], field_value(r, "variant"), src, None if protocol == "fewshot" else shots)
        runs = out.setdefault(e, Runs({}, shots is not None))
        col = shots if protocol == "fewshot" else None
        runs.cells.setdefault((r["dataset"], col), {}).setdefault(int(r["seed"]), []).append(r["metrics"])
    for runs in out.values():   # a training-free method that ran several seeds (its own randomness) is seeded too
        runs.seeded = is_seeded([None], runs.cells.values()) or runs.seeded
    return out


def coverage(entries: dict[Entry, Runs]) -> dict[Entry, set]:
    """Cells (dataset, shots column, seed) each entry covers; unseeded entries cover every seed run there."""
    seeds: dict[tuple, set] = {}
    for runs in entries.values():
        if runs.seeded:
            for dk, by_seed in runs.cells.items():
                seeds.setdefault(dk, set()).update(by_seed)
    cov = {}
    for e, runs in entries.items():
        cov[e] = {(d, k, s) for (d, k), by_seed in runs.cells.items()
                  for s in (by_seed if runs.seeded else (seeds.get((d, k)) or {None}))}
    return cov


def shared_grid(cov: dict[Entry, set]) -> tuple[list[Entry], set, dict[Entry, list]]:
    """Listed entries, their common cells, and the excluded entries with the cells they lack."""
    if not cov:
        return [], set(), {}
    need = len(cov) // 2 + 1  # strict majority: with two methods the grid is their intersection
    counts: dict[tuple, int] = {}
    for cells in cov.values():
        for c in cells:
            counts[c] = counts.get(c, 0) + 1
    majority = {c for c, n in counts.items() if n >= need}
    listed = [e for e in sorted(cov) if majority <= cov[e]] or sorted(cov)
    grid = set.intersection(*(cov[e] for e in listed))
    excluded = {e: sorted(grid - cov[e], key=_cell_key) for e in sorted(cov) if e not in listed}
    return listed, grid, excluded


def _cell_key(c: tuple) -> tuple:
    return (c[0], _shot_key(c[1]), -1 if c[2] is None else c[2])


def _avg(runs: Runs, grid: set, metric: str, col: Any = "all") -> tuple[float, float | None]:
    """Seed-first, then dataset average over the grid cells (optionally one shots column); std over seeds
    of the per-seed dataset averages when every dataset has the same seeds."""
    chosen = [c for c in grid if col == "all" or c[1] == col]
    seeds_at: dict[tuple, set] = {}
    for d, k, s in chosen:
        seeds_at.setdefault((d, k), set()).add(s)
    per_ds = []
    for dk in sorted(seeds_at, key=lambda x: (x[0], _shot_key(x[1]))):
        by_seed = runs.cells[dk]
        use = sorted(seeds_at[dk]) if runs.seeded else sorted(by_seed)
        per_ds.append([m for s in use for m in by_seed[s]])
    if metric == "hm" and all("base" in m and "novel" in m for ms in per_ds for m in ms):
        mean = harmonic(math.fsum(aggregate(ms, "base") for ms in per_ds) / len(per_ds),
                        math.fsum(aggregate(ms, "novel") for ms in per_ds) / len(per_ds))
    else:
        mean = math.fsum(aggregate(ms, metric) for ms in per_ds) / len(per_ds)
    std = None
    seedsets = {frozenset(v) for v in seeds_at.values()}
    if runs.seeded and len(seedsets) == 1 and len(next(iter(seedsets))) >= 2:
        std = seed_std([_avg(runs, {c for c in chosen if c[2] == s}, metric)[0]
                        for s in sorted(next(iter(seedsets)))])
    return mean, std


def _describe(grid: set) -> str:
    ds = sorted({c[0] for c in grid})
    shots = sorted({c[1] for c in grid if c[1] is not None})
    seeds = sorted({c[2] for c in grid if c[2] is not None})
    parts = [f"datasets {', '.join(ds)}"]
    if shots:
        parts.append("shots " + ", ".join(map(str, shots)))
    if seeds:
        parts.append("seeds " + ", ".join(map(str, seeds)))
    return "; ".join(parts)


def _lacks(cells: list) -> str:
    shown = [f"{d}" + (f" k={k}" if k is not None else "") + (f" seed {s}" if s is not None else "")
             for d, k, s in cells[:3]]
    return ", ".join(shown) + (f" and {len(cells) - 3} more" if len(cells) > 3 else "")


def selected_on_test(rec: dict) -> bool:
    return str(rec.get("selected_on") or "").lower() == "test"


def swept_away(rec: dict) -> bool:
    """A sweep setting that is neither the method's default nor chosen on validation data."""
    sweep = rec.get("sweep")
    return bool(sweep) and not sweep.get("default") and str(rec.get("selected_on") or "").lower() != "val"


class Leaderboard:
    def __init__(self, records: Sequence[dict], profile: str = "embedded", collapse_sweeps: bool = True):
        self.profile = profile
        recs, self.dup_notes = dedupe([r for r in records if r["profile"] == profile])
        self.swept = sorted({_entry_label(r) for r in recs if swept_away(r)}) if collapse_sweeps else []
        if collapse_sweeps:
            recs = [r for r in recs if not swept_away(r)]
        self.oracle = [r for r in recs if selected_on_test(r)]
        self.records = [r for r in recs if not selected_on_test(r)]
        self.collapse_sweeps = collapse_sweeps
        self.metrics: dict[str, float] = {}
        self.fewshot_rows: list[dict] = []
        self.figure_specs: list[tuple] = []

    def build(self) -> str:
        out = [f"# Leaderboard ({self.profile} profile)", "",
               "Generated by `python -m common.report --leaderboard` from the run records under `runs/`; "
               "do not edit by hand.", "",
               "Every table averages all its methods over the same cells: the datasets, shots and seeds that "
               "every listed method ran (stated under each table), seed-averaged per dataset first. A method "
               "that misses part of the grid most methods share is listed under the table instead of "
               "shrinking it. Rows are sorted by the last column."]
        if self.profile == "embedded":
            out += ["", "> " + EMBEDDED_CAVEAT]
        if self.swept:
            out += ["", f"Hyperparameter sweeps are collapsed to each method's default and validation-chosen "
                        f"settings; the {len(self.swept)} other settings ({', '.join(self.swept)}) are in "
                        f"[leaderboard_sweeps.md](leaderboard_sweeps.md)."]
        elif not self.collapse_sweeps:
            out += ["", "Every setting of every hyperparameter sweep (the main leaderboard shows only the "
                        "default and validation-chosen ones)."]
        if not self.records:
            return "\n".join(out + ["", f"No {self.profile}-profile run records yet."]) + "\n"
        for proto in PROTOCOLS:
            precs = [r for r in self.records if r["protocol"] == proto]
            for bb in sorted({r["backbone"] for r in precs}):
                brecs = [r for r in precs if r["backbone"] == bb]
                for metric in ([metrics_for(proto, brecs)[0]] if proto != "base2novel" else ["hm"]):
                    out += self._section(proto, bb, metric, brecs)
        return "\n".join(out).rstrip() + "\n"

    def _section(self, proto: str, bb: str, metric: str, recs: list[dict]) -> list[str]:
        if proto == "base2novel":
            cells = _cells(recs, proto, "base")
            for runs in cells.values():
                runs.cells = {dk: {s: ms for s, ms in by_seed.items() if all("novel" in m for m in ms)}
                              for dk, by_seed in runs.cells.items()}
                runs.cells = {dk: v for dk, v in runs.cells.items() if v}
        else:
            cells = _cells(recs, proto, metric)
        cells = {e: c for e, c in cells.items() if c.cells}
        if not cells:
            return []
        cov = coverage(cells)
        listed, grid, excluded = shared_grid(cov)
        title = f"## {proto} · {bb}"
        if not grid:
            return ["", title, "", "No cell is shared by the methods that ran: "
                    + "; ".join(f"{e.label()} ran {_describe(cov[e])}" for e in sorted(cells))]
        if proto == "fewshot":
            header, rows = self._fewshot(bb, metric, listed, grid, cells, recs)
        elif proto == "base2novel":
            header, rows = self._base2novel(bb, listed, grid, cells)
        elif proto in TRANSFER:
            header, rows = self._transfer(proto, bb, metric, listed, grid, cells)
        else:
            header, rows = self._generic(proto, bb, metric, listed, grid, cells)
        rows.sort(key=lambda r: (-r[0] if r[0] is not None else math.inf, r[1][0]))
        out = ["", title, "", f"{metric_title(metric) if proto != 'base2novel' else 'accuracy (%)'}; "
               f"mean ± std over seeds.", "",
               md_table(header, [r[1] for r in rows], [False] + [True] * (len(header) - 1)), "",
               f"Shared grid: {_describe(grid)}."]
        for e, lack in excluded.items():
            out.append(f"Not listed: {e.label()} (lacks {_lacks(lack)}).")
        out += self._oracle_lines(proto, bb, metric, grid)
        return out

    def _oracle_lines(self, proto: str, bb: str, metric: str, grid: set) -> list[str]:
        """Runs tuned on the test split: shown with their value on the same grid, never ranked."""
        recs = [r for r in self.oracle if r["protocol"] == proto and r["backbone"] == bb]
        out = []
        for e, runs in sorted(_cells(recs, proto, "base" if proto == "base2novel" else metric).items()):
            cov = coverage({e: runs})[e]
            mine = {c for c in grid if any(c[0] == d and c[1] == k for d, k, _ in cov)}
            if not mine:
                continue
            m, _ = _avg(runs, {(d, k, s) for d, k, s in cov if (d, k) in {(c[0], c[1]) for c in mine}},
                        "base" if proto == "base2novel" else metric)
            out.append(f"Not ranked (setting chosen on the test split): {e.label()} {fmt_pm(m, None)}.")
        return out

    def _put(self, proto: str, bb: str, e: Entry, col: str, value: float) -> None:
        self.metrics[f"{proto}/{bb}/{e.slug()}/{col}"] = round(value, 4)

    def _fewshot(self, bb, metric, listed, grid, cells, recs):
        shots = sorted({c[1] for c in grid})
        datasets = sorted({c[0] for c in grid})
        header = ["method", "k=0 (zero-shot)"] + [f"k={k}" for k in shots]
        rows, curves = [], {}
        for e in listed:
            stats = [_avg(cells[e], grid, metric, k) for k in shots]
            for k, (m, _) in zip(shots, stats):
                self._put("fewshot", bb, e, f"k{k}", m)
                self.fewshot_rows.append({"backbone": bb, "method": e.label(), "shots": k,
                                          "metric": metric, "value": round(m, 4),
                                          "std": None if _ is None else round(_, 4)})
            curves[e.label()] = [(k, m, s) for k, (m, s) in zip(shots, stats)]
            rows.append((stats[-1][0], [e.label(), "—"] + [fmt_pm(m, s) for m, s in stats]))
        # zero-shot reference rows (protocol zeroshot) over the same datasets
        refs = {}
        zrecs = [r for r in self.records if r["protocol"] == "zeroshot" and r["backbone"] == bb]
        for e, zc in sorted(_cells(zrecs, "zeroshot", metric).items()):
            zgrid = {(d, k, s) for (d, k), by_seed in zc.cells.items() if d in datasets for s in by_seed}
            if {c[0] for c in zgrid} != set(datasets):
                continue
            m, s = _avg(zc, zgrid, metric)
            self._put("fewshot", bb, e, "k0", m)
            self.fewshot_rows.append({"backbone": bb, "method": e.label() + ", zero-shot", "shots": 0,
                                      "metric": metric, "value": round(m, 4), "std": None if s is None else round(s, 4)})
            refs[e.label() + " zero-shot"] = m
            rows.append((None, [e.label() + ", zero-shot", fmt_pm(m, s)] + ["—"] * len(shots)))
        if not refs:  # no zero-shot run to show: drop the k=0 column
            header = [header[0]] + header[2:]
            rows = [(r[0], [r[1][0]] + r[1][2:]) for r in rows]
        self.figure_specs.append(("curve", f"fewshot_{bb}", curves, refs,
                                  f"Few-shot average over {len(datasets)} datasets, {bb}", metric_title(metric)))
        return header, rows

    def _base2novel(self, bb, listed, grid, cells):
        header = ["method", "base", "novel", "HM"]
        rows, vals = [], []
        for e in listed:
            st = [_avg(cells[e], grid, m) for m in ("base", "novel", "hm")]
            for name, (m, _) in zip(("base", "novel", "hm"), st):
                self._put("base2novel", bb, e, name, m)
            vals.append(st)
            rows.append((st[2][0], [e.label()] + [fmt_pm(*s) for s in st]))
        self.figure_specs.append(("bars", f"base2novel_{bb}", [e.label() for e in listed], ["base", "novel", "HM"],
                                  vals, f"Base-to-novel average, {bb}", "accuracy (%)"))
        return header, rows

    def _transfer(self, proto, bb, metric, listed, grid, cells):
        sources = sorted({e.source for e in listed})
        src_cells = {c for c in grid if c[0] in sources}
        tgt_cells = grid - src_cells
        targets = sorted({c[0] for c in tgt_cells})
        show = targets if len(targets) <= MAX_DATASET_COLUMNS else []
        header = ["method", f"source ({sources[0]})" if len(sources) == 1 else "source"] + show + ["target avg"]
        rows, vals = [], []
        for e in listed:
            src = _avg(cells[e], {c for c in src_cells if c[0] == e.source}, metric) \
                if any(c[0] == e.source for c in src_cells) else (None, None)
            per = [_avg(cells[e], {c for c in tgt_cells if c[0] == d}, metric) for d in show]
            tgt = _avg(cells[e], tgt_cells, metric) if tgt_cells else (None, None)
            if src[0] is not None:
                self._put(proto, bb, e, "source", src[0])
            if tgt[0] is not None:
                self._put(proto, bb, e, "target_avg", tgt[0])
            vals.append([src] + per + [tgt])
            label = e.label() + (f" [{e.source}]" if len(sources) > 1 else "")
            rows.append((tgt[0], [label, fmt_pm(*src)] + [fmt_pm(*p) for p in per] + [fmt_pm(*tgt)]))
        self.figure_specs.append(("bars", f"{proto}_{bb}", [e.label() for e in listed],
                                  ["source"] + show + ["target avg"], vals,
                                  f"{proto.replace('_', ' ')}, {bb}", metric_title(metric)))
        return header, rows

    def _generic(self, proto, bb, metric, listed, grid, cells):
        datasets = sorted({c[0] for c in grid})
        show = datasets if len(datasets) <= MAX_DATASET_COLUMNS else []
        header = ["method"] + show + ["avg"]
        rows = []
        for e in listed:
            per = [_avg(cells[e], {c for c in grid if c[0] == d}, metric) for d in show]
            avg = _avg(cells[e], grid, metric)
            self._put(proto, bb, e, "avg", avg[0])
            rows.append((avg[0], [e.label()] + [fmt_pm(*p) for p in per] + [fmt_pm(*avg)]))
        return header, rows

    def write_figures(self, out_dir: Path) -> list[Path]:
        made = []
        for spec in self.figure_specs:
            kind, name = spec[0], spec[1]
            path = out_dir / f"leaderboard_{name}.png"
            if kind == "curve":
                p = figures.curve_figure(spec[2], spec[3], spec[4], spec[5], path)
            else:
                series, cats, vals, title, ylabel = spec[2], spec[3], spec[4], spec[5], spec[6]
                p = figures.grouped_bars(series, cats, [[v[0] for v in row] for row in vals],
                                         [[v[1] for v in row] for row in vals], title, ylabel, path)
            if p is not None:
                made.append(p)
        return made


def _entry_label(rec: dict) -> str:
    return rec["method"] + (f" ({rec['variant']})" if rec.get("variant") else "")


def write_leaderboard(runs_root: Path | str | None = None, out_dir: Path | str = "reports",
                      profile: str = "embedded") -> dict[str, Path]:
    """Write leaderboard.md (+ leaderboard_sweeps.md), leaderboard.json, plots/fewshot.json and
    leaderboard_*.png under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in sorted(out_dir.glob("leaderboard_*.png")):
        old.unlink()
    records = load_records(runs_root)
    lb = Leaderboard(records, profile)
    text = lb.build()
    sweeps = out_dir / "leaderboard_sweeps.md"
    if lb.swept:
        full = Leaderboard(records, profile, collapse_sweeps=False)
        sweeps.write_text(full.build().replace("# Leaderboard (", "# Leaderboard with every sweep setting (", 1))
    else:
        sweeps.unlink(missing_ok=True)
    figs = lb.write_figures(out_dir)
    if figs:
        text += "\n## Figures\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figs) + "\n"
    paths = {"md": out_dir / "leaderboard.md", "json": out_dir / "leaderboard.json",
             "plot": out_dir / "plots" / "fewshot.json"}
    paths["md"].write_text(text)
    paths["json"].write_text(json.dumps(dict(sorted(lb.metrics.items())), indent=1) + "\n")
    paths["plot"].parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(lb.fewshot_rows, key=lambda r: (r["backbone"], r["method"], r["shots"]))
    paths["plot"].write_text(json.dumps(rows, indent=1) + "\n")
    return paths
