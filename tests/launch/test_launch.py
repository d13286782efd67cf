"""The grid split, the submitit launcher (local executor against the in-process run; Slurm against a fake
sbatch), the status command and the DVC queue worker's GPU."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import papers.taskres.__main__ as tr
from common.engine import load_records
from common.engine.cells import Shard, grid_of, owner_of, owns, owns_dataset, sharded, split_grid
from common.launch.__main__ import main as launch_main
from common.launch.gpu import dvc_worker_index, worker_env
from common.launch.launcher import LaunchOptions
from common.launch.status import format_status, status
from tests.papers.helpers import toy_overrides

REPO = Path(__file__).resolve().parents[2]

# TaskRes trains the pending runs of a dataset as one batched model (common.engine.batched), so a split grid
# changes which runs train together; its records hold the learned residual's relative size (residual_pct, 4
# decimals), a number that follows the training closely. A learning rate high enough to move top-1 off chance.
TINY = {"shots": "[1, 2]", "seeds": "[1, 2]", "cache_views": 1, "dg_shots": 1, "ablations": "{}",
        "epochs_by_shots": "{1: 20, 2: 20}", "train.lr": 0.05, "dg.epochs": 20, "dg.lr": 0.05, "enhanced.epochs": 2}


def _key(r: dict) -> tuple:
    return (r["protocol"], r["dataset"], r["source"], r["method"], r["variant"], r["shots"], r["seed"])


def test_grid_split_and_every_cell_has_one_owner():
    cfg = {"datasets": ["a", "b"], "dg_source": "a", "xd_source": "c", "shots": [1, 2], "dg_shots": 16,
           "seeds": [1, 2, 3]}
    grid = grid_of(cfg)
    assert len(grid) == 3 * 3 * 3 and grid[:4] == [("a", 1, 1), ("a", 1, 2), ("a", 1, 3), ("a", 2, 1)]
    assert grid_of({**cfg, "dg_shots": None}, unused=("xd_source",))[-1] == ("b", None, 3)
    assert grid_of({"dg_source": "a", "dg_shots": 16, "seeds": [1], "datasets": ["x"], "shots": [4]},
                   unused=("datasets", "shots")) == [("a", 16, 1)]
    jobs = split_grid(grid, 4)
    assert [len(j) for j in jobs] == [7, 7, 7, 6] and sum(jobs, []) == grid          # consecutive, balanced
    assert split_grid(grid, None) == [[c] for c in grid] == split_grid(grid, 100)
    shards = [Shard(i, 4, tuple(j), tuple(grid)) for i, j in enumerate(jobs)]
    outside = [("a", None, 0), ("z", 4, 7), ("b", 2, 9)] + [("o", k, s) for k in (3, 5) for s in (1, 2, 3)]
    for c in grid + outside:   # the jobs together run every cell exactly once, inside the grid or not
        assert [s.index for s in shards if s.owns(c)] == [owner_of(c, jobs)]
    assert len({owner_of(c, jobs) for c in outside}) > 1, "cells outside the grid must spread over the jobs"
    with sharded(shards[0]):
        assert owns(*jobs[0][0]) and not owns(*jobs[1][0])
        assert owns_dataset("a") and not owns_dataset("b")   # job 0: cells 0-6, all of dataset a
    assert owns(*jobs[0][0]) and owns_dataset("b")           # outside a launch every cell runs
    with pytest.raises(ValueError, match="outside the grid"):
        Shard(0, 1, (("nope", 1, 1),), tuple(grid))


@pytest.mark.slow   # two job processes start (imports) on the machine's cores
def test_submitit_local_jobs_write_the_in_process_records(tmp_path, tiny_rn, monkeypatch, capsys):
    """The same records (metrics equal) from one process and from 2 submitit local jobs of 2 cells each."""
    args = toy_overrides(tmp_path, tiny_rn, TINY)
    monkeypatch.setenv("VLMT_RUNS", str(tmp_path / "inproc"))
    monkeypatch.setenv("VLMT_CACHE", str(tmp_path / "cache_inproc"))
    tr.main(["reproduce", *args])
    ref = {_key(r): r["metrics"] for r in load_records()}

    monkeypatch.setenv("VLMT_RUNS", str(tmp_path / "jobs"))
    monkeypatch.setenv("VLMT_CACHE", str(tmp_path / "cache_jobs"))    # the jobs encode their own features
    manifest = tr.main(["reproduce", *args, "--launcher", "submitit-local", "--jobs", "2"])
    got = {_key(r): r["metrics"] for r in load_records()}
    assert len(ref) == 16 and set(got) == set(ref)      # 2 variants x (4 few-shot + 2 seeds x 2 DG sets) records
    assert len({m["residual_pct"] for m in ref.values()}) >= 6 and {m["top1"] for m in ref.values()} - {25.0}
    diff = max(abs(got[k][m] - ref[k][m]) for k in ref for m in ref[k])
    with capsys.disabled():
        print(f"\nsubmitit local (2 jobs) vs in-process: {len(ref)} records, max |metric diff| = {diff}")
    # tolerance: one unit of the records' last decimal (they keep 4). Batched runs equal separate runs up to float
    # rounding (common.engine.batched), which could at most flip that decimal; a top-1 change is a whole image.
    assert diff <= 1e-4

    assert [j["cells"] for j in manifest["jobs"]] == [[["toy", 1, 1], ["toy", 1, 2]], [["toy", 2, 1], ["toy", 2, 2]]]
    logs = [Path(j["stdout"]).read_text() for j in manifest["jobs"]]
    assert "k=1 seed=1" in logs[0] and "k=2" not in logs[0]          # each job ran its own cells only
    assert "k=2 seed=2" in logs[1] and "k=1" not in logs[1]
    st = status("taskres")
    assert st["counts"] == {"done": 4} and [j["state"] for j in st["jobs"]] == ["done", "done"]
    assert [c["records"] for c in st["cells"]] == [6, 6, 2, 2]        # 1-shot cells: few-shot + DG records
    capsys.readouterr()
    assert launch_main(["status", "taskres"]) == 0
    out = capsys.readouterr().out
    assert "done 4" in out and "toy/k2/seed1" in out

    # gather: every job done, so the in-process rerun trains nothing and the report is rendered
    assert launch_main(["gather", "taskres", "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "taskres" / "REPORT.md").is_file()
    assert {_key(r): r["metrics"] for r in load_records()} == got


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def test_status_lists_done_running_failed_and_pending_cells(tmp_path, capsys):
    """From files only: job states, a dead job process, a failed job's log, records and checkpoints."""
    runs = tmp_path / "runs"
    folder = runs / "demo" / "_launch" / "20260101-000000"
    grid = [["d", 1, 1], ["d", 1, 2], ["d", 2, 1], ["d", 2, 2], ["e", 1, 1]]
    split = [grid[0:2], grid[2:3], grid[3:4], grid[4:5]]
    logs = folder / "submitit"
    jobs = [{"index": i, "cells": c, "job_id": f"77_{i}", "stdout": str(logs / f"77_{i}_0_log.out"),
             "stderr": str(logs / f"77_{i}_0_log.err")} for i, c in enumerate(split)]
    _write(folder / "manifest.json", {"slug": "demo", "command": "reproduce", "argv": ["reproduce"],
                                      "profile": "embedded", "arch": "tiny-rn", "launcher": "slurm", "created": 0,
                                      "folder": str(folder), "options": {}, "grid": grid, "jobs": jobs})
    host = socket.gethostname()
    _write(folder / "jobs" / "0.json", {"status": "done", "seconds": 12.5})
    _write(folder / "jobs" / "1.json", {"status": "running", "host": host, "pid": os.getpid()})
    _write(folder / "jobs" / "2.json", {"status": "failed", "error": "python -m papers.demo exited with status 2"})
    _write(logs / "77_2_0_log.err", "loading\n[demo] python -m papers.demo: error: loss is not finite at step 3\n")
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write(folder / "jobs" / "3.json", {"status": "running", "host": host, "pid": int(proc.stdout)})   # gone
    rec = {"paper": "demo", "method": "demo", "variant": "", "profile": "embedded", "protocol": "fewshot",
           "backbone": "tiny-rn", "metrics": {"top1": 1.0}}
    for c in (grid[0], grid[1]):
        _write(runs / "demo" / "fewshot" / "embedded" / c[0] / "demo" / "tiny-rn" / f"k{c[1]}-seed{c[2]}" /
               "metrics.json", {**rec, "dataset": c[0], "source": c[0], "shots": c[1], "seed": c[2]})
    _write(runs / "demo" / "zeroshot" / "embedded" / "d" / "demo" / "tiny-rn" / "zs-seed0" / "metrics.json",
           {**rec, "protocol": "zeroshot", "dataset": "d", "source": "d", "shots": None, "seed": 0})
    _write(runs / "demo" / "_checkpoints" / "fewshot" / "embedded" / "d" / "demo" / "tiny-rn" / "group-k2s1" /
           "checkpoint.pt", "x")
    st = status("demo")
    states = {c["name"]: (c["state"], c["records"], c["job"]) for c in st["cells"]}
    outside = next(n for n in states if n.startswith("d/zs/seed0"))
    assert states == {"d/k1/seed1": ("done", 1, 0), "d/k1/seed2": ("done", 1, 0), "d/k2/seed1": ("training", 0, 1),
                      "d/k2/seed2": ("failed", 0, 2), "e/k1/seed1": ("failed", 0, 3),
                      outside: (states[outside][0], 1, states[outside][2])}
    assert [j["state"] for j in st["jobs"]] == ["done", "running", "failed", "failed"]
    assert "gone" in st["jobs"][3]["error"]
    text = format_status(st)
    assert "loss is not finite" in text and "77_2_0_log.err" in text
    assert launch_main(["gather", "demo"]) == 2          # jobs not done: refused, with the status
    assert "not done" in capsys.readouterr().err


def test_slurm_launch_writes_the_array_from_options_and_profile(tmp_path, tiny_rn, monkeypatch):
    """A fake sbatch records the submission: partition / GPUs / time from the command line, the rest from a
    launch profile; nothing runs, every cell is pending."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/sbatch_calls\necho Submitted batch job 4242\n")
    (bin_ / "sbatch").chmod(0o755)
    (bin_ / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_ / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    profile = tmp_path / "cluster.yaml"
    profile.write_text("partition: cpu\ncpus_per_job: 4\nmem_gb: 16\naccount: clip\nparallel: 2\n"
                       "setup: [module load cuda]\nslurm: {reservation: vlm}\n")
    args = toy_overrides(tmp_path, tiny_rn, TINY)
    manifest = tr.main(["reproduce", *args, "--launcher", "slurm", "--jobs", "3", "--partition", "gpu",
                        "--gpus-per-job", "1", "--time", "30", "--launch-profile", str(profile)])
    assert [j["job_id"] for j in manifest["jobs"]] == ["4242_0", "4242_1", "4242_2"]
    sbatch = next((Path(manifest["folder"]) / "submitit").glob("*.sh")).read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=30", "#SBATCH --array=0-2%2",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16GB", "#SBATCH --account=clip",
                 "#SBATCH --reservation=vlm", "module load cuda"):
        assert line in sbatch, line
    assert status("taskres")["counts"] == {"pending": 4}
    # Slurm ended job 1 at its time limit before it could requeue: sacct (faked) says so, and status shows it
    (bin_ / "sacct").write_text("#!/bin/sh\necho 'JobID|State|NodeList'\necho '4242_0|RUNNING|n1'\n"
                                "echo '4242_1|TIMEOUT|n2'\necho '4242_2|PENDING|'\n")
    (bin_ / "sacct").chmod(0o755)
    st = status("taskres")
    assert [j["state"] for j in st["jobs"]] == ["running", "failed", "pending"] and "TIMEOUT" in st["jobs"][1]["error"]


@pytest.mark.parametrize("extra, message", [
    (["--jobs", "2"], "needs --launcher"),
    (["--launcher", "submitit-local", "--jobs", "0"], "jobs must be a whole number >= 1"),
    (["--launcher", "slurm"], "sbatch"),
    (["--launcher", "submitit-local", "--launch-profile", "nope.yaml"], "nope.yaml not found"),
])
def test_bad_launch_options_are_one_line_before_any_work(tmp_path, tiny_rn, capsys, monkeypatch, extra, message):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")   # no sbatch here
    with pytest.raises(SystemExit) as exit_:
        tr.main(["reproduce", *toy_overrides(tmp_path, tiny_rn, TINY), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and message in err[-1] and len(err) == 1
    assert not (tmp_path / "runs").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("partitoin: gpu\n")
    with pytest.raises(Exception, match="unknown keys"):
        LaunchOptions.build(bad, launcher="slurm")


def test_dvc_queue_worker_gets_its_own_gpu(tmp_path):
    """DVC names queue worker n `dvc-exp-<hash>-<n>@localhost` on its command line: a command started below it
    gets GPU (n - 1) mod N, and DVC_ROOT (the repository the experiment was queued from) gets the records."""
    probe = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['VLMT_RUNS'])"
    outs = []
    for n in (1, 2, 3):
        worker = textwrap.dedent(f"""
            import subprocess, sys
            out = subprocess.run([sys.executable, "-m", "common.launch", "gpu", "--gpus", "2", "--",
                                  sys.executable, "-c", {probe!r}], capture_output=True, text=True, cwd={str(REPO)!r})
            print(out.stdout.strip(), out.stderr.strip())
        """)
        env = {**os.environ, "DVC_ROOT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
        env.pop("VLMT_RUNS", None)
        run = subprocess.run([sys.executable, "-c", worker, "exp", "queue-worker", f"dvc-exp-0a1b2c-{n}@localhost"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        outs.append(run.stdout.split())
    assert [o[:2] for o in outs] == [["0", str(tmp_path / "runs")], ["1", str(tmp_path / "runs")],
                                     ["0", str(tmp_path / "runs")]]
    assert "DVC queue worker 2 -> CUDA_VISIBLE_DEVICES=1" in " ".join(outs[1])
    assert dvc_worker_index() is None                               # pytest itself is no queue worker
    env, note = worker_env({"CUDA_VISIBLE_DEVICES": "4,5,6"}, worker=5)
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and "worker 5" in note     # of the GPUs already visible
