"""Dataset registry: every dataset, real or embedded, is a `Dataset` of `Datum`s built from disk.

A builder is registered under a name and turns a root folder into a `Dataset`. Real builders read
CoOp's DATA layout (`common/data/real/`), embedded ones read the same layout written by the
synthetic world (`common/data/synthetic/`), so both go through one code path.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..errors import InvalidDataError, MissingDataError, UnknownNameError

# Modules whose import registers builders. Listed here (not discovered) so an import error is loud.
BUILDER_MODULES = ("common.data.real", "common.data.synthetic.datasets")


@dataclass(frozen=True)
class Datum:
    """One sample. `label` indexes `Dataset.classnames`; `targets` holds multi-hot label indices for
    multi-label sets; `mask` is a per-pixel label image path for segmentation sets."""

    impath: str
    label: int
    classname: str = ""
    targets: tuple[int, ...] | None = None
    mask: str | None = None


@dataclass
class Dataset:
    """Class names, the CoOp prompt template and the three splits; `meta` holds optional extras:
    `hierarchy` (ProTeCt), `descriptors` (CuPL/VCD JSON path), `templates` (ensemble), `captions`
    (text-only corpus), `unlabeled` (list[Datum]), `ignore_index` (segmentation), `raw_classnames` (the
    names verbatim from the split file, one per class), ...

    `classnames` are cleaned as CoOp's prompts see them (`_` -> space): what a method gets unless its
    contract says otherwise (`prompt_classnames`)."""

    name: str
    classnames: list[str]
    template: str
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    root: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "{}" not in self.template:
            raise InvalidDataError(f"dataset {self.name}: template {self.template!r} lacks a '{{}}' slot for the "
                                   f"class name")
        # CLIP's ImageNet names repeat ("missile", "sunglasses") and every published number uses them.
        if len(set(self.classnames)) != len(self.classnames) and not self.meta.get("allow_duplicate_classnames"):
            raise InvalidDataError(f"dataset {self.name}: duplicate class names")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> list[Datum]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; expected train, val or test")
        return getattr(self, name)

    def with_splits(self, **splits: Any) -> "Dataset":
        return replace(self, **splits)


def prompt_classnames(dataset: Dataset, clean: bool = True) -> list[str]:
    """The class names a method formats into its prompts: part of each method's contract, by its official code.

    clean=True: `dataset.classnames`, the file's names with underscores read as spaces (CoOp's
    `name.replace("_", " ")`; whitespace runs collapsed). The official code of CoOp, CoCoOp and KgCoOp
    (`PromptLearner`), CoOp's zero-shot CLIP (`trainers/zsclip.py`), Tip-Adapter (`utils.clip_classifier`),
    CLIP-Adapter (`clip_adapter.py`) and SVL-Adapter (`low_shot_adapt.py`) all clean; every method here uses
    `Dataset.classnames` unless its paper folder says otherwise.
    clean=False: the names verbatim as the split/class file spells them, after the dataset's own renames
    (EuroSAT, Caltech101): `meta["raw_classnames"]`. TaskRes's official `_get_base_text_features` formats
    `classnames` unchanged ("a photo of a american_bulldog, a type of pet."). Where a dataset keeps no raw
    names (ImageNet and its variants read CLIP's names, the embedded world has no underscores) both agree."""
    if clean:
        return list(dataset.classnames)
    raw = dataset.meta.get("raw_classnames")
    if raw is None:
        return list(dataset.classnames)
    if len(raw) != len(dataset.classnames):
        raise ValueError(f"dataset {dataset.name}: {len(raw)} raw class names for {len(dataset.classnames)} classes")
    return list(raw)


_BUILDERS: dict[str, Callable[[Path], Dataset]] = {}
_DEFAULT_ROOTS: dict[str, str] = {}
_loaded = False


def register_dataset(name: str, default_subdir: str | None = None):
    """Decorator: register `fn(root: Path) -> Dataset` under `name`.

    `default_subdir` is the folder under the data root where this dataset lives (CoOp folder names
    for real sets, e.g. "oxford_pets")."""

    def deco(fn: Callable[[Path], Dataset]) -> Callable[[Path], Dataset]:
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"dataset {name!r} registered twice")
        _BUILDERS[name] = fn
        _DEFAULT_ROOTS[name] = default_subdir or name
        return fn

    return deco


def _load_builders() -> None:
    global _loaded
    if _loaded:
        return
    for mod in BUILDER_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if not mod.startswith(str(err.name)):  # a real import error inside the module: surface it
                raise
    _loaded = True


def list_datasets() -> list[str]:
    _load_builders()
    return sorted(_BUILDERS)


def dataset_dir(name: str, data_root: str | Path) -> Path:
    """Folder of dataset `name` under `data_root`."""
    _load_builders()
    if name not in _BUILDERS:
        raise UnknownNameError(f"unknown dataset {name!r}; registered: {', '.join(sorted(_BUILDERS))}")
    return Path(data_root) / _DEFAULT_ROOTS[name]


def build_dataset(name: str, data_root: str | Path) -> Dataset:
    """Build dataset `name` from `<data_root>/<its folder>`."""
    root = dataset_dir(name, data_root)
    if not root.is_dir():
        about = inspect.getdoc(_BUILDERS[name]) or "Expected layout: see common/data/real/README.md"
        raise MissingDataError(  # the builder's docstring says what the dataset is and its folder layout
            f"dataset {name!r}: folder {root} does not exist.\n{about}\n"
            f"Or use the embedded profile (`make repro` writes data/embedded/).")
    ds = _BUILDERS[name](root)
    ds.root = root
    return ds
