"""CuPL: `python -m papers.cupl {train,eval,reproduce}`.

train      builds (and caches) every variant's text classifier; CuPL trains nothing
eval       zero-shot top-1 of every variant on `datasets` (protocol zeroshot) and on `dg_source` + `dg_targets`
           (protocol domain_generalization), on the configured backbone
reproduce  eval on every backbone of `backbones` (embedded: both tiny CLIPs)

The sentences come from `descriptors`: `auto` (the file each embedded set ships, in CuPL's JSON format), a CuPL
JSON file, or a folder holding the authors' files (sarahpratt/CuPL all_prompts/full_prompts/); classes are
matched by name (common/data/descriptors.py). The baselines (single template, 80-template ensemble) are the
zeroshot_clip records on the same datasets and backbones.
"""
from __future__ import annotations

import time
from pathlib import Path

from common.cli import inputs, run_cli
from common.clip import IMAGENET_TEMPLATES, encode_texts
from common.data.descriptors import WHERE, run_class_texts
from common.engine import write_record
from common.engine.protocols import (Task, backbone_configs, bundle_for, eval_classifier, plan_datasets, plan_jobs,
                                     record_exists, run_plan, training_free_plan)
from common.engine.runs import print_record

from .method import BASE_VARIANTS, cupl_weights, variant_texts, wordify

SLUG = "cupl"
KIND = "cupl"
CONFIG = Path(__file__).with_name("config.yaml")


def variants_of(cfg: dict) -> list[str]:
    return list(cfg["variants"]) + [f"n{k}" for k in cfg["sentence_counts"]]


def _protocols(cfg: dict) -> list[tuple[str, list[str], str | None, list[str]]]:
    """(protocol, datasets, training source, variants) of one eval."""
    return training_free_plan(cfg, variants_of(cfg))


def _reads(cfg: dict) -> list[str]:
    """Every dataset a command reads: `datasets`, and the DG source and targets when there are targets."""
    return plan_datasets(_protocols(cfg))


def class_texts_of(cfg: dict) -> dict:
    """{dataset: (Dataset, ClassTexts)} of every dataset the run reads; all problems as one error, before any work."""
    return run_class_texts(cfg, KIND, _reads(cfg))


def standard_templates(ds) -> list[str]:
    """The "standard" prompts: the dataset's template set, else CLIP's 80 ImageNet templates (the templates of
    zero-shot CLIP's `ensemble` variant, papers/zeroshot_clip, so CuPL + e and that baseline share them)."""
    return list(ds.meta.get("templates") or IMAGENET_TEMPLATES)


def texts_for(cfg: dict, ds, ct, variant: str) -> list[list[str]]:
    """A variant's texts; class names in templates as the authors' file spells them (`classify_imagenet.py`)."""
    return variant_texts(variant, ct.texts, [wordify(k) for k in ct.keys], standard_templates(ds),
                         cfg["shuffle_seed"])


def evaluate_one(cfg: dict, ds, ct, protocol: str, source: str | None, variants: list[str]) -> list[dict]:
    bundle = bundle_for(cfg)
    task = Task(cfg, bundle, ds, None, 0, None)
    out = []
    for variant in variants:
        if record_exists(cfg, SLUG, protocol, ds.name, SLUG, None, 0, variant, source):
            continue
        t0 = time.time()
        texts = texts_for(cfg, ds, ct, variant)
        weights = cupl_weights(bundle, texts)
        _, truncated = encode_texts(bundle, [t for ts in texts for t in ts])
        values = eval_classifier(task, weights)
        rec = {"paper": SLUG, "method": SLUG, "variant": variant, "profile": cfg["profile"], "protocol": protocol,
               "dataset": ds.name, "source": source or ds.name, "backbone": cfg["arch"], "shots": None, "seed": 0,
               "n_classes": ds.num_classes, "metrics": {k: round(float(v), 4) for k, v in values.items()},
               "texts": {"file": ct.path, "sha256": ct.digest, "per_class_mean": sum(map(len, texts)) / len(texts),
                         "truncated": truncated, "unused_keys": ct.unused, "notes": ct.notes},
               "config": cfg, "wall_s": round(time.time() - t0, 2)}
        write_record(rec)
        print_record(rec)
        out.append(rec)
    return out


@inputs(datasets=_reads)
def evaluate(cfg: dict) -> list[dict]:
    """zero-shot CuPL (every variant) on every dataset and on the shifted sets, on the configured backbone"""
    return run_plan(cfg, _protocols(cfg), class_texts_of(cfg), evaluate_one, f"cupl {cfg['arch']}")


@inputs(datasets=_reads)
def train(cfg: dict) -> None:
    """builds and caches every variant's classifier (CuPL has nothing to train)"""
    loaded, bundle = class_texts_of(cfg), bundle_for(cfg)
    for _, name, _, variants in plan_jobs(_protocols(cfg)):
        ds, ct = loaded[name]
        for variant in variants:
            cupl_weights(bundle, texts_for(cfg, ds, ct, variant))


@inputs(datasets=_reads)
def reproduce(cfg: dict) -> None:
    """eval on every backbone of `backbones` (embedded: tiny-rn and tiny-vit)"""
    configs = backbone_configs(cfg)
    class_texts_of(cfg)                       # every dataset's sentences found and matched before any work
    for c in configs:
        evaluate(c)


def validate(cfg: dict) -> list[str]:
    out = []
    bad = [v for v in cfg["variants"] if v not in BASE_VARIANTS]
    if bad:
        out.append(f"variants: unknown {bad}; known: {', '.join(BASE_VARIANTS)} (n<k> comes from sentence_counts)")
    bad = [v for v in cfg["dg_variants"] if v not in BASE_VARIANTS]
    if bad:
        out.append(f"dg_variants: unknown {bad}; known: {', '.join(BASE_VARIANTS)}")
    bad = [k for k in cfg["sentence_counts"] if not isinstance(k, int) or isinstance(k, bool) or k < 1]
    if bad:
        out.append(f"sentence_counts must be integers >= 1, got {bad[0]!r}")
    if not isinstance(cfg["shuffle_seed"], int) or isinstance(cfg["shuffle_seed"], bool) or cfg["shuffle_seed"] < 0:
        out.append(f"shuffle_seed must be an integer >= 0, got {cfg['shuffle_seed']!r}")
    return out


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": evaluate, "reproduce": reproduce},
                   "CuPL: zero-shot CLIP with class-specific descriptive sentences (CuPL, CuPL + templates).", argv,
                   validate=validate)


if __name__ == "__main__":
    main()
