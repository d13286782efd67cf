"""Data layer: dataset registry, CoOp-style splits, few-shot sampling, images and transforms."""
from .images import CorruptImageError, ImageListDataset, build_transform, load_image
from .registry import Dataset, Datum, build_dataset, dataset_dir, list_datasets, prompt_classnames, register_dataset
from .splits import (check_exists, classnames_from, fewshot_split, read_split_json, sample_per_class,
                     subsample_classes, write_split_json)

__all__ = [
    "CorruptImageError", "Dataset", "Datum", "ImageListDataset", "build_dataset", "build_transform", "check_exists",
    "classnames_from", "dataset_dir", "fewshot_split", "list_datasets", "load_image", "prompt_classnames",
    "read_split_json",
    "register_dataset", "sample_per_class", "subsample_classes", "write_split_json",
]
