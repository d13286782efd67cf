"""Everything a run needs, checked before any work: option ranges and names, `auto` settings, the datasets a
command reads (folder, layout, every image decodable) and the CLIP weights. `run_cli` calls `check_run` right
after resolving the config; a paper adds its own rules with a `validate(cfg) -> list[str]` hook.

Types were checked when the config was resolved (`common.config.coerce`); here each option is checked by its
name, wherever it sits (`train.lr`, `e2e.lr` and `lc.lr` are all learning rates).
"""
from __future__ import annotations

import difflib
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import ConfigError, DataError, UserError, one_line
from .paths import cache_root

# option name -> (lowest, lowest allowed?, highest, highest allowed?) for every number the option holds
RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "lr": (0, False, None, False), "warmup_lr": (0, True, None, False),
    "epochs": (1, True, None, False), "steps": (1, True, None, False), "checkpoint_every": (1, True, None, False),
    "warmup_epochs": (0, True, None, False), "warmup_steps": (0, True, None, False),
    "min_steps": (0, True, None, False),
    "batch_size": (1, True, None, False), "eval_batch_size": (1, True, None, False),
    "shots": (1, True, None, False), "dg_shots": (1, True, None, False), "b2n_shots": (1, True, None, False),
    "fewshot_shots": (1, True, None, False), "ablation_shots": (1, True, None, False),
    "per_class": (1, True, None, False), "val_from_train": (1, True, None, False),
    "weight_decay": (0, True, None, False), "momentum": (0, True, 1, False), "grad_clip": (0, False, None, False),
    "label_smoothing": (0, True, 1, False), "alpha_step": (0, False, 1, True),
    "num_workers": (0, True, None, False), "threads": (0, True, None, False), "cache_views": (1, True, None, False),
    "n_ctx": (1, True, None, False),
}
CHOICES = {"class_token_position": ("end", "middle", "front")}  # more: the training loop's (common.engine.train)
# options naming datasets (a name or a list of names), wherever they sit
DATASET_OPTIONS = ("datasets", "dg_source", "dg_targets", "xd_source", "tax_datasets", "eval_on", "nfl_source")
NOT_EMPTY = ("datasets", "seeds", "shots")  # top-level lists a run iterates over
AUTO = ("num_workers",)  # numeric options that may be `auto` (resolved by `resolve_auto`)
PRECISIONS = ("fp32", "fp16", "bf16", "amp")
SHOWN_BAD_IMAGES = 20

DatasetsOf = Callable[[dict], Iterable[str]]


# ----------------------------------------------------------------------------------------- options
def _walk(cfg: dict, prefix: str = ""):
    for k, v in cfg.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        yield f"{prefix}{k}", k, v


def _numbers(v: Any) -> list:
    items = v if isinstance(v, list) else [v]
    return [x for x in items if isinstance(x, (int, float)) and not isinstance(x, bool)]


def _range_text(lo, lo_ok, hi, hi_ok) -> str:
    parts = ([f"{'>=' if lo_ok else '>'} {lo}"] if lo is not None else []) + \
            ([f"{'<=' if hi_ok else '<'} {hi}"] if hi is not None else [])
    return " and ".join(parts)


def option_problems(cfg: dict) -> list[str]:
    """Ranges, dataset names, arch, device and precision of a resolved config (empty when all is well)."""
    from .data import list_datasets
    from .engine.train import CHOICES as TRAIN_CHOICES
    known, choices = list_datasets(), {**TRAIN_CHOICES, **CHOICES}
    out = []
    for key, name, value in _walk(cfg):
        if name in choices and value is not None and value not in choices[name]:
            out.append(f"{key} must be one of {', '.join(choices[name])}, got {value!r}")
        if name in RANGES and isinstance(value, str) and not (name in AUTO and value == "auto"):
            out.append(f"{key} must be a number{' or auto' if name in AUTO else ''}, got {value!r}")
        elif name in RANGES:
            lo, lo_ok, hi, hi_ok = RANGES[name]
            bad = [x for x in _numbers(value) if (lo is not None and (x < lo or (x == lo and not lo_ok)))
                   or (hi is not None and (x > hi or (x == hi and not hi_ok)))]
            if bad:
                extra = " (null: the whole train split)" if name == "dg_shots" else ""
                out.append(f"{key} must be {_range_text(lo, lo_ok, hi, hi_ok)}{extra}, got {bad[0]}")
        if name in DATASET_OPTIONS and value is not None:
            for ds in (value if isinstance(value, list) else [value]):
                if ds not in known:
                    close = difflib.get_close_matches(str(ds), known, n=3, cutoff=0.5)
                    out.append(f"{key}: unknown dataset {ds!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                  else f"; known: {', '.join(known)}"))
    for key in NOT_EMPTY:
        if isinstance(cfg.get(key), list) and not cfg[key]:
            out.append(f"{key} is empty; give at least one value, e.g. --set {key}=[1]")
    out += _device_problems(cfg)
    if "arch" in cfg:
        from .clip.loader import check_weights
        try:
            check_weights(cfg["arch"], "random")
        except ConfigError as err:
            out.append(f"arch: {err}")
    return out


def reproduce_problems(cfg: dict, protocols: Iterable[str], design_keys: Iterable[str]) -> list[str]:
    """A paper's `reproduce` block: known protocols, ablation methods that name a design, designs that set only
    `design_keys`."""
    protocols, design_keys = tuple(protocols), set(design_keys)
    rep = cfg.get("reproduce") or {}
    problems = [f"reproduce.protocols: unknown protocol {p!r}; expected some of {protocols}"
                for p in rep.get("protocols") or [] if p not in protocols]
    abl = rep.get("ablation") or {}
    designs = abl.get("designs") or {}
    problems += [f"reproduce.ablation.methods: unknown design {m!r}; expected some of {sorted(designs)}"
                 for m in abl.get("methods") or [] if m not in designs]
    for name, over in designs.items():
        bad = set(over) - design_keys
        if bad:
            problems.append(f"reproduce.ablation.designs.{name}: unknown options {sorted(bad)}; allowed: "
                            f"{', '.join(sorted(design_keys))}")
    return problems


def _device_problems(cfg: dict) -> list[str]:
    import torch
    device, precision = str(cfg.get("device", "cpu")), cfg.get("precision", "fp32")
    out = []
    if device != "auto":
        try:
            kind = torch.device(device).type
        except RuntimeError:
            return [f"device {device!r} is not a device; use cpu, cuda, cuda:N or auto"]
        if kind == "cuda" and not torch.cuda.is_available():
            out.append(f"device {device!r} but this machine has no CUDA device; use --set device=cpu (or auto)")
    if precision not in PRECISIONS:
        out.append(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    elif precision != "fp32" and device == "cpu":
        out.append(f"precision {precision!r} needs a CUDA device; use --set precision=fp32 on the CPU")
    return out


def resolve_auto(cfg: dict, say: Callable[[str], None]) -> dict:
    """`device: auto` -> cuda if there is one, else cpu; `num_workers: auto` -> the machine's cores less one (at
    most 8). Each choice is said once, and the resolved value is what the run records."""
    import torch
    if cfg.get("device") == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        say(f"device auto -> {cfg['device']}" + ("" if cfg["device"] == "cuda" else " (no CUDA device)"))
    cores = os.cpu_count() or 1
    for key, name, value in list(_walk(cfg)):
        if name == "num_workers" and value == "auto":
            node = cfg
            for p in key.split(".")[:-1]:
                node = node[p]
            node[name] = max(0, min(8, cores - 1))
            say(f"{key} auto -> {node[name]} ({cores} CPU cores)")
    return cfg


# -------------------------------------------------------------------------------------------- data
def datasets_read(cfg: dict, keys_or_fn: Iterable[str] | DatasetsOf) -> list[str]:
    """The dataset names a command reads: the values of config `keys`, or what a function of the config returns."""
    if callable(keys_or_fn):
        names = list(keys_or_fn(cfg))
    else:
        names = []
        for key in keys_or_fn:
            v = cfg.get(key)
            names += v if isinstance(v, list) else ([v] if v else [])
    return list(dict.fromkeys(names))


def data_problems(cfg: dict, names: list[str]) -> tuple[list[str], list]:
    """(problems, built datasets): data_root exists and every named dataset builds (folder, layout, listed files)."""
    from .data import build_dataset
    if not names:
        return [], []
    root = Path(cfg["data_root"])
    if not root.is_dir():
        fix = ("build the embedded world with `make repro` (or `dvc repro world`)" if cfg.get("profile") == "embedded"
               else "--set data_root=/path/to/DATA, the folder holding the datasets (layouts in "
                    "common/data/real/README.md)")
        return [f"data_root {root} does not exist (needed for {', '.join(names)}): {fix}"], []
    problems, built = [], []
    for name in names:
        try:
            built.append(build_dataset(name, root))
        except (UserError, FileNotFoundError, ValueError) as err:
            problems.append(one_line(str(err)))
    return problems, built


def image_problems(datasets: list) -> list[str]:
    """Every image (and mask) the datasets list, opened (header decoded) once; a clean set is remembered in the
    cache, keyed by the files' paths, sizes and times, so later runs only stat them."""
    from .data.images import image_problem
    paths = sorted({p for ds in datasets for split in (ds.train, ds.val, ds.test) for d in split
                    for p in (d.impath, d.mask) if p})
    if not paths:
        return []
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    stamp = cache_root() / "image_checks" / f"{h.hexdigest()[:24]}.ok"
    if stamp.is_file():
        return []
    with ThreadPoolExecutor(max_workers=4) as pool:
        bad = [(p, why) for p, why in zip(paths, pool.map(image_problem, paths, chunksize=256)) if why]
    if bad:
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:SHOWN_BAD_IMAGES])
        more = f"; and {len(bad) - SHOWN_BAD_IMAGES} more" if len(bad) > SHOWN_BAD_IMAGES else ""
        return [f"{len(bad)} of {len(paths)} images cannot be decoded: {shown}{more}. Replace them (or remove "
                f"them from the split file) and rerun"]
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    except OSError:  # only a shortcut for the next run
        pass
    return []


# ---------------------------------------------------------------------------------------------- all
def check_run(cfg: dict, reads: Iterable[str] | DatasetsOf = (), weights: bool = True,
              paper_validate: Callable[[dict], list[str]] | None = None,
              say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Raise one `ConfigError`/`DataError` naming every problem of this run, or return the config with its `auto`
    settings resolved. Order: options (then nothing else is checked), then data and weights together, then images."""
    problems = option_problems(cfg) + (paper_validate(cfg) if paper_validate else [])
    if problems:
        raise ConfigError("; ".join(problems))
    names = datasets_read(cfg, reads)
    problems, built = data_problems(cfg, names)
    if weights and "pretrained" in cfg:
        from .clip.loader import check_weights
        try:
            check_weights(cfg["arch"], cfg["pretrained"])
        except UserError as err:
            problems.append(one_line(str(err)))
    if weights and cfg.get("backbones"):   # a multi-backbone run's other towers, checked with the weights
        from .engine.protocols import backbone_problems
        problems += backbone_problems(cfg)
    if problems:
        raise DataError("; ".join(problems))
    problems = image_problems(built)
    if problems:
        raise DataError("; ".join(problems))
    return resolve_auto(cfg, say)
