"""Real classification loaders (CoOp's ten sets, ImageNet and its four shifted sets) on fixture trees."""
from pathlib import Path

import pytest

from common.data import build_dataset, dataset_dir, list_datasets, load_image, prompt_classnames, subsample_classes
from common.data.real import LAYOUTS, OPENAI_IMAGENET_TEMPLATES, DatasetLayoutError
from tests.fixtures.real_layouts import (CLASSIFICATION, IMAGENET_A_WNIDS, IMAGENET_CLASSES, IMAGENET_FAMILY,
                                         MAKERS, SPECS, make, make_eurosat, make_imagenet, make_imagenet_r)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("DATA")
    for name in CLASSIFICATION + IMAGENET_FAMILY:
        make(name, root)
    return root


def test_every_real_dataset_is_registered_and_has_a_fixture():
    assert set(LAYOUTS) <= set(list_datasets())
    assert set(LAYOUTS) == set(MAKERS)
    # CoOp's folder names, which differ from the registry names for some sets
    assert dataset_dir("caltech101", "/D") == Path("/D/caltech-101")
    assert dataset_dir("food101", "/D") == Path("/D/food-101")
    assert dataset_dir("imagenet_a", "/D") == Path("/D/imagenet-adversarial")
    assert dataset_dir("imagenet_r", "/D") == Path("/D/imagenet-rendition")
    assert dataset_dir("imagenet_sketch", "/D") == Path("/D/imagenet-sketch")


@pytest.mark.parametrize("name", CLASSIFICATION + IMAGENET_FAMILY)
def test_classes_sizes_and_template(data_root, name):
    ds = build_dataset(name, data_root)
    spec = SPECS[name]
    assert ds.classnames == spec["classnames"]  # cleaned as CoOp's prompts see them
    assert (len(ds.train), len(ds.val), len(ds.test)) == spec["sizes"]
    assert ds.template == spec["template"]
    assert ds.root == dataset_dir(name, data_root)
    for d in ds.train + ds.val + ds.test:
        assert ds.classnames[d.label] == d.classname and d.targets is None and d.mask is None
        assert Path(d.impath).is_file() and Path(d.impath).is_relative_to(ds.root)
    if name in CLASSIFICATION:  # every class in every split (label order = split file's labels)
        for split in (ds.train, ds.val, ds.test):
            assert sorted({d.label for d in split}) == list(range(ds.num_classes))
        assert ds.meta["split_file"] == str(data_root / spec["split_file"])
    load_image(ds.test[0].impath)  # the fixture images decode


def test_paths_follow_the_split_file(data_root):
    pets = build_dataset("oxford_pets", data_root)
    assert pets.train[0].impath == str(data_root / "oxford_pets" / "images" / "Abyssinian_1.jpg")
    cars = build_dataset("stanford_cars", data_root)  # CoOp's Cars split is relative to the dataset folder
    assert {Path(d.impath).parent.name for d in cars.train} == {"cars_train"}
    assert {Path(d.impath).parent.name for d in cars.test} == {"cars_test"}
    sun = build_dataset("sun397", data_root)
    d = next(d for d in sun.train if d.classname == "outdoor apartment building")
    assert d.impath.endswith("SUN397/a/apartment_building/outdoor/sun_b001.jpg")
    fgvc = build_dataset("fgvc_aircraft", data_root)
    assert fgvc.train[0].impath == str(data_root / "fgvc_aircraft" / "images" / "1000001.jpg")
    assert [d.classname for d in fgvc.test[::2]] == ["707-320", "A300B4", "Cessna 172", "F-16A/B"]


def test_eurosat_folder_names_are_mapped_as_coop(tmp_path):
    # a split file that still carries the folder names gets CoOp's NEW_CNAMES
    ds = build_dataset("eurosat", make_eurosat(tmp_path, raw_names=True))
    assert ds.classnames == ["Annual Crop Land", "Forest", "Highway or Road", "Sea or Lake"]
    assert ds.train[0].impath.endswith("2750/AnnualCrop/AnnualCrop_1.jpg")


def test_raw_classnames_are_kept_for_methods_that_format_them_verbatim(data_root, tmp_path):
    """`classnames` stay CoOp-cleaned (every other method's input, unchanged); the split file's own spelling
    (after CoOp's renames) is `meta["raw_classnames"]`, given by prompt_classnames(clean=False)."""
    pets = build_dataset("oxford_pets", data_root)
    assert pets.classnames == ["abyssinian", "american bulldog", "great pyrenees", "yorkshire terrier"]
    assert prompt_classnames(pets) == pets.classnames
    assert prompt_classnames(pets, clean=False) == ["abyssinian", "american_bulldog", "great_pyrenees",
                                                    "yorkshire_terrier"]
    caltech = build_dataset("caltech101", data_root)   # renamed folders are raw too ("Faces" -> "face")
    assert prompt_classnames(caltech, clean=False) == ["accordion", "airplane", "dollar_bill", "face"]
    eurosat = build_dataset("eurosat", make_eurosat(tmp_path, raw_names=True))
    assert prompt_classnames(eurosat, clean=False) == eurosat.classnames   # NEW_CNAMES have no underscores
    new = subsample_classes(pets, "new")                                    # the per-class list follows a subset
    assert prompt_classnames(new, clean=False) == ["great_pyrenees", "yorkshire_terrier"]
    assert prompt_classnames(build_dataset("imagenet", data_root), clean=False) == \
        build_dataset("imagenet", data_root).classnames                    # CLIP's names: nothing to keep


def test_coop_templates_and_ensembles(data_root):
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 and len(set(OPENAI_IMAGENET_TEMPLATES)) == 80
    assert OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and "itap of a {}." in OPENAI_IMAGENET_TEMPLATES
    for name in IMAGENET_FAMILY:
        assert build_dataset(name, data_root).meta["templates"] == OPENAI_IMAGENET_TEMPLATES
    for name in CLASSIFICATION:
        assert "templates" not in build_dataset(name, data_root).meta


def test_imagenet_keeps_clip_names_and_leaves_val_empty(data_root):
    ds = build_dataset("imagenet", data_root)
    assert ds.classnames.count("missile") == 2  # CLIP's names, duplicates included
    assert ds.val == []  # CoOp evaluates on val (= its test); nothing may select on it here
    assert ds.meta["wnids"] == [w for w, _ in IMAGENET_CLASSES]
    assert ds.meta["imagenet_indices"] == list(range(6))
    assert {Path(d.impath).parent.name for d in ds.test if d.label == 3} == {"n01491361"}


def test_imagenetv2_folder_number_is_the_imagenet_label(data_root):
    ds = build_dataset("imagenetv2", data_root)
    for d in ds.test:
        assert int(Path(d.impath).parent.name) == d.label
    assert {d.classname for d in ds.test if d.label == 3} == {"tiger shark"}
    assert ds.train == [] and ds.val == []  # test-only


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_200_class_subsets_are_reindexed(data_root, name):
    ds = build_dataset(name, data_root)
    spec = SPECS[name]
    assert sorted({d.label for d in ds.test}) == list(range(len(spec["classnames"])))
    assert ds.meta["imagenet_indices"] == spec["imagenet_indices"]
    full = [c for _, c in IMAGENET_CLASSES]
    assert [full[i] for i in ds.meta["imagenet_indices"]] == ds.classnames
    assert ds.train == [] and ds.val == []
    if name == "imagenet_a":
        assert ds.meta["wnids"] == IMAGENET_A_WNIDS  # README.txt beside the folders is not a class


def test_shifted_set_falls_back_to_imagenet_classnames(tmp_path):
    make_imagenet(tmp_path)
    make_imagenet_r(tmp_path, copy_classnames=False)
    assert build_dataset("imagenet_r", tmp_path).classnames == SPECS["imagenet_r"]["classnames"]
    (tmp_path / "imagenet" / "classnames.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"classnames.txt not found at .*imagenet-rendition"):
        build_dataset("imagenet_r", tmp_path)


def test_imagenet_layout_errors(tmp_path):
    root = make_imagenet(tmp_path)
    val = root / "imagenet" / "images" / "val"
    wnid = IMAGENET_CLASSES[0][0]
    for f in (val / wnid).iterdir():  # flat val (the official download) is not the layout
        f.rename(val / f.name)
    (val / wnid).rmdir()
    with pytest.raises(DatasetLayoutError, match=r"has 5 class folders but .*train has 6"):
        build_dataset("imagenet", root)
    other = make_imagenet(tmp_path / "b")
    (other / "imagenet" / "classnames.txt").write_text("n01440764 tench\n")
    with pytest.raises(ValueError, match=r"5 class folders in .* are not in classnames.txt"):
        build_dataset("imagenet", other)
    (other / "imagenet" / "classnames.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"class list .*classnames.txt does not exist"):
        build_dataset("imagenet", other)


def test_fgvc_reads_its_own_variant_files(tmp_path):
    root = make(name="fgvc_aircraft", data_root=tmp_path)
    d = root / "fgvc_aircraft"
    with open(d / "images_variant_test.txt", "a") as f:
        f.write("1000099 Boeing 747-X\n")
    with pytest.raises(ValueError, match=r"images_variant_test.txt line 9: variant 'Boeing 747-X'"):
        build_dataset("fgvc_aircraft", root)
    (d / "variants.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"class list .*variants.txt does not exist"):
        build_dataset("fgvc_aircraft", root)
