"""ProTeCt: `python -m papers.protect {train,eval,reproduce}`.

Protocol `taxonomic`: K-shot prompt tuning on a dataset with a class taxonomy, evaluated on its test split
with leaf accuracy, HCA and MTA over 25 fixed tree cuts (drawn once per dataset with seed 100 and stored
beside the runs as `runs/protect/taxonomic/<profile>/<dataset>/treecuts_25.json`).

Methods in the run records: `protect` (CoOp + ProTeCt), `coop` variant `protect_baseline` (the same CoOp
prompt learner trained with leaf CE only, same shots/seeds/schedule), `zeroshot_clip` variant `single`
(node prompts from the dataset template, nothing trained), and with `ablation=true` `protect` variants
`dtl_only` (lambda = 0) and `ncl_only` (p = 0).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.cli import inputs, run_cli
from common.errors import ConfigError
from common.clip import logit_scale, zeroshot_classifier
from common.data import Dataset, build_dataset, fewshot_split
from common.engine import TrainConfig, Trainer, index_batches, run_dir, seed_everything, write_record
from common.config import load_config
from common.engine import convergence
from common.engine.cells import owns
from common.engine.convergence import with_schedule
from common.engine.protocols import Task, bundle_for, checkpoint_dir
from common.engine.threads import threaded
from common.paths import runs_root
from papers.coop.method import PromptLearner

from .method import ProTeCt, taxonomic_metrics
from .taxonomy import Taxonomy, TreeCut, cuts_from_json, cuts_to_json

SLUG = "protect"
PROTOCOL = "taxonomic"
CONFIG = Path(__file__).with_name("config.yaml")
BASELINE = ("coop", "protect_baseline")
ZEROSHOT = ("zeroshot_clip", "single")


# ------------------------------------------------------------------------------------------------ data
def datasets_of(cfg: dict) -> list[str]:
    return list(cfg["tax_datasets"] or [cfg["dg_source"]])


def _merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def dataset_config(cfg: dict, name: str) -> dict:
    """The config of one dataset's runs: `dataset_overrides[name]` on top (e.g. ImageNet's batch 8, lambda 1)."""
    return _merged(cfg, (cfg.get("dataset_overrides") or {}).get(name) or {})


def taxonomy_for(cfg: dict, dataset: Dataset) -> Taxonomy:
    """The dataset's taxonomy: `hierarchy` (a JSON {child: parent} file, or {dataset: file}) if given, else the
    dataset's own `meta["hierarchy"]` (a mapping, or a path to such a JSON file)."""
    given = cfg.get("hierarchy")
    if isinstance(given, dict):
        given = given.get(dataset.name)
    if given:
        return Taxonomy.from_json(given, dataset.classnames)
    own = dataset.meta.get("hierarchy")
    if own is None:
        raise ConfigError(
            f"dataset {dataset.name} has no label hierarchy, which ProTeCt needs. Give one as a JSON file "
            f"mapping every class name (and every internal node) to its parent: --set hierarchy=/path/tree.json. "
            f"The paper's trees are the pickled `prepro/data/<dataset>/tree.npy` of gina9726/ProTeCt (CIFAR-100, "
            f"SUN, ImageNet); export each node's parent from them with the class names of this dataset as leaves. "
            f"The embedded profile needs nothing: its generic set emb_objects carries its hierarchy.")
    if isinstance(own, (str, Path)):
        return Taxonomy.from_json(own, dataset.classnames)
    return Taxonomy(own, dataset.classnames)


def eval_cuts(cfg: dict, tax: Taxonomy, dataset: str) -> list[tuple[float, TreeCut]]:
    """The fixed evaluation cuts of `dataset`: read from the runs folder if drawn before, else drawn once."""
    spec = cfg["eval_cuts"]
    rates, per_rate, seed = [float(r) for r in spec["rates"]], int(spec["per_rate"]), int(spec["seed"])
    path = runs_root() / SLUG / PROTOCOL / cfg["profile"] / dataset / f"treecuts_{len(rates) * per_rate}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if (data.get("rates"), data.get("per_rate"), data.get("seed")) == (rates, per_rate, seed):
            try:
                return cuts_from_json(tax, data)
            except ValueError:
                pass  # drawn on another tree: draw again below
    cuts = tax.sample_eval_cuts(rates, per_rate, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    distinct = len({c.key() for _, c in cuts}) == len(cuts)
    path.write_text(json.dumps(cuts_to_json(tax, cuts, rates=rates, per_rate=per_rate, seed=seed,
                                            distinct=distinct, possible_cuts=tax.num_cuts()), indent=1))
    return cuts


# ----------------------------------------------------------------------------------------------- model
def build_model(cfg: dict, bundle, tax: Taxonomy, lam: float, collapse_p: float) -> ProTeCt:
    """CoOp's prompt learner over every node name, wrapped in the ProTeCt objective."""
    prompt = PromptLearner(bundle, tax.prompt_names, n_ctx=cfg["n_ctx"], ctx_init=cfg["ctx_init"] or None,
                           csc=cfg["csc"], class_token_position=cfg["class_token_position"])
    return ProTeCt(tax, prompt, logit_scale(bundle), lam=lam, collapse_p=collapse_p).to(bundle.device)


def fit(task: Task, tax: Taxonomy, lam: float, collapse_p: float, desc: str, val_score=None) -> ProTeCt:
    """Train the node prompts on the cached (augmented) train features of `task`: epoch e reads view
    e % cache_views, so the frozen image encoder never runs during training. `val_score(model)`: a convergence
    study's validation score, logged after every epoch of its curve run."""
    cfg = task.cfg
    model = build_model(cfg, task.bundle, tax, lam, collapse_p)
    views = [task.features("train", transform="train", view=v) for v in range(int(cfg.get("cache_views", 1)))]
    n, device = len(views[0]["labels"]), task.bundle.device

    def batches(epoch: int):
        v = views[epoch % len(views)]
        return [(v["features"][i].to(device), v["labels"][i].to(device))
                for i in index_batches(n, cfg["batch_size"], task.seed, epoch)]

    tcfg = with_schedule(TrainConfig.from_dict({**cfg["train"], "seed": task.seed}), task)
    trainer = Trainer(model, tcfg, task.out_dir, desc=desc)
    on_epoch_end = convergence.epoch_validation(task, lambda: val_score(model)) if val_score else None
    return convergence.keep_history(model, trainer.fit(lambda b: model.loss(*b), batches, on_epoch_end))


@torch.no_grad()
def evaluate(node_embeddings: torch.Tensor, scale: float, task: Task, tax: Taxonomy, cuts,
             split: str = "test") -> dict[str, float]:
    te = task.features(split)
    feats = te["features"].to(node_embeddings.device)
    scores = scale * torch.nn.functional.normalize(feats, dim=-1) @ node_embeddings.t()
    return taxonomic_metrics(scores.cpu(), te["labels"], tax, cuts)


# ------------------------------------------------------------------------------------------------ runs
def _record(cfg, method, variant, dataset, source, shots, seed, values, wall) -> dict:
    return {"paper": SLUG, "method": method, "variant": variant, "profile": cfg["profile"], "protocol": PROTOCOL,
            "dataset": dataset, "source": source, "backbone": cfg["arch"], "shots": shots, "seed": seed,
            "metrics": {k: round(float(v), 4) for k, v in values.items()}, "config": cfg, "wall_s": round(wall, 2)}


def _done(cfg, method, variant, dataset, shots, seed, source) -> bool:
    return (run_dir(SLUG, PROTOCOL, cfg["profile"], dataset, cfg["arch"], method, shots, seed, variant, source)
            / "metrics.json").is_file() and not cfg.get("force", False)


def methods_of(cfg: dict) -> list[tuple[str, str, float, float]]:
    """(method, variant, lambda, collapse p) of every trained run."""
    out = [(SLUG, "", float(cfg["lam"]), float(cfg["collapse_p"]))]
    if cfg["run_baseline"]:
        out.append((*BASELINE, 0.0, 0.0))
    if cfg["ablation"]:
        out += [(SLUG, "dtl_only", 0.0, float(cfg["collapse_p"])), (SLUG, "ncl_only", float(cfg["lam"]), 0.0)]
    return out


def targets_of(cfg: dict, name: str) -> list[str]:
    """Shifted domains evaluated with the prompts trained on `name` (the paper's ImageNet -> A/R/V2/Sketch)."""
    if not cfg["eval_targets"] or name != cfg["dg_source"]:
        return []
    return [t for t in cfg["dg_targets"] if t != name]


def datasets_read(cfg: dict) -> list[str]:
    """Every dataset a command reads: the taxonomic ones and their shifted domains (checked before any work)."""
    return [n for name in datasets_of(cfg) for n in [name, *targets_of(cfg, name)]]


class Trees:
    """Taxonomy and fixed evaluation cuts per dataset, built once per command. A shifted domain without a
    hierarchy of its own uses its source's tree (pruned to its classes)."""

    def __init__(self, cfg: dict):
        self.cfg, self.data, self.trees = cfg, {}, {}

    def dataset(self, name: str) -> Dataset:
        if name not in self.data:
            self.data[name] = build_dataset(name, self.cfg["data_root"])
        return self.data[name]

    def get(self, name: str, source: str | None = None) -> tuple[Taxonomy, list]:
        if name not in self.trees:
            dcfg, ds = dataset_config(self.cfg, source or name), self.dataset(name)
            try:
                tax = taxonomy_for(dcfg, ds)
            except ValueError:
                if source is None or source == name:
                    raise
                tax = Taxonomy(self.get(source)[0].mapping, ds.classnames)
            self.trees[name] = (tax, eval_cuts(dcfg, tax, name))
        return self.trees[name]


def node_embeddings_for(model: ProTeCt, tax: Taxonomy) -> torch.Tensor:
    """The trained prompts on another taxonomy (a shifted domain's sub-tree): CoOp's learned context with
    that tree's node names."""
    if tax.names == model.taxonomy.names:
        return model.node_embeddings()
    return model.prompt.with_classnames(tax.prompt_names).class_embeddings()


def run_taxonomic(cfg: dict, methods: list[tuple[str, str, float, float]] | None = None) -> list[dict]:
    """Train and evaluate every method on every taxonomic dataset x shots x seeds, and on the dataset's
    shifted domains (finished runs are skipped)."""
    methods = methods if methods is not None else methods_of(cfg)
    bundle = bundle_for(cfg)
    jobs = [(d, m, k, s) for d in datasets_of(cfg) for m in methods for k in cfg["shots"] for s in cfg["seeds"]
            if owns(d, k, s)]   # a job of a launch runs its own cells
    out, trees = [], Trees(cfg)
    for name, (method, variant, lam, p), k, seed in tqdm(jobs, desc=f"{SLUG} {PROTOCOL}"):
        dcfg = dataset_config(cfg, name)
        evals = [name] + targets_of(dcfg, name)
        if all(_done(dcfg, method, variant, d, k, seed, name) for d in evals):
            continue
        t0 = time.time()
        tax, _ = trees.get(name)
        run_cfg = {**copy.deepcopy(dcfg), "lam": lam, "collapse_p": p}
        task = Task(run_cfg, bundle, fewshot_split(trees.dataset(name), k, seed), k, seed,
                    checkpoint_dir(run_cfg, SLUG, PROTOCOL, name, method, k, seed, variant))
        seed_everything(seed)
        model = fit(task, tax, lam, p, desc=f"{method}{'-' + variant if variant else ''} {name} k{k} s{seed}")
        with torch.no_grad():
            for d in evals:
                tax_d, cuts_d = trees.get(d, name)
                ds = task.dataset if d == name else trees.dataset(d)
                values = evaluate(node_embeddings_for(model, tax_d), model.scale,
                                  Task(run_cfg, bundle, ds, k, seed, task.out_dir), tax_d, cuts_d)
                out.append(_record(run_cfg, method, variant, d, name, k, seed, values, time.time() - t0))
                write_record(out[-1])
        (Path(task.out_dir) / "checkpoint.pt").unlink(missing_ok=True)  # only for resuming an interrupted run
    return out


def run_zeroshot(cfg: dict) -> list[dict]:
    """Zero-shot CLIP on the taxonomy: node prompts from the dataset's template, nothing trained."""
    bundle = bundle_for(cfg)
    out, trees = [], Trees(cfg)
    for name in datasets_of(cfg):
        if not owns(name, None, 0):   # a job of a launch: another job's cell
            continue
        dcfg = dataset_config(cfg, name)
        for d in [name] + targets_of(dcfg, name):
            if _done(dcfg, *ZEROSHOT, d, None, 0, name):
                continue
            t0 = time.time()
            tax, cuts = trees.get(d, name)
            ds = trees.dataset(d)
            w = zeroshot_classifier(bundle, tax.prompt_names, [ds.template]).to(bundle.device)
            values = evaluate(w, logit_scale(bundle), Task(dcfg, bundle, ds, None, 0, None), tax, cuts)
            out.append(_record(dcfg, *ZEROSHOT, d, name, None, 0, values, time.time() - t0))
            write_record(out[-1])
    return out


def _print(records: list[dict]) -> None:
    for r in records:
        m = r["metrics"]
        name = r["method"] + (f"-{r['variant']}" if r["variant"] else "")
        print(f"{r['dataset']:22s} {name:26s} k{r['shots']} s{r['seed']}  leaf {m['leaf']:6.2f}  "
              f"HCA {m['hca']:6.2f}  MTA {m['mta']:6.2f}")


# -------------------------------------------------------------------------------------------- commands
@inputs(datasets=datasets_read)
def train(cfg: dict) -> list[dict]:
    """train CoOp+ProTeCt (and the leaf-CE CoOp baseline) and evaluate each run as soon as it is trained"""
    recs = run_taxonomic(cfg)
    _print(recs)
    return recs


@inputs(datasets=datasets_read)
def evaluate_cmd(cfg: dict) -> list[dict]:
    """same as train (finished runs are skipped); also evaluates zero-shot CLIP on the taxonomy"""
    recs = run_taxonomic(cfg) + (run_zeroshot(cfg) if cfg["run_zeroshot"] else [])
    _print(recs)
    return recs


@inputs(datasets=datasets_read)
def reproduce(cfg: dict) -> list[dict]:
    """the paper's protocol: zero-shot CLIP, CoOp and CoOp+ProTeCt (plus the loss ablation if enabled) on the
    taxonomic datasets; MaPLe+ProTeCt waits for MaPLe"""
    recs = (run_zeroshot(cfg) if cfg["run_zeroshot"] else []) + run_taxonomic(cfg)
    _print(recs)
    return recs


def convergence_cmd(cfg: dict) -> dict:
    """convergence study of ProTeCt at the official CIFAR-100/SUN recipe (SGD without momentum, 200 epochs; 16 shots,
    seed 1) on the taxonomic set: learning rate, then budgets -> papers/protect/convergence.json"""
    official = load_config(CONFIG, "real")["train"]
    cfg = {**cfg, "train": dict(official)}
    trees, bundle = Trees(cfg), bundle_for(cfg)
    name = datasets_of(cfg)[0]
    tax, cuts = trees.get(name)
    lam, p = float(cfg["lam"]), float(cfg["collapse_p"])

    def make_task(dataset_name, data, shots, seed):
        return Task({**copy.deepcopy(dataset_config(cfg, dataset_name)), "lam": lam, "collapse_p": p}, bundle,
                    fewshot_split(trees.dataset(dataset_name), shots, seed), shots, seed, None)

    def mta(model, task):
        with torch.no_grad():
            return evaluate(model.node_embeddings(), model.scale, task, tax, cuts, "val")["mta"]

    def fit_one(t):
        return fit(t, tax, lam, p, f"{SLUG} convergence {name}", lambda m: mta(m, t))
    return convergence.study(cfg, SLUG, SLUG, "", convergence.one_by_one(fit_one), mta,
                             int(official["epochs"]), float(official["lr"]), [name], make_task=make_task,
                             lr_factors=(1, 10), note="the validation score is ProTeCt's MTA (mean tree-cut "
                             "accuracy over the fixed cuts), its headline metric; the taxonomic set only")


def main(argv=None):
    # every command under cfg["threads"] intra-op threads, encoding included (common/engine/threads.py)
    commands = {"train": train, "eval": evaluate_cmd, "reproduce": reproduce, "convergence": convergence_cmd}
    return run_cli(SLUG, CONFIG, {k: threaded(v) for k, v in commands.items()},
                   "ProTeCt (Wu, Ho, Vasconcelos, CVPR 2024): prompts for every taxonomy node trained with the "
                   "dynamic treecut and node-centric losses on top of CoOp; leaf accuracy, HCA and MTA.", argv)


if __name__ == "__main__":
    main()
