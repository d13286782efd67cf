"""Recipe sweep for the tiny-rn pretraining: train one variant, probe it, append a JSON line (GPU or CPU).

    python -m common.data.synthetic.sweep --variant b256_s1200_cur03 --device cuda --out sweep.jsonl

Each variant is the pipeline's recipe (`pretrain.py`) with the overrides below; `+vit` also distils a
tiny-vit from it (the pipeline's tiny-vit recipe). On a GPU all variants run side by side in about six
minutes (one process each); `data/sweeps/` keeps the lines that chose the pipeline's setting, and
`data/README.md` summarises them. The probe is `probe.py`'s, on the sets named by --datasets.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from . import pretrain as P
from .probe import probe

OLD_COUNTS = (0.8, 0.08, 0.07, 0.05)  # the stream before this sweep: 20% groups of 2-4
MORE_COUNTS = (0.55, 0.15, 0.15, 0.15)
MORE_PATTERN_BG = {"scene": 0.2, "plain": 0.35, "gradient": 0.1, "pattern": 0.3, "noise": 0.05}
# name -> overrides: steps, batch, seed, curriculum (pretrain args); dist / cap (Distribution / CaptionStyle fields)
VARIANTS = {
    "base1000": dict(steps=1000, batch=128, curriculum=0.5, dist=dict(counts=OLD_COUNTS)),
    "s1600": dict(steps=1600, batch=128, curriculum=0.5, dist=dict(counts=OLD_COUNTS)),
    "s1600_count": dict(steps=1600, batch=128, curriculum=0.5, vit=True),
    "s1600_count_seed1": dict(steps=1600, batch=128, curriculum=0.5, seed=1),
    "s1600_count_vague": dict(steps=1600, batch=128, curriculum=0.5, cap=dict(p_vague_kind=0.05)),
    "s1600_count_tex": dict(steps=1600, batch=128, curriculum=0.5, dist=dict(backgrounds=MORE_PATTERN_BG)),
    "s2400_count": dict(steps=2400, batch=128, curriculum=0.5),
    "s1600_count_b256": dict(steps=1600, batch=256, curriculum=0.5),
    "b192_s1600": dict(steps=1600, batch=192, curriculum=0.5),
    "b256_s1000": dict(steps=1000, batch=256, curriculum=0.5),
    "b256_s1200": dict(steps=1200, batch=256, curriculum=0.5, vit=True),
    "b256_s1200_seed1": dict(steps=1200, batch=256, curriculum=0.5, seed=1),
    "b256_s1200_nocount": dict(steps=1200, batch=256, curriculum=0.5, dist=dict(counts=OLD_COUNTS)),
    "b256_s1200_tex": dict(steps=1200, batch=256, curriculum=0.5, dist=dict(backgrounds=MORE_PATTERN_BG)),
    "b256_s1200_cur03": dict(steps=1200, batch=256, curriculum=0.3),  # the pipeline's recipe
    "b256_s1600_seed1": dict(steps=1600, batch=256, curriculum=0.5, seed=1),
}
SWEEP_DATASETS = ["emb_objects", "emb_objects_v2", "emb_objects_sketch", "emb_textures", "emb_scenes", "emb_finegrained",
                  "emb_counting", "emb_satellite"]


def _record(name: str, arch: str, cfg: dict, log: dict, rows: list[dict], t0: float) -> dict:
    return {"variant": name, "arch": arch, "cfg": cfg, "evals": log["evals"], "train_s": log["train_s"],
            "render_s": log["render_s"], "wall_s": round(time.time() - t0, 1), "device": log["device"],
            "counts": log["distribution"]["counts"], "caption_style": log["caption_style"],
            "rows": {r["dataset"]: [round(100 * r["zero_shot"], 1),
                                    None if r["linear_probe"] is None else round(100 * r["linear_probe"], 1)] for r in rows}}


def run_variant(name: str, out: str, root: str = "data/embedded", datasets=None, device: str = "cuda",
                scale: float = 1.0, workdir: str = "/tmp") -> list[dict]:
    """Train + probe one variant (and its tiny-vit if asked); append each record to `out`. `scale` shrinks
    steps and pool (tests)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    v = VARIANTS[name]
    cfg = dict(P.DEFAULTS["tiny-rn"])
    cfg.update({k: v[k] for k in ("steps", "seed", "batch", "curriculum") if k in v})
    cfg["steps"], cfg["pool"] = max(2, int(cfg["steps"] * scale)), max(256, int(cfg["pool"] * scale))
    dist = P.PRETRAIN_DIST.with_(**{"counts": MORE_COUNTS, **v.get("dist", {})})
    cap = replace(P.PRETRAIN_CAPTIONS, **v.get("cap", {}))
    datasets = datasets or SWEEP_DATASETS
    records = []
    t0 = time.time()
    ck = f"{workdir}/sweep_{name}.pt"
    log = P.pretrain("tiny-rn", ck, dist=dist, cstyle=cap, eval_every=max(1, cfg["steps"] // 4), progress=False,
                     device=device, **cfg)
    records.append(_record(name, "tiny-rn", cfg, log, probe("tiny-rn", ck, root, datasets, device=device), t0))
    if v.get("vit"):
        t0 = time.time()
        vcfg = dict(P.DEFAULTS["tiny-vit"])
        vcfg["steps"], vcfg["pool"] = max(2, int(vcfg["steps"] * scale)), cfg["pool"]
        ckv = f"{workdir}/sweep_{name}_vit.pt"
        log = P.pretrain("tiny-vit", ckv, teacher=ck, dist=dist, cstyle=cap, progress=False, device=device, **vcfg)
        records.append(_record(name + "+vit", "tiny-vit", vcfg, log, probe("tiny-vit", ckv, root, datasets, device=device), t0))
    with open(out, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    ap.add_argument("--out", required=True, help="JSON-lines file the records are appended to")
    ap.add_argument("--root", default="data/embedded")
    ap.add_argument("--datasets", nargs="*", default=None, help=f"default: {' '.join(SWEEP_DATASETS)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink steps and pool (a quick check)")
    a = ap.parse_args(argv)
    for r in run_variant(a.variant, a.out, a.root, a.datasets, a.device, a.scale):
        print(json.dumps(r))


if __name__ == "__main__":
    main()
