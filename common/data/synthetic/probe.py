"""Zero-shot vs 16-shot linear probe per embedded dataset, for one checkpoint (the 'room for transfer' check).

    python -m common.data.synthetic.probe --arch tiny-rn --ckpt data/embedded/checkpoints/tiny-rn.pt

Zero-shot: the dataset's CoOp-style template with each class name, cosine logits, on the test split and (as
`zero_shot_val`) on the val split: recipe choices are made on the val column, the test column is reported. Linear probe (CLIP /
CoOp protocol): multinomial logistic regression on frozen, L2-normalised image features of K shots per
class, C chosen on the few-shot val split (min(K, 4) per class), then scored on test. Images go through
the model's own eval transform (`preprocess_val`), as every method sees them.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.clip.loader import load_clip
from common.data import build_dataset, load_image, sample_per_class
from common.metrics import NEAR_CHANCE

# classification sets, in the order of the table
PROBE_DATASETS = ["emb_objects", "emb_objects_v2", "emb_objects_sketch", "emb_objects_rendition", "emb_objects_hard",
                  "emb_textures", "emb_scenes", "emb_finegrained", "emb_counting", "emb_satellite", "emb_mnist", "emb_fashion"]
C_GRID = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0]


@torch.no_grad()
def image_features(bundle, paths: list[str], batch: int = 256) -> torch.Tensor:
    """L2-normalised image features of image files (eval transform), batched."""
    model, pre, device = bundle.model.eval(), bundle.preprocess_val, bundle.device
    out = []
    for i in range(0, len(paths), batch):
        x = torch.stack([pre(load_image(p)) for p in paths[i:i + batch]]).to(device)
        out.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, bundle.embed_dim)


@torch.no_grad()
def text_classifier(bundle, classnames: list[str], template: str) -> torch.Tensor:
    tok = bundle.tokenizer([template.format(c) for c in classnames]).to(bundle.device)
    return F.normalize(bundle.model.encode_text(tok).float(), dim=-1).cpu()


def logistic_probe(xtr, ytr, xva, yva, xte, yte, c_grid=C_GRID) -> tuple[float, float]:
    """Fit on train for each C, keep the best on val, return (test accuracy, C)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    best = (-1.0, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in c_grid:
            clf = LogisticRegression(C=c, max_iter=1000).fit(xtr, ytr)
            acc = float((clf.predict(xva) == yva).mean())
            if acc > best[0]:
                best = (acc, c, clf)
    _, c, clf = best
    return float((clf.predict(xte) == yte).mean()), c


def probe_dataset(bundle, name: str, root: str | Path, shots: int = 16, seed: int = 1, feature_cache: dict | None = None) -> dict:
    ds = build_dataset(name, root)
    feature_cache = {} if feature_cache is None else feature_cache

    def feats(items, split):
        key = (name, split, len(items))
        if key not in feature_cache:
            feature_cache[key] = image_features(bundle, [d.impath for d in items])
        return feature_cache[key]

    test_f = feats(ds.test, "test")
    yte = np.array([d.label for d in ds.test])
    zs = float(((test_f @ text_classifier(bundle, ds.classnames, ds.template).T).argmax(1).numpy() == yte).mean())
    row = {"dataset": name, "classes": ds.num_classes, "chance": 1.0 / ds.num_classes, "test": len(ds.test), "zero_shot": zs}
    if ds.val:  # what recipe choices are made on (the test column is reported, never chosen on)
        val_f = feats(ds.val, "val")
        yva_all = np.array([d.label for d in ds.val])
        row["zero_shot_val"] = float(((val_f @ text_classifier(bundle, ds.classnames, ds.template).T).argmax(1).numpy()
                                      == yva_all).mean())
    if ds.train:
        train = sample_per_class(ds.train, shots, seed)
        val = sample_per_class(ds.val, min(shots, 4), seed)
        all_train = {d.impath: i for i, d in enumerate(ds.train)}
        all_val = {d.impath: i for i, d in enumerate(ds.val)}
        tr_f = feats(ds.train, "train")[[all_train[d.impath] for d in train]]
        va_f = feats(ds.val, "val")[[all_val[d.impath] for d in val]]
        ytr, yva = np.array([d.label for d in train]), np.array([d.label for d in val])
        acc, c = logistic_probe(tr_f.numpy(), ytr, va_f.numpy(), yva, test_f.numpy(), yte)
        row.update(linear_probe=acc, C=c, shots=shots)
        # CoCoOp's base half (the classes base-to-novel training sees): zero-shot over the base classes only,
        # and the probe fitted on their shots, C again chosen on their val shots.
        m = -(-ds.num_classes // 2)
        te, tr, va = yte < m, ytr < m, yva < m
        base_text = text_classifier(bundle, ds.classnames[:m], ds.template)
        zs_base = float(((test_f[te] @ base_text.T).argmax(1).numpy() == yte[te]).mean())
        acc_base, c_base = logistic_probe(tr_f.numpy()[tr], ytr[tr], va_f.numpy()[va], yva[va], test_f.numpy()[te], yte[te])
        row.update(base_classes=m, zero_shot_base=zs_base, linear_probe_base=acc_base, C_base=c_base)
    else:  # shifted variants: the probe trained on the source set (emb_objects) is applied
        row.update(linear_probe=None)
    return row


def probe(arch: str, ckpt: str, root: str | Path = "data/embedded", datasets=None, shots: int = 16, seed: int = 1,
          threads: int = 2, device: str = "cpu") -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    bundle = load_clip(arch, ckpt, device=device)
    rows, cache = [], {}
    source = {}
    for name in tqdm(datasets or PROBE_DATASETS, desc=f"probe {arch}", leave=False):
        t = time.time()
        row = probe_dataset(bundle, name, root, shots, seed, cache)
        if name == "emb_objects":
            source = _source_probe(bundle, name, root, shots, seed, cache)
        if row["linear_probe"] is None and name.startswith("emb_objects_") and source:
            ds = build_dataset(name, root)
            xte = cache[(name, "test", len(ds.test))].numpy()
            row["linear_probe"] = float((source["clf"].predict(xte) == np.array([d.label for d in ds.test])).mean())
            row["probe_from"] = "emb_objects"
        row["seconds"] = round(time.time() - t, 1)
        rows.append(row)
        tqdm.write(format_row(row))
    return rows


def _source_probe(bundle, name, root, shots, seed, cache) -> dict:
    """The emb_objects probe as a classifier, to score on the shifted variants (domain generalisation)."""
    import warnings as _w

    from sklearn.linear_model import LogisticRegression
    ds = build_dataset(name, root)
    train = sample_per_class(ds.train, shots, seed)
    val = sample_per_class(ds.val, min(shots, 4), seed)
    idx_tr = {d.impath: i for i, d in enumerate(ds.train)}
    idx_va = {d.impath: i for i, d in enumerate(ds.val)}
    xtr = cache[(name, "train", len(ds.train))][[idx_tr[d.impath] for d in train]].numpy()
    xva = cache[(name, "val", len(ds.val))][[idx_va[d.impath] for d in val]].numpy()
    ytr, yva = np.array([d.label for d in train]), np.array([d.label for d in val])
    _, c = logistic_probe(xtr, ytr, xva, yva, xva, yva)
    with _w.catch_warnings():
        _w.simplefilter("ignore")
        return {"clf": LogisticRegression(C=c, max_iter=1000).fit(xtr, ytr)}


def format_row(r: dict) -> str:
    lp = "-" if r.get("linear_probe") is None else f"{100 * r['linear_probe']:.1f}"
    return (f"{r['dataset']:<24} {r['classes']:>4} {100 * r['chance']:>6.1f} {100 * r['zero_shot']:>6.1f} {lp:>6}"
            + ("  (probe from emb_objects)" if r.get("probe_from") else ""))


def markdown_table(results: dict[str, list[dict]]) -> str:
    """results: tower -> rows. One table, a zero-shot and a linear-probe column per tower."""
    towers = list(results)
    head = "| dataset | classes | test | chance | " + " | ".join(f"{t} zero-shot | {t} 16-shot probe" for t in towers) + " |"
    sep = "|---" * (4 + 2 * len(towers)) + "|"
    lines = [head, sep]
    by_name = {t: {r["dataset"]: r for r in rows} for t, rows in results.items()}
    for name in [r["dataset"] for r in results[towers[0]]]:
        r0 = by_name[towers[0]][name]
        cells = [name, str(r0["classes"]), str(r0["test"]), f"{100 * r0['chance']:.1f}"]
        for t in towers:
            r = by_name[t].get(name)
            if r is None:
                cells += ["", ""]
                continue
            lp = r.get("linear_probe")
            cells += [f"{100 * r['zero_shot']:.1f}", "-" if lp is None else f"{100 * lp:.1f}" + ("*" if r.get("probe_from") else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def base_table(results: dict[str, list[dict]]) -> str:
    """results: tower -> rows. Zero-shot vs 16-shot probe on each set's base half (CoCoOp's base classes)."""
    towers = list(results)
    head = "| dataset | base classes | " + " | ".join(f"{t} zero-shot | {t} 16-shot probe" for t in towers) + " |"
    lines = [head, "|---" * (2 + 2 * len(towers)) + "|"]
    by_name = {t: {r["dataset"]: r for r in rows} for t, rows in results.items()}
    for name in [r["dataset"] for r in results[towers[0]] if "zero_shot_base" in r]:
        cells = [name, str(by_name[towers[0]][name]["base_classes"])]
        for t in towers:
            r = by_name[t].get(name, {})
            cells += ([f"{100 * r['zero_shot_base']:.1f}", f"{100 * r['linear_probe_base']:.1f}"]
                      if "zero_shot_base" in r else ["", ""])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Zero-shot on each shifted set over its source's, real RN50 (ImageNet 58, -R 56, -V2 51, -Sketch 33, -A 22 top-1 %,
# CLIP paper Table 16 / CoOp's DG table); emb_objects_hard stands in for ImageNet-A.
REAL_SHIFT_RATIOS = {"emb_objects_rendition": 0.97, "emb_objects_v2": 0.88, "emb_objects_sketch": 0.57,
                     "emb_objects_hard": 0.38}
VIT_TARGET = {"zero_shot": 0.30, "gap_to_rn": 0.15}   # the regime issue's ViT stand-in target on emb_objects


def calibration_checks(results: dict[str, list[dict]]) -> list[dict]:
    """The world's calibration targets, read off the probe records: one dict per check with a value per tower and
    whether it holds. Twice chance on every classification set, the shifted sets in real CLIP's order relative to
    their source, the 16-shot probe against zero-shot, and the ViT stand-in's target."""
    by_name = {t: {r["dataset"]: r for r in rows} for t, rows in results.items()}
    checks = []
    for t, rows in by_name.items():
        below = [f"{n} {100 * r['zero_shot']:.1f} (chance {100 * r['chance']:.1f})" for n, r in rows.items()
                 if r["zero_shot"] < NEAR_CHANCE * r["chance"]]
        checks.append({"check": f"zero-shot >= {NEAR_CHANCE:g}x chance on every set", "tower": t, "holds": not below,
                       "value": "all sets" if not below else "below: " + ", ".join(below)})
        src = rows.get("emb_objects")
        shifts = [n for n in REAL_SHIFT_RATIOS if n in rows]
        if src and shifts:
            ratios = {n: rows[n]["zero_shot"] / src["zero_shot"] for n in shifts}
            ordered = [ratios[n] for n in shifts] == sorted(ratios.values(), reverse=True)
            checks.append({"check": "shifted sets ordered as real RN50 (R > V2 > Sketch > A: "
                           + ", ".join(f"{REAL_SHIFT_RATIOS[n]:.2f}" for n in shifts) + ")", "tower": t,
                           "holds": ordered, "value": ", ".join(f"{ratios[n]:.2f}" for n in shifts)})
        if "emb_satellite" in rows:
            r = rows["emb_satellite"]
            # informational: the set is already in the twice-chance check above
            checks.append({"check": "satellite zero-shot over chance (real EuroSAT 3.8x)", "tower": t,
                           "holds": None, "value": f"{r['zero_shot'] / r['chance']:.1f}x"})
        if src and src.get("linear_probe") is not None:
            checks.append({"check": "emb_objects 16-shot probe vs zero-shot (real ImageNet: probe below)", "tower": t,
                           "holds": None, "value": f"{100 * src['linear_probe']:.1f} vs {100 * src['zero_shot']:.1f}"})
        if src and "zero_shot_base" in src:
            checks.append({"check": "emb_objects base half: 16-shot probe above zero-shot", "tower": t,
                           "holds": src["linear_probe_base"] > src["zero_shot_base"],
                           "value": f"{100 * src['linear_probe_base']:.1f} vs {100 * src['zero_shot_base']:.1f}"})
    vit, rn = by_name.get("tiny-vit", {}).get("emb_objects"), by_name.get("tiny-rn", {}).get("emb_objects")
    if vit and rn:
        zs, gap = vit["zero_shot"], rn["zero_shot"] - vit["zero_shot"]
        checks.append({"check": f"ViT stand-in: emb_objects zero-shot >= {100 * VIT_TARGET['zero_shot']:.0f}% and within "
                                f"{100 * VIT_TARGET['gap_to_rn']:.0f} points of tiny-rn", "tower": "tiny-vit",
                       "holds": zs >= VIT_TARGET["zero_shot"] and gap <= VIT_TARGET["gap_to_rn"],
                       "value": f"{100 * zs:.1f}%, {100 * gap:.1f} points below"})
    return checks


def checks_table(results: dict[str, list[dict]]) -> str:
    lines = ["| check | tower | measured | holds |", "|---|---|---|---|"]
    for c in calibration_checks(results):
        mark = "-" if c["holds"] is None else ("yes" if c["holds"] else "**no**")
        lines.append(f"| {c['check']} | {c['tower']} | {c['value']} | {mark} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, help="tiny-rn | tiny-vit (or any open_clip arch)")
    ap.add_argument("--ckpt", required=True, help="checkpoint path (or open_clip tag)")
    ap.add_argument("--root", default="data/embedded", help="embedded data root")
    ap.add_argument("--datasets", nargs="*", default=None, help=f"default: {' '.join(PROBE_DATASETS)}")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the image features are computed (cpu or cuda)")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    a = ap.parse_args(argv)
    print(f"{'dataset':<24} {'cls':>4} {'chance':>6} {'zs':>6} {'probe':>6}")
    rows = probe(a.arch, a.ckpt, a.root, a.datasets, a.shots, a.seed, device=a.device)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"arch": a.arch, "ckpt": a.ckpt, "shots": a.shots, "seed": a.seed, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
