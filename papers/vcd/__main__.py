"""Classification by description (VCD): `python -m papers.vcd {train,eval,reproduce,plot}`.

train      builds (and caches) every variant's sentence embeddings; VCD trains nothing
eval       zero-shot top-1 of every variant and of the bare-class-name baseline (`clip_classname`) on `datasets`
           (protocol zeroshot) and on `dg_source` + `dg_targets` (protocol domain_generalization)
reproduce  eval and the per-image explanations (runs/vcd/explain/...) on every backbone of `backbones`
plot       the explanation figures from those files (to `figure_dir`; --set figure_dir=papers/vcd puts them beside
           REPORT.md)

Descriptors come from `descriptors`: `auto` (the file each embedded set ships, in VCD's JSON format), a VCD JSON
file, or a folder holding the authors' files (classify_by_description_release descriptors/); classes are matched
by name (common/data/descriptors.py); sentences name the class as the file's key spells it (the official loader).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from common.atomic import write_text_atomic
from common.cli import inputs, run_cli
from common.clip import pooled_classifier
from common.data.descriptors import WHERE, run_class_texts
from common.engine import classification_metrics, write_record
from common.engine.protocols import (Task, backbone_configs, bundle_for, eval_classifier, plan_datasets, plan_jobs,
                                     record_exists, run_plan, training_free_plan)
from common.engine.runs import print_record
from common.paths import runs_root

from .method import PHRASINGS, VARIANTS, classname_texts, descriptor_head, variant_sentences

SLUG = "vcd"
KIND = "vcd"
BASELINE = "clip_classname"
CONFIG = Path(__file__).with_name("config.yaml")


def _protocols(cfg: dict) -> list[tuple[str, list[str], str | None, list[str]]]:
    """(protocol, datasets, training source, variants) of one eval."""
    return training_free_plan(cfg, cfg["variants"])


def _reads(cfg: dict) -> list[str]:
    """Every dataset eval reads: `datasets`, and the DG source and targets when there are targets."""
    return plan_datasets(_protocols(cfg))


def class_texts_of(cfg: dict, names: list[str] | None = None) -> dict:
    """{dataset: (Dataset, ClassTexts)} of every dataset the run reads; all problems as one error, before any work."""
    names = names if names is not None else _reads(cfg)
    return run_class_texts(cfg, KIND, names, allow_empty=cfg["empty_descriptors"] == "official")


def sentences_for(cfg: dict, ds, ct, variant: str):
    """(sentences per class, descriptors per class) of a variant; the class named as the file's key."""
    return variant_sentences(variant, ct.keys, ct.texts, cfg["phrasing"], (cfg["sentence_end"] or {}).get(ds.name, ""),
                             cfg["shuffle_seed"])


def _record(cfg, ds, ct, protocol, source, method, variant, values, extra, wall) -> dict:
    return {"paper": SLUG, "method": method, "variant": variant, "profile": cfg["profile"], "protocol": protocol,
            "dataset": ds.name, "source": source or ds.name, "backbone": cfg["arch"], "shots": None, "seed": 0,
            "n_classes": ds.num_classes, "metrics": {k: round(float(v), 4) for k, v in values.items()},
            "texts": {"file": ct.path, "sha256": ct.digest, "empty_lists": ct.empty, "unused_keys": ct.unused,
                      "notes": ct.notes, **extra},
            "config": cfg, "wall_s": round(wall, 2)}


def evaluate_one(cfg: dict, ds, ct, protocol: str, source: str | None, variants: list[str]) -> list[dict]:
    bundle = bundle_for(cfg)
    task = Task(cfg, bundle, ds, None, 0, None)
    out = []
    todo = [(SLUG, v) for v in variants] + [(BASELINE, "")]
    todo = [(m, v) for m, v in todo if not record_exists(cfg, SLUG, protocol, ds.name, m, None, 0, v, source)]
    if not todo:
        return out
    feats = task.features("test")
    for method, variant in todo:
        t0 = time.time()
        if method == BASELINE:
            texts = classname_texts(ct.keys, (cfg["sentence_end"] or {}).get(ds.name, ""))
            values, extra = eval_classifier(task, pooled_classifier(bundle, texts)), {"example": texts[0][0]}
        else:
            sentences, _ = sentences_for(cfg, ds, ct, variant)
            head = descriptor_head(bundle, sentences)
            values = classification_metrics(head.scores(feats["features"]), feats["labels"])
            extra = {"example": sentences[0][0], "per_class_mean": len(head.owner) / ds.num_classes,
                     "truncated": head.truncated}
        rec = _record(cfg, ds, ct, protocol, source, method, variant, values, extra, time.time() - t0)
        write_record(rec)
        print_record(rec)
        out.append(rec)
    return out


@inputs(datasets=_reads)
def evaluate(cfg: dict) -> list[dict]:
    """zero-shot VCD (every variant) and the bare-class-name baseline on every dataset and the shifted sets"""
    return run_plan(cfg, _protocols(cfg), class_texts_of(cfg), evaluate_one, f"vcd {cfg['arch']}")


@inputs(datasets=_reads)
def train(cfg: dict) -> None:
    """builds and caches every variant's sentence embeddings (VCD has nothing to train)"""
    loaded, bundle = class_texts_of(cfg), bundle_for(cfg)
    for _, name, _, variants in plan_jobs(_protocols(cfg)):
        ds, ct = loaded[name]
        for variant in variants:
            descriptor_head(bundle, sentences_for(cfg, ds, ct, variant)[0])


def explain_path(profile: str, arch: str) -> Path:
    return runs_root() / SLUG / "explain" / profile / arch / "explanations.json"


def _class_entry(head, sentences, descriptors, scores_row: torch.Tensor, per_desc_row: torch.Tensor, c: int,
                 name: str, role: str) -> dict:
    idx = (head.owner == c).nonzero().flatten().tolist()
    items = sorted(((descriptors[c][k], round(100 * float(per_desc_row[i]), 3)) for k, i in enumerate(idx)),
                   key=lambda x: -x[1])
    return {"class": name, "role": role, "score": round(100 * float(scores_row[c]), 3),
            "descriptors": [{"descriptor": d, "score": s} for d, s in items], "sentence_example": sentences[c][0]}


def explain(cfg: dict) -> Path | None:
    """Per image, the descriptors behind the decision: for a few test images of each `explain.datasets` set, the
    score of every descriptor of the predicted class and of the other class of the story (the true class when the
    prediction is wrong, else the runner-up). Images: the first that descriptors classify correctly and the bare
    name does not, and the first that descriptors get wrong (test order, a fixed rule: nothing is cherry-picked)."""
    ex = cfg["explain"]
    if not ex["datasets"]:
        return None
    plan = class_texts_of(cfg, list(ex["datasets"]))
    bundle = bundle_for(cfg)
    images = []
    for name in ex["datasets"]:
        ds, ct = plan[name]
        task = Task(cfg, bundle, ds, None, 0, None)
        feats = task.features("test")
        sentences, descriptors = sentences_for(cfg, ds, ct, "vcd")
        head = descriptor_head(bundle, sentences)
        scores = head.scores(feats["features"])
        per_desc = head.descriptor_scores(feats["features"])
        base = pooled_classifier(bundle, classname_texts(ct.keys, (cfg["sentence_end"] or {}).get(ds.name, "")))
        base_pred = (torch.nn.functional.normalize(feats["features"], dim=-1) @ base.t()).argmax(-1)
        pred, labels = scores.argmax(-1), feats["labels"]
        fixed = ((pred == labels) & (base_pred != labels)).nonzero().flatten().tolist()
        wrong = (pred != labels).nonzero().flatten().tolist()
        right = (pred == labels).nonzero().flatten().tolist()
        picks = list(dict.fromkeys(([fixed[0]] if fixed else []) + ([wrong[0]] if wrong else []) + right[:1]))
        for i in picks[:ex["images"]]:
            p, y = int(pred[i]), int(labels[i])
            other = y if p != y else int(scores[i].topk(2).indices[1])
            images.append({"dataset": name, "impath": ds.test[i].impath, "index": i, "true": ct.keys[y],
                           "predicted": ct.keys[p], "classname_baseline": ct.keys[int(base_pred[i])],
                           "classes": [_class_entry(head, sentences, descriptors, scores[i], per_desc[i], p,
                                                    ct.keys[p], "predicted"),
                                       _class_entry(head, sentences, descriptors, scores[i], per_desc[i], other,
                                                    ct.keys[other], "true" if p != y else "runner-up")]})
    path = explain_path(cfg["profile"], cfg["arch"])
    write_text_atomic(path, json.dumps({"backbone": cfg["arch"], "profile": cfg["profile"], "images": images},
                                       indent=1))
    print(f"[vcd] explanations of {len(images)} images -> {path}")
    return path


def _reads_all(cfg: dict) -> list[str]:
    """reproduce also reads the sets it explains."""
    return list(dict.fromkeys(_reads(cfg) + list(cfg["explain"]["datasets"])))


@inputs(datasets=_reads_all)
def reproduce(cfg: dict) -> None:
    """eval and the explanations on every backbone of `backbones` (embedded: tiny-rn and tiny-vit)"""
    configs = backbone_configs(cfg)
    class_texts_of(cfg, _reads_all(cfg))      # every dataset's descriptors found and matched before any work
    for c in configs:
        evaluate(c)
        explain(c)


@inputs(weights=False)
def plot(cfg: dict) -> list[Path]:
    """the explanation figures from runs/vcd/explain (to `figure_dir`)"""
    from .plot import explanation_figure
    out = []
    for path in sorted((runs_root() / SLUG / "explain" / cfg["profile"]).glob("*/explanations.json")):
        data = json.loads(path.read_text())
        fig = explanation_figure(data, Path(cfg["figure_dir"]) / f"explanations_{data['profile']}_{data['backbone']}.png",
                                 top=cfg["explain"]["top"])
        if fig:
            out.append(fig)
            print(fig)
    if not out:
        print("no VCD explanations to plot yet (run reproduce first)")
    return out


def validate(cfg: dict) -> list[str]:
    out = []
    bad = [v for v in list(cfg["variants"]) + list(cfg["dg_variants"]) if v not in VARIANTS]
    if bad:
        out.append(f"variants / dg_variants: unknown {sorted(set(bad))}; known: {', '.join(VARIANTS)}")
    if cfg["phrasing"] not in PHRASINGS:
        out.append(f"phrasing must be one of {', '.join(PHRASINGS)}, got {cfg['phrasing']!r}")
    if cfg["empty_descriptors"] not in ("official", "error"):
        out.append(f"empty_descriptors must be official (an empty list scores '<class>, which has ') or error, got "
                   f"{cfg['empty_descriptors']!r}")
    ends = cfg["sentence_end"]
    if not isinstance(ends, dict) or not all(isinstance(v, str) for v in ends.values()):
        out.append(f"sentence_end must map dataset -> text appended to every sentence (e.g. {{imagenet: '.'}}), "
                   f"got {ends!r}")
    if not isinstance(cfg["shuffle_seed"], int) or isinstance(cfg["shuffle_seed"], bool) or cfg["shuffle_seed"] < 0:
        out.append(f"shuffle_seed must be an integer >= 0, got {cfg['shuffle_seed']!r}")
    ex = cfg["explain"]
    for key in ("images", "top"):
        if not isinstance(ex.get(key), int) or isinstance(ex.get(key), bool) or ex[key] < 1:
            out.append(f"explain.{key} must be an integer >= 1, got {ex.get(key)!r}")
    return out


def main(argv=None):
    return run_cli(SLUG, CONFIG, {"train": train, "eval": evaluate, "reproduce": reproduce, "plot": plot},
                   "Classification by description (VCD): mean descriptor scores per class, with explanations.",
                   argv, validate=validate)


if __name__ == "__main__":
    main()
