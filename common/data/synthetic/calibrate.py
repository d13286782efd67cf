"""Calibrate the downstream suite's difficulty on fresh renders, never on its written test images.

    python -m common.data.synthetic.calibrate --ckpt data/embedded/checkpoints/tiny-rn.pt --arch tiny-rn

Renders `--per-class` new images per class of each synthetic set from its generator with a calibration
seed (a different stream from the suite's train/val/test files), scores zero-shot CLIP with the set's
template, and prints accuracy, chance and, for the generic set's shifted variants, the ratio to the
source. The suite's knobs (suite.py's distributions) are set from these numbers; the test splits only
ever see the final world.

Targets (real CLIP, CoOp Table 1 / CLIP: RN50 ImageNet 58 -> -V2 51, -Sketch 33, -A 22, -R 56): every shift
below its source, -V2 closest, -Sketch and -A far below; every set's zero-shot at least twice chance.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.clip.loader import load_clip

from .catalog import SETS
from .suite import RENDERERS

CALIBRATION_SEED = 777_001          # not the suite's seed: fresh images of the same generators
DG_SOURCE = "emb_objects"
DG_SHIFTS = ("emb_objects_v2", "emb_objects_sketch", "emb_objects_rendition", "emb_objects_hard")
# the order real CLIP shows relative to its source (RN50 / ViT-B/16 ratios: V2 0.88 / 0.91, R 0.97 / 1.11,
# Sketch 0.57 / 0.69, A 0.38 / 0.72): each pair (a, b) means a's ratio above b's
DG_ORDER = (("emb_objects_v2", "emb_objects_sketch"), ("emb_objects_v2", "emb_objects_hard"),
            ("emb_objects_rendition", "emb_objects_sketch"), ("emb_objects_rendition", "emb_objects_hard"))


@torch.no_grad()
def zero_shot(bundle, name: str, per_class: int, seed: int = CALIBRATION_SEED, size: int = 64) -> dict:
    info = SETS[name]
    labels = np.repeat(np.arange(len(info.classnames)), per_class)
    imgs = RENDERERS[name](labels, np.random.default_rng([seed, len(name)]), size)
    x = torch.stack([bundle.preprocess_val(Image.fromarray(im)) for im in imgs])
    f = F.normalize(bundle.model.encode_image(x.to(bundle.device)).float(), dim=-1)
    t = F.normalize(bundle.model.encode_text(bundle.tokenizer([info.template.format(c) for c in info.classnames])
                                             .to(bundle.device)).float(), dim=-1)
    acc = float(((f @ t.T).argmax(1).cpu().numpy() == labels).mean() * 100)
    return {"dataset": name, "zero_shot": round(acc, 1), "chance": round(100 / len(info.classnames), 1)}


def calibrate(bundle, names, per_class: int) -> dict:
    rows = {n: zero_shot(bundle, n, per_class) for n in names}
    if DG_SOURCE in rows:
        src = rows[DG_SOURCE]["zero_shot"]
        for n in DG_SHIFTS:
            if n in rows:
                rows[n]["ratio_to_source"] = round(rows[n]["zero_shot"] / max(src, 1e-6), 2)
    return rows


def order_ok(rows: dict) -> dict:
    """Which of the real shifts' orderings (DG_ORDER, and every shift below its source) hold."""
    r = {n: rows[n]["ratio_to_source"] for n in DG_SHIFTS if n in rows}
    out = {f"{n} < source": v < 1.0 for n, v in r.items() if n != "emb_objects_rendition"}
    out.update({f"{a} > {b}": r[a] > r[b] for a, b in DG_ORDER if a in r and b in r})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--datasets", nargs="*", default=[DG_SOURCE, *DG_SHIFTS])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    bundle = load_clip(a.arch, a.ckpt)
    rows = calibrate(bundle, a.datasets, a.per_class)
    for r in rows.values():
        print(json.dumps(r))
    print(json.dumps(order_ok(rows)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "order": order_ok(rows)}, f, indent=1)


if __name__ == "__main__":
    main()
