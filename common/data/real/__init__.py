"""Loaders of the real benchmarks in CoOp's DATA layout (and DualCoOp's / mmseg's for multi-label and
segmentation sets). Importing this package registers every one of them; folder layouts are in
README.md beside this file and in each builder's docstring."""
from . import classification, imagenet, multilabel, segmentation  # noqa: F401  (registers the builders)
from ._layout import LAYOUTS, DatasetLayoutError, clean_classname
from .segmentation import IGNORE_INDEX, load_mask
from .templates import COOP_TEMPLATES, MASKCLIP_TEMPLATES, OPENAI_IMAGENET_TEMPLATES

REAL_DATASETS = tuple(LAYOUTS)

__all__ = ["COOP_TEMPLATES", "DatasetLayoutError", "IGNORE_INDEX", "LAYOUTS", "MASKCLIP_TEMPLATES",
           "OPENAI_IMAGENET_TEMPLATES", "REAL_DATASETS", "clean_classname", "load_mask"]
