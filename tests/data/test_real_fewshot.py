import os
"""CoOp's few-shot protocol and CoCoOp's base/novel split on the real loaders' fixture trees."""
import json
import math
from pathlib import Path

import pytest

import common.data.splits as splits
from common.data import build_dataset, fewshot_split, subsample_classes
from tests.fixtures.real_layouts import COUNTS, make


def _rel(items, root):
    return [str(Path(d.impath).relative_to(root)) for d in items]


@pytest.mark.parametrize("name", ["oxford_pets", "fgvc_aircraft", "ucf101"])
def test_k_shots_per_class_val_min_k_4(tmp_path, name):
    ds = build_dataset(name, make(name, tmp_path))
    for k in (1, 2):
        fs = fewshot_split(ds, k, seed=1)
        for label in range(ds.num_classes):
            assert sum(d.label == label for d in fs.train) == k
            assert sum(d.label == label for d in fs.val) == min(k, 4)
        assert set(d.impath for d in fs.train) <= set(d.impath for d in ds.train)
        assert set(d.impath for d in fs.val) <= set(d.impath for d in ds.val)
        assert fs.test == ds.test
    # K above what a class has: Dassl keeps every image of a short class (val has 2 per class here)
    fs = fewshot_split(ds, 16, seed=1)
    assert len(fs.train) == COUNTS[0] * ds.num_classes and len(fs.val) == COUNTS[1] * ds.num_classes


def test_seeds_are_deterministic_across_trees(tmp_path, monkeypatch):
    # two separate copies of the dataset, each with its own cache, draw the same shots per seed
    a = build_dataset("dtd", make("dtd", tmp_path / "a"))
    b = build_dataset("dtd", make("dtd", tmp_path / "b"))
    draws = {}
    for seed in (1, 2, 3):
        monkeypatch.setenv("VLMT_CACHE", str(tmp_path / "cache_a"))
        fa = fewshot_split(a, 1, seed)
        assert splits.fewshot_file(a, 1, seed).is_file()
        monkeypatch.setenv("VLMT_CACHE", str(tmp_path / "cache_b"))
        fb = fewshot_split(b, 1, seed)
        assert _rel(fa.train, a.root) == _rel(fb.train, b.root)
        assert _rel(fa.val, a.root) == _rel(fb.val, b.root)
        draws[seed] = tuple(_rel(fa.train, a.root))
    assert len(set(draws.values())) > 1  # the seed matters
    assert not (a.root / "split_fewshot").exists()  # the user's data folder is not written


def test_rerun_reuses_the_cached_file(tmp_path, monkeypatch):
    ds = build_dataset("food101", make("food101", tmp_path))
    first = fewshot_split(ds, 2, seed=3)
    cache = splits.fewshot_file(ds, 2, 3)  # in the project's cache, keyed by the split file's content
    assert cache.is_file() and not cache.is_relative_to(tmp_path / "food-101")
    rel = lambda items: [os.path.relpath(d.impath, first.root) for d in items]  # noqa: E731
    assert json.loads(cache.read_text()) == {"train": rel(first.train), "val": rel(first.val)}

    def no_sampling(*args, **kwargs):
        raise AssertionError("a rerun must read the cached shots, not sample again")

    monkeypatch.setattr(splits, "sample_per_class", no_sampling)
    again = fewshot_split(build_dataset("food101", tmp_path), 2, seed=3)
    assert again.train == first.train and again.val == first.val
    with pytest.raises(AssertionError, match="cached shots"):
        fewshot_split(ds, 2, seed=4)  # a new seed does sample


def test_imagenet_fewshot_draws_from_train_only(tmp_path):
    ds = build_dataset("imagenet", make("imagenet", tmp_path))
    fs = fewshot_split(ds, 2, seed=1)
    assert len(fs.train) == 2 * ds.num_classes and fs.val == [] and fs.test == ds.test


@pytest.mark.parametrize("name", ["eurosat", "imagenet"])
def test_base_novel_after_fewshot(tmp_path, name):
    ds = build_dataset(name, make(name, tmp_path))
    fs = fewshot_split(ds, 2, seed=1)
    m = math.ceil(ds.num_classes / 2)
    base, new = subsample_classes(fs, "base"), subsample_classes(fs, "new")
    assert base.classnames == ds.classnames[:m] and new.classnames == ds.classnames[m:]
    assert len(base.train) == 2 * m and len(new.train) == 2 * (ds.num_classes - m)
    assert len(base.test) + len(new.test) == len(ds.test)
    for part, offset in ((base, 0), (new, m)):
        for d in part.train + part.val + part.test:
            assert part.classnames[d.label] == d.classname == ds.classnames[d.label + offset]
    assert base.meta.get("templates") == ds.meta.get("templates")  # the ensemble travels with the subset
