"""Claim verdicts computed from run records.

States: **reproduced** (holds beyond run-to-run noise), **not reproduced** (its opposite holds beyond noise),
**inconclusive** (inside the noise, or decided only by near-chance datasets), **premise not met** (a claim
it `requires` is not reproduced), **not testable** (a number it needs is missing, or the profile cannot
judge it).

Evaluation of one claim on one profile:
1. every selection in the check gets the claim's defaults (profile, protocol, backbone, per-method
   defaults from paper.yaml) unless it sets that filter itself, and is resolved to one series of records;
   any selection without records makes the claim *not testable*, with the reason; a dataset list keeps the
   names of the judged profile's world (emb_* on embedded), so one check can name both EuroSAT and its
   stand-in;
2. matched grid: selections that do not name their datasets are compared on the datasets present for ALL
   of them (at every shot count used); terms at different shot counts are refused unless each of them pins
   `shots=`; trained terms are compared on the seeds they all ran. Datasets where zero-shot CLIP of that
   backbone is below twice chance decide nothing and are left out (all of them: inconclusive);
3. the check is evaluated on seed-first, then dataset, averages (the point estimate and its trace);
4. noise: the check's margin is recomputed on 2000 paired bootstrap resamples (seeds with replacement
   within each dataset, shared by all terms; datasets with replacement within each averaged dataset list;
   fixed resampling seed). Reproduced when it holds in at least 97.5% of them (the 95% interval of the
   margin excludes the opposite sign), not reproduced when it fails in at least 97.5%, else inconclusive;
5. stability: the check on each seed alone (stable when every seed gives the point verdict, else fragile).
A claim is never *reproduced* when one of the numbers it needs is missing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from common.metrics import NEAR_CHANCE

from .expr import Selection, Step, Truth, Vec
from .records import Missing, Series, fmt_filters, metric_of, norm, resolve
from .schema import Claim, Paper

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
PREMISE_NOT_MET, NOT_TESTABLE = "premise not met", "not testable"
STATUSES = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, PREMISE_NOT_MET, NOT_TESTABLE)
RESAMPLES = 2000
RESAMPLE_SEED = 0
LEVEL = 0.95                    # two-sided interval; each tail holds (1 - LEVEL) / 2
ZERO_SHOT = ("zeroshot_clip", "zeroshot", ("single", ""))   # method, protocol, preferred variants


@dataclass
class Term:
    """One selection of a check with the numbers it contributed."""
    text: str                       # as written in the check
    filters: str                    # the full filters it was resolved with
    value: Any = None               # float (mean) or {key: float} (per)
    datasets: list[str] = field(default_factory=list)
    per_dataset: dict[str, float] = field(default_factory=dict)
    seeds: dict[str, list[int]] = field(default_factory=dict)
    shots: list = field(default_factory=list)


@dataclass
class Noise:
    """The check's margin under resampling and per seed."""
    margin: float                   # point estimate (> 0: the check holds)
    low: float                      # 2.5% quantile of the resampled margins
    high: float                     # 97.5% quantile
    holds: float                    # share of resamples where the check holds
    resamples: int
    per_seed: dict[int, bool] = field(default_factory=dict)
    stability: str = "deterministic"   # stable | fragile | deterministic (no trained term) | one seed


@dataclass
class Verdict:
    claim: Claim
    profile: str
    status: str
    reason: str = ""
    terms: list[Term] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    datasets: dict[str, list[str]] = field(default_factory=dict)  # pool label -> common datasets used
    dropped: dict[str, list[str]] = field(default_factory=dict)  # dataset -> terms lacking it
    notes: list[str] = field(default_factory=list)
    near_chance: dict[str, str] = field(default_factory=dict)    # dataset -> "zero-shot x% < 2 x chance y%"
    seeds: list[int] = field(default_factory=list)                # seeds of the trained terms
    shots: list = field(default_factory=list)
    noise: Noise | None = None
    holds: bool | None = None       # the check on the point estimate (seed-first, then dataset averages)
    check_status: str = ""          # the check's own verdict when a premise overrides it
    premises: dict[str, str] = field(default_factory=dict)        # premise id -> its status


def pool_label(sel: Selection) -> str:
    """Selections over the same pool of datasets are compared on their common datasets."""
    role = ",".join(sorted(str(r) for r in sel.filter_dict().get("role", ())))
    label = f"role={role}" if role else ""
    if sel.exclude:
        label += (" " if label else "") + "without " + ",".join(sorted(sel.exclude))
    return label


EMBEDDED_PREFIX = "emb_"  # every embedded dataset's registry name starts with it; real ones never do


def in_profile(dataset: Any, profile: str) -> bool:
    """Whether a dataset name belongs to the profile's world (emb_* to embedded, the rest to real)."""
    embedded = str(dataset).startswith(EMBEDDED_PREFIX)
    return embedded if norm(profile) == "embedded" else not embedded


def profile_datasets(names: Sequence, profile: str) -> tuple:
    """A check's dataset list may name both worlds' sets; the profile keeps its own (all, if none is)."""
    kept = tuple(d for d in names if in_profile(d, profile))
    return kept or tuple(names)


def selection_filters(sel: Selection, claim: Claim, paper: Paper, profile: str) -> dict[str, tuple]:
    """The selection's own filters completed with the claim/paper defaults (own filters win)."""
    own = sel.filter_dict()
    filters: dict[str, tuple] = dict(own)
    extra = method_defaults(paper, own.get("method", ()), claim, profile)
    for k, v in extra.items():
        if k not in filters:
            filters[k] = (v,)
    if "dataset" in own:
        filters["dataset"] = profile_datasets(own["dataset"], profile)
    # keep a stable, readable order: the written filters first, then the defaults
    return {k: filters[k] for k in list(own) + [k for k in extra if k not in own]}


def method_defaults(paper: Paper, methods: Sequence, claim: Claim | None, profile: str,
                    protocol: str | None = None) -> dict[str, Any]:
    """Filters every selection of ``methods`` gets: profile, protocol, backbone and the paper's per-method
    defaults (also used by the report's tables, so a table row and a verdict use the same runs)."""
    extra: dict[str, Any] = {"profile": profile, "protocol": protocol or (claim.protocol if claim else None)}
    if extra["protocol"] is None:
        del extra["protocol"]
    bb = paper.backbone_for(profile, claim)
    if bb:
        extra["backbone"] = bb
    if len(methods) == 1:
        for m, d in paper.defaults.items():
            if norm(m) == norm(methods[0]):
                extra.update(d)
    return extra


def zero_shot_levels(records: Sequence[dict], profile: str) -> dict[tuple, tuple[float, float]]:
    """(backbone, dataset) -> (zero-shot top-1, chance) from the zero-shot CLIP baseline's records."""
    method, protocol, variants = ZERO_SHOT
    out: dict[tuple, tuple[float, float, int]] = {}
    for r in records:
        if (norm(r.get("profile")) != norm(profile) or norm(r.get("method")) != norm(method)
                or norm(r.get("protocol")) != norm(protocol) or "top1" not in (r.get("metrics") or {})):
            continue
        n = r.get("n_classes") or (r.get("config") or {}).get("n_classes")
        if not n:
            continue
        rank = variants.index(r.get("variant") or "") if (r.get("variant") or "") in variants else len(variants)
        key = (r["backbone"], r["dataset"])
        if key not in out or rank < out[key][2]:
            out[key] = (float(r["metrics"]["top1"]), 100.0 / int(n), rank)
    return {k: v[:2] for k, v in out.items()}


def evaluate_claim(claim: Claim, paper: Paper, records: Sequence[dict], profile: str,
                   levels: dict[tuple, tuple[float, float]] | None = None) -> Verdict:
    v = Verdict(claim, profile, NOT_TESTABLE)
    if profile not in claim.profiles:
        v.reason = f"judged on the {' and '.join(claim.profiles)} profile only"
        return v
    if claim.check is None:
        v.reason = claim.untestable or "no numeric check"
        return v
    recs = [r for r in records if norm(r.get("profile")) == norm(profile)]
    if not any(norm(r.get("protocol")) == norm(claim.protocol) for r in recs):
        v.reason = f"no {profile}-profile runs of protocol {claim.protocol}"
        return v
    levels = zero_shot_levels(records, profile) if levels is None else levels
    try:
        grid = _Grid.build(claim, paper, recs, profile, levels, v)
        if grid is None:
            return v
        _judge(claim, grid, v)
    except Missing as e:
        v.status, v.reason = NOT_TESTABLE, str(e)
        v.terms, v.steps, v.noise = [], [], None
    return v


class _Grid:
    """The matched cells of one claim: per selection its datasets, shot counts and seed data."""

    def __init__(self, series: dict[Selection, Series], datasets: dict[Selection, list[str]], seeds: list[int],
                 seeded: dict[Selection, bool]):
        self.series, self.datasets, self.seeds, self.seeded = series, datasets, seeds, seeded
        self.data: dict[Selection, dict] = {s: self._arrays(s) for s in series}

    @classmethod
    def build(cls, claim: Claim, paper: Paper, recs: list[dict], profile: str, levels: dict, v: Verdict):
        series: dict[Selection, Series] = {}
        reasons = []
        for sel in claim.check.selections:
            filters = selection_filters(sel, claim, paper, profile)
            try:
                s = resolve(recs, sel.metric, filters, by=sel.by, prefer_paper=paper.slug)
            except Missing as e:
                reasons.append(str(e))
                continue
            series[sel] = s
            v.notes.extend(s.notes)
        if reasons:
            v.reason = "; ".join(dict.fromkeys(reasons))
            return None
        sels = list(dict.fromkeys(claim.check.selections))
        _check_shots(sels, series)
        seeded = {s: series[s].seeded() for s in sels}

        # near chance: zero-shot of the term's backbone below NEAR_CHANCE x chance on a dataset
        def near(s: Selection, d: str) -> bool:
            lv = levels.get((series[s].identity.get("backbone"), d))
            if lv is not None and lv[0] < NEAR_CHANCE * lv[1]:
                v.near_chance[d] = f"zero-shot {lv[0]:.1f}% < {NEAR_CHANCE:g} x chance {lv[1]:.1f}%"
                return True
            return False

        avail = {s: [d for d in series[s].datasets() if d not in s.exclude] for s in sels}
        pools: dict[str, list[Selection]] = {}
        for s in sels:
            if not s.pinned:
                pools.setdefault(pool_label(s), []).append(s)
        datasets: dict[Selection, list[str]] = {}
        for label, members in sorted(pools.items()):
            common = sorted(set.intersection(*(set(avail[s]) for s in members)))
            for s in members:
                for d in avail[s]:
                    if d not in common:
                        v.dropped.setdefault(d, [o.text for o in members if d not in avail[o]])
            if not common:
                v.reason = "no dataset is common to all terms: " + "; ".join(
                    f"`{s.text}` has {', '.join(avail[s]) or 'none'}" for s in members)
                return None
            kept = [d for d in common if not any(near(s, d) for s in members)]
            v.datasets[label] = kept
            for s in members:
                datasets[s] = kept
        for s in sels:
            if s.pinned:
                want = [str(d) for d in series[s].filters["dataset"]]  # as resolved: the profile's own names
                have = {norm(d): d for d in avail[s]}
                missing = [d for d in want if norm(d) not in have]
                if missing:
                    raise Missing(f"`{s.text}` has no runs on {', '.join(missing)}")
                datasets[s] = [have[norm(d)] for d in want if not near(s, have[norm(d)])]
        v.dropped = dict(sorted(v.dropped.items()))
        v.near_chance = dict(sorted(v.near_chance.items()))
        empty = [s.text for s in sels if not datasets[s]]
        if empty:
            v.status = INCONCLUSIVE
            v.reason = (f"every dataset of {', '.join(f'`{t}`' for t in empty)} is near chance (zero-shot < "
                        f"{NEAR_CHANCE:g} x chance): " + "; ".join(f"{d}: {why}" for d, why in v.near_chance.items()))
            return None

        # seeds every trained term ran on every one of its cells
        seedsets = [set(series[s].cells.get((k, d), {})) for s in sels if seeded[s]
                    for d in datasets[s] for k in _shots_of(series[s])]
        seeds = sorted(set.intersection(*seedsets)) if seedsets else []
        if seedsets and not seeds:
            raise Missing("the trained terms share no seed on their datasets: "
                          + "; ".join(f"`{s.text}` ran seeds {', '.join(map(str, _all_seeds(series[s])))}"
                                      for s in sels if seeded[s]))
        for s in sels:
            if seeded[s] and set(_all_seeds(series[s], datasets[s])) - set(seeds):
                extra = sorted(set(_all_seeds(series[s], datasets[s])) - set(seeds))
                v.notes.append(f"`{s.text}` also ran seed(s) {', '.join(map(str, extra))}; compared on the seeds "
                               f"every trained term ran ({', '.join(map(str, seeds))})")
        v.seeds = seeds
        v.shots = sorted({k for s in sels for k in _shots_of(series[s]) if k is not None})
        return cls(series, datasets, seeds, seeded)

    def _arrays(self, sel: Selection) -> dict:
        """{metric: array (K, D, S)} of the cells the term uses (S = 1 for untrained terms)."""
        s = self.series[sel]
        metrics = ("base", "novel") if _is_hm(s) else (s.metric,)
        shots = _shots_of(s)
        out = {}
        for m in metrics:
            rows = []
            for k in shots:
                row = []
                for d in self.datasets[sel]:
                    cell = s.cells[(k, d)]
                    use = self.seeds if self.seeded[sel] else sorted(cell)[:1]
                    row.append([metric_of(cell[seed], m) for seed in use])
                rows.append(row)
            out[m] = np.asarray(rows, float)
        return {"shots": shots, "metrics": out}

    def value(self, sel: Selection, seed_w: dict[str, np.ndarray] | None, data_w: dict[tuple, np.ndarray] | None,
              split: bool = False):
        """The term under weights: seed_w[dataset] (B, S) seed counts, data_w[dataset list] (B, D) dataset
        counts (None: every seed / dataset once). Returns (B,) arrays or a Vec of them; ``split`` gives a
        `mean` term's per-dataset values instead (for the report)."""
        d = self.data[sel]
        names = self.datasets[sel]
        per_dataset = split or (sel.func == "per" and sel.by == "dataset")

        def seed_means(m: str) -> np.ndarray:        # (B or 1, K, D)
            X = d["metrics"][m]                       # (K, D, S)
            if not self.seeded[sel] or seed_w is None:
                return X.mean(-1)[None]
            W = np.stack([seed_w[n] for n in names], axis=1)          # (B, D, S)
            return np.einsum("bds,kds->bkd", W, X) / W.sum(-1)[:, None, :]

        def over_datasets(m_kd: np.ndarray) -> np.ndarray:          # (B, K)
            if data_w is None:
                return m_kd.mean(-1)
            w = data_w[tuple(names)]                                   # (B, D)
            return (m_kd * w[:, None, :]).sum(-1) / w.sum(-1)[:, None]

        hm = _is_hm(self.series[sel])
        if hm:
            b, n = seed_means("base"), seed_means("novel")
        else:
            m = seed_means(self.series[sel].metric)
        if per_dataset:
            return Vec("dataset", {ds: (_harmonic(b[:, 0, i], n[:, 0, i]) if hm else m[:, 0, i])
                                   for i, ds in enumerate(names)})
        agg = _harmonic(over_datasets(b), over_datasets(n)) if hm else over_datasets(m)
        if sel.by == "shots" and sel.func == "per":
            return Vec("shots", {k: agg[:, i] for i, k in enumerate(d["shots"])})
        return agg[:, 0]

    def resampled_lists(self) -> list[tuple]:
        """Dataset lists averaged over (resampled with replacement); per-dataset vectors keep theirs."""
        return sorted({tuple(self.datasets[s]) for s in self.series
                       if not (s.func == "per" and s.by == "dataset")})


def _is_hm(s: Series) -> bool:
    return s.metric == "hm" and all("base" in m and "novel" in m for c in s.cells.values() for m in c.values())


def _harmonic(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.where(a + b == 0, 0.0, 2 * a * b / np.where(a + b == 0, 1.0, a + b))


def _shots_of(s: Series) -> list:
    return s.shots()


def _all_seeds(s: Series, datasets: Sequence[str] | None = None) -> list[int]:
    return sorted({seed for (k, d), c in s.cells.items() if datasets is None or d in datasets for seed in c})


def _check_shots(sels: list[Selection], series: dict[Selection, Series]) -> None:
    """Terms of one comparison run at the same shot count unless the check pins each one's shots."""
    single = {s: series[s].shots()[0] for s in sels if s.by != "shots" and series[s].shots() != [None]}
    if len(set(single.values())) > 1 and not all(s.pins_shots for s in single):
        shown = "; ".join(f"`{s.text}` at {k} shots" for s, k in single.items())
        raise Missing(f"terms run at different shot counts ({shown}): a comparison needs matched grids; "
                      f"pin shots= in each term if the claim compares shot counts")


def _judge(claim: Claim, grid: _Grid, v: Verdict) -> None:
    sels = list(grid.series)
    terms: dict[Selection, Term] = {}

    def point(sel: Selection):
        s = grid.series[sel]
        out = grid.value(sel, None, None)
        t = terms.setdefault(sel, Term(sel.text, fmt_filters(s.filters), datasets=list(grid.datasets[sel]),
                                       shots=_shots_of(s)))
        k0 = _shots_of(s)[0]
        t.seeds = {d: grid.seeds if grid.seeded[sel] else sorted(s.cells[(k0, d)])[:1] for d in t.datasets}
        if isinstance(out, Vec):
            t.value = {k: float(x[0]) for k, x in out.values.items()}
            if out.by == "dataset":
                t.per_dataset = dict(t.value)
            return Vec(out.by, dict(t.value))
        if sel.by == "dataset":
            t.per_dataset = {k: float(x[0]) for k, x in grid.value(sel, None, None, split=True).values.items()}
        t.value = float(out[0])
        return t.value

    result, trace = claim.check.evaluate(point)
    v.holds = result
    v.terms = [terms[s] for s in sels if s in terms]
    v.steps = trace.steps

    rng = np.random.default_rng(RESAMPLE_SEED)
    S = len(grid.seeds)
    any_seeded = any(grid.seeded.values())
    all_datasets = sorted({d for s in sels for d in grid.datasets[s]})
    seed_w = {d: _counts(rng.integers(0, S, (RESAMPLES, S)), S) for d in all_datasets} if S else {}
    data_w = {lst: _counts(rng.integers(0, len(lst), (RESAMPLES, len(lst))), len(lst)) for lst in grid.resampled_lists()}
    boot = claim.check.evaluate_batch(lambda sel: grid.value(sel, seed_w, data_w))
    tail = (1 - LEVEL) / 2
    low, high = (float(q) for q in np.quantile(_finite(boot.margin), [tail, 1 - tail]))
    holds = float(np.mean(boot.value))
    noise = Noise(trace.margin, low, high, holds, RESAMPLES)
    if any_seeded:
        per_seed = {}
        for i, seed in enumerate(grid.seeds):
            one = {d: np.eye(S)[i][None] for d in all_datasets}
            per_seed[seed] = bool(claim.check.evaluate_batch(lambda sel: grid.value(sel, one, None)).value[0])
        noise.per_seed = per_seed
        noise.stability = ("one seed" if S == 1 else
                           "stable" if all(x == result for x in per_seed.values()) else "fragile")
    v.noise = noise
    resampled = any(len(lst) > 1 for lst in grid.resampled_lists())
    if any_seeded and S < 2 and not resampled:
        v.status = INCONCLUSIVE
        v.reason = "one seed on one dataset: run-to-run noise is unknown"
    elif result and holds >= 1 - tail:
        v.status = REPRODUCED
    elif not result and holds <= tail:
        v.status = NOT_REPRODUCED
    else:
        v.status = INCONCLUSIVE
        v.reason = (f"inside run-to-run noise: margin {_fmt(noise.margin)}, 95% interval [{_fmt(low)}, "
                    f"{_fmt(high)}]; the check holds in {holds:.0%} of {RESAMPLES} resamples")
    v.notes = sorted(set(v.notes))


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    """(B, n) draws of indices -> (B, n) multiplicities."""
    out = np.zeros((draws.shape[0], n))
    np.add.at(out, (np.arange(draws.shape[0])[:, None], draws), 1.0)
    return out


def _finite(x: np.ndarray) -> np.ndarray:
    """Margins may be +-inf (a decided name comparison); clip them so quantiles stay defined."""
    return np.clip(np.asarray(x, float), -1e9, 1e9)


def _fmt(x: float) -> str:
    if abs(x) >= 1e9:
        return "∞" if x > 0 else "-∞"
    return f"{x:.2f}"


def evaluate_paper(paper: Paper, records: Sequence[dict], profile: str) -> list[Verdict]:
    """Every claim's verdict; a claim whose premise (``requires``) is not reproduced is 'premise not met'."""
    levels = zero_shot_levels(records, profile)
    out = {c.id: evaluate_claim(c, paper, records, profile, levels) for c in paper.claims}
    for c in paper.ordered_claims():   # premises before the claims that require them
        v = out[c.id]
        if not c.requires or v.status == NOT_TESTABLE:
            continue
        v.premises = {p: out[p].status for p in c.requires}
        unmet = {p: s for p, s in v.premises.items() if s != REPRODUCED}
        if unmet:
            v.check_status = v.status
            v.status = PREMISE_NOT_MET
            v.reason = "premise not met: " + "; ".join(f"`{p}` is {s}" for p, s in unmet.items())
    return [out[c.id] for c in paper.claims]
