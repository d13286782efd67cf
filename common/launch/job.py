"""One job of a launch: a paper's command run on the cells its shard owns, in a process of its own.

submitit pickles a `CellJob` into the launch folder; the job (a Slurm array task, or a local process) unpickles
it and calls it. The job writes its state (`running`, then `done` or `failed` with the reason) to
`jobs/<index>.json` of the launch folder, which `python -m common.launch status` reads. On a Slurm timeout or
preemption submitit calls `checkpoint`, which requeues the same job: the engine then skips the finished runs
and resumes the interrupted one from its checkpoint.
"""
from __future__ import annotations

import importlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from ..atomic import write_text_atomic
from ..engine.cells import Shard, sharded


def write_state(path: Path, **state) -> None:
    old = json.loads(path.read_text()) if path.is_file() else {}
    write_text_atomic(path, json.dumps({**old, **state, "updated": time.time()}, indent=1))


@dataclass
class CellJob(submitit.helpers.Checkpointable):
    """`python -m papers.<slug> <argv>` on the cells of shard `index` of `count` (the split of `grid`)."""

    slug: str
    argv: list
    index: int
    count: int
    cells: list
    grid: list
    state_path: str
    env: dict = field(default_factory=dict)        # VLMT_* paths of the launching process
    preload: list = field(default_factory=list)    # modules to import first (datasets registered by code)

    def __call__(self) -> dict:
        os.environ.update(self.env)
        dist = self._distributed()
        rank0 = int(os.environ.get("RANK", "0")) == 0
        state = Path(self.state_path)
        t0 = time.time()
        if rank0:
            write_state(state, status="running", host=socket.gethostname(), pid=os.getpid(), started=t0,
                        job_id=_job_id(), attempt=_attempt(state) + 1, error=None)
        try:
            for name in self.preload:
                importlib.import_module(name)
            shard = Shard(self.index, self.count, tuple(map(tuple, self.cells)), tuple(map(tuple, self.grid)))
            with sharded(shard):
                importlib.import_module(f"papers.{self.slug}.__main__").main(list(self.argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if code:
                self._failed(state, rank0, f"python -m papers.{self.slug} exited with status {code} (its one-line "
                                           f"error is the last line of the job's stderr log)")
                raise RuntimeError(f"job {self.index}: python -m papers.{self.slug} {' '.join(self.argv)} exited "
                                   f"with status {code}") from None
        except BaseException as err:
            self._failed(state, rank0, f"{type(err).__name__}: {err}")
            raise
        if rank0:
            write_state(state, status="done", finished=time.time(), seconds=round(time.time() - t0, 1))
        if dist:
            from ..engine import distributed
            distributed.shutdown()
        return {"index": self.index, "cells": len(self.cells), "seconds": round(time.time() - t0, 1)}

    def checkpoint(self, *args, **kwargs):
        """Timeout or preemption: mark the job requeued and submit it again (the engine resumes it)."""
        if int(os.environ.get("RANK", "0")) == 0:
            write_state(Path(self.state_path), status="requeued", error=None)
        return super().checkpoint(*args, **kwargs)

    def _failed(self, state: Path, rank0: bool, error: str) -> None:
        if rank0:
            write_state(state, status="failed", finished=time.time(), error=error)

    @staticmethod
    def _distributed() -> bool:
        """A job of several tasks (one per GPU) is one data-parallel run: export torch's variables (RANK,
        WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) as torchrun would; `common.cli` starts the group."""
        try:
            env = submitit.JobEnvironment()
        except RuntimeError:
            return False
        if env.num_tasks <= 1:
            return False
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return True


def _job_id() -> str | None:
    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:
        return None


def _attempt(state: Path) -> int:
    try:
        return int(json.loads(state.read_text()).get("attempt", 0))
    except (OSError, ValueError):
        return 0


def log_tail(path: str | Path | None, lines: int = 3) -> str:
    """The last non-empty lines of a log file ('' when there is none)."""
    if not path or not Path(path).is_file():
        return ""
    text = Path(path).read_text(errors="replace").splitlines()
    return "\n".join([t for t in text if t.strip()][-lines:])


__all__ = ["CellJob", "log_tail", "write_state"]
