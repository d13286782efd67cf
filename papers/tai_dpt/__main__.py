"""TaI-DPT: `python -m papers.tai_dpt {train,partial,eval,reproduce,convergence}`.

train        zero-shot multi-label recognition: double-grained prompts trained on the caption corpus only (labels
             parsed from the captions), tested on the dataset's test images; records per seed the merged score
             (TaI-DPT, variant ""), the global branch alone (TaI, "global") and the local branch ("local"); the
             caption-count ablation ("captions<percent>": a fraction of the captions, templates kept); and zero-shot
             CLIP with the hand-crafted prompt (pooled embedding, "single"; and the same prompt on the pooled
             embedding without positional embedding that TaI-DPT's global branch reads, "nopos")
partial      partial-label MLR: DualCoOp (papers.dualcoop, imported) trained on the images at each label proportion
             x seed, and its ensemble with the TaI-DPT prompts of the same seed (min-max normalised scores,
             (1 - r) TaI-DPT + r DualCoOp, variant "dualcoop_ens"); needs `train` first
eval         re-scores the kept TaI-DPT prompts on the test split (prints them beside the records)
reproduce    train + partial
convergence  the budget study (full caption corpus, seed 1): lr factor on val mAP, then budgets

Run records: protocol `multilabel`; zero-shot runs have `shots` null; partial-label runs keep the label percentage
in `shots` (as papers.dualcoop). Hyperparameters (lr factor, budget) are chosen on the image validation split;
training never sees an image. The official code keeps the checkpoint that is best on the test images.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from common.cli import inputs, run_cli
from common.clip import PromptTextEncoder, zeroshot_classifier
from common.config import load_config
from common.data import build_dataset
from common.engine import TrainConfig, convergence, run_dir, write_record
from common.engine.cache import cached_features
from common.engine.protocols import Task, bundle_for, record_exists
from common.engine.runs import beside_record, kept, print_record
from common.engine.threads import threaded
from common.errors import ConfigError, MissingDataError
from common.metrics import mean_average_precision
from papers.coop.method import PROMPT_FILE, load_learner, save_learner

from .fit import build_models, train_many
from .method import (DoubleGrainedPrompt, LabelParser, caption_corpus, encode_caption_tokens,
                     encode_image_global_dense, ensemble, predict)

SLUG = "tai_dpt"
PROTOCOL = "multilabel"
CONFIG = Path(__file__).with_name("config.yaml")

# Hand-made synonym lists of the real sets (our own, in the spirit of the official data_helpers.py); the class name
# itself is always a synonym. The embedded world's come from its vocabulary (`world_synonyms`).
VOC_SYNONYMS = {
    "aeroplane": ["airplane", "plane", "aircraft", "jet", "airliner"], "bicycle": ["bike", "cycle"],
    "bird": ["parrot", "pigeon", "duck", "seagull", "gull", "owl", "goose", "swan", "eagle"], "boat": ["ship", "sailboat", "yacht", "canoe", "kayak", "ferry"],
    "bottle": ["wine bottle", "water bottle"], "bus": ["double decker", "minibus"], "car": ["taxi", "suv", "jeep", "sedan"],
    "cat": ["kitten", "kitty"], "chair": ["seat", "stool", "armchair"], "cow": ["cattle", "calf", "bull", "ox"],
    "diningtable": ["dining table", "table", "desk"], "dog": ["puppy", "pup"], "horse": ["pony", "foal"],
    "motorbike": ["motorcycle", "motor bike", "scooter", "moped"], "person": ["man", "woman", "people", "child", "boy", "girl", "kid", "player", "guy", "lady"],
    "pottedplant": ["potted plant", "houseplant", "plant", "flower pot"], "sheep": ["lamb", "ram"],
    "sofa": ["couch", "loveseat"], "train": ["locomotive", "railway", "subway"], "tvmonitor": ["tv", "television", "monitor", "screen"],
}


# ------------------------------------------------------------------------------------------- options
def validate(cfg: dict) -> list[str]:
    out = []
    if not isinstance(cfg["n_ctx"], int) or isinstance(cfg["n_ctx"], bool) or cfg["n_ctx"] < 1:
        out.append(f"n_ctx must be an integer >= 1, got {cfg['n_ctx']!r}")
    for k in ("tau_text", "tau_image", "scale", "margin"):
        v = cfg[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            out.append(f"{k} must be a number > 0, got {v!r}")
    for k in ("merge_rate",):
        v = cfg[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
            out.append(f"{k} must be a number in [0, 1], got {v!r}")
    if not isinstance(cfg["n_default"], int) or isinstance(cfg["n_default"], bool) or cfg["n_default"] < 0:
        out.append(f"n_default must be an integer >= 0, got {cfg['n_default']!r}")
    if cfg["templates"] not in ("imagenet80", "none"):
        out.append(f"templates must be imagenet80 or none, got {cfg['templates']!r}")
    if cfg["lemmatizer"] not in ("rules", "nltk"):
        out.append(f"lemmatizer must be rules or nltk, got {cfg['lemmatizer']!r}")
    fr = cfg["caption_fractions"]
    if not isinstance(fr, list) or any(not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f < 1 for f in fr) \
            or len(set(fr)) != len(fr):
        out.append(f"caption_fractions must be distinct numbers in (0, 1), got {fr!r}")
    if not isinstance(cfg["batch_size"], int) or isinstance(cfg["batch_size"], bool) or cfg["batch_size"] < 1:
        out.append(f"batch_size must be an integer >= 1, got {cfg['batch_size']!r}")
    p = cfg["partial"]
    props = p["label_proportions"]
    if not isinstance(props, list) or any(not isinstance(x, int) or isinstance(x, bool) or not 1 <= x <= 100 for x in props) \
            or len(set(props)) != len(props):
        out.append(f"partial.label_proportions must be distinct integer percentages in [1, 100], got {props!r}")
    r = p["ensemble_rate"]
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r <= 1:
        out.append(f"partial.ensemble_rate must be a number in [0, 1], got {r!r}")
    cap = cfg["captions_file"]
    if cap and not Path(cap).is_file():
        out.append(f"captions_file {cap} does not exist: give COCO's captions_train2017.json (or a .txt / .json "
                   f"list of captions), or leave it empty on the embedded profile")
    syn = cfg["synonyms_file"]
    if syn and not Path(syn).is_file():
        out.append(f"synonyms_file {syn} does not exist: a JSON {{class name: [synonyms]}}")
    return out


def load_dataset(name: str, cfg: dict):
    data = build_dataset(name, cfg["data_root"])
    if not data.test or getattr(data.test[0], "targets", None) is None:
        raise ConfigError(f"{data.name} is not a multi-label dataset (its items carry no targets); TaI-DPT runs on "
                          f"emb_multilabel (embedded) or voc2007 / coco2014 (real)")
    return data


def multi_hot(items, num_classes: int) -> torch.Tensor:
    y = torch.zeros(len(items), num_classes)
    for i, d in enumerate(items):
        if d.targets:
            y[i, list(d.targets)] = 1.0
    return y


# ------------------------------------------------------------------------------------------- captions
def world_synonyms(classnames, exclude=()) -> list[list[str]]:
    """Per class: its name, plural and the vocabulary's synonyms of the embedded world, minus `exclude`."""
    from common.data.synthetic.vocab import KINDS
    kinds = {k.name: k for k in KINDS}
    out = []
    for c in classnames:
        k = kinds.get(c)
        names = [c] + ([k.plural_name, *k.synonyms] if k else [])
        out.append(list(dict.fromkeys(n for n in names if n not in set(exclude))))
    return out


def synonyms_for(cfg: dict, data) -> list[list[str]]:
    extra = json.loads(Path(cfg["synonyms_file"]).read_text()) if cfg["synonyms_file"] else {}
    exclude = list(cfg["exclude_synonyms"])
    if data.name.startswith("emb_"):
        base = world_synonyms(data.classnames, exclude)
    else:
        table = VOC_SYNONYMS if data.name == "voc2007" else {}
        raw = data.meta.get("raw_classnames") or data.classnames
        base = [[c] + list(table.get(r, table.get(c, []))) for c, r in zip(data.classnames, raw)]
        base = [[n for n in names if n not in exclude] for names in base]
    return [list(dict.fromkeys(b + list(extra.get(c, [])))) for b, c in zip(base, data.classnames)]


def read_captions(cfg: dict, data) -> list[str]:
    """The caption corpus: the embedded world's (dataset meta) or `captions_file` (COCO captions JSON: the first
    caption of every image, by image id, as the official one caption per image; or a JSON list / a .txt file)."""
    path = cfg["captions_file"]
    if not path:
        caps = list(data.meta.get("captions") or [])
        if not caps:
            raise MissingDataError(f"{data.name} ships no caption corpus (data/embedded/captions/captions.json); "
                                   f"rewrite the world (`dvc repro world`) or give --set captions_file=...")
        return caps
    p = Path(path)
    if p.suffix == ".txt":
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    raw = json.loads(p.read_text())
    if isinstance(raw, list):
        return [str(c) for c in raw]
    first: dict = {}
    for a in sorted(raw.get("annotations", []), key=lambda a: (a["image_id"], a["id"])):
        first.setdefault(a["image_id"], a["caption"])
    if not first:
        raise ConfigError(f"captions_file {p} holds no 'annotations' with captions (COCO captions format)")
    return [first[k] for k in sorted(first)]


def templates_of(cfg: dict) -> list[str]:
    if cfg["templates"] == "none":
        return []
    from common.data.real.templates import OPENAI_IMAGENET_TEMPLATES
    return list(OPENAI_IMAGENET_TEMPLATES)


def corpus(cfg: dict, bundle, data) -> dict:
    """Labelled corpus and its frozen text features: {"texts", "targets", "n_captions", "text"}."""
    parser = LabelParser(synonyms_for(cfg, data), cfg["lemmatizer"])
    texts, targets, n_caps = caption_corpus(read_captions(cfg, data), data.classnames, parser, templates_of(cfg),
                                            int(cfg["n_default"]))
    ids = bundle.tokenizer(texts)               # truncates to the context length (official: 77 tokens)
    text = encode_caption_tokens(PromptTextEncoder(bundle.model), ids)
    return {"texts": texts, "targets": targets, "n_captions": n_caps, "text": text}


def caption_subset(n_captions: int, n_total: int, fraction: float, seed: int) -> torch.Tensor:
    """Rows of a run on `fraction` of the captions (drawn per seed) plus every template sentence."""
    k = max(1, int(round(n_captions * fraction)))
    perm = torch.randperm(n_captions, generator=torch.Generator().manual_seed(7919 * int(seed) + int(fraction * 1e4)))
    return torch.cat([perm[:k].sort().values, torch.arange(n_captions, n_total)])


# ------------------------------------------------------------------------------------------- features
def image_features(cfg: dict, bundle, data, split: str) -> torch.Tensor:
    """Cached (N, 1+hw, D): the no-position attention-pool embedding, then the no-position dense features."""
    return cached_features(bundle, data.name, split, data.split(split), transform="test", kind="taidpt-nopos",
                           batch_size=int(cfg["eval_batch_size"]),
                           encode=lambda x: encode_image_global_dense(bundle.model, x))["features"].float()


def pooled_features(cfg: dict, bundle, data, split: str) -> torch.Tensor:
    return cached_features(bundle, data.name, split, data.split(split), transform="test",
                           batch_size=int(cfg["eval_batch_size"]))["features"].float()


# ------------------------------------------------------------------------------------------- training
def train_config(cfg: dict, seed: int, schedule: dict | None = None) -> TrainConfig:
    d = {**cfg["train"], "seed": int(seed)}
    if schedule:
        d["epochs"] = int(schedule.get("epochs", d["epochs"]))
        d["lr"] = float(schedule.get("lr", d["lr"]))
        d["warmup_epochs"] = min(int(d["warmup_epochs"]), d["epochs"])
    return TrainConfig.from_dict(d)


def builder(cfg: dict, bundle, classnames):
    return lambda: DoubleGrainedPrompt(bundle, classnames, n_ctx=int(cfg["n_ctx"]), ctx_init=cfg["ctx_init"] or None)


def fit(cfg: dict, bundle, data, cor: dict, jobs: list[tuple[float, int]], schedules=None, val=None, val_runs=(),
        desc: str = "") -> list[DoubleGrainedPrompt]:
    """Train one model per (caption fraction, seed) job, batched."""
    n_total = len(cor["targets"])
    subsets = [torch.arange(n_total) if f >= 1 else caption_subset(cor["n_captions"], n_total, f, s) for f, s in jobs]
    models = build_models(builder(cfg, bundle, data.classnames), [s for _, s in jobs])
    tcfgs = [train_config(cfg, s, schedules[i] if schedules else None) for i, (_, s) in enumerate(jobs)]
    return train_many(models, cor["text"], cor["targets"], subsets, tcfgs, int(cfg["batch_size"]),
                      tau_text=float(cfg["tau_text"]), margin=float(cfg["margin"]), desc=desc or f"tai_dpt {data.name} x{len(jobs)}",
                      threads=cfg.get("threads"), val=val, val_runs=val_runs, tau_image=float(cfg["tau_image"]),
                      merge_rate=float(cfg["merge_rate"]))


def _record(cfg, name, method, variant, shots, seed, metrics, wall, n_classes, extra=None) -> dict:
    rec = {"paper": SLUG, "method": method, "variant": variant, "profile": cfg["profile"], "protocol": PROTOCOL,
           "dataset": name, "source": name, "backbone": cfg["arch"], "shots": shots, "seed": seed,
           "n_classes": n_classes, "metrics": {k: round(float(v), 4) for k, v in metrics.items()}, "config": cfg,
           "wall_s": round(wall, 2)}
    rec.update(extra or {})
    write_record(rec)
    print_record(rec)
    return rec


def variant_of(fraction: float) -> str:
    return "" if fraction >= 1 else f"captions{int(round(fraction * 100))}"


def _scores(model, feats, cfg):
    return predict(model, feats, tau=float(cfg["tau_image"]), merge_rate=float(cfg["merge_rate"]))


def zeroshot_mlr(cfg: dict) -> list[dict]:
    """TaI-DPT trained on captions (full corpus and the caption-count ablation) x seeds; test mAP per branch."""
    bundle, out = bundle_for(cfg), []
    fractions = [1.0] + [float(f) for f in cfg["caption_fractions"]]
    for name in cfg["datasets"]:
        jobs = [(f, s) for f in fractions for s in cfg["seeds"]
                if not record_exists(cfg, SLUG, PROTOCOL, name, SLUG, None, s, variant_of(f))]
        if not jobs:
            continue
        data = load_dataset(name, cfg)
        t0 = time.time()
        cor = corpus(cfg, bundle, data)
        print(f"[{SLUG}] {name}: {cor['n_captions']} captions name a class; {len(cor['targets'])} training "
              f"sentences with the templates")
        Xva, Yva = (image_features(cfg, bundle, data, "val"), multi_hot(data.val, data.num_classes)) if data.val \
            else (None, None)
        Xte, Yte = image_features(cfg, bundle, data, "test"), multi_hot(data.test, data.num_classes)
        models = fit(cfg, bundle, data, cor, jobs)
        wall = (time.time() - t0) / len(jobs)
        for (f, s), m in zip(jobs, models):
            v = variant_of(f)
            save_learner(m, run_dir(SLUG, PROTOCOL, cfg["profile"], name, cfg["arch"], SLUG, None, s, v) / PROMPT_FILE)
            sc = _scores(m, Xte, cfg)
            val = _scores(m, Xva, cfg)["merged"] if data.val else None
            n_caps = cor["n_captions"] if f >= 1 else max(1, int(round(cor["n_captions"] * f)))
            extra = {"n_captions": n_caps, "caption_fraction": f}
            base = {"mAP": mean_average_precision(sc["merged"], Yte)}
            if val is not None:
                base["val_mAP"] = mean_average_precision(val, Yva)
            out.append(_record(cfg, name, SLUG, v, None, s, base, wall, data.num_classes, extra))
            if f >= 1:   # the branches of the main model: TaI (global) and the local branch alone
                for branch in ("global", "local"):
                    out.append(_record(cfg, name, SLUG, branch, None, s,
                                       {"mAP": mean_average_precision(sc[branch], Yte)}, wall, data.num_classes, extra))
    return out


def zeroshot_clip(cfg: dict) -> list[dict]:
    """Zero-shot CLIP, the dataset's hand-crafted prompt: on the pooled embedding ("single", the paper's ZSCLIP) and
    on the pooled embedding without positional embedding that TaI-DPT's global branch reads ("nopos")."""
    bundle, out = bundle_for(cfg), []
    for name in cfg["datasets"]:
        data = load_dataset(name, cfg)
        Y = multi_hot(data.test, data.num_classes)
        W = zeroshot_classifier(bundle, data.classnames, [data.template]).float().cpu()
        feats = {"single": lambda: pooled_features(cfg, bundle, data, "test"),
                 "nopos": lambda: image_features(cfg, bundle, data, "test")[:, 0]}
        for variant, get in feats.items():
            seeds = [s for s in cfg["seeds"] if not record_exists(cfg, SLUG, PROTOCOL, name, "zeroshot_clip", None, s, variant)]
            if not seeds:
                continue
            m = mean_average_precision(F.normalize(get(), dim=-1) @ W.t(), Y)
            for s in seeds:      # deterministic: one record per seed keeps the seed grids matched
                out.append(_record(cfg, name, "zeroshot_clip", variant, None, s, {"mAP": m}, 0.0, data.num_classes))
    return out


@inputs("datasets")
def train(cfg: dict) -> list[dict]:
    """zero-shot MLR: TaI-DPT on captions only (and its branches, the caption-count ablation), zero-shot CLIP"""
    return zeroshot_mlr(cfg) + zeroshot_clip(cfg)


def dualcoop_config(cfg: dict) -> dict:
    """papers/dualcoop's config for this profile, on our datasets, seeds, backbone and data."""
    from papers.dualcoop.__main__ import CONFIG as DUAL_CONFIG
    d = load_config(DUAL_CONFIG, cfg["profile"])
    for k in ("arch", "pretrained", "data_root", "datasets", "seeds", "device", "eval_batch_size", "threads", "force"):
        if k in cfg:
            d[k] = cfg[k]
    d["label_proportions"] = list(cfg["partial"]["label_proportions"])
    return d


@inputs("datasets")
def partial(cfg: dict) -> list[dict]:
    """partial-label MLR: DualCoOp (imported) at each label proportion x seed and its ensemble with TaI-DPT"""
    from papers.dualcoop import __main__ as dual
    dcfg = dualcoop_config(cfg)
    rate = float(cfg["partial"]["ensemble_rate"])
    bundle, out = bundle_for(cfg), []
    for name in cfg["datasets"]:
        jobs = [(pp, s) for pp in cfg["partial"]["label_proportions"] for s in cfg["seeds"]
                if not (record_exists(cfg, SLUG, PROTOCOL, name, "dualcoop", pp, s, "")
                        and record_exists(cfg, SLUG, PROTOCOL, name, SLUG, pp, s, "dualcoop_ens"))]
        if not jobs:
            continue
        prompts = {s: kept(run_dir(SLUG, PROTOCOL, cfg["profile"], name, cfg["arch"], SLUG, None, s, "") / PROMPT_FILE,
                           SLUG, "TaI-DPT prompt") for s in cfg["seeds"]}
        data = dual.load_dataset(dcfg, name)
        t0 = time.time()
        scale = dcfg["input_scale"]
        Xtr, Ytr = dual.region_features(dcfg, bundle, data, "train", scale), dual.multi_hot(data.train, data.num_classes)
        Xte_r, Yte = dual.region_features(dcfg, bundle, data, "test", scale), dual.multi_hot(data.test, data.num_classes)
        models = dual.fit_partial(dcfg, bundle, data, "", jobs, Xtr, Ytr,
                                  desc=f"tai_dpt: dualcoop {name} x{len(jobs)}")
        wall = (time.time() - t0) / len(jobs)
        Xte = image_features(cfg, bundle, data, "test")
        tai = {s: _scores(load_learner(p, bundle, DoubleGrainedPrompt), Xte, cfg)["merged"] for s, p in prompts.items()}
        for (pp, s), m in zip(jobs, models):
            sd = dual.predict(m, Xte_r)
            extra = {"label_proportion": pp / 100.0}
            out.append(_record(cfg, name, "dualcoop", "", pp, s, {"mAP": mean_average_precision(sd, Yte)}, wall,
                               data.num_classes, extra))
            out.append(_record(cfg, name, SLUG, "dualcoop_ens", pp, s,
                               {"mAP": mean_average_precision(ensemble(tai[s], sd, rate), Yte)}, wall,
                               data.num_classes, {**extra, "ensemble_rate": rate}))
    return out


@inputs("datasets")
def eval_(cfg: dict) -> list[dict]:
    """re-score the kept TaI-DPT prompts (every seed, full corpus) on the test split"""
    bundle, out = bundle_for(cfg), []
    for name in cfg["datasets"]:
        data = load_dataset(name, cfg)
        Xte, Yte = image_features(cfg, bundle, data, "test"), multi_hot(data.test, data.num_classes)
        for s in cfg["seeds"]:
            path = kept(run_dir(SLUG, PROTOCOL, cfg["profile"], name, cfg["arch"], SLUG, None, s, "") / PROMPT_FILE, SLUG)
            sc = _scores(load_learner(path, bundle, DoubleGrainedPrompt), Xte, cfg)
            vals = {k: mean_average_precision(v, Yte) for k, v in sc.items()}
            note = beside_record("mAP", paper=SLUG, protocol=PROTOCOL, dataset=name, method=SLUG, shots=None, seed=s,
                                 variant="")
            print(f"{name} seed={s} mAP merged {vals['merged']:6.2f} global {vals['global']:6.2f} local {vals['local']:6.2f}"
                  f"{note}")
            out.append({"dataset": name, "seed": s, **vals})
    return out


@inputs("datasets")
def reproduce(cfg: dict) -> None:
    """zero-shot MLR from captions (TaI-DPT, branches, caption ablation, zero-shot CLIP), then partial-label MLR"""
    train(cfg)
    partial(cfg)


@inputs("datasets")
def convergence_cmd(cfg: dict) -> dict:
    """convergence study of TaI-DPT on the full caption corpus, seed 1: lr = official x {1,3,10,30,100} at the
    official 20 epochs, then budgets of 1/8..1 of them; val mAP of the merged score -> papers/tai_dpt/convergence.json"""
    real = load_config(CONFIG, "real")
    cache: dict = {}

    def make_task(name, data, shots, seed):
        return Task(cfg, bundle_for(cfg), load_dataset(name, cfg), shots, seed, None)

    def fit_many(tasks):
        t0 = tasks[0]
        data, bundle = t0.dataset, t0.bundle
        if data.name not in cache:
            cache[data.name] = (corpus(cfg, bundle, data),
                                (image_features(cfg, bundle, data, "val"), multi_hot(data.val, data.num_classes)))
        cor, val = cache[data.name]
        curve = [i for i, t in enumerate(tasks) if t.extra.get("on_eval")]
        models = fit(cfg, bundle, data, cor, [(1.0, t.seed) for t in tasks],
                     schedules=[t.extra.get("schedule") for t in tasks], val=val, val_runs=curve,
                     desc=f"tai_dpt convergence {data.name} x{len(tasks)}")
        return [SimpleNamespace(model=m, train_history=m.train_history,
                                val_history=m.val_history if i in curve else [], val=val)
                for i, m in enumerate(models)]

    return convergence.study(cfg, SLUG, SLUG, "", fit_many,
                             lambda s, t: mean_average_precision(_scores(s.model, s.val[0], cfg)["merged"], s.val[1]),
                             int(real["train"]["epochs"]), float(real["train"]["lr"]), cfg["datasets"], shots=None,
                             make_task=make_task,
                             note="TaI-DPT (global + local prompts, ranking loss) trained on the full caption corpus; "
                                  "the score is the merged val mAP on the validation images")


def main(argv=None):
    commands = {"train": train, "partial": partial, "eval": eval_, "reproduce": reproduce,
                "convergence": convergence_cmd}
    return run_cli(SLUG, CONFIG, {k: threaded(v) for k, v in commands.items()},
                   "TaI-DPT (Guo et al., CVPR 2023): double-grained (global + local) prompts trained on captions only "
                   "(labels parsed from the words), tested on images (mAP); combined with DualCoOp for partial labels. "
                   "Selection on val, never on test.", argv, validate=validate)


if __name__ == "__main__":
    main()
