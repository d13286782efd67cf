"""Multi-label (VOC2007, COCO-2014 as DualCoOp reads them) and segmentation (mmseg layouts) loaders."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import CorruptImageError, build_dataset
from common.data.real import IGNORE_INDEX, MASKCLIP_TEMPLATES, OPENAI_IMAGENET_TEMPLATES, DatasetLayoutError, load_mask
from tests.fixtures.real_layouts import (COCO_EXPECTED, SEGMENTATION, SPECS, VOC_OBJECTS, VOC_TARGETS, VOC_TEST,
                                         VOC_TRAINVAL, coco_file, make, make_voc2012_seg, seg_values,
                                         write_image)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("DATA")
    for name in ["voc2007", "coco2014"] + SEGMENTATION:
        make(name, root)
    return root


def test_voc2007_targets_skip_difficult(data_root):
    ds = build_dataset("voc2007", data_root)
    assert ds.classnames == SPECS["voc2007"]["classnames"] and ds.val == []
    assert [Path(d.impath).stem for d in ds.train] == VOC_TRAINVAL
    assert [Path(d.impath).stem for d in ds.test] == VOC_TEST
    for d in ds.train + ds.test:
        t = VOC_TARGETS[Path(d.impath).stem]
        assert d.targets == t
        assert d.label == (t[0] if t else -1) and d.classname == (ds.classnames[t[0]] if t else "")
    assert ds.meta["multilabel"] is True
    assert ds.meta["clean_classnames"][10] == "dining table" and ds.meta["clean_classnames"][19] == "tv monitor"


def test_voc2007_errors(tmp_path):
    root = make("voc2007", tmp_path)
    voc = root / "VOCdevkit" / "VOC2007"
    good = (voc / "Annotations" / "000003.xml").read_text()
    (voc / "Annotations" / "000003.xml").write_text(
        "<annotation><object><name>unicorn</name><difficult>0</difficult></object></annotation>")
    with pytest.raises(ValueError, match=r"000003.xml: unknown class 'unicorn'"):
        build_dataset("voc2007", root)
    (voc / "Annotations" / "000003.xml").write_text(good)
    (voc / "Annotations" / "000004.xml").write_text("<annotation><object>")
    (voc / "JPEGImages" / "000008.jpg").unlink()  # layout problems are reported before any parsing
    with pytest.raises(DatasetLayoutError, match=r"1 of 8 files listed in .*test.txt are missing"):
        build_dataset("voc2007", root)
    write_image(voc / "JPEGImages" / "000008.jpg")
    with pytest.raises(ValueError, match=r"cannot parse VOC annotation .*000004.xml"):
        build_dataset("voc2007", root)
    (voc / "ImageSets" / "Main" / "trainval.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"split file .*trainval.txt does not exist"):
        build_dataset("voc2007", root)


def test_coco2014_targets_and_order(data_root):
    ds = build_dataset("coco2014", data_root)
    assert ds.classnames == ["person", "bicycle", "car", "dog", "toothbrush"]  # by category id, not file order
    for split, folder in (("train", "train2014"), ("test", "val2014")):
        items = ds.split(split)
        assert [d.impath for d in items] == [str(data_root / "mscoco_2014" / folder / coco_file(folder, i))
                                            for i, _ in COCO_EXPECTED[split]]  # unannotated image 34 left out
        assert [d.targets for d in items] == [t for _, t in COCO_EXPECTED[split]]
        assert [d.label for d in items] == [t[0] for _, t in COCO_EXPECTED[split]]


def test_coco2014_errors(tmp_path):
    root = make("coco2014", tmp_path)
    coco = root / "mscoco_2014"
    (coco / "val2014" / coco_file("val2014", 73)).unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of 2 files listed in .*instances_val2014.json are missing"):
        build_dataset("coco2014", root)
    (coco / "annotations" / "instances_val2014.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"instances_val2014.json is not valid JSON"):
        build_dataset("coco2014", root)
    (coco / "annotations" / "instances_train2014.json").unlink()
    with pytest.raises(DatasetLayoutError, match=r"annotation file .*instances_train2014.json does not exist"):
        build_dataset("coco2014", root)


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_sets(data_root, name):
    ds = build_dataset(name, data_root)
    spec = SPECS[name]
    assert ds.num_classes == spec["num_classes"]
    assert ds.classnames[0] == spec["first"] and ds.classnames[-1] == spec["last"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == spec["sizes"]
    assert ds.meta["ignore_index"] == IGNORE_INDEX == 255 and ds.meta["reduce_zero_label"] is True
    assert ds.meta["templates"] == MASKCLIP_TEMPLATES and len(MASKCLIP_TEMPLATES) == 85
    assert MASKCLIP_TEMPLATES[:80] == OPENAI_IMAGENET_TEMPLATES and "there is a {} in the scene." in MASKCLIP_TEMPLATES
    for d in ds.train + ds.test:
        assert d.label == -1 and Path(d.mask).is_file() and Path(d.impath).stem == Path(d.mask).stem
        m = load_mask(d.mask, reduce_zero_label=True)
        assert m.shape == Image.open(d.impath).size[::-1]
        assert m.dtype == np.int64 and set(np.unique(m)) <= set(range(ds.num_classes)) | {255}


def test_load_mask_reduces_zero_label_as_mmseg(data_root):
    ds = build_dataset("ade20k", data_root)
    raw = load_mask(ds.train[0].mask)
    assert np.array_equal(raw, seg_values(1, 150))  # stored values read back unchanged
    m = load_mask(ds.train[0].mask, reduce_zero_label=True)
    assert (m[0, 1:] == 255).all()           # raw 0 ("other") -> ignored
    assert (m[-1, 1:] == 149).all()          # raw 150 -> last class
    assert (m[:, 0] == 255).all()            # raw 255 stays ignored
    assert (m[1:-1, 1:] == 1).all()          # raw 2 -> class 1 ("building")


def test_voc_palette_masks_read_as_indices(data_root):
    ds = build_dataset("voc2012_seg", data_root)
    d = ds.test[0]
    assert Image.open(d.mask).mode == "P"
    assert np.array_equal(load_mask(d.mask), seg_values(1, 20))  # indices, not palette colours
    assert ds.classnames[19] == "tv monitor"
    aug = [d for d in ds.train if "SegmentationClassAug" in d.mask]
    assert len(aug) == 2


def test_voc2012_without_aug(tmp_path):
    ds = build_dataset("voc2012_seg", make_voc2012_seg(tmp_path, aug=False))
    assert len(ds.train) == 3 and all("SegmentationClassAug" not in d.mask for d in ds.train)


def test_segmentation_errors(tmp_path):
    root = make("ade20k", tmp_path)
    ade = root / "ade" / "ADEChallengeData2016"
    bad = ade / "annotations" / "validation" / "ADE_val_00000001.png"
    bad.write_bytes(b"\x89PNG not a png")
    with pytest.raises(CorruptImageError, match="ADE_val_00000001.png"):
        load_mask(bad)
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4)).save(rgb)
    with pytest.raises(CorruptImageError, match=r"rgb.png has mode RGB"):
        load_mask(rgb)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_mask(tmp_path / "nope.png")
    (ade / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of 6 files listed in .*images/training .* are missing"):
        build_dataset("ade20k", root)
    ctx = make("pascal_context", tmp_path / "b") / "VOCdevkit" / "VOC2010"
    (ctx / "ImageSets" / "SegmentationContext" / "val.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"split file .*SegmentationContext/val.txt does not exist"):
        build_dataset("pascal_context", tmp_path / "b")


def test_voc_objects_fixture_matches_expected_targets():
    # guard on the fixture itself: every image has an entry and only listed classes appear
    assert set(VOC_OBJECTS) == set(VOC_TARGETS) == set(VOC_TRAINVAL) | set(VOC_TEST)
