"""`python -m common.launch repro`: DVC's reproduction with independent stages at once, on a toy DVC project.

Stage a feeds b and c, which feed d. With two jobs b and c must overlap in time; afterwards DVC itself must
see the project up to date (the same dvc.lock `dvc repro` would write), a second call must run nothing, and a
failing stage must stop its downstream, keep its sibling's result and name its log."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.launch.pipeline import StageFailed, repro, thread_env

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # DVC's own, about pygtrie

# Each command records when it started and ended (after a short sleep), then writes its output.
STEP = (f"{sys.executable} -c \"import json,os,sys,time; t=time.time(); time.sleep({{sleep}}); "
        "open('{name}.json','w').write(json.dumps([t, time.time(), os.environ.get('OMP_NUM_THREADS')])); {extra}\"")


def _project(tmp_path: Path, fail_c: bool = False, sleep_b: float = 1.5, sleep_c: float = 1.5) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "src.txt").write_text("input\n")
    stages = {
        "a": (STEP.format(name="a", sleep=0, extra=""), ["src.txt"]),
        "b": (STEP.format(name="b", sleep=sleep_b, extra=""), ["a.json"]),
        "c": (STEP.format(name="c", sleep=sleep_c, extra="sys.exit(3)" if fail_c else ""), ["a.json"]),
        "d": (STEP.format(name="d", sleep=0, extra=""), ["b.json", "c.json"]),
    }
    lines = ["stages:"]
    for name, (cmd, deps) in stages.items():
        lines += [f"  {name}:", f"    cmd: {json.dumps(cmd)}", "    deps:"] + [f"      - {d}" for d in deps]
        lines += ["    outs:", f"      - {name}.json"]
    (root / "dvc.yaml").write_text("\n".join(lines) + "\n")
    return root


def _dvc_status(root: Path) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True, text=True,
                          check=True).stdout


def test_independent_stages_run_at_once_and_dvc_sees_them_done(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    root = _project(tmp_path)
    times = repro(jobs=2, root=root, say=lambda m: None)
    assert set(times) == {"a", "b", "c", "d"} and all(t is not None for t in times.values())
    span = {n: json.loads((root / f"{n}.json").read_text()) for n in "abcd"}
    assert span["b"][0] < span["c"][1] and span["c"][0] < span["b"][1], "b and c did not overlap"
    assert span["a"][1] <= min(span["b"][0], span["c"][0]) and span["d"][0] >= max(span["b"][1], span["c"][1])
    assert {v[2] for v in span.values()} == {"2"}           # each of 2 stages at once gets 4 // 2 threads
    assert "up to date" in _dvc_status(root).lower()
    lock = (root / "dvc.lock").read_text()
    assert all(f"  {n}:" in lock for n in "abcd")
    assert repro(jobs=2, root=root, say=lambda m: None) == dict.fromkeys("abcd")   # nothing to do the second time
    (root / "src.txt").write_text("changed\n")                                      # a changed: everything reruns
    assert all(t is not None for t in repro(jobs=2, root=root, say=lambda m: None).values())


def test_one_job_runs_stages_one_after_another(tmp_path):
    root = _project(tmp_path)
    repro(["d"], jobs=1, root=root, say=lambda m: None)
    b, c = (json.loads((root / f"{n}.json").read_text()) for n in "bc")
    assert b[1] <= c[0] or c[1] <= b[0]


def test_dry_lists_what_would_run_and_runs_nothing(tmp_path):
    root = _project(tmp_path, sleep_b=0, sleep_c=0)
    repro(jobs=2, root=root, say=lambda m: None)
    before = (root / "a.json").read_text()
    assert repro(jobs=2, root=root, dry=True, say=lambda m: None) == dict.fromkeys("abcd")
    (root / "src.txt").write_text("changed\n")
    said = []
    assert repro(jobs=2, root=root, dry=True, say=said.append) == dict.fromkeys("abcd", 0.0)
    assert (root / "a.json").read_text() == before and sum(m.startswith("would run") for m in said) == 4


def test_the_longest_ready_stage_starts_first_next_time(tmp_path):
    root = _project(tmp_path, sleep_b=0.1, sleep_c=1.0)
    first = repro(jobs=1, root=root, say=lambda m: None)
    assert first["c"] > first["b"]
    times = json.loads((root / ".dvc" / "tmp" / "repro" / "times.json").read_text())
    assert set(times) == {"a", "b", "c", "d"}
    (root / "src.txt").write_text("changed\n")
    repro(jobs=1, root=root, say=lambda m: None)
    b, c = (json.loads((root / f"{n}.json").read_text()) for n in "bc")
    assert c[1] <= b[0]                                  # c (1 s last time) ran before b (0.1 s)


def test_a_failed_stage_stops_downstream_and_keeps_its_sibling(tmp_path):
    root = _project(tmp_path, fail_c=True)
    with pytest.raises(StageFailed, match=r"stage 'c' failed \(exit 3\)[\s\S]*c\.log[\s\S]*1 stage\(s\) not started"):
        repro(jobs=2, root=root, say=lambda m: None)
    assert (root / "b.json").exists() and not (root / "d.json").exists()
    stale = {line[:-1] for line in _dvc_status(root).splitlines() if line and not line[0].isspace()}
    assert stale == {"c", "d"}   # a and b committed, c and d not


def test_thread_share(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert thread_env(2) == {"OMP_NUM_THREADS": "1"} and thread_env(3) == {"OMP_NUM_THREADS": "1"}
    assert thread_env(1) == {}                                # one stage at a time: as dvc repro
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert thread_env(2) == {}                                # the caller's choice wins


def test_bad_jobs_value_is_refused(tmp_path):
    from common.errors import UserError
    with pytest.raises(UserError, match="--jobs must be a whole number >= 1"):
        repro(jobs=0, root=tmp_path)
