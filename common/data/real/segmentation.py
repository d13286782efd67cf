"""Semantic segmentation sets in the mmsegmentation layout that MaskCLIP and DenseCLIP read.

`Datum.mask` is the path of the label PNG (`Datum.label` is -1). The PNGs store the dataset's raw
indices; `load_mask(path, reduce_zero_label=True)` turns them into class indices as mmseg does for these
three sets: raw 0 (ADE "other", VOC/Context background) -> `ignore_index` 255, raw k -> k-1, 255 stays
ignored. `meta` holds `ignore_index`, `reduce_zero_label` and MaskCLIP's 85 templates. The validation
split is the test split (as both papers evaluate); `val` is empty.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ...errors import MissingDataError
from ..images import CorruptImageError
from ..registry import Dataset, Datum
from ._layout import check_listed, listdir_nohidden, need_dir, need_file, read_lines, real_dataset
from .templates import MASKCLIP_TEMPLATES

IGNORE_INDEX = 255

# Class names as MaskCLIP prompts them (tools/maskclip_utils/prompt_engineering.py; ADE = mmseg's ADE20K names).
ADE20K_CLASSNAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag")
VOC20_CLASSNAMES = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table", "dog",
    "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor")
CONTEXT59_CLASSNAMES = (
    "airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "potted plant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tv monitor", "wall",
    "water", "window", "wood")
assert (len(ADE20K_CLASSNAMES), len(VOC20_CLASSNAMES), len(CONTEXT59_CLASSNAMES)) == (150, 20, 59)


def load_mask(path: str | Path, reduce_zero_label: bool = False, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A label PNG as an (H, W) int64 array of class indices, `ignore_index` where unlabelled.

    Palette PNGs (VOC) are read as their indices, not as colours."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"mask file {path} does not exist")
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise CorruptImageError(f"mask {path} has mode {im.mode}; expected a single-channel label PNG")
            mask = np.asarray(im, dtype=np.int64).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CorruptImageError(f"cannot decode mask {path}: {err}") from err
    if reduce_zero_label:  # mmseg's reduce_zero_label: 0 -> ignore, k -> k-1, ignore stays ignore
        ignore = (mask == 0) | (mask == ignore_index)
        mask = mask - 1
        mask[ignore] = ignore_index
    return mask


def _seg_meta(**extra) -> dict:
    return {"ignore_index": IGNORE_INDEX, "reduce_zero_label": True, "templates": MASKCLIP_TEMPLATES, **extra}


def _pairs(name: str, ids: list[str], image_dir: Path, mask_dir: Path, listed_in: Path | str,
           image_ext: str = ".jpg") -> list[Datum]:
    items = [Datum(str(image_dir / f"{i}{image_ext}"), -1, mask=str(mask_dir / f"{i}.png")) for i in ids]
    check_listed([d.impath for d in items] + [d.mask for d in items], name, listed_in)
    return items


@real_dataset("ade20k", "ade/ADEChallengeData2016", """
ade/ADEChallengeData2016/    (ADEChallengeData2016.zip, mmseg's data/ade layout)
  images/training/ADE_train_XXXXXXXX.jpg
  images/validation/ADE_val_XXXXXXXX.jpg
  annotations/training/ADE_train_XXXXXXXX.png     (0 = other/ignored, 1..150 = classes)
  annotations/validation/ADE_val_XXXXXXXX.png
""")
def build_ade20k(root: Path) -> Dataset:
    """ADE20K SceneParsing (150 classes): train = training (20,210), test = validation (2,000)."""
    name = "ade20k"
    splits = {}
    for split, folder in (("train", "training"), ("test", "validation")):
        image_dir = need_dir(root / "images" / folder, name, "image folder")
        mask_dir = need_dir(root / "annotations" / folder, name, "annotation folder")
        ids = [Path(f).stem for f in listdir_nohidden(image_dir, dirs=False) if f.lower().endswith(".jpg")]
        splits[split] = _pairs(name, ids, image_dir, mask_dir, f"{image_dir} (mask for each image)")
    return Dataset(name=name, classnames=list(ADE20K_CLASSNAMES), template="a photo of a {}.",
                   train=splits["train"], val=[], test=splits["test"], meta=_seg_meta())


@real_dataset("voc2012_seg", "VOCdevkit/VOC2012", """
VOCdevkit/VOC2012/           (mmseg's data/VOCdevkit/VOC2012)
  JPEGImages/<id>.jpg
  SegmentationClass/<id>.png              (palette PNG: 0 = background, 1..20 = classes, 255 = border)
  ImageSets/Segmentation/train.txt , val.txt
  SegmentationClassAug/<id>.png + ImageSets/Segmentation/aug.txt   (optional: SBD augmented train set,
                                                                   from mmseg's voc_aug converter)
""")
def build_voc2012_seg(root: Path) -> Dataset:
    """PASCAL VOC 2012 segmentation, 20 classes without background (MaskCLIP's VOC-20: background
    ignored). Train = train (+ aug when aug.txt exists), test = val."""
    name = "voc2012_seg"
    image_dir = need_dir(root / "JPEGImages", name, "image folder")
    mask_dir = need_dir(root / "SegmentationClass", name, "annotation folder")
    sets = root / "ImageSets" / "Segmentation"
    train_list = need_file(sets / "train.txt", name, "split file")
    val_list = need_file(sets / "val.txt", name, "split file")
    train = _pairs(name, read_lines(train_list), image_dir, mask_dir, train_list)
    if (sets / "aug.txt").is_file():
        aug_dir = need_dir(root / "SegmentationClassAug", name, "annotation folder")
        train += _pairs(name, read_lines(sets / "aug.txt"), image_dir, aug_dir, sets / "aug.txt")
    test = _pairs(name, read_lines(val_list), image_dir, mask_dir, val_list)
    return Dataset(name=name, classnames=list(VOC20_CLASSNAMES), template="a photo of a {}.", train=train, val=[],
                   test=test, meta=_seg_meta())


@real_dataset("pascal_context", "VOCdevkit/VOC2010", """
VOCdevkit/VOC2010/           (mmseg's data/VOCdevkit/VOC2010, masks from mmseg's pascal_context converter)
  JPEGImages/<id>.jpg
  SegmentationClassContext/<id>.png        (0 = background, 1..59 = classes)
  ImageSets/SegmentationContext/train.txt , val.txt
""")
def build_pascal_context(root: Path) -> Dataset:
    """PASCAL Context, 59 classes without background (mmseg's PascalContextDataset59): train = train
    (4,996), test = val (5,104)."""
    name = "pascal_context"
    image_dir = need_dir(root / "JPEGImages", name, "image folder")
    mask_dir = need_dir(root / "SegmentationClassContext", name, "annotation folder")
    sets = root / "ImageSets" / "SegmentationContext"
    splits = {}
    for split, list_name in (("train", "train"), ("test", "val")):
        path = need_file(sets / f"{list_name}.txt", name, "split file")
        splits[split] = _pairs(name, read_lines(path), image_dir, mask_dir, path)
    return Dataset(name=name, classnames=list(CONTEXT59_CLASSNAMES), template="a photo of a {}.",
                   train=splits["train"], val=[], test=splits["test"], meta=_seg_meta())
