"""CoOp-style split files, few-shot sampling and the base/novel class split."""
from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from .registry import Dataset, Datum


def read_split_json(path: str | Path, image_dir: str | Path, check_files: bool = True) -> dict[str, list[Datum]]:
    """Read a CoOp `split_zhou_*.json`: {"train"|"val"|"test": [[relpath, label, classname], ...]}.

    Paths are joined to `image_dir`. With `check_files`, files listed but absent are reported all at once
    (path of the first few and how many), never later inside a DataLoader worker."""
    path, image_dir = Path(path), Path(image_dir)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"split file {path} is not valid JSON: {err}") from err
    out: dict[str, list[Datum]] = {}
    for split in ("train", "val", "test"):
        if split not in raw:
            raise ValueError(f"split file {path} lacks the {split!r} list")
        items = []
        for row in raw[split]:
            if not (isinstance(row, (list, tuple)) and len(row) == 3):
                raise ValueError(f"split file {path}: {split} entry {row!r} is not [relpath, label, classname]")
            rel, label, cname = row
            items.append(Datum(str(image_dir / rel), int(label), str(cname)))
        out[split] = items
    if check_files:
        check_exists([d.impath for s in out.values() for d in s], f"listed in {path}")
    return out


def write_split_json(path: str | Path, splits: dict[str, list[Datum]], image_dir: str | Path) -> None:
    """Write splits in CoOp's format, paths relative to `image_dir`."""
    image_dir = Path(image_dir)
    raw = {s: [[str(Path(d.impath).relative_to(image_dir)), d.label, d.classname] for d in splits[s]]
           for s in ("train", "val", "test")}
    Path(path).write_text(json.dumps(raw))


def check_exists(paths: list[str], what: str) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        shown = "\n  ".join(missing[:5])
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} files {what} are missing, e.g.:\n  {shown}")


def classnames_from(items: list[Datum]) -> list[str]:
    """Class names ordered by label, as Dassl derives them from the split."""
    names: dict[int, str] = {}
    for d in items:
        if names.setdefault(d.label, d.classname) != d.classname:
            raise ValueError(f"label {d.label} has two class names: {names[d.label]!r} and {d.classname!r}")
    labels = sorted(names)
    if labels != list(range(len(labels))):
        raise ValueError(f"labels are not contiguous 0..{len(labels) - 1}: {labels[:10]}...")
    return [names[i] for i in labels]


def sample_per_class(items: list[Datum], shots: int, seed: int, repeat: bool = False) -> list[Datum]:
    """K items per class, as Dassl's generate_fewshot_dataset: a class with fewer than K items keeps
    all of them (or, with `repeat`, is sampled with replacement)."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    rng = random.Random(seed)
    by_label: dict[int, list[Datum]] = defaultdict(list)
    for d in items:
        by_label[d.label].append(d)
    out: list[Datum] = []
    for label in sorted(by_label):
        group = by_label[label]
        if len(group) >= shots:
            out.extend(rng.sample(group, shots))
        else:
            out.extend(rng.choices(group, k=shots) if repeat else group)
    return out


def fewshot_split(dataset: Dataset, shots: int, seed: int, cache_dir: str | Path | None = None) -> Dataset:
    """The dataset with K-shot train and min(K, 4)-shot val (CoOp's protocol), cached to a JSON file.

    The file `split_fewshot/shot_{K}-seed_{S}.json` lives beside the dataset so every method and rerun sees
    the same shots."""
    cache_dir = Path(cache_dir) if cache_dir is not None else (Path(dataset.root) / "split_fewshot" if dataset.root else None)
    path = cache_dir / f"shot_{shots}-seed_{seed}.json" if cache_dir else None
    base = Path(dataset.root) if dataset.root else None

    def rel(p: str) -> str:  # paths relative to the dataset folder, so a moved data root keeps its shots
        return str(Path(p).relative_to(base)) if base is not None and Path(p).is_relative_to(base) else p

    if path is not None and path.is_file():
        raw = json.loads(path.read_text())
        index = {rel(d.impath): d for d in dataset.train + dataset.val}
        try:
            train = [index[p] for p in raw["train"]]
            val = [index[p] for p in raw["val"]]
        except KeyError as err:
            raise ValueError(f"few-shot file {path} names {err} which is not in dataset {dataset.name}; "
                             f"delete the file to resample") from err
    else:
        train = sample_per_class(dataset.train, shots, seed)
        val = sample_per_class(dataset.val, min(shots, 4), seed) if dataset.val else []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"train": [rel(d.impath) for d in train], "val": [rel(d.impath) for d in val]}))
            tmp.replace(path)
    return replace(dataset, train=train, val=val)


# Per-class lists in Dataset.meta that must follow a class subset.
PER_CLASS_META = ("wnids", "imagenet_indices", "raw_classnames")


def subsample_classes(dataset: Dataset, subsample: str = "all") -> Dataset:
    """CoCoOp's base/novel split: base = first ceil(K/2) classes, new = the rest (relabelled from 0).
    `meta["class_subset"]` records the kept original class indices; per-class meta lists are sliced."""
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"subsample must be all|base|new, got {subsample!r}")
    if subsample == "all":
        return dataset
    n = dataset.num_classes
    m = math.ceil(n / 2)
    keep = list(range(m)) if subsample == "base" else list(range(m, n))
    relabel = {old: new for new, old in enumerate(keep)}

    def pick(items: list[Datum]) -> list[Datum]:
        return [replace(d, label=relabel[d.label]) for d in items if d.label in relabel]

    meta = dict(dataset.meta)
    for key in PER_CLASS_META:
        if key in meta:
            meta[key] = [meta[key][i] for i in keep]
    meta["class_subset"] = keep
    return replace(dataset, name=f"{dataset.name}[{subsample}]", classnames=[dataset.classnames[i] for i in keep],
                   train=pick(dataset.train), val=pick(dataset.val), test=pick(dataset.test), meta=meta)
