"""Shared helpers of the real loaders: registration with a documented folder layout, and checks that
fail at build time with the path, the expected layout and where the files come from."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ...errors import MissingDataError
from ..registry import Dataset, register_dataset

README = "common/data/real/README.md"

# name -> (folder under data_root, layout text); filled by `real_dataset`.
LAYOUTS: dict[str, tuple[str, str]] = {}


class DatasetLayoutError(MissingDataError):
    """A real dataset's folder does not match the layout its loader reads."""


def real_dataset(name: str, subdir: str, layout: str):
    """Register a real builder under `name` (folder `<data_root>/<subdir>`) and document its layout in
    the builder's docstring, which the registry's missing-folder error points to."""
    layout = layout.strip("\n")

    def deco(fn: Callable[[Path], Dataset]) -> Callable[[Path], Dataset]:
        LAYOUTS[name] = (subdir, layout)
        fn.__doc__ = (fn.__doc__ or "").rstrip() + f"\n\nExpected layout under <data_root>:\n\n{layout}\n"
        return register_dataset(name, default_subdir=subdir)(fn)

    return deco


def layout_help(name: str) -> str:
    subdir, layout = LAYOUTS[name]
    return f"Expected layout under <data_root> (folder {subdir}/):\n{layout}\nSee {README} for where each file comes from."


def need_file(path: Path, name: str, what: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"dataset {name!r}: {what} {path} does not exist.\n{layout_help(name)}")
    return path


def need_dir(path: Path, name: str, what: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"dataset {name!r}: {what} {path} does not exist.\n{layout_help(name)}")
    return path


def check_listed(paths: list[str], name: str, listed_in: Path | str) -> None:
    """All files an index names must exist; report how many are missing and a few of them."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = "\n  ".join(missing[:5])
        raise DatasetLayoutError(f"dataset {name!r}: {len(missing)} of {len(paths)} files listed in {listed_in} are "
                                 f"missing, e.g.:\n  {shown}\n{layout_help(name)}")


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def listdir_nohidden(path: Path, dirs: bool | None = None) -> list[str]:
    """Sorted entry names without hidden ones (Dassl's listdir_nohidden, sorted so every run sees one
    order); `dirs=True` keeps folders only, `dirs=False` files only."""
    out = []
    with os.scandir(path) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if dirs is None or e.is_dir() == dirs:
                out.append(e.name)
    return sorted(out)


def clean_classname(name: str) -> str:
    """CoOp formats prompts with `name.replace("_", " ")`; do it once here so every consumer sees it."""
    return " ".join(name.replace("_", " ").split())
