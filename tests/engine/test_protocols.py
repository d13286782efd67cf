import pytest
import torch.nn as nn

from common.config import load_config
from common.engine import TrainConfig, Trainer, index_batches, load_records
from common.engine.protocols import run_base2novel, run_fewshot, run_transfer
from common.metrics import harmonic_mean
from tests.papers.helpers import toy_overrides

CONFIG = "papers/zeroshot_clip/config.yaml"


def _cfg(tmp_path, bundle):
    return load_config(CONFIG, "embedded", toy_overrides(tmp_path, bundle)[1::2])


def test_fewshot_writes_records_drops_checkpoints_and_skips_done(tmp_path, tiny_rn):
    cfg = _cfg(tmp_path, tiny_rn)
    seen = []

    def fit_eval(task):
        seen.append((task.dataset.name, task.shots, task.seed, len(task.dataset.train)))
        head = nn.Linear(tiny_rn.embed_dim, task.dataset.num_classes)
        f = task.features("train")
        Trainer(head, TrainConfig(epochs=2, warmup_epochs=0), task.out_dir).fit(
            lambda idx: nn.functional.cross_entropy(head(f["features"][idx]), f["labels"][idx]),
            lambda ep: index_batches(len(f["labels"]), 4, task.seed, ep))
        assert (task.out_dir / "checkpoint.pt").is_file()
        return {"top1": 50.0}

    recs = run_fewshot(cfg, "demo", "demo", fit_eval)
    assert seen == [("toy", 1, 1, 4), ("toy", 2, 1, 8)]
    assert [r["shots"] for r in recs] == [1, 2] and all(r["backbone"] == "tiny-rn" for r in recs)
    assert not list((tmp_path / "runs").rglob("checkpoint.pt")), "finished runs must not leave resume checkpoints"
    assert list((tmp_path / "runs" / "demo" / "_checkpoints").rglob("train_log.json"))
    assert run_fewshot(cfg, "demo", "demo", fit_eval) == [] and len(seen) == 2  # done runs are skipped
    assert len(load_records(paper="demo")) == 2


def test_base2novel_and_transfer(tmp_path, tiny_rn):
    cfg = _cfg(tmp_path, tiny_rn)
    calls = []

    def evaluate(state, task):
        calls.append(task.dataset.classnames)
        return {"top1": 80.0 if "[base]" in task.dataset.name else 40.0}

    rec = run_base2novel(cfg, "demo", "demo", lambda t: None, evaluate)[0]
    assert calls == [["red square", "green circle"], ["blue triangle", "yellow star"]]
    assert rec["metrics"] == {"base": 80.0, "novel": 40.0, "hm": round(harmonic_mean(80, 40), 4)}
    out = run_transfer(cfg, "demo", "demo", "domain_generalization", lambda t: t.dataset.name,
                       lambda state, t: {"top1": 1.0 if t.dataset.name == state else 0.0}, "toy", ["toy_shift"])
    assert [(r["source"], r["dataset"], r["metrics"]["top1"]) for r in out] == [("toy", "toy", 1.0),
                                                                                ("toy", "toy_shift", 0.0)]


def test_records_cover_the_whole_run_say_what_was_used_and_print_metrics(tmp_path, tiny_rn, capsys, monkeypatch):
    """wall_s includes training done before a resume; a class short of K images is recorded as shots_used; every
    run prints its metrics, a finished one too."""
    import common.data.splits as splits
    monkeypatch.setattr(splits, "_NOTED", set())  # the note is printed once per process and (dataset, K)
    cfg = load_config(CONFIG, "embedded", toy_overrides(tmp_path, tiny_rn, {"shots": "[8]"})[1::2])  # toy: 6 per class

    def fit_eval(task, kill=False):
        head = nn.Linear(tiny_rn.embed_dim, task.dataset.num_classes)
        f = task.features("train")
        tr = Trainer(head, TrainConfig(epochs=3, warmup_epochs=0), task.out_dir)
        tr.fit(lambda idx: nn.functional.cross_entropy(head(f["features"][idx]), f["labels"][idx]),
               lambda ep: index_batches(len(f["labels"]), 4, task.seed, ep), max_epochs=1 if kill else None)
        if kill:
            import torch
            ckpt = torch.load(task.out_dir / "checkpoint.pt", weights_only=False)
            ckpt["history"][0]["wall_s"] = 1000.0
            torch.save(ckpt, task.out_dir / "checkpoint.pt")
            raise KeyboardInterrupt
        return {"top1": 50.0}

    import pytest
    with pytest.raises(KeyboardInterrupt):
        run_fewshot(cfg, "demo", "demo", lambda t: fit_eval(t, kill=True))
    rec = run_fewshot(cfg, "demo", "demo", fit_eval)[0]
    assert rec["wall_s"] >= 1000.0
    assert rec["shots"] == 8 and rec["shots_used"] == {"min": 6, "max": 6, "classes_short": 4}
    out = capsys.readouterr()
    assert "4 of 4 classes have fewer than 8 training images (as few as 6)" in out.err
    assert "resumed from" in out.err and "fewshot toy demo k=8 seed=1: top1 50.00\n" in out.out
    assert run_fewshot(cfg, "demo", "demo", fit_eval) == []
    assert "fewshot toy demo k=8 seed=1: top1 50.00  (existing record" in capsys.readouterr().out


def test_backbone_configs_and_their_problems(tmp_path, tiny_rn):
    from common.clip import save_clip_checkpoint
    from common.engine.protocols import backbone_configs, backbone_problems
    ckpt = save_clip_checkpoint(tiny_rn.model, tmp_path / "rn.pt")
    cfg = {"arch": "tiny-rn", "pretrained": str(ckpt), "backbones": []}
    assert backbone_configs(cfg) == [cfg] and backbone_problems(cfg) == []
    cfg["backbones"] = [f"tiny-rn={ckpt}", "tiny-rn"]
    out = backbone_configs(cfg)
    assert [(c["arch"], c["pretrained"]) for c in out] == [("tiny-rn", str(ckpt)), ("tiny-rn", str(ckpt))]
    assert backbone_problems(cfg) == []
    bad = {**cfg, "backbones": [f"tiny-rn={tmp_path / 'nope.pt'}", "=x", "no-such-arch=random"]}
    problems = backbone_problems(bad)
    assert len(problems) == 3 and "does not exist" in problems[0] and "names no arch" in problems[1]
    assert "unknown CLIP architecture" in problems[2]


def test_kept_names_the_missing_prompt_and_the_command_that_makes_it(tmp_path):
    from common.engine.runs import kept
    from common.errors import MissingDataError
    path = tmp_path / "prompt.pt"
    with pytest.raises(MissingDataError, match=r"no trained prompt at .*prompt.pt: run `python -m papers.coop train`"):
        kept(path, "coop")
    path.write_bytes(b"x")
    assert kept(path, "coop") == path


def test_beside_record_prints_the_stored_metric_or_nothing(tmp_path):
    from common.engine.runs import beside_record, write_record
    write_record({"paper": "coop", "method": "coop", "protocol": "fewshot", "profile": "embedded", "dataset": "toy",
                  "backbone": "tiny-rn", "shots": 4, "seed": 1, "metrics": {"top1": 41.5}}, root=tmp_path)
    assert beside_record("top1", root=tmp_path, paper="coop", shots=4, seed=1) == "  (record  41.50)"
    assert beside_record("top1", root=tmp_path, paper="coop", shots=4, seed=2) == ""
