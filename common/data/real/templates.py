"""Prompt templates of the real datasets.

`COOP_TEMPLATES`: the single hand-written template per dataset that CoOp's zero-shot CLIP uses
(`trainers/zsclip.py`, CUSTOM_TEMPLATES), keyed by this project's dataset names.
`OPENAI_IMAGENET_TEMPLATES`: CLIP's 80 ImageNet templates (from open_clip), the ensemble that is the
standard for ImageNet and its shifted variants. `MASKCLIP_TEMPLATES`: those 80 plus the 5 scene
templates MaskCLIP adds for segmentation.
"""
from __future__ import annotations

from open_clip import OPENAI_IMAGENET_TEMPLATES as _OPENAI

COOP_TEMPLATES: dict[str, str] = {
    "imagenet": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
}

# open_clip stores them as callables; keep plain format strings so they print and hash.
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in _OPENAI)

MASKCLIP_TEMPLATES: tuple[str, ...] = OPENAI_IMAGENET_TEMPLATES + (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
