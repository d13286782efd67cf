"""ImageNet and its four shifted test sets in CoOp's DATA layout.

Class names come from CoOp's `classnames.txt` ("<wnid> <class name>" per line, CLIP's names). Those
names are CLIP's and repeat twice ("missile", "sunglasses"); they are kept as they are, since every
published CLIP ImageNet number uses them. ImageNet-A and -R hold 200 of the 1000 classes: their labels
are the sorted wnid folders present, re-indexed 0..199, and `meta["imagenet_indices"]` maps each to
its ImageNet label so a 1000-way head can be restricted to them.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

from ...errors import InvalidDataError
from ..registry import Dataset, Datum
from ._layout import (DatasetLayoutError, layout_help, listdir_nohidden, need_dir, need_file, read_lines,
                      real_dataset)
from .templates import COOP_TEMPLATES, OPENAI_IMAGENET_TEMPLATES


def read_classnames(path: Path) -> "OrderedDict[str, str]":
    """CoOp's ImageNet classnames.txt: wnid -> class name, in file order (= ImageNet label order)."""
    names: OrderedDict[str, str] = OrderedDict()
    for n, line in enumerate(read_lines(path), 1):
        wnid, _, cname = line.partition(" ")
        if not cname.strip():
            raise InvalidDataError(f"{path} line {n}: expected '<wnid> <class name>', got {line!r}")
        names[wnid] = cname.strip()
    return names


def _find_classnames(name: str, root: Path) -> "OrderedDict[str, str]":
    """The variant's own classnames.txt (CoOp asks to copy it there), else ImageNet's beside it."""
    for path in (root / "classnames.txt", root.parent / "imagenet" / "classnames.txt"):
        if path.is_file():
            return read_classnames(path)
    raise DatasetLayoutError(f"dataset {name!r}: classnames.txt not found at {root / 'classnames.txt'} nor at "
                             f"{root.parent / 'imagenet' / 'classnames.txt'}; copy CoOp's ImageNet "
                             f"classnames.txt there.\n{layout_help(name)}")


@lru_cache(maxsize=8)
def _list_files(split_dir: str, folders: tuple[str, ...], stamps: tuple[int, ...]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(listdir_nohidden(Path(split_dir) / f, dirs=False)) for f in folders)


def _read_folders(name: str, split_dir: Path, folders: list[str], names: dict[str, str]) -> list[Datum]:
    """Images of `folders` (label = position in the list), sorted by file name."""
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise InvalidDataError(f"dataset {name!r}: {len(unknown)} class folders in {split_dir} are not in "
                               f"classnames.txt, e.g. {unknown[:5]}")
    # Listing 1.28M files takes a while; reuse the listing in this process while no folder changed.
    stamps = tuple(os.stat(split_dir / f).st_mtime_ns for f in folders)
    files = _list_files(str(split_dir), tuple(folders), stamps)
    items = [Datum(str(split_dir / folders[label] / im), label, names[folders[label]])
             for label, ims in enumerate(files) for im in ims]
    if not items:
        raise DatasetLayoutError(f"dataset {name!r}: no images under {split_dir}.\n{layout_help(name)}")
    return items


def _imagenet_meta(folders: list[str], names: "OrderedDict[str, str]") -> dict:
    index = {w: i for i, w in enumerate(names)}
    return {"templates": OPENAI_IMAGENET_TEMPLATES, "wnids": list(folders),
            "imagenet_indices": [index[w] for w in folders], "allow_duplicate_classnames": True}


@real_dataset("imagenet", "imagenet", """
imagenet/
  classnames.txt             ("<wnid> <class name>" per line, CoOp's file = CLIP's names)
  images/train/<wnid>/*.JPEG (1000 folders)
  images/val/<wnid>/*.JPEG   (the 50k validation images sorted into the same 1000 folders)
""")
def build_imagenet(root: Path) -> Dataset:
    """ImageNet-1k. As in CoOp, the official val set is the test set; unlike CoOp (which also uses it as
    val), `val` is left empty so nothing selects on the test set. Few-shot sampling draws from train."""
    name = "imagenet"
    names = read_classnames(need_file(root / "classnames.txt", name, "class list"))
    train_dir = need_dir(root / "images" / "train", name, "image folder")
    test_dir = need_dir(root / "images" / "val", name, "image folder")
    folders = listdir_nohidden(train_dir, dirs=True)
    val_folders = listdir_nohidden(test_dir, dirs=True)
    if val_folders != folders:
        raise DatasetLayoutError(
            f"dataset {name!r}: {test_dir} has {len(val_folders)} class folders but {train_dir} has {len(folders)} "
            f"(they must match; the official val images must be moved into <wnid>/ folders).\n{layout_help(name)}")
    train = _read_folders(name, train_dir, folders, names)
    test = _read_folders(name, test_dir, folders, names)
    return Dataset(name=name, classnames=[names[f] for f in folders], template=COOP_TEMPLATES[name],
                   train=train, val=[], test=test, meta=_imagenet_meta(folders, names))


def _test_only(name: str, classnames: list[str], test: list[Datum], meta: dict) -> Dataset:
    # CoOp passes the data as train_x too (Dassl needs one); here the shifted sets are test-only.
    return Dataset(name=name, classnames=classnames, template=COOP_TEMPLATES[name], train=[], val=[], test=test,
                   meta=meta)


@real_dataset("imagenetv2", "imagenetv2", """
imagenetv2/
  imagenetv2-matched-frequency-format-val/<label 0..999>/*.jpeg
  classnames.txt             (copy of imagenet/classnames.txt; line i names folder i)
""")
def build_imagenetv2(root: Path) -> Dataset:
    """ImageNetV2 matched-frequency (test only); folder i holds ImageNet class i."""
    name = "imagenetv2"
    names = _find_classnames(name, root)
    image_dir = need_dir(root / "imagenetv2-matched-frequency-format-val", name, "image folder")
    wnids = list(names)
    missing = [str(image_dir / str(i)) for i in range(len(wnids)) if not (image_dir / str(i)).is_dir()]
    if missing:
        raise DatasetLayoutError(f"dataset {name!r}: {len(missing)} of {len(wnids)} class folders are missing, e.g. "
                                 f"{missing[:3]}.\n{layout_help(name)}")
    test = []
    for label, wnid in enumerate(wnids):
        class_dir = image_dir / str(label)
        test += [Datum(str(class_dir / im), label, names[wnid]) for im in listdir_nohidden(class_dir, dirs=False)]
    return _test_only(name, [names[w] for w in wnids], test, _imagenet_meta(wnids, names))


def _wnid_folders(name: str, root: Path, image_subdir: str) -> Dataset:
    names = _find_classnames(name, root)
    image_dir = need_dir(root / image_subdir, name, "image folder")
    folders = listdir_nohidden(image_dir, dirs=True)  # files such as README.txt are skipped
    test = _read_folders(name, image_dir, folders, names)
    return _test_only(name, [names[f] for f in folders], test, _imagenet_meta(folders, names))


@real_dataset("imagenet_sketch", "imagenet-sketch", """
imagenet-sketch/
  images/<wnid>/*.JPEG       (1000 folders)
  classnames.txt             (copy of imagenet/classnames.txt)
""")
def build_imagenet_sketch(root: Path) -> Dataset:
    """ImageNet-Sketch (test only)."""
    return _wnid_folders("imagenet_sketch", root, "images")


@real_dataset("imagenet_a", "imagenet-adversarial", """
imagenet-adversarial/
  imagenet-a/<wnid>/*.jpg    (200 folders, README.txt ignored)
  classnames.txt             (copy of imagenet/classnames.txt)
""")
def build_imagenet_a(root: Path) -> Dataset:
    """ImageNet-A (test only): the 200 classes whose folders exist, labels 0..199 in wnid order."""
    return _wnid_folders("imagenet_a", root, "imagenet-a")


@real_dataset("imagenet_r", "imagenet-rendition", """
imagenet-rendition/
  imagenet-r/<wnid>/*.jpg    (200 folders, README.txt ignored)
  classnames.txt             (copy of imagenet/classnames.txt)
""")
def build_imagenet_r(root: Path) -> Dataset:
    """ImageNet-R (test only): the 200 classes whose folders exist, labels 0..199 in wnid order."""
    return _wnid_folders("imagenet_r", root, "imagenet-r")
