"""Claim verdicts computed from run records: reproduced / not reproduced / not testable.

Evaluation of one claim on one profile:
1. every selection in the check gets the claim's defaults (profile, protocol, backbone, per-method
   defaults from paper.yaml) unless it sets that filter itself, and is resolved to one series of records;
   any selection without records makes the claim *not testable*, with the reason;
   a dataset list keeps the names of the judged profile's world (emb_* on embedded), so one check can
   name both EuroSAT and its stand-in;
2. selections that do not name their datasets are compared on the datasets present for ALL of them (at
   every shot count used); the others are reported as dropped;
3. the check is evaluated on seed-first, then dataset, averages; its boolean is the verdict.
A claim is never *reproduced* when one of the numbers it needs is missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .expr import Selection, Step, Vec
from .records import Missing, Series, fmt_filters, norm, resolve
from .schema import Claim, Paper

REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE = "reproduced", "not reproduced", "not testable"


@dataclass
class Term:
    """One selection of a check with the numbers it contributed."""
    text: str                       # as written in the check
    filters: str                    # the full filters it was resolved with
    value: Any = None               # float (mean) or {key: float} (per)
    datasets: list[str] = field(default_factory=list)
    per_dataset: dict[str, float] = field(default_factory=dict)
    seeds: dict[str, list[int]] = field(default_factory=dict)


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
    methods = own.get("method", ())
    extra: dict[str, Any] = {"profile": profile, "protocol": claim.protocol}
    bb = paper.backbone_for(profile, claim)
    if bb:
        extra["backbone"] = bb
    if len(methods) == 1:
        for m, d in paper.defaults.items():
            if norm(m) == norm(methods[0]):
                extra.update(d)
    for k, v in extra.items():
        if k not in filters:
            filters[k] = (v,)
    if "dataset" in own:
        filters["dataset"] = profile_datasets(own["dataset"], profile)
    # keep a stable, readable order: the written filters first, then the defaults
    return {k: filters[k] for k in list(own) + [k for k in extra if k not in own]}


def evaluate_claim(claim: Claim, paper: Paper, records: Sequence[dict], profile: str) -> Verdict:
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
        return v

    # datasets common to every selection that does not name its datasets, within each dataset pool
    # (selections filtered to role=source are not intersected with those filtered to role=target)
    avail = {s: [d for d in series[s].datasets() if d not in s.exclude] for s in claim.check.selections}
    pools: dict[str, list[Selection]] = {}
    for s in claim.check.selections:
        if not s.pinned:
            pools.setdefault(pool_label(s), []).append(s)
    common: dict[str, list[str]] = {}
    for label, sels in sorted(pools.items()):
        common[label] = sorted(set.intersection(*(set(avail[s]) for s in sels)))
        for s in sels:
            for d in avail[s]:
                if d not in common[label]:
                    v.dropped.setdefault(d, [o.text for o in sels if d not in avail[o]])
        if not common[label]:
            v.reason = "no dataset is common to all terms: " + "; ".join(
                f"`{s.text}` has {', '.join(avail[s]) or 'none'}" for s in sels)
            return v
    v.dropped = dict(sorted(v.dropped.items()))
    v.datasets = common

    def datasets_of(sel: Selection) -> list[str]:
        if not sel.pinned:
            return common[pool_label(sel)]
        want = [str(d) for d in series[sel].filters["dataset"]]  # as resolved: the profile's own names
        have = {norm(d): d for d in avail[sel]}
        missing = [d for d in want if norm(d) not in have]
        if missing:
            raise Missing(f"`{sel.text}` has no runs on {', '.join(missing)}")
        return [have[norm(d)] for d in want]

    terms: dict[Selection, Term] = {}

    def resolver(sel: Selection):
        s = series[sel]
        ds = datasets_of(sel)
        term = terms.setdefault(sel, Term(sel.text, fmt_filters(s.filters), datasets=list(ds)))
        if sel.by == "shots":
            value = {k: s.average(ds, k) for k in s.shots()}
            term.seeds = {f"{d}@{k}": s.seeds(d, k) for k in s.shots() for d in ds}
        else:
            term.per_dataset = {d: s.value(d) for d in ds}
            term.seeds = {d: s.seeds(d) for d in ds}
            value = s.average(ds) if sel.func == "mean" else dict(term.per_dataset)
        term.value = value
        return value if sel.func == "mean" else Vec(sel.by, dict(value))

    try:
        result, trace = claim.check.evaluate(resolver)
    except Missing as e:
        v.reason = str(e)
        return v
    used = [s for s in dict.fromkeys(claim.check.selections) if s in terms]
    v.terms = [terms[s] for s in used]
    v.steps = trace.steps
    v.notes.extend(_seed_notes(v.terms, [any(k is not None for k in series[s].shots()) for s in used]))
    v.notes = sorted(set(v.notes))
    v.status = REPRODUCED if result else NOT_REPRODUCED
    return v


def _seed_notes(terms: list[Term], seeded: list[bool]) -> list[str]:
    """Flag cells with fewer seeds than expected: the fullest cell of the same term, or for few-shot
    terms the fullest few-shot cell of the claim (zero-shot runs legitimately have one seed)."""
    most_seeded = max((len(s) for t, f in zip(terms, seeded) if f for s in t.seeds.values()), default=0)
    notes = []
    for t, f in zip(terms, seeded):
        most = max([len(s) for s in t.seeds.values()] + ([most_seeded] if f else []))
        short = [f"{d} ({len(s)} of {most})" for d, s in t.seeds.items() if len(s) < most]
        if short:
            notes.append(f"`{t.text}` has fewer seeds on {', '.join(short)}; averaged over the seeds present")
    return notes


def evaluate_paper(paper: Paper, records: Sequence[dict], profile: str) -> list[Verdict]:
    return [evaluate_claim(c, paper, records, profile) for c in paper.claims]
