"""`python -m common.launch {status,gather,gpu,repro}`: follow a launch, collect it, run a command on the GPU of a
DVC queue worker (README 'Running at scale'), or reproduce the DVC pipeline with independent stages at once."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import UserError, one_line


def _config_grid(slug: str, profile: str, overrides: list[str]) -> tuple[list, str]:
    from ..config import load_config, read_paper_config
    from ..engine.cells import grid_of
    path = Path("papers") / slug / "config.yaml"
    if not path.is_file():
        raise UserError(f"papers/{slug}/config.yaml not found: name a paper folder under papers/")
    cfg = load_config(path, profile, overrides)
    return grid_of(cfg, (read_paper_config(path).get("unused") or {})), cfg["arch"]


def cmd_status(a) -> int:
    from .status import format_status, launches, status
    grid, arch = (None, None)
    if a.launch is None and not launches(a.slug):
        grid, arch = _config_grid(a.slug, a.profile, a.overrides)
    st = status(a.slug, a.launch, grid, a.profile, arch)
    print(format_status(st, all_cells=not a.summary))
    return 0


def cmd_gather(a) -> int:
    """Check that every job of the launch is done, run the launch's command once in this process (every cell has
    its records, so only the steps outside the cells run: a paper's own figures) and render REPORT.md. With
    `partial`: only REPORT.md, from the records there are."""
    from .status import format_status, status
    st = status(a.slug, a.launch)
    m = st["manifest"]
    unfinished = [j for j in st["jobs"] if j["state"] != "done"]
    if unfinished and not a.partial:
        print(format_status(st, all_cells=False), file=sys.stderr)
        raise UserError(f"{len(unfinished)} of {len(st['jobs'])} job(s) of launch {st['launch']} are not done "
                        f"(jobs {[j['index'] for j in unfinished][:10]}): wait, or rerun the launch command to resume "
                        f"failed ones; --partial renders the report from the records there are")
    if not a.partial:
        import importlib
        print(f"[{a.slug}] all {len(st['jobs'])} job(s) done; running `{m['command']}` in this process for the steps "
              f"outside the cells", file=sys.stderr)
        importlib.import_module(f"papers.{a.slug}.__main__").main(list(m["argv"]))
    from ..report.__main__ import main as report_main
    return report_main([a.slug] + (["--out", str(a.out)] if a.out else []))


def cmd_gpu(a) -> int:
    from .gpu import worker_env
    cmd = list(a.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UserError("give the command after --, e.g. python -m common.launch gpu -- python -m papers.coop "
                        "reproduce --profile real")
    env, note = worker_env(gpus=a.gpus)
    print(f"[gpu] {note}", file=sys.stderr)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def cmd_repro(a) -> int:
    from .pipeline import repro
    times = repro(a.targets, jobs=a.jobs, dry=a.dry, force=a.force, say=lambda m: print(f"[repro] {m}", file=sys.stderr))
    ran = {k: v for k, v in times.items() if v is not None}
    print(f"[repro] {len(ran)} stage(s) {'would run' if a.dry else 'ran'}, {len(times) - len(ran)} up to date"
          + (f"; stage time {sum(ran.values()) / 60:.1f} min" if ran and not a.dry else ""), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.launch", description=__doc__)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("status", help="done / running / failed / pending cells of a paper's latest launch")
    s.add_argument("slug")
    s.add_argument("--launch", help="a launch folder name under runs/<slug>/_launch (default: the latest)")
    s.add_argument("--summary", action="store_true", help="jobs and counts only, not every cell")
    s.add_argument("--profile", default="embedded", help="without a launch: the config whose grid to list")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    g = sub.add_parser("gather", help="when every job is done: the steps outside the cells, then REPORT.md")
    g.add_argument("slug")
    g.add_argument("--launch", help="a launch folder name (default: the latest)")
    g.add_argument("--partial", action="store_true", help="only render the report, from the records there are "
                                                          "(jobs not done allowed)")
    g.add_argument("--out", type=Path, help="write REPORT.md to OUT/<slug>/ (default: beside paper.yaml)")
    u = sub.add_parser("gpu", help="run a command on the GPU of the DVC queue worker running it")
    u.add_argument("--gpus", type=int, default=None, help="GPUs to spread the workers over (default: all visible)")
    u.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command")
    r = sub.add_parser("repro", help="dvc repro, running up to --jobs independent stages at once")
    r.add_argument("targets", nargs="*", help="stages (as dvc repro takes them; default: the whole pipeline)")
    r.add_argument("--jobs", "-j", type=int, default=2, help="stage commands at once (default 2: the project's cores)")
    r.add_argument("--dry", action="store_true", help="list the stages that would run, run nothing")
    r.add_argument("--force", "-f", action="store_true", help="run every planned stage even if up to date")
    a = ap.parse_args(argv)
    try:
        return {"status": cmd_status, "gather": cmd_gather, "gpu": cmd_gpu, "repro": cmd_repro}[a.what](a)
    except UserError as err:
        print(f"{ap.prog} {a.what}: error: {one_line(str(err))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
