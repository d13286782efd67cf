"""The CuPL / VCD descriptor-file loader: format errors, by-name class matching, aliases, file lookup; and the
authors' published files (../shared/descriptors, when present) against the real datasets' class names."""
import json
from pathlib import Path

import pytest

from common.data.descriptors import (ALIASES, AUTHOR_FILES, derangement, descriptor_path, load_class_texts,
                                     match_classes, name_key, read_descriptor_file)
from common.errors import ConfigError, InvalidDataError, MissingDataError, UserError
from common.paths import REPO_ROOT
from tests.fixtures import real_layouts as rl

SHARED = REPO_ROOT.parent / "shared" / "descriptors"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the authors' files are not at {SHARED}")


def write(tmp_path, data, name="d.json") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_read_errors_name_the_problem(tmp_path):
    with pytest.raises(MissingDataError, match="does not exist"):
        read_descriptor_file(tmp_path / "nope.json", "vcd")
    with pytest.raises(InvalidDataError, match=r"not valid JSON \(line 1, column"):
        read_descriptor_file(write(tmp_path, '{"a": ["x"],}'), "vcd")
    with pytest.raises(InvalidDataError, match="JSON list, not an object"):
        read_descriptor_file(write(tmp_path, ["a"]), "cupl")
    with pytest.raises(InvalidDataError, match="empty JSON object"):
        read_descriptor_file(write(tmp_path, {}), "cupl")
    with pytest.raises(InvalidDataError, match="not a list of strings.*'b'"):
        read_descriptor_file(write(tmp_path, {"a": ["x"], "b": "y"}), "vcd")
    with pytest.raises(InvalidDataError, match="not a list of strings"):
        read_descriptor_file(write(tmp_path, {"a": ["x", 3]}), "vcd")
    assert list(read_descriptor_file(write(tmp_path, {"b": ["1"], "a": ["2", "3"]}), "vcd")) == ["b", "a"]
    with pytest.raises(ValueError, match="kind"):
        read_descriptor_file(write(tmp_path, {"a": ["x"]}), "clip")


def test_match_by_name_ignores_case_underscores_hyphens_and_order():
    data = {"Hard_Leaved  orchid": ["h"], "sweet pea": ["s1", "s2"], "Abyssinian": ["a"]}
    ct = match_classes(data, ["abyssinian", "sweet-pea", "hard-leaved orchid"], kind="cupl")
    assert ct.keys == ["Abyssinian", "sweet pea", "Hard_Leaved  orchid"]
    assert ct.texts == [["a"], ["s1", "s2"], ["h"]] and ct.counts == [1, 2, 1] and ct.unused == []
    assert name_key(" Sea_or-Lake ") == "sea or lake"


def test_missing_classes_are_named_with_the_closest_unused_key():
    data = {"tench": ["a"], "goldfsh": ["b"], "background": ["c"]}
    with pytest.raises(InvalidDataError, match=r"lacks 1 of the 2 classes: 'goldfish' \(closest unused key: "
                                                r"'goldfsh'\).*aliases"):
        match_classes(data, ["tench", "goldfish"], kind="vcd", path="f.json", dataset="imagenet")


def test_unknown_keys_error_only_when_strict():
    data = {"a": ["x"], "b": ["y"], "background": ["z"]}
    ct = match_classes(data, ["a", "b"], kind="cupl")
    assert ct.unused == ["background"]
    with pytest.raises(InvalidDataError, match=r"1 key\(s\) that name no class.*background"):
        match_classes(data, ["a", "b"], kind="cupl", strict=True)


def test_empty_lists_error_unless_allowed():
    data = {"donuts": [], "pizza": ["round"]}
    with pytest.raises(InvalidDataError, match=r"empty list: \['donuts'\]"):
        match_classes(data, ["donuts", "pizza"], kind="vcd")
    ct = match_classes(data, ["donuts", "pizza"], kind="vcd", allow_empty=True)
    assert ct.empty == ["donuts"] and ct.texts[0] == []


def test_aliases_builtin_and_user_and_their_errors():
    data = {"off-center face": ["f"], "accordion": ["a"]}
    ct = match_classes(data, ["face", "accordion"], kind="cupl", dataset="caltech101")   # built-in alias
    assert ct.keys == ["off-center face", "accordion"]
    # a file that uses our name directly wins over the built-in alias
    assert match_classes({"face": ["x"], "accordion": ["a"]}, ["face", "accordion"], kind="cupl",
                         dataset="caltech101").keys == ["face", "accordion"]
    ct = match_classes({"kitty": ["k"]}, ["cat"], kind="vcd", aliases={"cat": "kitty"})
    assert ct.keys == ["kitty"]
    with pytest.raises(ConfigError, match=r"unknown class\(es\) \['dog'\]"):
        match_classes({"kitty": ["k"]}, ["cat"], kind="vcd", aliases={"dog": "kitty"})
    with pytest.raises(ConfigError, match=r"key\(s\) \['puss'\]"):
        match_classes({"kitty": ["k"]}, ["cat"], kind="vcd", aliases={"cat": "puss"})
    with pytest.raises(InvalidDataError, match="several keys"):
        match_classes({"Cat": ["a"], "cat": ["b"]}, ["cat"], kind="vcd")


def test_repeated_class_names_use_position_when_the_file_lists_one_key_per_class():
    data = {"tench": ["t"], "missile": ["m"], "projectile": ["p"]}
    ct = match_classes(data, ["tench", "missile", "missile"], kind="vcd")
    assert ct.keys == ["tench", "missile", "projectile"] and len(ct.notes) == 2
    ct = match_classes({**data, "extra": ["e"]}, ["tench", "missile", "missile"], kind="vcd")
    assert ct.keys == ["tench", "missile", "missile"] and "repeats" in ct.notes[0]


def test_descriptor_path_auto_file_and_folder(tmp_path):
    shipped = write(tmp_path, {"a": ["x"]}, "descriptors_vcd.json")
    assert descriptor_path("auto", "vcd", "emb_x", {"descriptors": {"vcd": str(shipped)}}) == shipped
    with pytest.raises(ConfigError, match="ships no vcd descriptor file"):
        descriptor_path("auto", "vcd", "dtd", {})
    with pytest.raises(ConfigError, match="--set descriptors="):
        descriptor_path("", "cupl", "dtd")
    assert descriptor_path(str(shipped), "vcd", "anything") == shipped
    with pytest.raises(MissingDataError, match="does not exist"):
        descriptor_path(str(tmp_path / "x.json"), "vcd", "dtd")
    folder = tmp_path / "CuPL" / "all_prompts" / "full_prompts"
    folder.mkdir(parents=True)
    f = write(folder, {"banded": ["s"]}, "texture_prompts_full.json")
    assert descriptor_path(str(tmp_path / "CuPL"), "cupl", "dtd") == f        # found below the folder
    with pytest.raises(MissingDataError, match="cars_prompts_full.json not found"):
        descriptor_path(str(tmp_path / "CuPL"), "cupl", "stanford_cars")
    with pytest.raises(ConfigError, match="published no cupl file for dataset eurosat"):
        descriptor_path(str(tmp_path / "CuPL"), "cupl", "eurosat")


def test_load_records_digest_and_every_error_is_a_user_error(tmp_path):
    p = write(tmp_path, {"a": ["x"], "b": ["y", "z"]})
    ct = load_class_texts(p, "cupl", ["b", "a"])
    assert ct.texts == [["y", "z"], ["x"]] and len(ct.digest) == 16
    for bad in ('{"a": [', '{"a": ["x"]}'):
        with pytest.raises(UserError):
            load_class_texts(write(tmp_path, bad, "bad.json"), "cupl", ["a", "b"])


def test_derangement_has_no_fixed_point_and_is_deterministic():
    for n in (2, 3, 10, 51):
        p = derangement(n, 0)
        assert sorted(p) == list(range(n)) and all(i != j for i, j in enumerate(p))
        assert p == derangement(n, 0)
    assert derangement(10, 0) != derangement(10, 1)
    with pytest.raises(ValueError):
        derangement(1, 0)


# ------------------------------------------------------------------ the authors' files (never committed)
@needs_shared
def test_every_published_file_reads():
    files = sorted(SHARED.glob("*/*.json"))
    assert files
    for f in files:
        data = read_descriptor_file(f, f.parent.name)
        assert len(data) >= 10 and all(isinstance(t, str) for v in data.values() for t in v)


@needs_shared
@pytest.mark.parametrize("kind,dataset", [(k, d) for k in AUTHOR_FILES for d in AUTHOR_FILES[k]
                                          if d in rl.SPECS])
def test_published_files_match_the_real_loaders_class_names(kind, dataset):
    """The class names our real loaders produce (fixture trees mirror CoOp's names) are found in the authors'
    files by name, the built-in aliases included (Caltech's face, EuroSAT's renamings)."""
    path = SHARED / kind / AUTHOR_FILES[kind][dataset]
    if not path.is_file():
        pytest.skip(f"{path.name} is not among the shared copies")
    names = rl.SPECS[dataset]["classnames"]
    ct = load_class_texts(path, kind, names, dataset=dataset, allow_empty=True)
    assert len(ct.keys) == len(names) and all(ct.texts[i] for i in range(len(names)))
    for c, k in zip(names, ct.keys):
        assert name_key(c) == name_key(k) or name_key(c) in {name_key(a) for a in ALIASES[kind].get(dataset, {})}


@needs_shared
def test_published_dtd_and_pets_files_agree_with_each_other():
    """Both papers' DTD and Pets files name the same 47 / 37 classes (so one loader serves both formats)."""
    for cupl, vcd, n in (("texture_prompts_full.json", "descriptors_dtd.json", 47),
                         ("pets_prompts_full.json", "descriptors_pets.json", 37)):
        a = read_descriptor_file(SHARED / "cupl" / cupl, "cupl")
        b = read_descriptor_file(SHARED / "vcd" / vcd, "vcd")
        ct = match_classes(b, list(a), kind="vcd", strict=True)
        assert len(ct.keys) == n


@needs_shared
def test_published_vcd_imagenet_resolves_clips_repeated_names_by_position():
    data = read_descriptor_file(SHARED / "vcd" / "descriptors_imagenet.json", "vcd")
    names = list(data)
    names[744] = "missile"          # CLIP's ImageNet names (CoOp's classnames.txt) repeat "missile"
    ct = match_classes(data, names, kind="vcd", strict=True)
    assert ct.keys[657] == "missile" and ct.keys[744] == "projectile"
    food = read_descriptor_file(SHARED / "vcd" / "descriptors_food101.json", "vcd")
    with pytest.raises(InvalidDataError, match="empty list"):   # 5 empty lists in the released Food-101 file
        match_classes(food, list(food), kind="vcd")
