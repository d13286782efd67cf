import json

import pytest

from common.data import (CorruptImageError, build_dataset, fewshot_split, load_image, read_split_json,
                         subsample_classes)
from common.data.splits import fewshot_file
from tests.fixtures.toy import TOY_CLASSES, write_toy


@pytest.fixture
def toy(tmp_path):
    write_toy(tmp_path)
    return build_dataset("toy", tmp_path)


def test_fewshot_is_k_per_class_seeded_and_cached(toy, tmp_path):
    a = fewshot_split(toy, 2, seed=1)
    assert len(a.train) == 2 * len(TOY_CLASSES) and len(a.val) == 2 * len(TOY_CLASSES)
    cache = fewshot_file(toy, 2, 1)
    assert cache.is_file() and cache.is_relative_to(tmp_path / "cache")
    assert fewshot_split(toy, 2, seed=1).train == a.train
    assert fewshot_split(toy, 2, seed=2).train != a.train
    # the file is what is reused: edit it and the edit is honoured
    raw = json.loads(cache.read_text())
    raw["train"] = raw["train"][::-1]
    cache.write_text(json.dumps(raw))
    assert fewshot_split(toy, 2, seed=1).train == a.train[::-1]
    assert len(fewshot_split(toy, 16, seed=1).val) == 3 * len(TOY_CLASSES)  # val min(K,4) capped by 3 available
    assert len(fewshot_split(toy, 8, seed=1).train) == 6 * len(TOY_CLASSES)  # Dassl: a short class keeps all


def test_base_novel_split_relabels(toy):
    base, new = subsample_classes(toy, "base"), subsample_classes(toy, "new")
    assert base.classnames == TOY_CLASSES[:2] and new.classnames == TOY_CLASSES[2:]
    assert {d.label for d in new.test} == {0, 1}
    assert all(new.classnames[d.label] == d.classname for d in new.test)
    with pytest.raises(ValueError, match="subsample"):
        subsample_classes(toy, "novel")


def test_split_errors_name_the_problem(tmp_path):
    folder = write_toy(tmp_path)
    with pytest.raises(FileNotFoundError, match="split file .* does not exist"):
        read_split_json(folder / "nope.json", folder / "images")
    victims = sorted((folder / "images").rglob("*.png"))[:3]
    for v in victims:
        v.unlink()
    with pytest.raises(FileNotFoundError, match="3 of 56 files listed in .* are missing"):
        build_dataset("toy", tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset 'toy': folder"):
        build_dataset("toy", tmp_path / "elsewhere")
    with pytest.raises(KeyError, match="unknown dataset 'nope'"):
        build_dataset("nope", tmp_path)


def test_corrupt_image_names_its_path(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(CorruptImageError, match="bad.png"):
        load_image(bad)


def test_fewshot_file_survives_a_moved_data_root(tmp_path):
    import shutil
    write_toy(tmp_path / "a")
    shots = fewshot_split(build_dataset("toy", tmp_path / "a"), 2, seed=3).train
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    moved = fewshot_split(build_dataset("toy", tmp_path / "b"), 2, seed=3).train
    assert [d.impath.replace("/b/", "/a/") for d in moved] == [d.impath for d in shots]


def test_subsample_records_class_subset(toy):
    new = subsample_classes(toy, "new")
    assert new.meta["class_subset"] == [2, 3] and "class_subset" not in toy.meta


def test_user_data_is_never_written_and_files_beside_it_are_still_read(tmp_path):
    import shutil
    folder = write_toy(tmp_path / "data")
    before = sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*"))
    toy = build_dataset("toy", tmp_path / "data")
    first = fewshot_split(toy, 2, seed=1)
    assert sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*")) == before  # read-only data stays usable
    # a file an earlier version wrote beside the dataset is read, not replaced
    beside = folder / "split_fewshot" / "shot_2-seed_1.json"
    beside.parent.mkdir()
    shutil.copy(fewshot_file(toy, 2, 1), beside)
    raw = json.loads(beside.read_text())
    raw["train"] = raw["train"][::-1]
    beside.write_text(json.dumps(raw))
    assert fewshot_file(toy, 2, 1) == beside and fewshot_split(toy, 2, seed=1).train == first.train[::-1]
    # an edited split file gets its own cached shots
    beside.unlink()
    edited = toy.with_splits(train=toy.train[1:])
    assert fewshot_file(edited, 2, 1) != fewshot_file(toy, 2, 1)


def test_project_data_keeps_its_few_shot_files_beside_its_images(tmp_path, toy):
    world = toy.with_splits()
    world.meta = {**toy.meta, "fewshot_dir": str(tmp_path / "toy" / "split_fewshot")}
    fewshot_split(world, 1, seed=1)
    assert (tmp_path / "toy" / "split_fewshot" / "shot_1-seed_1.json").is_file()


def test_short_classes_are_noted_and_reported(toy, capsys, monkeypatch):
    import common.data.splits as splits
    monkeypatch.setattr(splits, "_NOTED", set())  # the note is printed once per process and (dataset, K)
    fs = fewshot_split(toy, 16, seed=5)
    assert fs.meta["shots_used"] == {"min": 6, "max": 6, "classes_short": 4}
    assert "toy: 4 of 4 classes have fewer than 16 training images (as few as 6)" in capsys.readouterr().err
    assert "shots_used" not in fewshot_split(toy, 2, seed=5).meta
