"""Multi-label sets as DualCoOp reads them: PASCAL VOC 2007 (XML annotations) and MS-COCO 2014
(instances JSON). `Datum.targets` is the sorted tuple of positive class indices, `Datum.label` the first
of them (-1 for an image with no positive label).

As in DualCoOp: VOC objects marked difficult are not positives, VOC trains on trainval and tests on
test; COCO trains on train2014 and tests on val2014 and keeps only images with at least one annotation
(crowd ones included), in the order their first annotation appears. DualCoOp selects its checkpoint
on the test split (val == test); here `val` is empty, select on part of train instead.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

from ...errors import InvalidDataError
from ..registry import Dataset, Datum
from ._layout import check_listed, need_dir, need_file, read_lines, real_dataset

VOC_CLASSNAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                  "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                  "tvmonitor")
# Readable names for hand-written prompts (DualCoOp itself prompts with the raw VOC names above).
VOC_CLEAN_CLASSNAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                        "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
                        "train", "tv monitor")


def _datum(impath: str, targets, classnames) -> Datum:
    t = tuple(sorted(targets))
    return Datum(impath, t[0] if t else -1, classnames[t[0]] if t else "", targets=t)


def read_voc_xml(path: Path, index: dict[str, int]) -> set[int]:
    """Positive classes of one VOC annotation file, difficult objects left out."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as err:
        raise InvalidDataError(f"cannot parse VOC annotation {path}: {err}") from err
    out = set()
    for obj in tree.getroot().iter("object"):
        if (obj.findtext("difficult") or "0").strip() == "1":
            continue
        cname = (obj.findtext("name") or "").strip().lower()
        if cname not in index:
            raise InvalidDataError(f"VOC annotation {path}: unknown class {cname!r}")
        out.add(index[cname])
    return out


@real_dataset("voc2007", "VOCdevkit/VOC2007", """
VOCdevkit/VOC2007/           (VOCtrainval_06-Nov-2007 + VOCtest_06-Nov-2007 extracted together)
  JPEGImages/<id>.jpg
  Annotations/<id>.xml
  ImageSets/Main/trainval.txt  (one image id per line)
  ImageSets/Main/test.txt
""")
def build_voc2007(root: Path) -> Dataset:
    """PASCAL VOC 2007 multi-label classification (20 classes): train = trainval, test = test."""
    name = "voc2007"
    image_dir = need_dir(root / "JPEGImages", name, "image folder")
    ann_dir = need_dir(root / "Annotations", name, "annotation folder")
    index = {c: i for i, c in enumerate(VOC_CLASSNAMES)}
    ids = {}
    for split, list_name in (("train", "trainval"), ("test", "test")):  # every file checked before parsing
        list_path = need_file(root / "ImageSets" / "Main" / f"{list_name}.txt", name, "split file")
        ids[split] = read_lines(list_path)
        check_listed([str(image_dir / f"{i}.jpg") for i in ids[split]] +
                     [str(ann_dir / f"{i}.xml") for i in ids[split]], name, list_path)
    splits = {split: [_datum(str(image_dir / f"{i}.jpg"), read_voc_xml(ann_dir / f"{i}.xml", index), VOC_CLASSNAMES)
                      for i in split_ids] for split, split_ids in ids.items()}
    return Dataset(name=name, classnames=list(VOC_CLASSNAMES), template="a photo of a {}.", train=splits["train"],
                   val=[], test=splits["test"],
                   meta={"multilabel": True, "clean_classnames": list(VOC_CLEAN_CLASSNAMES)})


def read_coco_instances(path: Path, image_dir: Path) -> tuple[list[str], list[tuple[str, tuple[int, ...]]]]:
    """Class names (categories by id) and (image path, positive classes) per annotated image.

    The train JSON is ~0.5 GB; the parse is reused in this process while the file is unchanged."""
    st = os.stat(path)
    names, items = _parse_coco(str(path), str(image_dir), st.st_mtime_ns, st.st_size)
    return list(names), list(items)


@lru_cache(maxsize=2)
def _parse_coco(path: str, image_dir: str, mtime: int, size: int):
    path, image_dir = Path(path), Path(image_dir)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidDataError(f"COCO annotation file {path} is not valid JSON: {err}") from err
    for key in ("images", "annotations", "categories"):
        if key not in raw:
            raise InvalidDataError(f"COCO annotation file {path} lacks {key!r}")
    cats = sorted(raw["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(cats)}
    files = {im["id"]: im["file_name"] for im in raw["images"]}
    bad = {a["category_id"] for a in raw["annotations"]} - set(label_of)
    if bad:
        raise InvalidDataError(f"COCO annotation file {path}: category ids {sorted(bad)[:5]} are not in 'categories'")
    targets: dict[int, set[int]] = {}  # insertion order = order of first annotation, as pycocotools' imgToAnns
    for ann in raw["annotations"]:
        targets.setdefault(ann["image_id"], set()).add(label_of[ann["category_id"]])
    unknown = [i for i in targets if i not in files]
    if unknown:
        raise InvalidDataError(f"COCO annotation file {path}: {len(unknown)} annotated image ids are not in 'images', "
                               f"e.g. {unknown[:5]}")
    return tuple(c["name"] for c in cats), tuple((str(image_dir / files[i]), tuple(sorted(t)))
                                                 for i, t in targets.items())


@real_dataset("coco2014", "mscoco_2014", """
mscoco_2014/
  train2014/COCO_train2014_XXXXXXXXXXXX.jpg
  val2014/COCO_val2014_XXXXXXXXXXXX.jpg
  annotations/instances_train2014.json
  annotations/instances_val2014.json
""")
def build_coco2014(root: Path) -> Dataset:
    """MS-COCO 2014 multi-label classification (80 classes): train = train2014, test = val2014."""
    name = "coco2014"
    splits, classnames = {}, None
    for split, folder in (("train", "train2014"), ("test", "val2014")):
        ann = need_file(root / "annotations" / f"instances_{folder}.json", name, "annotation file")
        image_dir = need_dir(root / folder, name, "image folder")
        names, items = read_coco_instances(ann, image_dir)
        if classnames is not None and names != classnames:
            raise InvalidDataError(f"dataset {name!r}: {ann} lists other categories than instances_train2014.json")
        classnames = names
        check_listed([p for p, _ in items], name, ann)
        splits[split] = [_datum(p, t, names) for p, t in items]
    return Dataset(name=name, classnames=classnames, template="a photo of a {}.", train=splits["train"], val=[],
                   test=splits["test"], meta={"multilabel": True})
