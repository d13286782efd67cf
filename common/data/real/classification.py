"""The ten CoOp few-shot classification sets, read from CoOp's DATA layout and official split files.

Nine read CoOp's `split_zhou_*.json` (train/val/test with [relpath, label, classname]); FGVC-Aircraft
reads the dataset's own `images_variant_{train,val,test}.txt` and `variants.txt`, as CoOp does. Class
names are cleaned as CoOp's prompts see them (underscores -> spaces); EuroSAT and Caltech101 apply
CoOp's renaming if a split file still carries the folder names. The names as the files spell them (after
that renaming) are kept in `meta["raw_classnames"]` for methods whose official code formats them verbatim
(`common.data.prompt_classnames`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ...errors import InvalidDataError
from ..registry import Dataset, Datum
from ..splits import classnames_from, read_split_json
from ._layout import (DatasetLayoutError, check_listed, clean_classname, layout_help, need_dir, need_file,
                      read_lines, real_dataset)
from .templates import COOP_TEMPLATES

# CoOp's datasets/eurosat.py NEW_CNAMES (folder name -> prompt name).
EUROSAT_CLASSNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
# CoOp's datasets/caltech101.py NEW_CNAMES; BACKGROUND_Google and Faces_easy are not in its split.
CALTECH101_CLASSNAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


def read_coop_split(name: str, root: Path, image_dir: Path, split_file: str,
                    rename: dict[str, str] | None = None, **meta) -> Dataset:
    """A Dataset from a CoOp split file, every listed image checked at build time."""
    split_path = need_file(root / split_file, name, "split file")
    need_dir(image_dir, name, "image folder")
    try:
        splits = read_split_json(split_path, image_dir, check_files=False)
    except ValueError as err:
        raise InvalidDataError(f"dataset {name!r}: {err}") from err
    check_listed([d.impath for s in splits.values() for d in s], name, split_path)
    rename = rename or {}
    raw_of: dict[int, str] = {}   # label -> the name as the split file spells it (after CoOp's renaming)
    for key, items in splits.items():
        for d in items:
            raw_of.setdefault(d.label, rename.get(d.classname, d.classname))
        splits[key] = [replace(d, classname=clean_classname(rename.get(d.classname, d.classname))) for d in items]
    try:
        classnames = classnames_from(splits["train"] + splits["val"] + splits["test"])
    except ValueError as err:
        raise InvalidDataError(f"dataset {name!r}: split file {split_path}: {err}") from err
    raw = [raw_of[i] for i in range(len(classnames))]
    return Dataset(name=name, classnames=classnames, template=COOP_TEMPLATES[name], train=splits["train"],
                   val=splits["val"], test=splits["test"],
                   meta={"split_file": str(split_path), "raw_classnames": raw, **meta})


@real_dataset("caltech101", "caltech-101", """
caltech-101/
  101_ObjectCategories/<class>/image_XXXX.jpg
  split_zhou_Caltech101.json
""")
def build_caltech101(root: Path) -> Dataset:
    """Caltech101 (CoOp split; BACKGROUND_Google and Faces_easy excluded by the split)."""
    return read_coop_split("caltech101", root, root / "101_ObjectCategories", "split_zhou_Caltech101.json",
                           rename=CALTECH101_CLASSNAMES)


@real_dataset("oxford_pets", "oxford_pets", """
oxford_pets/
  images/<Breed>_<n>.jpg
  annotations/            (only needed to regenerate the split)
  split_zhou_OxfordPets.json
""")
def build_oxford_pets(root: Path) -> Dataset:
    """Oxford-IIIT Pets (CoOp split)."""
    return read_coop_split("oxford_pets", root, root / "images", "split_zhou_OxfordPets.json")


@real_dataset("stanford_cars", "stanford_cars", """
stanford_cars/
  cars_train/XXXXX.jpg
  cars_test/XXXXX.jpg
  devkit/ , cars_test_annos_withlabels.mat   (only needed to regenerate the split)
  split_zhou_StanfordCars.json               (paths relative to stanford_cars/)
""")
def build_stanford_cars(root: Path) -> Dataset:
    """Stanford Cars (CoOp split; its paths start with cars_train/ or cars_test/)."""
    for sub in ("cars_train", "cars_test"):
        need_dir(root / sub, "stanford_cars", "image folder")
    return read_coop_split("stanford_cars", root, root, "split_zhou_StanfordCars.json")


@real_dataset("oxford_flowers", "oxford_flowers", """
oxford_flowers/
  jpg/image_XXXXX.jpg
  imagelabels.mat , cat_to_name.json   (only needed to regenerate the split)
  split_zhou_OxfordFlowers.json
""")
def build_oxford_flowers(root: Path) -> Dataset:
    """Oxford Flowers102 (CoOp split)."""
    return read_coop_split("oxford_flowers", root, root / "jpg", "split_zhou_OxfordFlowers.json")


@real_dataset("food101", "food-101", """
food-101/
  images/<class>/<id>.jpg
  split_zhou_Food101.json
""")
def build_food101(root: Path) -> Dataset:
    """Food-101 (CoOp split)."""
    return read_coop_split("food101", root, root / "images", "split_zhou_Food101.json")


@real_dataset("sun397", "sun397", """
sun397/
  SUN397/<letter>/<scene>[/<indoor|outdoor|...>]/sun_XXXX.jpg
  split_zhou_SUN397.json
""")
def build_sun397(root: Path) -> Dataset:
    """SUN397 (CoOp split; class names like "outdoor apartment building")."""
    return read_coop_split("sun397", root, root / "SUN397", "split_zhou_SUN397.json")


@real_dataset("dtd", "dtd", """
dtd/
  images/<texture>/<texture>_XXXX.jpg
  split_zhou_DescribableTextures.json
""")
def build_dtd(root: Path) -> Dataset:
    """Describable Textures (CoOp split)."""
    return read_coop_split("dtd", root, root / "images", "split_zhou_DescribableTextures.json")


@real_dataset("eurosat", "eurosat", """
eurosat/
  2750/<Class>/<Class>_<n>.jpg
  split_zhou_EuroSAT.json
""")
def build_eurosat(root: Path) -> Dataset:
    """EuroSAT RGB (CoOp split; CoOp's class names, e.g. AnnualCrop -> "Annual Crop Land")."""
    return read_coop_split("eurosat", root, root / "2750", "split_zhou_EuroSAT.json", rename=EUROSAT_CLASSNAMES)


@real_dataset("ucf101", "ucf101", """
ucf101/
  UCF-101-midframes/<Action_Name>/v_<Action>_gXX_cXX.jpg
  split_zhou_UCF101.json
""")
def build_ucf101(root: Path) -> Dataset:
    """UCF101 middle frames (CoOp split; "Apply_Eye_Makeup" -> "Apply Eye Makeup")."""
    return read_coop_split("ucf101", root, root / "UCF-101-midframes", "split_zhou_UCF101.json")


@real_dataset("fgvc_aircraft", "fgvc_aircraft", """
fgvc_aircraft/               (the data/ folder of fgvc-aircraft-2013b, renamed)
  images/<id>.jpg
  variants.txt               (one variant per line; line order = label)
  images_variant_train.txt   ("<id> <variant>" per line)
  images_variant_val.txt
  images_variant_test.txt
""")
def build_fgvc_aircraft(root: Path) -> Dataset:
    """FGVC-Aircraft variants (100 classes) from the dataset's own split files, as CoOp reads them."""
    name = "fgvc_aircraft"
    image_dir = need_dir(root / "images", name, "image folder")
    classnames = read_lines(need_file(root / "variants.txt", name, "class list"))
    label_of = {c: i for i, c in enumerate(classnames)}
    splits = {}
    for split in ("train", "val", "test"):
        path = need_file(root / f"images_variant_{split}.txt", name, "split file")
        items = []
        for n, line in enumerate(read_lines(path), 1):
            imname, _, variant = line.partition(" ")
            if variant not in label_of:
                raise InvalidDataError(f"dataset {name!r}: {path} line {n}: variant {variant!r} is not in "
                                       f"{root / 'variants.txt'}")
            items.append(Datum(str(image_dir / f"{imname}.jpg"), label_of[variant], clean_classname(variant)))
        check_listed([d.impath for d in items], name, path)
        splits[split] = items
    return Dataset(name=name, classnames=[clean_classname(c) for c in classnames], template=COOP_TEMPLATES[name],
                   train=splits["train"], val=splits["val"], test=splits["test"],
                   meta={"split_file": str(root / "images_variant_{train,val,test}.txt"), "raw_classnames": classnames})


__all__ = ["CALTECH101_CLASSNAMES", "DatasetLayoutError", "EUROSAT_CLASSNAMES", "layout_help", "read_coop_split"]
