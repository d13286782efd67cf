"""Data parallel runs under `torchrun` (DistributedDataParallel): one program on every process (rank), each
rank doing a share of the big work and rank 0 writing what is written.

    torchrun --standalone --nproc_per_node 8 -m papers.wise_ft reproduce --profile real ...

`common.cli` starts the process group when `torchrun` set WORLD_SIZE > 1 (NCCL on GPUs, each rank on
`cuda:LOCAL_RANK`; gloo on the CPU). Then:

- feature extraction (`common.engine.cache`): rank r encodes items r, r + W, r + 2W, ... of a split; the rows
  are gathered on every rank in the original order and rank 0 writes the cache entry;
- full fine-tuning (WiSE-FT end to end): each step's batch of the single-process schedule is split the same
  way across ranks (`shard`), gradients are averaged by DDP and every rank's loss is weighted so that the
  average is the whole batch's mean: the weights follow the single-process trajectory up to float rounding;
- run records, resume checkpoints, training logs and feature-cache entries are written by rank 0 only, and
  whether a run is already done is rank 0's answer (`agree`), so every rank takes the same path.

Small work (training on cached features, searches) runs on every rank alike: it is deterministic and cheap.
Without torchrun every function here is the identity of a single process (rank 0 of 1).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from typing import Any, Iterator, Sequence

import torch

_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("alone", default=False)


def available() -> bool:
    return torch.distributed.is_available()


def active() -> bool:
    """Whether this process is one rank of an initialised process group of more than one process (and not inside
    `alone()`)."""
    return (not _ALONE.get() and available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


@contextlib.contextmanager
def alone(enabled: bool = True) -> Iterator[None]:
    """Within this block (when `enabled`) this rank computes as a single process: no sharding, no collective."""
    token = _ALONE.set(bool(enabled) or _ALONE.get())
    try:
        yield
    finally:
        _ALONE.reset(token)


def rank() -> int:
    """This process's rank (0 without torchrun; inside `alone()` still its true rank, so only rank 0 writes)."""
    ok = available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if ok else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu") -> str:
    """Start the process group that `torchrun` described in the environment (once) and return this rank's device:
    `cuda:LOCAL_RANK` when `device` is a CUDA device (NCCL), else `device` (gloo). A single process is left as is."""
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def shutdown() -> None:
    if available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(seq: Sequence, rnk: int | None = None, world: int | None = None):
    """This rank's share of a sequence or tensor: elements rank, rank + W, rank + 2W, ... (sizes differ by at
    most one; the union over ranks is `seq`, and `gather_rows` puts the rows back in its order)."""
    if world is None and not active():
        return seq
    rnk = rank() if rnk is None else rnk
    world = world_size() if world is None else world
    return seq[rnk::world]


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, ...) tensor whose rows rank r computed for `shard(range(n))` (its `local` rows), on every rank, in
    the original order. A single process returns `local` itself."""
    if not active():
        return local
    world = world_size()
    sizes = [len(range(r, n, world)) for r in range(world)]
    if len(local) != sizes[rank()]:
        raise ValueError(f"rank {rank()} holds {len(local)} rows, its share of {n} is {sizes[rank()]}")
    dev = _comm_device()
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: len(local)] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r, (part, size) in enumerate(zip(parts, sizes)):
        out[r::world] = part[:size].cpu()
    return out


def agree(value: Any) -> Any:
    """Rank 0's `value` on every rank (a decision every rank must take alike: is this run done, is this cache
    entry there). A single process returns `value`."""
    if not active():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """`model` under DistributedDataParallel when there are several ranks (BatchNorm made SyncBatchNorm on GPUs,
    so batch statistics are those of the whole batch); the model itself otherwise."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    device = next(model.parameters()).device
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif has_bn and model.training and is_main():
        print("note: BatchNorm layers on the CPU keep per-process batch statistics (SyncBatchNorm needs a GPU), so "
              "this data-parallel run is not the single-process one", file=sys.stderr)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def loss_weight(local: int, total: int) -> float:
    """Factor of a rank's summed loss over its `local` examples of a `total`-example batch, so that DDP's average
    of the ranks' gradients is the gradient of the whole batch's mean loss (exact for unequal shares too)."""
    return world_size() / max(total, 1) if local else 0.0
