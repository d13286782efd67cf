"""Clear build-time errors of the real loaders: missing folder, split file, listed files, corrupt images."""
import json
import re
from pathlib import Path

import pytest

from common.data import CorruptImageError, ImageListDataset, build_dataset, build_transform, load_image
from common.data.real import LAYOUTS, DatasetLayoutError
from tests.fixtures.real_layouts import CLASSIFICATION, SPECS, make

SPLIT_ZHOU = [n for n in CLASSIFICATION if n != "fgvc_aircraft"]
README = Path(__file__).resolve().parents[2] / "common" / "data" / "real" / "README.md"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_missing_folder_points_to_the_layout(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=r"dataset '%s': folder .* does not exist" % name):
        build_dataset(name, tmp_path)
    # the registry's message points to the builder's docstring, which carries the layout
    from common.data.registry import _BUILDERS
    subdir, layout = LAYOUTS[name]
    assert layout in _BUILDERS[name].__doc__ and subdir.split("/")[-1] in layout


@pytest.mark.parametrize("name", SPLIT_ZHOU)
def test_empty_folder_names_split_file_and_layout(tmp_path, name):
    root = make(name, tmp_path)
    split = tmp_path / SPECS[name]["split_file"]
    split.unlink()
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset(name, root)
    msg = str(err.value)
    assert f"split file {split} does not exist" in msg
    assert "Expected layout" in msg and split.name in msg and "README.md" in msg


@pytest.mark.parametrize("name", SPLIT_ZHOU)
def test_files_listed_but_absent_are_counted_at_build_time(tmp_path, name):
    root = make(name, tmp_path)
    split = tmp_path / SPECS[name]["split_file"]
    ds = build_dataset(name, root)
    gone = [ds.test[0].impath, ds.train[-1].impath]
    for p in gone:
        Path(p).unlink()
    total = sum(SPECS[name]["sizes"])
    with pytest.raises(DatasetLayoutError, match=re.escape(f"2 of {total} files listed in {split} are missing")) as err:
        build_dataset(name, root)
    assert all(p in str(err.value) for p in gone)


def test_missing_image_folder_and_bad_split_json(tmp_path):
    root = make("dtd", tmp_path)
    split = root / "dtd" / "split_zhou_DescribableTextures.json"
    raw = json.loads(split.read_text())
    raw["val"][0] = ["banded/x.jpg", 0]
    split.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"dataset 'dtd': .* is not \[relpath, label, classname\]"):
        build_dataset("dtd", root)
    split.write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        build_dataset("dtd", root)
    (root / "dtd" / "images").rename(root / "dtd" / "imgs")
    with pytest.raises(DatasetLayoutError, match=r"image folder .*dtd/images does not exist"):
        build_dataset("dtd", root)


def test_inconsistent_labels_in_split_file(tmp_path):
    root = make("caltech101", tmp_path)
    split = root / "caltech-101" / "split_zhou_Caltech101.json"
    raw = json.loads(split.read_text())
    raw["test"][0][2] = "accordeon"
    split.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="label 0 has two class names"):
        build_dataset("caltech101", root)


def test_corrupt_image_is_reported_with_its_path(tmp_path):
    ds = build_dataset("oxford_pets", make("oxford_pets", tmp_path))
    victim = ds.train[2]
    Path(victim.impath).write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.raises(CorruptImageError, match=re.escape(victim.impath)):
        load_image(victim.impath)
    loader = ImageListDataset(ds.train, build_transform("test", 8))
    loader[0]  # intact images load
    with pytest.raises(CorruptImageError, match=re.escape(victim.impath)):
        loader[2]


def test_readme_documents_every_real_dataset():
    text = README.read_text()
    for name, (subdir, _) in LAYOUTS.items():
        assert f"`{name}`" in text, name
        assert subdir in text, subdir
