"""Data parallel under torchrun on the CPU (gloo, 2 processes) against one process: the same features (sharded
encoding gathered in order; rank 0 writes the cache), the same fine-tuned weights up to float rounding (DDP with
the batch of the single-process schedule split across ranks), and the same WiSE-FT run records."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import papers.wise_ft.__main__ as wise
from common.data import build_dataset
from common.engine import distributed, load_records
from common.engine.cache import FeatureCache, cached_features
from common.engine.threads import torch_threads
from papers.wise_ft.method import batch_loss, finetune_end_to_end, mean_std, state_of, zeroshot_model
from tests.engine.ddp_job import _trainable, job_batch
from tests.papers.helpers import toy_overrides

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow   # two torchrun processes start once for the module
TEMPLATES = ["a photo of a {}.", "a {} object."]
E2E = {"epochs": 2, "lr": 1e-3, "batch_size": 8, "weight_decay": 0.1, "warmup_steps": 1, "grad_clip": 1.0,
       "label_smoothing": 0.0, "crop_scale": [0.5, 1.0], "num_workers": 0}
WISE = {"datasets": None, "shots": None, "xd_source": None, "seeds": "[1]", "dg_shots": 4, "e2e.epochs": 1,
        "e2e.batch_size": 6, "lc.epochs": 2, "alpha_step": 0.5}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_vit):
    """Run tests/engine/ddp_job.py on 2 gloo processes once; returns its folder and the WiSE-FT overrides."""
    folder = tmp_path_factory.mktemp("ddp")
    sets = toy_overrides(folder, tiny_vit, {**WISE, "figure_dir": str(folder)})
    job = {"checkpoint": str(folder / "tiny-vit.pt"), "data_root": str(folder / "data"), "templates": TEMPLATES,
           "e2e": E2E, "wise_argv": ["reproduce", *sets]}
    (folder / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLMT_RUNS": str(folder / "runs_ddp"),
           "VLMT_CACHE": str(folder / "cache_cli_ddp")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "tests.engine.ddp_job", str(folder)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return folder, sets, run.stderr


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def test_two_rank_features_are_the_single_process_features(two_ranks, tiny_vit):
    folder, _, _ = two_ranks
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    ds = build_dataset("toy", folder / "data")
    with torch_threads(1):
        one = cached_features(tiny_vit, "toy", "test", ds.test, cache=FeatureCache(folder / "cache_one"), batch_size=4)
        aug = cached_features(tiny_vit, "toy", "train", ds.train, transform="train", view=0,
                              cache=FeatureCache(folder / "cache_one"), batch_size=4)
    diff = float((ranks[0]["test"] - one["features"]).abs().max())
    print(f"\n2-rank gloo vs 1 process: test features {tuple(one['features'].shape)}, max |diff| = {diff:.3g}")
    assert torch.equal(ranks[0]["test"], ranks[1]["test"])          # gathered in order on every rank
    assert torch.allclose(ranks[0]["test"], one["features"], rtol=0, atol=1e-5)
    assert torch.equal(ranks[0]["aug"], aug["features"])           # augmented views: rank 0 alone, one stream
    written = sorted(p.name for p in (folder / "cache_ddp").iterdir())
    assert len(written) == 2 and all(p.endswith(".pt") for p in written)   # rank 0 wrote; no temporary files left
    stored = torch.load(folder / "cache_ddp" / written[0], weights_only=True)
    assert stored["features"].shape[1] == one["features"].shape[1]


def test_two_rank_fine_tuning_gives_the_single_process_weights(two_ranks, tiny_vit):
    folder, _, _ = two_ranks
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    ds = build_dataset("toy", folder / "data")
    with torch_threads(1):
        zs = zeroshot_model(tiny_vit, ds.classnames, TEMPLATES)
        # the gradient of one 7-image step (ranks hold 4 and 3 images): the whole batch's mean-loss gradient
        model = _trainable(zs)
        x, y = job_batch(tiny_vit)
        batch_loss(model, x, y, len(y)).backward()
        ref = {n: p.grad for n, p in model.named_parameters()}
        gdiff = max(float((ranks[r]["grads"][n] - g).abs().max() / g.abs().max().clamp(min=1e-12))
                    for r in (0, 1) for n, g in ref.items())
        one = state_of(finetune_end_to_end(zs, ds.train, E2E, tiny_vit.image_size, *mean_std(tiny_vit), seed=1,
                                           out_dir=folder / "ckpt_one"))
    theta0 = state_of(zs)
    moved = _max_diff(one, theta0)
    diff = _max_diff(ranks[0]["weights"], one)
    print(f"\n2-rank DDP vs 1 process: one step's gradient max relative diff {gdiff:.3g}; after {E2E['epochs']} "
          f"epochs of AdamW the weights moved by up to {moved:.3g}, max |weight diff| = {diff:.3g}")
    assert gdiff < 1e-4                                               # the loss weighting of unequal shares
    assert _max_diff(ranks[0]["weights"], ranks[1]["weights"]) == 0   # the ranks stay in step
    # float rounding, not another trajectory: Adam divides by sqrt(v), so rounding in near-zero gradients shows up
    # at a fraction of one step (lr 1e-3); another batch split or crop would differ by whole steps
    assert moved > 1e-3 and diff < 0.02 * moved
    assert (folder / "ckpt_ddp" / "checkpoint.pt").is_file() and (folder / "ckpt_ddp" / "train_log.json").is_file()
    assert not list((folder / "ckpt_ddp").glob("*.tmp"))


def test_two_rank_wise_ft_writes_the_single_process_records(two_ranks, tiny_vit, monkeypatch):
    folder, sets, log = two_ranks
    assert "data parallel: rank 0 of 2 on cpu" in log and "data parallel: rank 1 of 2 on cpu" in log
    monkeypatch.setenv("VLMT_RUNS", str(folder / "runs_one"))
    monkeypatch.setenv("VLMT_CACHE", str(folder / "cache_cli_one"))
    wise._STATES.clear()
    wise._EVAL_IMAGES.clear()
    wise.main(["reproduce", *sets])
    key = lambda r: (r["variant"], r["dataset"], r["seed"])  # noqa: E731
    one = {key(r): r["metrics"] for r in load_records(paper="wise_ft")}
    two = {key(r): r["metrics"] for r in load_records(folder / "runs_ddp", paper="wise_ft")}
    assert len(one) == 12 and set(two) == set(one)          # (e2e, lc) x alpha {0, 0.5, 1} x (toy, toy_shift)
    diff = max(abs(two[k][m] - one[k][m]) for k in one for m in one[k])
    print(f"\n2-rank torchrun vs 1 process WiSE-FT reproduce: {len(one)} records, max |metric diff| = {diff}")
    assert diff <= 1e-4   # one unit of the records' last decimal
    assert distributed.world_size() == 1 and not distributed.active()   # this process never joined a group
