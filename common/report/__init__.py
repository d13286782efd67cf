"""Replication reports: paper.yaml schema, claim verdicts from run records, REPORT.md and the leaderboard.

- :func:`load_paper` validates ``papers/<slug>/paper.yaml`` (schema in :mod:`common.report.schema`);
- :func:`evaluate_claim` / :func:`evaluate_paper` give reproduced / not reproduced / not testable with the
  numbers that decided it (:mod:`common.report.verdict`, expression language in :mod:`common.report.expr`);
- :func:`write_report` renders ``REPORT.md`` and its figures; :func:`write_leaderboard` the cross-method
  leaderboard. CLI: ``python -m common.report <slug> | --all | --leaderboard``.
"""
from .expr import Expression, ExpressionError
from .leaderboard import write_leaderboard
from .records import Missing
from .render import write_report
from .schema import Claim, Paper, PaperSpecError, Reported, load_paper, parse_paper
from .verdict import NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, Verdict, evaluate_claim, evaluate_paper

__all__ = ["Expression", "ExpressionError", "Missing", "Claim", "Paper", "PaperSpecError", "Reported",
           "load_paper", "parse_paper", "Verdict", "evaluate_claim", "evaluate_paper", "REPRODUCED",
           "NOT_REPRODUCED", "NOT_TESTABLE", "write_report", "write_leaderboard"]
