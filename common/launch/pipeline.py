"""`python -m common.launch repro [TARGET ...] --jobs 2`: `dvc repro` with independent stages run at once.

`dvc repro` runs one stage at a time. Most of this pipeline's stages are independent once the world and the
tiny CLIPs exist (every paper stage reads only them), and each paper stage runs on one thread, so on the
project's 2 cores two stages at a time halve the wall time. This is DVC's own reproduction, step for step,
with a scheduler in front of it: the same stage graph and plan (`plan_repro`), the same "changed?" test once
a stage's upstream is done (`Stage.changed`), the same output removal, run-cache restore, command environment
(`cmd_run`), save, commit and `dvc.lock` entry. Only the commands run in parallel, in worker threads; every
DVC call stays in the main thread, which holds the repository lock throughout (no stage command calls DVC).

Each stage's output goes to `.dvc/tmp/repro/<stage>.log` (two interleaved progress bars read as noise); a
progress bar over the stages shows what runs. Each finished stage's time is kept in `.dvc/tmp/repro/times.json`,
and the next run starts the longest of the ready stages first. On a failure no new stage starts, the running ones finish and
are committed, and the error names the failed stage and the end of its log; rerunning resumes (finished stages
are up to date, an interrupted paper run resumes from its checkpoint).
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Sequence

from ..atomic import write_text_atomic
from ..errors import UserError


class StageFailed(UserError):
    pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def thread_env(jobs: int) -> dict[str, str]:
    """With several stages at once, each gets its share of the cores: OMP_NUM_THREADS = cores // jobs, unless the
    caller set it (a stage command may still set its own, as the paper stages' `OMP_NUM_THREADS=1` does). Two
    stages of two threads each on two cores measured 2-3x slower than one thread each (the linear probe)."""
    if jobs <= 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def _run_command(stage, log: Path, env: dict[str, str]) -> float:
    """The stage's command(s) as `dvc repro` runs them (`cmd_run`: working directory, DVC_ROOT / DVC_STAGE,
    the same shell) with `env` added, output to `log`. Returns seconds taken; raises on a non-zero exit."""
    import subprocess

    from dvc.stage.run import _enforce_cmd_list, _make_cmd, get_executable, prepare_kwargs

    t0 = time.time()
    kwargs = prepare_kwargs(stage, run_env=env)
    with open(log, "w") as out:
        for cmd in _enforce_cmd_list(stage.cmd):
            out.write(f"> {cmd}\n")
            out.flush()
            rc = subprocess.run(_make_cmd(get_executable(), cmd), stdout=out, stderr=subprocess.STDOUT,
                                **kwargs).returncode
            if rc != 0:
                raise StageFailed(f"stage {stage.addressing!r} failed (exit {rc}) running `{cmd}`")
    return time.time() - t0


def _read_times(logs: Path) -> dict[str, float]:
    try:
        return json.loads((logs / "times.json").read_text())
    except (OSError, ValueError):
        return {}


def _record_time(logs: Path, stage: str, seconds: float) -> None:
    write_text_atomic(logs / "times.json", json.dumps({**_read_times(logs), stage: round(seconds, 1)}, indent=1))


def plan(repo, targets: Sequence[str] | None = None) -> tuple[list, "object"]:
    """The stages `dvc repro TARGETS` would consider, in its order, and the graph (edges: stage -> upstream)."""
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    stages = collect_stages(repo, list(targets or ["dvc.yaml"]))
    graph = get_active_graph(repo.index.graph)
    return plan_repro(graph, stages), graph


def repro(targets: Sequence[str] | None = None, jobs: int = 2, root: str | Path = ".", dry: bool = False,
          force: bool = False, say: Callable[[str], None] = print) -> dict[str, float | None]:
    """Bring the pipeline (or TARGETS and their upstream) up to date, up to `jobs` stage commands at once.
    Returns {stage: seconds its command took (0 for a stage `dry` would run), or None where it was up to date or
    restored from the run cache}."""
    from dvc.repo import Repo

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"--jobs must be a whole number >= 1, got {jobs!r}")
    repo = Repo(str(root))
    here = os.getcwd()
    os.chdir(repo.root_dir)   # targets name stages as `dvc repro` run in the project root does
    try:
        return _repro(repo, targets, jobs, dry, force, say)
    finally:
        os.chdir(here)


def _repro(repo, targets, jobs, dry, force, say) -> dict[str, float | None]:
    from dvc.stage.cache import RunCacheNotFoundError
    from tqdm import tqdm

    logs = Path(repo.tmp_dir) / "repro"
    logs.mkdir(parents=True, exist_ok=True)
    times: dict[str, float | None] = {}
    env = thread_env(jobs)
    with repo.lock:
        steps, graph = plan(repo, targets)
        upstream = {s: [u for u in graph.successors(s) if u in steps] for s in steps}
        # Longest first among the stages that can start (by their last run here), so that a long stage does not
        # start last and run alone; stages never timed keep DVC's order.
        last = _read_times(logs)
        pending = sorted(steps, key=lambda s: -last.get(s.addressing, 0.0))
        running, done, failed = {}, set(), []
        bar = tqdm(total=len(steps), desc="stages", unit="stage")

        def start(stage) -> Future | None:
            """DVC's `Stage.reproduce` up to the command: skip if unchanged, else clear outputs, try the run cache."""
            upstream_would_run = dry and any(times.get(u.addressing) == 0.0 for u in upstream[stage])
            if not force and not upstream_would_run and not stage.changed(upstream=upstream[stage]):
                return None
            if dry:   # downstream of a stage that would run counts as would-run (its inputs are about to change)
                say(f"would run {stage.addressing}: {stage.cmd}")
                times[stage.addressing] = 0.0        # "would run" (None: up to date)
                return None
            stage.remove_outs(ignore_remove=False, force=False)
            if not force:
                try:
                    repo.stage_cache.restore(stage)
                    say(f"{stage.addressing}: restored from the run cache")
                    return None
                except RunCacheNotFoundError:
                    stage.save_deps()
            say(f"running {stage.addressing} (log: {logs / (stage.addressing + '.log')})")
            return pool.submit(_run_command, stage, logs / f"{stage.addressing}.log", env)

        def finish(stage) -> None:
            """DVC's `Stage.run` after the command: save and commit the outputs, write the dvc.lock entry."""
            no_cache_outs = any(not o.use_cache for o in stage.outs if not (o.is_metric or o.is_plot))
            stage.save(run_cache=not no_cache_outs)
            stage.commit()
            stage.dump(update_pipeline=False)

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            while pending or running:
                started = True
                while started and not failed and len(running) < jobs:   # a skipped stage may free its downstream
                    ready = [s for s in pending if all(u in done for u in upstream[s])]
                    started = bool(ready)
                    if ready:
                        stage = ready[0]
                        pending.remove(stage)
                        future = start(stage)
                        if future is None:
                            times.setdefault(stage.addressing, None)
                            done.add(stage)
                            bar.update(1)
                        else:
                            running[future] = stage
                if failed and not running:
                    break
                if not running:
                    if pending and not failed:   # nothing runs, nothing can start: an upstream never finished
                        raise UserError(f"stages {[s.addressing for s in pending]} wait on stages outside the plan")
                    continue
                bar.set_postfix_str(", ".join(s.addressing for s in running.values()))
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    stage = running.pop(future)
                    try:
                        times[stage.addressing] = future.result()
                        finish(stage)
                        _record_time(logs, stage.addressing, times[stage.addressing])
                        done.add(stage)
                        bar.update(1)
                        t = times[stage.addressing]
                        say(f"{stage.addressing} done in " + (f"{t / 60:.1f} min" if t >= 60 else f"{t:.0f} s"))
                    except Exception as err:   # noqa: BLE001 - reported with its log below
                        failed.append((stage, err))
        bar.close()
    if failed:
        stage, err = failed[0]
        log = logs / f"{stage.addressing}.log"
        raise StageFailed(f"{err}; the end of {log}:\n{_tail(log)}\n"
                          f"{len(pending)} stage(s) not started; rerun the same command to resume")
    return times
