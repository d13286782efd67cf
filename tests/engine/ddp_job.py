"""One rank of the 2-process data-parallel check (tests/engine/test_distributed.py), started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.engine.ddp_job <folder>

<folder>/job.json holds the inputs (checkpoint, data root, fine-tuning options, the WiSE-FT command line); each
rank saves what it computed as <folder>/rank<r>.pt, and rank 0 writes the caches, checkpoints and run records.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(folder: str) -> None:
    folder = Path(folder)
    job = json.loads((folder / "job.json").read_text())
    from common.engine import distributed
    distributed.init_from_env("cpu")                     # gloo
    torch.set_num_threads(1)
    import tests.fixtures.toy  # noqa: F401  registers the toy sets
    from common.clip import load_clip
    from common.data import build_dataset
    from common.engine.cache import FeatureCache, cached_features
    from papers.wise_ft.method import batch_loss, finetune_end_to_end, mean_std, state_of, zeroshot_model

    bundle = load_clip("tiny-vit", job["checkpoint"])
    ds = build_dataset("toy", job["data_root"])
    cache = FeatureCache(folder / "cache_ddp")
    test = cached_features(bundle, "toy", "test", ds.test, cache=cache, batch_size=4)
    aug = cached_features(bundle, "toy", "train", ds.train, transform="train", view=0, cache=cache, batch_size=4)
    zs = zeroshot_model(bundle, ds.classnames, job["templates"])
    # one step's gradient on a 7-image batch (shares of 4 and 3 images): DDP's average of the weighted losses
    grad_model = _trainable(zs)
    net = distributed.wrap(grad_model)
    x, y = job_batch(bundle)
    batch_loss(net, distributed.shard(x), distributed.shard(y), len(y)).backward()
    grads = {n: p.grad.clone() for n, p in grad_model.named_parameters()}
    ft = finetune_end_to_end(zs, ds.train, job["e2e"], bundle.image_size, *mean_std(bundle), seed=1,
                             out_dir=folder / "ckpt_ddp")
    torch.save({"rank": distributed.rank(), "world": distributed.world_size(), "test": test["features"],
                "aug": aug["features"], "weights": state_of(ft), "grads": grads}, folder / f"rank{distributed.rank()}.pt")
    # the entry point itself: `reproduce` of WiSE-FT (E2E fine-tuning, sharded evaluation, rank-0 records)
    import papers.wise_ft.__main__ as wise
    wise.main(job["wise_argv"])
    distributed.shutdown()


def job_batch(bundle) -> tuple[torch.Tensor, torch.Tensor]:
    """7 fixed random images and labels (the gradient check's batch)."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(7, 3, bundle.image_size, bundle.image_size, generator=g), torch.tensor([0, 1, 2, 3, 0, 1, 2])


def _trainable(model: torch.nn.Module) -> torch.nn.Module:
    import copy
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(True)
    return out.train()


if __name__ == "__main__":
    main(sys.argv[1])
