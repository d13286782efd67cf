"""Split a paper's grid into jobs and submit them with submitit: to Slurm (`slurm`) or as local processes
(`submitit-local`). `local` is the default in-process run and never comes here.

Resources come from the command line or a launch profile (YAML, the same keys):

    partition: gpu          # Slurm partition
    gpus_per_job: 1         # GPUs of one job; more than one runs the job data-parallel (one task per GPU)
    cpus_per_job: 8
    mem_gb: 64
    time: 240               # minutes per job (a job past it is requeued and resumes)
    jobs: 33                # how many jobs the grid is split into (default: one per cell)
    parallel: 16            # at most this many jobs of the array run at once
    account: myproject      # optional Slurm fields: account, qos, constraint, exclude
    setup: [module load cuda/12.4, source .venv/bin/activate]   # lines run before each job
    slurm: {reservation: clip}                                  # any other sbatch option

Every launch gets a folder `runs/<slug>/_launch/<id>/`: `manifest.json` (the command, the grid, each job's
cells, submitit job id and log files), `jobs/<index>.json` (the job's state) and `submitit/` (submitit's
pickles and the per-job logs `<job id>_0_log.out` / `.err`).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..atomic import write_text_atomic
from ..engine.cells import cell_name, grid_of, split_grid
from ..errors import ConfigError, UserError
from ..paths import runs_root

LAUNCHERS = ("local", "submitit-local", "slurm")
LAUNCHED_COMMANDS = ("train", "eval", "reproduce")
ENV_KEYS = ("VLMT_DATA", "VLMT_CACHE", "VLMT_RUNS", "OMP_NUM_THREADS")


@dataclass
class LaunchOptions:
    launcher: str = "local"
    jobs: int | None = None
    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    time: int = 60
    parallel: int | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    setup: list = field(default_factory=list)
    slurm: dict = field(default_factory=dict)
    wait: bool = False
    preload: list = field(default_factory=list)   # Python API: modules each job imports first

    @classmethod
    def build(cls, profile: str | Path | None = None, **given) -> "LaunchOptions":
        """Options from a launch profile file, then the values given (None: not given), checked."""
        values: dict = {}
        if profile:
            path = Path(profile)
            if not path.is_file():
                raise ConfigError(f"launch profile {path} not found; write a YAML file with partition, gpus_per_job, "
                                  f"time, ... (README 'Running at scale') or give them as options")
            try:
                values = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"launch profile {path} is not valid YAML: {str(err).splitlines()[0]}") from None
            if not isinstance(values, dict):
                raise ConfigError(f"launch profile {path} must be a mapping of option: value")
            known = {f.name for f in fields(cls)} - {"launcher", "wait", "preload"}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ConfigError(f"launch profile {path}: unknown keys {unknown}; known: {sorted(known)}")
        values.update({k: v for k, v in given.items() if v is not None})
        opts = cls(**values)
        opts.check()
        return opts

    def check(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        for name, low in (("jobs", 1), ("gpus_per_job", 0), ("cpus_per_job", 1), ("time", 1), ("parallel", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ConfigError(f"{name.replace('_', '-')} must be a whole number >= {low}, got {v!r}")
        if self.mem_gb is not None and (isinstance(self.mem_gb, bool) or not isinstance(self.mem_gb, (int, float))
                                        or self.mem_gb <= 0):
            raise ConfigError(f"mem-gb must be a positive number, got {self.mem_gb!r}")
        if not isinstance(self.setup, list) or not all(isinstance(s, str) for s in self.setup):
            raise ConfigError("setup must be a list of shell lines")
        if not isinstance(self.slurm, dict):
            raise ConfigError("slurm must be a mapping of sbatch option: value")

    def executor_parameters(self, slug: str) -> dict:
        """submitit AutoExecutor parameters."""
        tasks = max(1, self.gpus_per_job)
        p = {"name": f"vlmt-{slug}", "timeout_min": int(self.time), "tasks_per_node": tasks, "nodes": 1}
        if self.gpus_per_job:
            p["gpus_per_node"] = int(self.gpus_per_job)
        if self.cpus_per_job:
            p["cpus_per_task"] = int(self.cpus_per_job)
        if self.mem_gb:
            p["mem_gb"] = self.mem_gb
        if self.launcher == "slurm":
            for key in ("partition", "account", "qos", "constraint", "exclude"):
                if getattr(self, key):
                    p[f"slurm_{key}"] = getattr(self, key)
            if self.parallel:
                p["slurm_array_parallelism"] = int(self.parallel)
            if self.setup:
                p["slurm_setup"] = list(self.setup)
            if self.slurm:
                p["slurm_additional_parameters"] = dict(self.slurm)
        return p


class JobsFailed(UserError):
    pass


def check_command(command: str, opts: LaunchOptions) -> None:
    if command not in LAUNCHED_COMMANDS:
        raise ConfigError(f"--launcher {opts.launcher} splits the grid of {'/'.join(LAUNCHED_COMMANDS)}; "
                          f"run {command!r} without it")


def launch_root(slug: str) -> Path:
    return runs_root() / slug / "_launch"


def _new_folder(slug: str) -> Path:
    base = launch_root(slug) / time.strftime("%Y%m%d-%H%M%S")
    folder, i = base, 1
    while folder.exists():
        i += 1
        folder = base.with_name(f"{base.name}-{i}")
    folder.mkdir(parents=True)
    return folder


def job_argv(command: str, profile: str, overrides: list[str], debug: bool = False) -> list[str]:
    """The argv each job gives the paper's entry point (the launch options left out)."""
    out = [command, "--profile", profile]
    for item in overrides:
        out += ["--set", item]
    return out + (["--debug"] if debug else [])


def launch(slug: str, command: str, cfg: dict, argv: list[str], opts: LaunchOptions,
           unused: tuple = (), say=print) -> dict:
    """Split the grid of `cfg` into jobs running `python -m papers.<slug> <argv>` and submit them; returns the
    manifest (also written to the launch folder). With `opts.wait` (always for submitit-local) wait for every job."""
    import submitit
    from .job import CellJob

    check_command(command, opts)
    if opts.launcher == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ConfigError("--launcher slurm needs Slurm's sbatch and srun on the PATH (run it on the cluster's login "
                          "node), or use --launcher submitit-local on this machine")
    grid = grid_of(cfg, unused)
    if not grid:
        raise ConfigError("the config has no grid to split (no datasets x shots x seeds)")
    split = split_grid(grid, opts.jobs)
    folder = _new_folder(slug)
    env = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    for key in ("VLMT_RUNS", "VLMT_CACHE", "VLMT_DATA"):   # jobs may start elsewhere: absolute paths
        if key in env:
            env[key] = str(Path(env[key]).resolve())
    cluster = "local" if opts.launcher == "submitit-local" else "slurm"
    executor = submitit.AutoExecutor(folder=folder / "submitit", cluster=cluster)
    executor.update_parameters(**opts.executor_parameters(slug))
    preload = list(dict.fromkeys(list(opts.preload) + registering_modules()))
    calls = [CellJob(slug, list(argv), i, len(split), [list(c) for c in cells], [list(c) for c in grid],
                     str(folder / "jobs" / f"{i}.json"), env, preload)
             for i, cells in enumerate(split)]
    manifest = {"slug": slug, "command": command, "argv": list(argv), "profile": cfg["profile"], "arch": cfg["arch"],
                "launcher": opts.launcher, "created": time.time(), "folder": str(folder),
                "options": {k: v for k, v in asdict(opts).items() if k not in ("preload",)},
                "grid": [list(c) for c in grid], "jobs": []}
    write_text_atomic(folder / "manifest.json", json.dumps(manifest, indent=1))
    with executor.batch():
        jobs = [executor.submit(c) for c in calls]
    for i, (job, cells) in enumerate(zip(jobs, split)):
        manifest["jobs"].append({"index": i, "cells": [list(c) for c in cells], "job_id": str(job.job_id),
                                 "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)})
    write_text_atomic(folder / "manifest.json", json.dumps(manifest, indent=1))
    say(f"[{slug}] {len(jobs)} {opts.launcher} job(s) over {len(grid)} cells, e.g. job 0: "
        f"{', '.join(cell_name(c) for c in split[0][:3])}{' ...' if len(split[0]) > 3 else ''}; launch folder {folder}")
    say(f"[{slug}] follow it: python -m common.launch status {slug}    when done: python -m common.launch gather {slug}")
    if opts.wait or opts.launcher == "submitit-local":
        failed = wait(jobs, say)
        manifest["failed"] = failed
        if failed:
            raise JobsFailed(f"{len(failed)} of {len(jobs)} job(s) failed ({failed[:10]}): `python -m common.launch "
                             f"status {slug}` shows why and where their logs are; rerun the same command to resume")
        say(f"[{slug}] all {len(jobs)} job(s) done; `python -m common.launch gather {slug}` renders the report")
    return manifest


def registering_modules() -> list[str]:
    """Modules outside common/ that registered datasets in this process (a researcher's own dataset, the tests'
    toy sets): each job imports them first, so the same dataset names resolve there."""
    from ..data.registry import _BUILDERS
    mods = {getattr(fn, "__module__", "") for fn in _BUILDERS.values()}
    return sorted(m for m in mods if m and m != "__main__" and not m.startswith("common."))


def wait(jobs, say=print) -> list[int]:
    """Wait for every job; returns the indices of the failed ones."""
    failed = []
    for i, job in enumerate(jobs):
        try:
            job.result()
        except Exception as err:  # submitit re-raises the job's error with its traceback: keep one line
            failed.append(i)
            say(f"job {i} ({job.job_id}) failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err}")
    sys.stdout.flush()
    return failed
