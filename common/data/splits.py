"""CoOp-style split files, few-shot sampling and the base/novel class split."""
from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import InvalidDataError, MissingDataError
from ..paths import cache_root
from .registry import Dataset, Datum


def read_split_json(path: str | Path, image_dir: str | Path, check_files: bool = True) -> dict[str, list[Datum]]:
    """Read a CoOp `split_zhou_*.json`: {"train"|"val"|"test": [[relpath, label, classname], ...]}.

    Paths are joined to `image_dir`. With `check_files`, files listed but absent are reported all at once
    (path of the first few and how many), never later inside a DataLoader worker."""
    path, image_dir = Path(path), Path(image_dir)
    if not path.is_file():
        raise MissingDataError(f"split file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidDataError(f"split file {path} is not valid JSON: {err}") from err
    out: dict[str, list[Datum]] = {}
    for split in ("train", "val", "test"):
        if split not in raw:
            raise InvalidDataError(f"split file {path} lacks the {split!r} list")
        items = []
        for row in raw[split]:
            if not (isinstance(row, (list, tuple)) and len(row) == 3):
                raise InvalidDataError(f"split file {path}: {split} entry {row!r} is not [relpath, label, classname]")
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
        raise MissingDataError(f"{len(missing)} of {len(paths)} files {what} are missing, e.g.:\n  {shown}")


def classnames_from(items: list[Datum]) -> list[str]:
    """Class names ordered by label, as Dassl derives them from the split."""
    names: dict[int, str] = {}
    for d in items:
        if names.setdefault(d.label, d.classname) != d.classname:
            raise InvalidDataError(f"label {d.label} has two class names: {names[d.label]!r} and {d.classname!r}")
    labels = sorted(names)
    if labels != list(range(len(labels))):
        raise InvalidDataError(f"labels are not contiguous 0..{len(labels) - 1}: {labels[:10]}...")
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


FEWSHOT_FOLDER = "split_fewshot"
_NOTED: set[tuple[str, int]] = set()


def _rel(dataset: Dataset, p: str) -> str:
    """A path relative to the dataset folder, so a moved data root keeps its shots."""
    base = Path(dataset.root) if dataset.root else None
    return str(Path(p).relative_to(base)) if base is not None and Path(p).is_relative_to(base) else p


def split_digest(dataset: Dataset) -> str:
    """Digest of what few-shot sampling draws from (the train and val lists of the split file, relative paths and
    labels): keys the cached few-shot files, so an edited split file gets new shots."""
    h = hashlib.sha256(dataset.name.encode())
    for split in ("train", "val"):
        for d in getattr(dataset, split):
            h.update(f"{split}\t{_rel(dataset, d.impath)}\t{d.label}\n".encode())
    return h.hexdigest()[:16]


def fewshot_file(dataset: Dataset, shots: int, seed: int) -> Path:
    """Where the few-shot file of (K, seed) is read from and written to. Project data (the embedded world, whose
    builder sets `meta["fewshot_dir"]`) keeps its files beside its images, written with the world. A user's data
    folder is never written: a file already beside the dataset (`split_fewshot/`, from an earlier version of this
    project) is read; anything else lives in the project cache, `<cache>/fewshot/<name>-<split digest>/`."""
    name = f"shot_{shots}-seed_{seed}.json"
    if dataset.meta.get("fewshot_dir"):
        return Path(dataset.meta["fewshot_dir"]) / name
    if dataset.root is not None and (Path(dataset.root) / FEWSHOT_FOLDER / name).is_file():
        return Path(dataset.root) / FEWSHOT_FOLDER / name
    return cache_root() / "fewshot" / f"{dataset.name}-{split_digest(dataset)}" / name


def fewshot_split(dataset: Dataset, shots: int, seed: int, cache_dir: str | Path | None = None) -> Dataset:
    """The dataset with K-shot train and min(K, 4)-shot val (CoOp's protocol), kept in a JSON file (`fewshot_file`,
    or `cache_dir/shot_{K}-seed_{S}.json`) so every method and rerun sees the same shots.

    A class with fewer than K training images keeps all of them (Dassl's rule): the returned dataset's
    `meta["shots_used"]` then says how many were used, and a note is printed once."""
    path = Path(cache_dir) / f"shot_{shots}-seed_{seed}.json" if cache_dir is not None else \
        fewshot_file(dataset, shots, seed)
    if path.is_file():
        raw = json.loads(path.read_text())
        index = {_rel(dataset, d.impath): d for d in dataset.train + dataset.val}
        try:
            train = [index[p] for p in raw["train"]]
            val = [index[p] for p in raw["val"]]
        except KeyError as err:
            raise InvalidDataError(f"few-shot file {path} names {err} which is not in dataset {dataset.name}; "
                                   f"delete the file to resample") from err
    else:
        train = sample_per_class(dataset.train, shots, seed)
        val = sample_per_class(dataset.val, min(shots, 4), seed) if dataset.val else []
        text = json.dumps({"train": [_rel(dataset, d.impath) for d in train],
                           "val": [_rel(dataset, d.impath) for d in val]})
        write_text_atomic(path, text)
    out = replace(dataset, train=train, val=val)
    used = shots_used(train, shots)
    if used:
        out.meta = {**dataset.meta, "shots_used": used}
        if (dataset.name, shots) not in _NOTED:
            _NOTED.add((dataset.name, shots))
            print(f"note: {dataset.name}: {used['classes_short']} of {dataset.num_classes} classes have fewer than "
                  f"{shots} training images (as few as {used['min']}); they train on all they have, as CoOp's protocol "
                  f"does, and the run records shots_used", file=sys.stderr)
    return out


def shots_used(train: list[Datum], shots: int) -> dict | None:
    """Per-class training images actually drawn, when some class has fewer than `shots` (else None)."""
    counts = Counter(d.label for d in train)
    short = [c for c in counts.values() if c < shots]
    if not short:
        return None
    return {"min": min(counts.values()), "max": max(counts.values()), "classes_short": len(short)}


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
