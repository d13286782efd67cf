"""A paper's grid of cells and the share of it one job runs.

A cell is one (dataset, shots, seed) of a paper's grid: the training set, the shot count and the seed of a
run (for a transfer protocol, the source it trains on). Every protocol run of `reproduce` belongs to exactly
one cell, whatever the protocol, method or variant, so one cell's runs (a few-shot run and the
domain-generalisation run that reuses its training, say) stay in one job.

The grid is read from the resolved config: `datasets` (plus `dg_source` / `xd_source`) x `shots` (plus
`dg_shots`) x `seeds`, less the keys a paper lists as `unused`. A launcher (`common.launch`) splits it into
jobs of consecutive cells (datasets outermost, so a job's cells share datasets and batched runs still group);
a job runs its paper's command inside `sharded(shard)`, and the protocols skip every run whose cell the shard
does not own. A run outside the grid (a seed list of its own, `shots: null` zero-shot rows) is owned by the
job its cell hashes to, so the jobs together still run every run exactly once.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

Cell = tuple  # (dataset: str, shots: int | None, seed: int)

_SHARD: contextvars.ContextVar["Shard | None"] = contextvars.ContextVar("shard", default=None)


def cell(dataset: str, shots, seed) -> Cell:
    return (str(dataset), None if shots is None else int(shots), int(seed))


def cell_name(c: Cell) -> str:
    """`emb_objects/k16/seed1` (`zs` for no shots)."""
    return f"{c[0]}/{'zs' if c[1] is None else 'k' + str(c[1])}/seed{c[2]}"


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def grid_of(cfg: dict, unused: Iterable[str] = ()) -> list[Cell]:
    """The grid of a resolved config: datasets (then dg_source, xd_source) x shots (then dg_shots) x seeds, in
    that order, without duplicates. Keys in `unused` (the paper's `unused` block) are left out."""
    unused = set(unused)

    def read(key):
        return [] if key in unused or key not in cfg else _as_list(cfg[key])

    datasets = list(dict.fromkeys(str(d) for d in read("datasets") + read("dg_source") + read("xd_source")))
    shots = read("shots")
    if "dg_shots" in cfg and "dg_shots" not in unused:
        shots.append(cfg["dg_shots"])                    # null (the whole train split) is a shot count too
    shots = list(dict.fromkeys(None if k is None else int(k) for k in shots)) or [None]
    seeds = list(dict.fromkeys(int(s) for s in read("seeds"))) or [0]
    return [cell(d, k, s) for d in datasets for k in shots for s in seeds]


def split_grid(cells: Sequence[Cell], jobs: int | None = None) -> list[list[Cell]]:
    """`jobs` runs of consecutive cells, sizes differing by at most one (None or more jobs than cells: one
    cell per job)."""
    n = len(cells) if not jobs else min(int(jobs), len(cells))
    if n < 1:
        return []
    size, extra = divmod(len(cells), n)
    out, start = [], 0
    for i in range(n):
        stop = start + size + (1 if i < extra else 0)
        out.append(list(cells[start:stop]))
        start = stop
    return out


def hash_owner(c: Cell, count: int) -> int:
    """The job owning a cell outside the grid: a stable hash (the same in every process and on every machine)."""
    digest = hashlib.sha256(json.dumps(list(c)).encode()).hexdigest()
    return int(digest[:12], 16) % count


@dataclass(frozen=True)
class Shard:
    """Job `index` of `count`: it owns `cells` of the grid `grid`, and the cells outside the grid that hash to it."""

    index: int
    count: int
    cells: tuple
    grid: tuple

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is not in [0, {self.count})")
        object.__setattr__(self, "cells", tuple(cell(*c) for c in self.cells))
        object.__setattr__(self, "grid", tuple(cell(*c) for c in self.grid))
        missing = set(self.cells) - set(self.grid)
        if missing:
            raise ValueError(f"shard cells outside the grid: {sorted(map(cell_name, missing))}")

    def owns(self, c: Cell) -> bool:
        c = cell(*c)
        if c in set(self.grid):
            return c in set(self.cells)
        return hash_owner(c, self.count) == self.index


def owner_of(c: Cell, jobs: Sequence[Sequence[Cell]]) -> int:
    """Index of the job that owns cell `c` under the split `jobs` (the same rule as `Shard.owns`)."""
    c = cell(*c)
    for i, cells in enumerate(jobs):
        if c in {cell(*x) for x in cells}:
            return i
    return hash_owner(c, len(jobs))


def current() -> Shard | None:
    return _SHARD.get()


def owns(dataset: str, shots, seed) -> bool:
    """Whether this process runs the cell: always, unless it is a job of a launch that gave the cell to another."""
    shard = _SHARD.get()
    return shard is None or shard.owns(cell(dataset, shots, seed))


def owns_dataset(dataset: str) -> bool:
    """Whether this process runs any grid cell of `dataset` (for per-dataset work before the cells, e.g. an
    encoder pretrained once per dataset); a dataset outside the grid goes to the job its name hashes to."""
    shard = _SHARD.get()
    if shard is None:
        return True
    if any(c[0] == dataset for c in shard.grid):
        return any(c[0] == dataset for c in shard.cells)
    return hash_owner((dataset,), shard.count) == shard.index


@contextlib.contextmanager
def sharded(shard: Shard | None) -> Iterator[None]:
    """Within this block the protocols run only the cells `shard` owns (None: every cell)."""
    token = _SHARD.set(shard)
    try:
        yield
    finally:
        _SHARD.reset(token)
