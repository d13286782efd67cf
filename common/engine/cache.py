"""Feature cache: frozen-encoder features are computed once and stored on disk.

Keyed by (arch, checkpoint hash, dataset, split, transform, view index, the exact item list, and an
optional `kind` for non-global features), so a new checkpoint or another few-shot sample can never
read stale features.

Under `torchrun` (common.engine.distributed) a missing entry is computed by every rank together: each encodes
its share of the items, the rows are gathered in order and rank 0 writes the file. Augmented views draw their
crops from one seeded random stream over the items, so they are encoded by rank 0 alone (the others wait for
the entry): splitting them would change the crops.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..atomic import torch_save_atomic
from ..clip.loader import ClipBundle
from ..data.images import ImageListDataset, build_transform
from ..data.registry import Datum
from ..paths import cache_root
from . import distributed
from .seed import seed_everything


def cache_key(**fields) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def items_digest(items: Sequence[Datum]) -> str:
    h = hashlib.sha256()
    for d in items:
        h.update(f"{d.impath}\t{d.label}\n".encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """A folder of `.pt` files, one per key; writes are atomic so an interrupted run leaves no half file."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_root() / "features"
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def get_or_compute(self, key: str, compute: Callable[[], dict], collective: bool = True) -> dict:
        """The entry `key`, computed and written when missing. Under torchrun rank 0 decides whether it is
        missing; `compute` runs on every rank (`collective`: it is a data-parallel computation) or on rank 0
        alone, and rank 0 writes the file."""
        path = self.path(key)
        if distributed.agree(path.is_file()):
            self.hits += 1
            return torch.load(path, map_location="cpu", weights_only=True)
        self.misses += 1
        if collective or distributed.is_main():
            value = compute()
            if distributed.is_main():
                torch_save_atomic(value, path)
        if not collective:
            distributed.barrier()                     # rank 0 has written the entry
            if not distributed.is_main():
                value = torch.load(path, map_location="cpu", weights_only=True)
        return value


@torch.no_grad()
def encode_items(bundle: ClipBundle, items: Sequence[Datum], transform, batch_size: int = 256,
                 encode: Callable[[torch.Tensor], torch.Tensor] | None = None, desc: str = "encode",
                 num_workers: int = 0) -> torch.Tensor:
    """Run the (frozen) image encoder over `items`, batched, with a progress bar. Under torchrun (`sharded`)
    each rank encodes its share of the items and every rank gets all rows, in the order of `items`."""
    n = len(items)
    sharded = distributed.active()
    if sharded:
        items = distributed.shard(items)
    loader = torch.utils.data.DataLoader(ImageListDataset(items, transform), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers)
    encode = encode or bundle.model.encode_image
    bundle.model.eval()
    out = []
    for images, _, _ in tqdm(loader, desc=desc, leave=False, disable=len(items) < 2 * batch_size):
        out.append(encode(images.to(bundle.device)).float().cpu())
    if sharded:
        width = out[0].shape[1:] if out else _width(bundle, encode)
        local = torch.cat(out) if out else torch.empty((0, *width))
        return distributed.gather_rows(local, n) if n else torch.empty(0)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def _width(bundle: ClipBundle, encode) -> tuple:
    """Feature shape of one image (a rank with no items still takes part in the gather)."""
    x = torch.zeros(1, 3, bundle.image_size, bundle.image_size, device=bundle.device)
    return tuple(encode(x).shape[1:])


def cached_features(bundle: ClipBundle, dataset_name: str, split: str, items: Sequence[Datum],
                    transform: str = "test", view: int = 0, kind: str = "global",
                    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    cache: FeatureCache | None = None, batch_size: int = 256) -> dict:
    """{"features": (N, D) float32 (not normalised), "labels": (N,) long} for `items`.

    `transform` is "test" (deterministic) or an augmentation ("train", "train_flip"); augmented view
    `v` is seeded by `v`, so K views = K cache entries that are each reproducible. `kind` names a
    non-default `encode` function (e.g. "dense") so its features get their own key."""
    cache = cache or FeatureCache()
    key = cache_key(arch=bundle.arch, ckpt=bundle.checkpoint_id, dataset=dataset_name, split=split,
                    transform=transform, view=view, kind=kind, items=items_digest(items),
                    image_size=bundle.image_size)

    augmented = transform != "test"

    def compute() -> dict:
        if augmented:
            seed_everything(1000 + view, deterministic=False)
        tf = build_transform(transform, bundle.image_size, *mean_std(bundle))
        with distributed.alone(augmented):
            feats = encode_items(bundle, items, tf, batch_size, encode,
                                 desc=f"{dataset_name}/{split}/{kind}/v{view}")
        return {"features": feats, "labels": torch.tensor([d.label for d in items], dtype=torch.long)}

    return cache.get_or_compute(key, compute, collective=not augmented)


def mean_std(bundle: ClipBundle):
    """The normalisation the model was trained with, read from open_clip's preprocess pipeline."""
    for t in getattr(bundle.preprocess_val, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(t.mean), tuple(t.std)
    from ..data.images import OPENAI_MEAN, OPENAI_STD
    return OPENAI_MEAN, OPENAI_STD
