"""Benchmark: independent runs trained separately vs as one batched model (same results, steps per second).

    python -m common.engine.benchmark [--methods coop cocoop clip_adapter] [--epochs 3]

On the embedded emb_objects (tiny-rn for CoOp and CLIP-Adapter, tiny-vit for CoCoOp): R runs (CoOp and
CLIP-Adapter: 5 shot counts x 3 seeds; CoCoOp: 3 seeds at 16 shots), each trained `--epochs` epochs
with the embedded profile's other settings, first one after the other as a single run each, then all
together (`train_coop_many` / `train_cocoop_many` / `fit_modules`: stacked parameters). CoOp's single runs
are the engine before this change (the single-run Trainer, every prompt encoded in full), so its ratio also
holds the shared-prefix encoder's gain; CoCoOp's and CLIP-Adapter's single runs already use the new
engine, so theirs is the gain of stacking alone. Prints optimiser run-steps per second of both, their
ratio, and the largest difference in test accuracy between the two trainings of a run. Measure on an
otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from common.config import load_config
from common.data import build_dataset, fewshot_split
from common.engine import index_batches
from common.engine.protocols import Task, bundle_for
from common.engine.seed import seed_everything


def _tasks(cfg: dict, grid) -> list[Task]:
    bundle = bundle_for(cfg)
    data = build_dataset("emb_objects", cfg["data_root"])
    return [Task(cfg, bundle, fewshot_split(data, k, s), k, s, None) for k, s in grid]


def _run_steps(tasks: list[Task], epochs: int, batch_size: int) -> int:
    """Optimiser steps of the runs: epochs x batches per epoch (the engine's batching) of each."""
    return sum(epochs * len(index_batches(len(t.dataset.train), batch_size, 0, 0, shuffle=False)) for t in tasks)


def _compare(method: str, tasks: list[Task], steps: int, alone: Callable[[Task], Any],
             together: Callable[[list[Task]], list], evaluate: Callable[[Any, Task], dict]) -> dict:
    """Time the runs one by one and all together; the largest test-accuracy difference between the two."""
    t0 = time.perf_counter()
    single = [alone(t) for t in tasks]
    t_sep = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = together(tasks)
    t_bat = time.perf_counter() - t0
    delta = max(abs(evaluate(a, t)["top1"] - evaluate(b, t)["top1"]) for a, b, t in zip(single, batched, tasks))
    row = {"method": method, "runs": len(tasks), "run_steps": steps, "separate_s": round(t_sep, 1),
           "batched_s": round(t_bat, 1), "separate_steps_per_s": round(steps / t_sep, 1),
           "batched_steps_per_s": round(steps / t_bat, 1), "speedup": round(t_sep / t_bat, 2),
           "max_top1_delta": round(delta, 3)}
    print(json.dumps(row))
    return row


SHOTS_X_SEEDS = [(k, s) for k in (1, 2, 4, 8, 16) for s in (1, 2, 3)]


def bench_coop(epochs: int) -> dict:
    from papers.coop.__main__ import CONFIG
    from papers.coop.method import build_learner, evaluate, train_coop_many, train_coop_single
    cfg = dict(load_config(CONFIG, "embedded"), epochs=epochs)
    tasks = _tasks(cfg, SHOTS_X_SEEDS)

    def alone(t: Task):      # the engine before batching: one run, every prompt encoded in full
        seed_everything(t.seed)
        return train_coop_single(t, cfg, build_learner(t.bundle, t.dataset.classnames, cfg))
    return _compare("coop", tasks, _run_steps(tasks, epochs, int(cfg["batch_size"])), alone,
                    lambda ts: train_coop_many(ts, cfg), evaluate)


def bench_cocoop(epochs: int) -> dict:
    from papers.cocoop.__main__ import CONFIG
    from papers.cocoop.method import evaluate, train_cocoop, train_cocoop_many
    cfg = dict(load_config(CONFIG, "embedded"), epochs=epochs)
    tasks = _tasks(cfg, [(16, s) for s in (1, 2, 3)])
    return _compare("cocoop", tasks, _run_steps(tasks, epochs, int(cfg["batch_size"])),
                    lambda t: train_cocoop(t, cfg), lambda ts: train_cocoop_many(ts, cfg), evaluate)


def bench_clip_adapter(epochs: int) -> dict:
    from papers.clip_adapter.__main__ import CONFIG, evaluate, fit_many
    cfg = load_config(CONFIG, "embedded")
    cfg["train"] = dict(cfg["train"], epochs=epochs)
    tasks = _tasks(cfg, SHOTS_X_SEEDS)
    return _compare("clip_adapter", tasks, _run_steps(tasks, epochs, int(cfg["batch_size"])),
                    lambda t: fit_many([t])[0], fit_many, evaluate)


BENCHES = {"coop": bench_coop, "cocoop": bench_cocoop, "clip_adapter": bench_clip_adapter}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=list(BENCHES), choices=list(BENCHES))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = [BENCHES[m](a.epochs) for m in a.methods]
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
