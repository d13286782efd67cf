"""Registry builders of the embedded downstream suite (`emb_*`), reading what `suite.py` wrote.

`build_dataset("emb_objects", "data/embedded")` -> `Dataset` with the CoOp-style template, splits from
`split_zhou_<folder>.json` and `meta` extras:
- every set: `descriptors` = {"cupl": path, "vcd": path}, `unlabeled` = the train images as unlabeled
  `Datum`s (label -1; UPL's pool), `about`, `fewshot_dir` (its few-shot files, beside its images);
- generic objects and its shifted variants: `hierarchy` (child -> parent; leaf -> category -> top -> "object"),
  and on the variants `source` = "emb_objects" (they are test-only, as ImageNet-V2/-Sketch/-R/-A);
- `emb_multilabel`: `Datum.targets` (multi-hot label indices), `captions` (the text-only corpus, list[str]);
- `emb_segmentation`: `Datum.mask` (PNG of class indices), `ignore_index` 255.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from common.data.registry import Dataset, Datum, register_dataset
from common.data.splits import FEWSHOT_FOLDER, read_split_json
from common.errors import InvalidDataError, MissingDataError

from .catalog import CAPTIONS_FOLDER, OBJECT_VARIANTS, SEG_IGNORE, SETS, SetInfo


def _build(root: Path, info: SetInfo) -> Dataset:
    root = Path(root)
    split_file = root / f"split_zhou_{info.folder}.json"
    if not split_file.is_file():
        raise MissingDataError(f"dataset {info.name}: {split_file} is missing; write the embedded suite with "
                               f"`dvc repro world` (or `python -m common.data.synthetic.suite --root {root.parent}`)")
    splits = read_split_json(split_file, root / "images")
    bad = [d for s in splits.values() for d in s
           if not (0 <= d.label < len(info.classnames) and info.classnames[d.label] == d.classname)]
    if bad:
        raise InvalidDataError(f"dataset {info.name}: {len(bad)} entries of {split_file} disagree with the "
                               f"catalogue's class names (e.g. label {bad[0].label} {bad[0].classname!r}); rewrite "
                               f"the suite")
    # the world is project data: its few-shot files live beside its images (written by the world stage)
    meta = {"about": info.about, "kind": info.kind, "fewshot_dir": str(root / FEWSHOT_FOLDER),
            "descriptors": {k: str(root / f"descriptors_{k}.json") for k in ("cupl", "vcd")},
            "unlabeled": [Datum(d.impath, -1, "") for d in splits["train"]]}
    hier = root / "hierarchy.json"
    if hier.is_file():
        meta["hierarchy"] = json.loads(hier.read_text())
    if info.name in OBJECT_VARIANTS:
        meta["source"] = "emb_objects"
    if info.kind == "multilabel":
        targets = json.loads((root / "labels.json").read_text())
        image_dir = root / "images"
        for s in splits:
            splits[s] = [replace(d, targets=tuple(targets[str(Path(d.impath).relative_to(image_dir))])) for d in splits[s]]
        cap = root.parent / CAPTIONS_FOLDER / "captions.json"
        meta["captions"] = json.loads(cap.read_text()) if cap.is_file() else []
    if info.kind == "segmentation":
        image_dir, mask_dir = root / "images", root / "masks"
        for s in splits:
            splits[s] = [replace(d, mask=str(mask_dir / Path(d.impath).relative_to(image_dir))) for d in splits[s]]
        meta["ignore_index"] = SEG_IGNORE
    return Dataset(info.name, list(info.classnames), info.template, splits["train"], splits["val"], splits["test"],
                   root, meta)


def _register(info: SetInfo) -> None:
    @register_dataset(info.name, default_subdir=info.folder)
    def builder(root: Path) -> Dataset:
        return _build(root, info)

    builder.__name__ = f"build_{info.name}"
    builder.__doc__ = (f"{info.name}: {info.about}. Layout: <root>/images/<split>/..png + split_zhou_{info.folder}.json "
                       f"(CoOp format); written by common.data.synthetic.suite.")


for _info in SETS.values():
    _register(_info)
