"""Where a launch stands, from files only: its manifest, each job's state file and log, the run records and
the resume checkpoints under runs/<slug>/.

A cell is `done` when its job finished (with the number of records it holds; `empty` when the paper has no run
there), `running` while its job runs (`training` when a resume checkpoint of the cell exists), `failed` when its
job failed (the reason and the log), `requeued` after a timeout or preemption, `pending` before its job starts.
Without a launch (an in-process run) the cells of the config's grid are listed with their records.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..engine.cells import cell, cell_name, owner_of
from ..engine.runs import load_records
from ..errors import UserError
from ..paths import runs_root
from .job import log_tail
from .launcher import launch_root

CKPT = re.compile(r"k(\d+|zs)-seed(\d+)$")
GROUP = re.compile(r"k(\d+|None)s(\d+)")


def launches(slug: str) -> list[Path]:
    """Launch folders of a paper, oldest first."""
    root = launch_root(slug)
    return sorted(p for p in root.glob("*") if (p / "manifest.json").is_file()) if root.is_dir() else []


def read_manifest(slug: str, launch: str | None = None) -> dict:
    found = launches(slug)
    if not found:
        raise UserError(f"no launch of {slug} under {launch_root(slug)}: start one with `python -m papers.{slug} "
                        f"reproduce --launcher slurm|submitit-local ...`")
    if launch is None:
        return json.loads((found[-1] / "manifest.json").read_text())
    for p in found:
        if p.name == launch:
            return json.loads((p / "manifest.json").read_text())
    raise UserError(f"no launch {launch!r} of {slug}; launches: {', '.join(p.name for p in found)}")


def _records_by_cell(slug: str, profile: str, arch: str | None) -> dict[tuple, list[dict]]:
    """The paper's records of `profile` (and backbone `arch`), by cell (source, shots, seed)."""
    out: dict[tuple, list[dict]] = {}
    for r in load_records(runs_root() / slug, paper=slug, profile=profile):
        if arch is not None and r.get("backbone") != arch:
            continue
        out.setdefault(cell(r.get("source") or r["dataset"], r.get("shots"), r["seed"]), []).append(r)
    return out


def _checkpoints_by_cell(slug: str) -> set[tuple]:
    """Cells with a resume checkpoint (a run in training, or interrupted) under runs/<slug>/_checkpoints."""
    out = set()
    root = runs_root() / slug / "_checkpoints"
    if not root.is_dir():
        return out
    for ck in root.glob("**/checkpoint.pt"):
        folder = ck.parent
        # <protocol>/<profile>/<dataset>/<method>/<backbone>/<k..-seed..> or .../<backbone>/group-k1s1_k2s1
        m = CKPT.search(folder.name)
        if m:
            shots = None if m.group(1) == "zs" else int(m.group(1))
            out.add(cell(folder.parents[2].name, shots, int(m.group(2))))
        elif folder.name.startswith("group-"):
            for k, s in GROUP.findall(folder.name):
                out.add(cell(folder.parents[2].name, None if k == "None" else int(k), int(s)))
    return out


SLURM_FAILED = ("BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT")


def _slurm_state(launch: Path, job: dict) -> str | None:
    """Slurm's own state of a job (sacct, through submitit), None off a Slurm cluster."""
    import shutil
    if not shutil.which("sacct"):
        return None
    import submitit
    return str(submitit.SlurmJob(launch / "submitit", job["job_id"]).state).split()[0]


def _job_state(launch: Path, job: dict, slurm: bool = False) -> dict:
    path = launch / "jobs" / f"{job['index']}.json"
    state = json.loads(path.read_text()) if path.is_file() else {"status": "pending"}
    if slurm and state["status"] in ("running", "pending", "requeued"):
        # a job Slurm ended without our handler running (killed, out of memory, time limit without requeue)
        told = _slurm_state(launch, job)
        if told in SLURM_FAILED:
            return {**state, "status": "failed", "error": f"Slurm says {told}"}
        if told == "RUNNING" and state["status"] == "pending":     # started, state file not written yet
            state = {**state, "status": "running"}
    if state["status"] in ("running", "requeued"):
        result = _submitit_result(job)
        if result == "error":
            state = {**state, "status": "failed", "error": state.get("error") or "the job raised (see its log)"}
        elif state["status"] == "running" and _dead(state):
            state = {**state, "status": "failed", "error": f"process {state['pid']} on this host is gone without "
                                                           f"finishing (killed?)"}
    elif state["status"] == "pending" and _submitit_result(job) == "error":
        state = {"status": "failed", "error": "the job failed before it started (see its log)"}
    return state


def _submitit_result(job: dict) -> str | None:
    """'success' / 'error' from submitit's result pickle next to the job's logs, None while there is none."""
    out = Path(job.get("stdout") or "")
    pickle = out.with_name(out.name.replace("_log.out", "_result.pkl")) if out.name else None
    if not pickle or not pickle.is_file():
        return None
    import pickle as pkl
    try:
        with pickle.open("rb") as f:
            return pkl.load(f)[0]
    except Exception:  # a half-written pickle: the job is finishing
        return None


def _dead(state: dict) -> bool:
    """A job process of this host that no longer exists (only checked on the host that ran it)."""
    import socket
    if state.get("host") != socket.gethostname() or not state.get("pid"):
        return False
    try:
        os.kill(int(state["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def status(slug: str, launch: str | None = None, cfg_grid: list | None = None, profile: str = "embedded",
           arch: str | None = None) -> dict:
    """Cells, jobs and counts of the latest launch of `slug` (or `launch`). Without any launch, `cfg_grid`
    (the grid of a config) is listed from the records alone."""
    if launch is None and not launches(slug) and cfg_grid is not None:
        recs = _records_by_cell(slug, profile, arch)
        ckpts = _checkpoints_by_cell(slug)
        cells = [{"cell": list(c), "name": cell_name(c), "job": None, "records": len(recs.get(c, [])),
                  "state": "recorded" if recs.get(c) else ("training" if c in ckpts else "no records")}
                 for c in map(tuple, cfg_grid)]
        return {"slug": slug, "launch": None, "jobs": [], "cells": cells, "counts": _count(cells)}
    manifest = read_manifest(slug, launch)
    folder = Path(manifest["folder"])
    recs = _records_by_cell(slug, manifest["profile"], manifest["arch"])
    ckpts = _checkpoints_by_cell(slug)
    jobs = []
    for job in manifest["jobs"]:
        state = _job_state(folder, job, manifest.get("launcher") == "slurm")
        jobs.append({**job, "state": state["status"], "error": state.get("error"), "host": state.get("host"),
                     "seconds": state.get("seconds"), "log_tail": log_tail(job.get("stderr"))
                     if state["status"] == "failed" else ""})
    splits = [j["cells"] for j in manifest["jobs"]]
    grid = [tuple(c) for c in manifest["grid"]]
    extra = sorted((c for c in recs if c not in set(grid)), key=lambda c: [str(x) for x in c])  # outside the grid
    cells = []
    for c in grid + extra:
        j = jobs[owner_of(c, splits)] if jobs else None
        n = len(recs.get(c, []))
        state = j["state"] if j else "pending"
        if state == "done":
            state = "done" if n else "empty"
        elif state == "running" and c in ckpts:
            state = "training"
        cells.append({"cell": list(c), "name": cell_name(c) + ("" if c in set(grid) else " (outside the grid)"),
                      "job": j["index"] if j else None, "records": n, "state": state})
    return {"slug": slug, "launch": folder.name, "folder": str(folder), "manifest": manifest, "jobs": jobs,
            "cells": cells, "counts": _count(cells)}


def _count(cells: list[dict]) -> dict:
    out: dict[str, int] = {}
    for c in cells:
        out[c["state"]] = out.get(c["state"], 0) + 1
    return out


def format_status(st: dict, all_cells: bool = True) -> str:
    lines = []
    if st["launch"] is None:
        lines.append(f"{st['slug']}: no launch; the grid of the config from the records under {runs_root()}")
    else:
        m = st["manifest"]
        lines.append(f"{st['slug']}: launch {st['launch']} ({m['launcher']}, {m['command']} --profile {m['profile']} "
                     f"arch {m['arch']}), {len(st['jobs'])} job(s), folder {st['folder']}")
        for j in st["jobs"]:
            extra = f"  {j['error']}" if j.get("error") else ""
            took = f" in {j['seconds']}s" if j.get("seconds") is not None else ""
            lines.append(f"  job {j['index']:>3} [{j['job_id']}] {j['state']}{took}: {len(j['cells'])} cell(s); "
                         f"log {j['stderr']}{extra}")
            if j.get("log_tail"):
                lines += ["      | " + t for t in j["log_tail"].splitlines()]
    lines.append("  counts: " + ", ".join(f"{k} {v}" for k, v in sorted(st["counts"].items())))
    if all_cells:
        for c in st["cells"]:
            job = "" if c["job"] is None else f"job {c['job']:>3}  "
            lines.append(f"  {c['state']:>10}  {job}{c['name']}  ({c['records']} records)")
    return "\n".join(lines)
