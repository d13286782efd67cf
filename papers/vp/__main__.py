"""Visual Prompting (VP): `python -m papers.vp {train,eval,reproduce,convergence}`.

train        few-shot VP (the configured prompt shape/size) on every dataset x shots x seeds; writes run records
eval         same as train (a prompt is trained and tested in one go; records are reused when they exist)
reproduce    the paper's protocols the profile supports: the main padding prompt at every shot count, training
             on every image of each training split ("full data", as the paper's Table 1) beside a linear probe on
             the same images, and the prompt design ablation (padding / fixed patch / random patch, sizes)
convergence  the budget study (learning rate, then epochs) -> papers/vp/convergence.json

Run records: method `vp`, variant `<shape><paper size>` (e.g. padding30: a frame of 30 px at the paper's 224 px,
scaled to the model's input side). The full-data runs are few-shot records at `full_data_shots` shots, a count
larger than every class's training set, so every image is used (the record's `shots_used` says how many).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from common.cli import run_cli
from common.clip import logit_scale
from common.config import load_config
from common.engine import TrainConfig, classification_metrics
from common.engine import convergence
from common.engine.batched import RunSchedule
from common.engine.cache import cached_features
from common.engine.convergence import with_schedule
from common.data import Dataset, sample_per_class
from common.data.splits import shots_used
from common.engine.protocols import BatchedFit, Task, run_fewshot
from common.engine.threads import threaded

from .method import SHAPES, PixelPrompt, VPRun, predict, scaled_size, check_prompt, text_weights, train_prompts

SLUG = "vp"
CONFIG = Path(__file__).with_name("config.yaml")


def variant_name(prompt: dict) -> str:
    return f"{prompt['shape']}{int(prompt['size'])}"


def pixel_size(prompt: dict, image_size: int) -> int:
    """The prompt size in the model's pixels: the paper's size (at 224 px) scaled to the input side."""
    return scaled_size(int(prompt["size"]), image_size) if prompt.get("scale_to_input", True) else int(prompt["size"])


def pixels(task: Task, split: str, items=None) -> dict:
    """The split's images after CLIP's test transform (resize, centre crop, normalise), cached like features:
    {"features": (N, 3, S, S), "labels": (N,)}. The prompt changes the pixels, so features cannot be cached."""
    items = task.dataset.split(split) if items is None else items
    return cached_features(task.bundle, task.dataset.name, split, items, transform="test", kind="pixels",
                           encode=lambda x: x, batch_size=int(task.cfg["eval_batch_size"]))


def scale_of(task: Task) -> float:
    value = task.cfg.get("clip_scale")
    return float(value) if value is not None else logit_scale(task.bundle)


def train_config(task: Task) -> TrainConfig:
    cfg = task.cfg
    return with_schedule(TrainConfig.from_dict({**cfg["train"], "seed": task.seed}), task)


class Fitter:
    """Trains the prompts of a group of tasks (one dataset's shots x seeds, or a study's schedules) together."""

    def __init__(self, cfg: dict, prompt: dict):
        self.cfg, self.prompt = cfg, dict(prompt)

    def fit_many(self, tasks: list[Task]) -> list:
        cfg, bundle = self.cfg, tasks[0].bundle
        S = bundle.image_size
        size = pixel_size(self.prompt, S)
        shape = self.prompt["shape"]
        slices = [PixelPrompt(shape, size, S, 1, torch.Generator().manual_seed(t.seed)) for t in tasks]
        prompt = PixelPrompt(shape, size, S, len(tasks))
        with torch.no_grad():
            for name, p in prompt.named_parameters():
                p.copy_(torch.cat([s.get_parameter(name) for s in slices]))
        runs, weights = [], []
        for t in tasks:
            tr = pixels(t, "train")
            w = text_weights(bundle, t.dataset, cfg.get("template"), bool(cfg["clean_names"]))
            tcfg = train_config(t)
            runs.append(VPRun(tr["features"], tr["labels"], w, RunSchedule(tcfg, len(tr["labels"]),
                                                                           int(cfg["batch_size"]), label=str(t.seed))))
            weights.append(w)
        scale = scale_of(tasks[0])
        curve = [i for i, t in enumerate(tasks) if t.extra.get("on_eval")]
        eval_fn, every = None, 0
        if curve:
            vals = {i: pixels(tasks[i], "val") for i in curve}

            def eval_fn():
                out = torch.zeros(len(tasks))
                for i in curve:
                    lg = predict(bundle, prompt, i, vals[i]["features"], weights[i], scale,
                                 int(cfg["eval_batch_size"]), seed=tasks[i].seed)
                    out[i] = classification_metrics(lg, vals[i]["labels"])["top1"]
                return out
            every = convergence.eval_every(max(r.schedule.total_steps for r in runs), 10)
        group = tasks[0].extra.get("group_dir")
        name = tasks[0].dataset.name
        trainer = train_prompts(bundle, prompt, runs, scale, out_dir=group, desc=f"vp {name} x{len(tasks)}",
                                eval_fn=eval_fn, eval_every=every, seed=tasks[0].seed)
        out = []
        for i, t in enumerate(tasks):
            hist = trainer.history[i]
            out.append(SimpleNamespace(prompt=prompt, run=i, weights=weights[i], scale=scale, pixel_size=size,
                                       train_history=hist, val_history=trainer.evals[i]))
        return out


def evaluate(state, task: Task, split: str = "test") -> dict:
    data = pixels(task, split)
    weights = text_weights(task.bundle, task.dataset, task.cfg.get("template"), bool(task.cfg["clean_names"]))
    logits = predict(task.bundle, state.prompt, state.run, data["features"], weights, state.scale,
                     int(task.cfg["eval_batch_size"]), seed=task.seed)
    return {**classification_metrics(logits, data["labels"]), "prompt_px": state.pixel_size}


def fewshot(cfg: dict, prompt: dict, shots=None, datasets=None, seeds=None) -> list[dict]:
    fit = Fitter(cfg, prompt)
    return run_fewshot(cfg, SLUG, SLUG, BatchedFit(fit.fit_many, evaluate), variant=variant_name(prompt),
                       shots=shots, datasets=datasets, seeds=seeds)


def train(cfg: dict) -> list[dict]:
    """few-shot VP with the configured prompt on every dataset x shots x seeds; writes run records"""
    return fewshot(cfg, cfg["prompt"])


def evaluate_cmd(cfg: dict) -> list[dict]:
    """same as train: a prompt is trained and tested in one go (existing records are reused)"""
    return train(cfg)


def full_split(data: Dataset, shots: int, seed: int) -> Dataset:
    """Every training image, and the few-shot protocol's validation sample (min(K, 4) = 4 per class, seeded):
    nothing to persist (the data folder is never written), `shots_used` says how many images each class has."""
    val = sample_per_class(data.val, 4, seed) if data.val else []
    out = replace(data, train=list(data.train), val=val)
    used = shots_used(out.train, shots)
    if used:
        out.meta = {**data.meta, "shots_used": used}
    return out


def full_data(cfg: dict, prompt: dict, datasets, seeds) -> list[dict]:
    """VP and the linear-probe baseline (papers/linear_probe, C chosen on val) on the same full training sets."""
    from papers.linear_probe.__main__ import fit_eval
    fit, shots = Fitter(cfg, prompt), [int(cfg["full_data_shots"])]
    out = run_fewshot(cfg, SLUG, SLUG, BatchedFit(fit.fit_many, evaluate), variant_name(prompt), datasets=datasets,
                      shots=shots, seeds=seeds, split=full_split)
    return out + run_fewshot(cfg, SLUG, "linear_probe", fit_eval, datasets=datasets, shots=shots, seeds=seeds,
                             split=full_split)


def reproduce(cfg: dict) -> None:
    """few-shot curves of the padding prompt, full-data VP vs linear probe, and the prompt design ablation"""
    plan = cfg["reproduce"]
    main = cfg["prompt"]
    fewshot(cfg, main, shots=plan.get("shots"), datasets=plan.get("datasets"))
    full = plan.get("full_data") or {}
    if full.get("enabled", True):
        full_data(cfg, main, full.get("datasets") or plan.get("datasets") or cfg["datasets"],
                  full.get("seeds") or cfg["seeds"])
    abl = plan.get("ablation") or {}
    for p in abl.get("prompts") or []:
        p = {**main, **p}
        if variant_name(p) == variant_name(main):
            continue
        fewshot(cfg, p, shots=abl.get("shots"), datasets=abl.get("datasets"), seeds=abl.get("seeds"))


def input_side(arch: str) -> int | None:
    """The image side of an open_clip architecture (the embedded tiny configs included), without loading it."""
    import open_clip
    conf = open_clip.get_model_config(arch)
    size = (conf or {}).get("vision_cfg", {}).get("image_size")
    return int(size[0] if isinstance(size, (list, tuple)) else size) if size else None


def validate(cfg: dict) -> list[str]:
    """VP's own options, checked before any work: prompt shapes and sizes at the model's input side, the template,
    the full-data shot count, and that every dataset a reproduce plan names is one of `datasets` (so it is checked)."""
    problems = []
    plan = cfg.get("reproduce") or {}
    abl = plan.get("ablation") or {}
    prompts = [cfg["prompt"]] + [{**cfg["prompt"], **p} if isinstance(p, dict) else p for p in abl.get("prompts") or []]
    side = input_side(cfg["arch"])
    for p in prompts:
        if not isinstance(p, dict) or set(p) - {"shape", "size", "scale_to_input"} or not isinstance(p.get("size"), int):
            problems.append(f"a prompt is {{shape: padding|fixed_patch|random_patch, size: <int, pixels at 224>}}, "
                            f"got {p!r}")
            continue
        if p.get("shape") not in SHAPES:
            problems.append(f"prompt shape must be one of {SHAPES}, got {p.get('shape')!r}")
            continue
        if side is not None:
            try:
                check_prompt(p["shape"], pixel_size(p, side), side)
            except ValueError as err:
                problems.append(f"prompt {variant_name(p)} on {cfg['arch']} ({side} px): {err}; choose a smaller "
                                f"prompt.size")
    template = cfg.get("template")
    if template is not None and (not isinstance(template, str) or "{}" not in template):
        problems.append(f"template must contain '{{}}' for the class name (or be null for the dataset's own), "
                        f"got {template!r}")
    if int(cfg["full_data_shots"]) < 1:
        problems.append(f"full_data_shots must be >= 1, got {cfg['full_data_shots']}")
    for where, names in (("reproduce.datasets", plan.get("datasets")),
                         ("reproduce.full_data.datasets", (plan.get("full_data") or {}).get("datasets")),
                         ("reproduce.ablation.datasets", abl.get("datasets"))):
        unknown = [n for n in names or [] if n not in cfg["datasets"]]
        if unknown:
            problems.append(f"{where} names {unknown}, which are not in datasets {cfg['datasets']}; add them to "
                            f"datasets (--set datasets=[...]) or drop them")
    return problems


def convergence_cmd(cfg: dict) -> dict:
    """convergence study of the padding prompt (16 shots, seed 1, study.datasets): learning rate (official 40 x
    study.lr_factors), then budgets up to study.epochs -> papers/vp/convergence.json"""
    fit = Fitter(cfg, cfg["prompt"])
    return convergence.study(cfg, SLUG, SLUG, variant_name(cfg["prompt"]), fit.fit_many,
                             lambda s, t: evaluate(s, t, split="val")["top1"], int(cfg["study"]["epochs"]),
                             float(load_config(CONFIG, "real")["train"]["lr"]), tuple(cfg["study"]["datasets"]),
                             note=cfg["study"]["note"], lr_factors=tuple(cfg["study"]["lr_factors"]))


def main(argv=None):
    commands = {"train": train, "eval": evaluate_cmd, "reproduce": reproduce, "convergence": convergence_cmd}
    return run_cli(SLUG, CONFIG, {k: threaded(v) for k, v in commands.items()},
                   "Visual Prompting (Bahng et al., 2022): a learned pixel-space prompt (padding frame or patch) added "
                   "to every normalised image; the frozen CLIP classifies it with its zero-shot text classifier. "
                   "Epochs and learning rate are chosen on validation data, never on test.", argv, validate=validate)


if __name__ == "__main__":
    main()
