"""Selecting run records and aggregating them: seeds first, then datasets.

A *selection* is a set of equality filters over run-record fields (see ``common/engine/runs.py``) plus a
metric. It must resolve to one series (one method, variant, backbone, protocol, profile, shot count and
training source); its records are grouped into cells ``(shots, dataset) -> {seed: metrics}``.

Aggregation rules (used by verdicts, report tables and the leaderboard alike):
- a cell's value is the mean over the seeds present in it (missing seeds are reported, not imputed);
- an average over datasets is the mean of the per-dataset seed means, so every dataset weighs the same
  whatever its number of seeds;
- ``hm`` (base-to-novel harmonic mean) aggregates as the harmonic mean of the aggregated ``base`` and
  ``novel`` (CoCoOp's convention for its seed-averaged and dataset-averaged rows), and falls back to the
  mean of the recorded ``hm`` when base/novel are absent.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

# Fields a selection may filter on (``role`` is derived: "source" when dataset == source, else "target").
FILTER_KEYS = ("paper", "method", "variant", "profile", "protocol", "dataset", "source", "backbone",
               "shots", "seed", "role")
# Fields that must take a single value inside one selection (else it mixes different runs).
SERIES_KEYS = ("method", "variant", "backbone", "protocol", "profile")
PROTOCOLS = ("fewshot", "base2novel", "cross_dataset", "domain_generalization", "multilabel",
             "segmentation", "test_time", "unsupervised", "zeroshot", "taxonomic")
PROFILES = ("embedded", "real")
# Embedded stand-ins for the papers' backbones (DESIGN.md section 4).
STAND_INS = (("rn", "tiny-rn"), ("vit", "tiny-vit"))


_ONLY = object()  # "the single shot count of a series"


class Missing(Exception):
    """A number a check needs is not in the run records (the claim becomes 'not testable')."""


def norm(value: Any) -> Any:
    """Canonical form for matching names: lower case, alphanumerics only ('ViT-B/16' == 'vit_b16')."""
    if isinstance(value, str):
        return re.sub(r"[^a-z0-9]", "", value.lower())
    return value


def stand_in(backbone: str | None) -> str | None:
    """Embedded stand-in for a real backbone name (RN50 -> tiny-rn, ViT-B/16 -> tiny-vit)."""
    if backbone is None or norm(backbone).startswith("tiny"):
        return backbone
    for prefix, tiny in STAND_INS:
        if norm(backbone).startswith(prefix):
            return tiny
    return backbone


def role(rec: dict) -> str:
    return "source" if rec.get("source", rec["dataset"]) in (None, rec["dataset"]) else "target"


def field_value(rec: dict, key: str) -> Any:
    if key == "role":
        return role(rec)
    if key == "variant":
        return rec.get("variant") or ""
    if key == "source":
        return rec.get("source") or rec["dataset"]
    return rec.get(key)


def matches(rec: dict, filters: dict[str, tuple]) -> bool:
    """``filters``: key -> tuple of accepted values (compared with :func:`norm`)."""
    return all(norm(field_value(rec, k)) in {norm(v) for v in vals} for k, vals in filters.items())


def fmt_filters(filters: dict[str, tuple]) -> str:
    def one(vals):
        vals = ["null" if v is None else str(v) for v in vals]
        return vals[0] if len(vals) == 1 else "[" + ", ".join(vals) + "]"
    return ", ".join(f"{k}={one(v)}" for k, v in filters.items())


def harmonic(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def metric_of(metrics: dict, metric: str) -> float | None:
    """One seed's value of ``metric`` (``hm`` recomputed from base/novel when absent)."""
    if metric in metrics and metrics[metric] is not None:
        return float(metrics[metric])
    if metric == "hm" and "base" in metrics and "novel" in metrics:
        return harmonic(float(metrics["base"]), float(metrics["novel"]))
    return None


def aggregate(seed_metrics: Sequence[dict], metric: str) -> float:
    """Mean over seeds of one cell (for ``hm``: harmonic mean of the seed-mean base and novel)."""
    if metric == "hm" and all("base" in m and "novel" in m for m in seed_metrics):
        return harmonic(_mean([float(m["base"]) for m in seed_metrics]),
                        _mean([float(m["novel"]) for m in seed_metrics]))
    return _mean([metric_of(m, metric) for m in seed_metrics])


def average_cells(cells: Sequence[Sequence[dict]], metric: str) -> float:
    """Average over datasets of the seed means of each cell (``hm``: harmonic mean of the averages)."""
    if metric == "hm" and all("base" in m and "novel" in m for c in cells for m in c):
        return harmonic(_mean([aggregate(c, "base") for c in cells]),
                        _mean([aggregate(c, "novel") for c in cells]))
    return _mean([aggregate(c, metric) for c in cells])


def seed_std(per_seed: Sequence[float]) -> float | None:
    """Sample standard deviation over seeds (None with fewer than two seeds)."""
    return statistics.stdev(per_seed) if len(per_seed) >= 2 else None


def dedupe(records: Iterable[dict], prefer_paper: str | None = None) -> tuple[list[dict], list[str]]:
    """One record per run: the same method can be run by several paper folders (e.g. a baseline re-run
    inside a paper's folder). Prefer the method's own folder, then ``prefer_paper``, then path order."""
    best: dict[tuple, dict] = {}
    notes = []
    for rec in records:
        key = tuple(norm(field_value(rec, k)) for k in
                    ("method", "variant", "profile", "protocol", "source", "dataset", "backbone", "shots", "seed"))
        if key not in best:
            best[key] = rec
            continue
        old = best[key]
        rank = lambda r: (norm(r["paper"]) != norm(r["method"]), norm(r["paper"]) != norm(prefer_paper),
                          r.get("_path", ""))
        keep, drop = (rec, old) if rank(rec) < rank(old) else (old, rec)
        best[key] = keep
        notes.append(f"duplicate run of {keep['method']} on {keep['dataset']} seed {keep['seed']}: "
                     f"used papers/{keep['paper']}, ignored papers/{drop['paper']}")
    return list(best.values()), sorted(set(notes))


@dataclass
class Series:
    """The records of one resolved selection: cells ``(shots, dataset) -> {seed: metrics}``."""
    metric: str
    filters: dict[str, tuple]
    identity: dict[str, Any]
    cells: dict[tuple, dict[int, dict]]
    notes: list[str] = field(default_factory=list)

    def shots(self) -> list:
        return sorted({k for k, _ in self.cells}, key=_shot_key)

    def seeded(self) -> bool:
        """Whether the series' seeds are repetitions (see `is_seeded`)."""
        return is_seeded(self.shots(), self.cells.values())

    def _k(self, shots: Any) -> Any:
        if shots is _ONLY:
            ks = self.shots()
            return ks[0] if len(ks) == 1 else None
        return shots

    def datasets(self, shots: Any = None, every_shot: bool = True) -> list[str]:
        """Datasets present at ``shots``, or (default) at every shot count of the series."""
        by_shot: dict[Any, set] = {}
        for (k, ds) in self.cells:
            by_shot.setdefault(k, set()).add(ds)
        if not every_shot:
            return sorted(by_shot.get(shots, set()))
        sets = list(by_shot.values())
        return sorted(set.intersection(*sets)) if sets else []

    def seeds(self, dataset: str, shots: Any = _ONLY) -> list[int]:
        return sorted(self.cells.get((self._k(shots), dataset), {}))

    def cell(self, dataset: str, shots: Any = _ONLY) -> list[dict]:
        seeds = self.cells.get((self._k(shots), dataset))
        if not seeds:
            at = "" if shots is _ONLY else f" at {shots} shots"
            raise Missing(f"no {self.metric} on {dataset}{at} for {self.label()}")
        return [seeds[s] for s in sorted(seeds)]

    def value(self, dataset: str, shots: Any = _ONLY) -> float:
        return aggregate(self.cell(dataset, shots), self.metric)

    def average(self, datasets: Sequence[str], shots: Any = _ONLY) -> float:
        if not datasets:
            raise Missing(f"no dataset to average for {self.label()}")
        return average_cells([self.cell(d, shots) for d in datasets], self.metric)

    def label(self) -> str:
        return f"{self.metric}({fmt_filters(self.filters)})"


def is_seeded(shots: Iterable, cells: Iterable[dict]) -> bool:
    """Whether runs' seeds are repetitions to average and resample: they trained on shots, or a cell holds
    several seeds (a training-free method with its own randomness, e.g. TPT's augmented views). The single
    seed of a deterministic run without shots is arbitrary: it matches any seed of the grid."""
    return any(k is not None for k in shots) or any(len(c) > 1 for c in cells)


def _shot_key(k: Any) -> tuple:
    return (k is not None, k if k is not None else 0)


def resolve(records: Sequence[dict], metric: str, filters: dict[str, tuple], by: str = "dataset",
            prefer_paper: str | None = None) -> Series:
    """Filter ``records`` and check they form one series; raises :class:`Missing` with the reason."""
    sel = [r for r in records if matches(r, filters)]
    if not sel:
        raise Missing(_why_empty(records, filters))
    sel, notes = dedupe(sel, prefer_paper)
    keys = SERIES_KEYS + (() if by == "shots" else ("shots",))
    for k in keys + ("source",):
        # the training source must be unique among transfer (target) records; source == dataset otherwise
        pool = [r for r in sel if role(r) == "target"] if k == "source" else sel
        vals = {field_value(r, k) for r in pool}
        if len(vals) > 1:
            shown = ", ".join(sorted("null" if v is None else str(v) for v in vals))
            raise Missing(f"{metric}({fmt_filters(filters)}) mixes several {k} values ({shown}); "
                          f"pin {k}=... in the check")
    if metric == "chance":
        if any(n_classes(r) is None for r in sel):
            raise Missing(f"records of {fmt_filters(filters)} carry no class count (record field "
                          f"'n_classes'), needed for the chance level")
    else:
        lacking = sorted({r["dataset"] for r in sel if metric_of(r["metrics"], metric) is None})
        if lacking:
            have = sorted({m for r in sel for m in r["metrics"]})
            raise Missing(f"metric '{metric}' absent from {fmt_filters(filters)} records on "
                          f"{', '.join(lacking)} (they have: {', '.join(have)})")
    cells: dict[tuple, dict[int, dict]] = {}
    for r in sel:
        metrics = {"chance": 100.0 / n_classes(r)} if metric == "chance" else r["metrics"]
        cells.setdefault((r.get("shots"), r["dataset"]), {})[int(r["seed"])] = metrics
    identity = {k: field_value(sel[0], k) for k in keys}
    return Series(metric, filters, identity, cells, notes)


def n_classes(rec: dict) -> int | None:
    for where in (rec, rec.get("config") or {}, rec.get("metrics") or {}):
        for key in ("n_classes", "num_classes"):
            if isinstance(where, dict) and where.get(key):
                return int(where[key])
    return None


def _why_empty(records: Sequence[dict], filters: dict[str, tuple]) -> str:
    """Name the first filter that empties the selection (in the order they were given)."""
    kept: dict[str, tuple] = {}
    pool = list(records)
    for k, vals in filters.items():
        nxt = [r for r in pool if matches(r, {k: vals})]
        if not nxt:
            if not kept:
                return f"no run records with {fmt_filters({k: vals})}"
            present = sorted({"null" if field_value(r, k) is None else str(field_value(r, k)) for r in pool})
            return (f"no run records with {fmt_filters({k: vals})} among those with {fmt_filters(kept)} "
                    f"(present: {', '.join(present)})")
        kept[k] = vals
        pool = nxt
    return f"no run records with {fmt_filters(filters)}"
