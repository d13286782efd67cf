"""Hand-made run records for the report tests (written with the real ``write_record``)."""
from __future__ import annotations

from pathlib import Path

from common.engine.runs import write_record

DATASETS = ("emb_objects", "emb_scenes", "emb_textures")
SHIFTS = ("emb_objects_sketch", "emb_objects_v2")
SEEDS = (1, 2, 3)


def rec(root: Path, method: str, dataset: str, metrics: dict, *, protocol: str = "fewshot", shots=None, seed: int = 1,
        variant: str = "", paper: str | None = None, profile: str = "embedded", backbone: str = "tiny-rn",
        source: str | None = None, **extra) -> Path:
    return write_record({"paper": paper or method, "method": method, "variant": variant, "profile": profile,
                         "protocol": protocol, "dataset": dataset, "source": source or dataset,
                         "backbone": backbone, "shots": shots, "seed": seed, "metrics": metrics, **extra},
                        root=root)


def world(root: Path, profile: str = "embedded", backbone: str = "tiny-rn") -> Path:
    """A small but complete set of runs: zero-shot (2 variants), linear probe (5 shots x 3 seeds), CoOp,
    base-to-novel for CoOp/CoCoOp/zero-shot, and domain generalisation. Values are simple closed forms so
    tests can compute the expected averages by hand."""
    kw = dict(profile=profile, backbone=backbone)
    for i, ds in enumerate(DATASETS):
        base = 40.0 + 10 * i                                   # zero-shot single: 40, 50, 60
        rec(root, "zeroshot_clip", ds, {"top1": base}, protocol="zeroshot", variant="single", seed=0,
            n_classes=10, **kw)
        rec(root, "zeroshot_clip", ds, {"top1": base + 2}, protocol="zeroshot", variant="ensemble", seed=0,
            n_classes=10, **kw)
        for k in (1, 2, 4, 8, 16):
            for s in SEEDS:
                # linear probe: base - 20 + 2*log2(k)*... : simple monotone curve, seed offset s - 2
                lp = base - 20 + 4 * {1: 0, 2: 1, 4: 2, 8: 3, 16: 7}[k] + (s - 2)
                rec(root, "linear_probe", ds, {"top1": lp}, shots=k, seed=s, **kw)
                rec(root, "coop", ds, {"top1": lp + 5}, shots=k, seed=s, variant="m16", **kw)
        for s in SEEDS:
            rec(root, "coop", ds, {"base": base + 30, "novel": base - 10}, protocol="base2novel", shots=16,
                seed=s, variant="m4", **kw)
            rec(root, "cocoop", ds, {"base": base + 28, "novel": base}, protocol="base2novel", shots=16, seed=s, **kw)
            rec(root, "zeroshot_clip", ds, {"base": base + 5, "novel": base + 8}, protocol="base2novel", shots=16,
                seed=s, variant="single", **kw)
    src = DATASETS[0]
    for j, ds in enumerate((src,) + SHIFTS):
        rec(root, "zeroshot_clip", ds, {"top1": 40.0 - 5 * j}, protocol="domain_generalization", seed=0,
            variant="single", source=src, **kw)
        for s in SEEDS:
            rec(root, "linear_probe", ds, {"top1": 52.0 - 12 * j + (s - 2)}, protocol="domain_generalization",
                shots=16, seed=s, source=src, **kw)
    return root
