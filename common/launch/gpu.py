"""One GPU per DVC experiment-queue worker: `python -m common.launch gpu [--gpus N] -- <command>`.

`dvc queue start --jobs N` starts N workers, each running one queued experiment at a time. DVC (3.x) exports
no worker number to the stage command; it names worker n `dvc-exp-<hash>-<n>@localhost` on the command line
of its process (`dvc exp queue-worker dvc-exp-<hash>-<n>@localhost`), and the experiment runs in a child of
it. This wrapper finds that name among its ancestors (Linux /proc), sets CUDA_VISIBLE_DEVICES to GPU
(n - 1) mod N (of the GPUs already visible, if CUDA_VISIBLE_DEVICES lists some) and runs the command. So N
workers on N GPUs never share one. Outside a queue worker the command runs with the environment as it is.

A queued experiment runs in a temporary copy of the repository; DVC sets DVC_ROOT to the repository it was
queued from, and the wrapper points VLMT_RUNS, VLMT_CACHE and VLMT_DATA there (unless they are set), so every
experiment writes its run records into the same runs/ folder and shares one feature cache.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

WORKER = re.compile(r"dvc-exp-[0-9a-f]+-(\d+)@")


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()   # after "pid (comm) ": state, ppid, ...
    ppid = int(fields[1])
    return ppid if ppid > 0 else None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def dvc_worker_index(pid: int | None = None) -> int | None:
    """The number n (1-based) of the DVC queue worker this process descends from, or None."""
    pid = os.getpid() if pid is None else pid
    seen = set()
    while pid and pid not in seen:
        seen.add(pid)
        m = WORKER.search(_cmdline(pid))
        if m and "queue-worker" in _cmdline(pid):
            return int(m.group(1))
        pid = _parent(pid)
    return None


def visible_gpus(count: int | None = None, env: dict | None = None) -> list[str]:
    """GPU ids to choose from: CUDA_VISIBLE_DEVICES when it lists some, else 0..count-1 (`count` None: as many as
    `nvidia-smi -L` lists; none without it)."""
    env = os.environ if env is None else env
    listed = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if listed:
        return listed[:count] if count else listed
    if count is None:
        smi = shutil.which("nvidia-smi")
        out = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout if smi else ""
        count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    return [str(i) for i in range(count)]


def worker_env(env: dict | None = None, gpus: int | None = None, worker: int | None = None) -> tuple[dict, str]:
    """The environment for the command and one line saying what was chosen."""
    env = dict(os.environ if env is None else env)
    worker = dvc_worker_index() if worker is None else worker
    notes = []
    root = env.get("DVC_ROOT")
    if root:
        for key, sub in (("VLMT_RUNS", "runs"), ("VLMT_CACHE", "data/cache"), ("VLMT_DATA", "data/embedded")):
            if key not in env:
                env[key] = str(Path(root) / sub)
                notes.append(f"{key}={env[key]}")
    if worker is None:
        return env, "not under a DVC queue worker: CUDA_VISIBLE_DEVICES left as it is" + (
            f"; {', '.join(notes)}" if notes else "")
    ids = visible_gpus(gpus or None, env)
    if not ids:
        return env, f"DVC queue worker {worker}, but no GPU is visible: running on what the command chooses"
    env["CUDA_VISIBLE_DEVICES"] = ids[(worker - 1) % len(ids)]
    return env, (f"DVC queue worker {worker} -> CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} (of {len(ids)} "
                 f"GPU(s))" + (f"; {', '.join(notes)}" if notes else ""))
