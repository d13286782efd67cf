"""Do the verdicts survive another pretraining run? Claim by claim, the verdicts of two sets of run records.

The embedded verdicts rest on one pretraining run of each tiny CLIP. Pretrain the towers again (another seed, or
another machine: CPU kernels do not give the same bytes), rerun the papers into a second runs root, and compare:

    python -m common.report --compare runs_other/ coop cocoop ...     # or --all

A claim whose verdict changes with the towers alone describes the pretraining run more than the method. The
table lists every claim with both verdicts; the summary counts the claims that agree, by source.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common.engine.runs import load_records

from .schema import load_paper
from .verdict import NOT_REPRODUCED, REPRODUCED, evaluate_paper


@dataclass
class ClaimPair:
    slug: str
    claim: str
    source: str
    a: str
    b: str

    @property
    def same(self) -> bool:
        return self.a == self.b


def compare_runs(slugs: Sequence[str], runs_a: Path | str | None, runs_b: Path | str,
                 papers_root: Path | str = "papers", profile: str = "embedded") -> list[ClaimPair]:
    """Every claim of `slugs` judged on the records under `runs_a` (default: runs/) and under `runs_b`."""
    a, b = load_records(runs_a), load_records(runs_b)
    if not b:
        raise FileNotFoundError(f"no run records (metrics.json) under {runs_b}")
    out = []
    for slug in slugs:
        paper = load_paper(Path(papers_root) / slug / "paper.yaml")
        for va, vb in zip(evaluate_paper(paper, a, profile), evaluate_paper(paper, b, profile)):
            out.append(ClaimPair(slug, va.claim.id, va.claim.source, va.status, vb.status))
    return out


def format_comparison(pairs: Sequence[ClaimPair], label_a: str, label_b: str) -> str:
    """A markdown table of every claim's two verdicts (changed ones marked) and the agreement by source."""
    lines = [f"| paper | claim | source | {label_a} | {label_b} | |", "|---|---|---|---|---|---|"]
    lines += [f"| {p.slug} | {p.claim} | {p.source} | {p.a} | {p.b} | {'' if p.same else 'changed'} |" for p in pairs]
    lines.append("")
    for source in sorted({p.source for p in pairs}):
        group = [p for p in pairs if p.source == source]
        lines.append(f"- {source} claims: {sum(p.same for p in group)} of {len(group)} keep their verdict")
    flips = [p for p in pairs if {p.a, p.b} == {REPRODUCED, NOT_REPRODUCED}]
    lines.append(f"- all: {sum(p.same for p in pairs)} of {len(pairs)} keep their verdict; {len(flips)} flip "
                 f"between reproduced and not reproduced")
    return "\n".join(lines) + "\n"
