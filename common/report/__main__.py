"""CLI: ``python -m common.report <slug> [<slug> ...] | --all | --leaderboard`` (see --help)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .budgets import write_budgets
from .leaderboard import write_leaderboard
from .records import PROFILES
from .render import write_report
from .schema import PaperSpecError


def paper_slugs(papers_root: Path) -> list[str]:
    return sorted(p.parent.name for p in papers_root.glob("*/paper.yaml"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m common.report",
        description="Render papers/<slug>/REPORT.md (paper numbers, ours, claim verdicts, figures) and the "
                    "cross-method leaderboard from the run records under runs/.")
    ap.add_argument("slugs", nargs="*", help="paper folders to report on (papers/<slug>/paper.yaml)")
    ap.add_argument("--all", action="store_true", help="every papers/*/paper.yaml")
    ap.add_argument("--leaderboard", action="store_true",
                    help="write reports/leaderboard.md, leaderboard.json, plots/fewshot.json and figures")
    ap.add_argument("--runs", type=Path, default=None,
                    help="root of the run records (default: $VLMT_RUNS or runs/)")
    ap.add_argument("--papers", type=Path, default=Path("papers"), help="folder holding <slug>/paper.yaml")
    ap.add_argument("--out", type=Path, default=None,
                    help="output root: REPORT.md goes to OUT/<slug>/ (default: next to paper.yaml); "
                         "the leaderboard goes to OUT/ (default: reports/)")
    ap.add_argument("--compare", type=Path, default=None, metavar="RUNS_B",
                    help="print every claim's verdict on --runs (default runs/) beside its verdict on the records "
                         "under RUNS_B (e.g. a rerun on towers pretrained again), instead of writing reports")
    ap.add_argument("--profile", choices=PROFILES, default="embedded", help="leaderboard profile (default embedded)")
    args = ap.parse_args(argv)

    slugs = paper_slugs(args.papers) if args.all else list(args.slugs)
    if not slugs and not args.leaderboard:
        ap.error("name a paper slug, or use --all or --leaderboard")
    if slugs and args.leaderboard and args.out is not None:
        ap.error("--out is ambiguous with both reports and --leaderboard: run them separately")
    if args.compare is not None:
        from .stability import compare_runs, format_comparison
        pairs = compare_runs(slugs, args.runs, args.compare, args.papers, args.profile)
        print(format_comparison(pairs, str(args.runs or "runs"), str(args.compare)), end="")
        return 0
    if args.all and not slugs:
        print(f"no paper.yaml under {args.papers}/", file=sys.stderr)
    failed = 0
    for slug in slugs:  # a bad paper.yaml is reported, and the other reports are still written
        if not (args.papers / slug / "paper.yaml").exists():
            known = ", ".join(paper_slugs(args.papers)) or "none"
            print(f"error: {args.papers / slug / 'paper.yaml'} not found (papers with a paper.yaml: {known})",
                  file=sys.stderr)
            failed += 1
            continue
        try:
            print(write_report(slug, args.papers, args.runs, args.out))
        except PaperSpecError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    if args.leaderboard:
        paths = write_leaderboard(args.runs, args.out or Path("reports"), args.profile)
        print(paths["md"])
        print(write_budgets(args.papers, args.out or Path("reports")))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
