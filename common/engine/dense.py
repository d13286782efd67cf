"""Dense (per-location) image features in CLIP's joint space, computed once and cached like global ones.

Modes (`mode`):
- ``attnpool``: the image tower's *final pooling run on every token*. ResNet: the attention pool's full
  self-attention over [mean token; HW tokens] + positions, keeping all HW+1 outputs (output 0 is exactly
  `encode_image`); this is what CALIP's official code returns. ViT: `ln_post` + `proj` on every token.
- ``value``: the shared hook `encode_image_hooked(return_dense=True)`: ResNet value path (v_proj -> c_proj
  per location, with positions; MaskCLIP/DenseCLIP), ViT patch tokens (identical to ``attnpool``).

One cache entry per (dataset, split, transform, view, mode) holds a (N, 1+HW, D) tensor: the global
embedding at index 0 and the HW dense features after it, from the *same* forward pass, so the two stay
aligned on augmented training views.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..clip.loader import ClipBundle
from ..clip.visual import attention_pool_tokens, encode_image_hooked, is_resnet, resnet_feature_map
from ..data.registry import Datum
from .cache import FeatureCache, cached_features

DENSE_MODES = ("attnpool", "value")


def attnpool_tokens(attnpool: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """All HW+1 outputs (n, 1+HW, D) of a CLIP `AttentionPool2d` on a (n, C, h, w) map; [:, 0] is its usual output."""
    return attention_pool_tokens(attnpool, fmap, with_position=True)


def encode_global_and_dense(model: nn.Module, images: torch.Tensor, mode: str = "attnpool") -> torch.Tensor:
    """(n, 1+HW, D): the global image embedding followed by the dense features of `mode` (not normalised)."""
    if mode not in DENSE_MODES:
        raise ValueError(f"dense mode must be one of {DENSE_MODES}, got {mode!r}")
    if mode == "attnpool" and is_resnet(model):
        return attnpool_tokens(model.visual.attnpool, resnet_feature_map(model, images))
    pooled, dense = encode_image_hooked(model, images, return_dense=True)
    return torch.cat([pooled.unsqueeze(1), dense], dim=1)


def dense_features(bundle: ClipBundle, dataset_name: str, split: str, items: Sequence[Datum],
                   transform: str = "test", view: int = 0, mode: str = "attnpool",
                   cache: FeatureCache | None = None, batch_size: int = 256) -> dict:
    """{"global": (N, D), "dense": (N, HW, D), "labels": (N,)} for `items`, from the feature cache."""
    if mode not in DENSE_MODES:
        raise ValueError(f"dense mode must be one of {DENSE_MODES}, got {mode!r}")
    if not items:
        raise ValueError(f"{dataset_name}/{split} has no images to encode")
    out = cached_features(bundle, dataset_name, split, items, transform=transform, view=view,
                          kind=f"dense-{mode}", cache=cache, batch_size=batch_size,
                          encode=lambda x: encode_global_and_dense(bundle.model, x, mode))
    feats = out["features"]
    if feats.dim() != 3:
        raise ValueError(f"dense cache entry for {dataset_name}/{split} has shape {tuple(feats.shape)}, "
                         f"expected (N, 1+HW, D); delete the stale cache file")
    return {"global": feats[:, 0], "dense": feats[:, 1:], "labels": out["labels"]}


def dense_train_views(bundle: ClipBundle, dataset_name: str, items: Sequence[Datum], mode: str = "attnpool",
                      transform: str = "train", views: int = 1, batch_size: int = 256,
                      pool: Sequence[Datum] | None = None) -> list[dict]:
    """Cached dense features of `views` augmented views of the training items (view v seeded by v).

    With `pool` (e.g. the full train split, of which `items` is a few-shot subset) the views of the whole pool
    are encoded once and the items' rows are taken from them, so every shot count and seed shares one
    encoding per view (worth it when the pool is small, as on the embedded profile)."""
    if views < 1:
        raise ValueError(f"need at least one training view, got {views}")
    if pool is None:
        return [dense_features(bundle, dataset_name, "train", items, transform=transform, view=v, mode=mode,
                               batch_size=batch_size) for v in range(views)]
    index = {d.impath: i for i, d in enumerate(pool)}
    missing = [d.impath for d in items if d.impath not in index]
    if missing:
        raise ValueError(f"{len(missing)} training items are not in the pool of {dataset_name} (e.g. {missing[0]})")
    rows = torch.tensor([index[d.impath] for d in items], dtype=torch.long)
    labels = torch.tensor([d.label for d in items], dtype=torch.long)
    out = []
    for v in range(views):
        f = dense_features(bundle, dataset_name, "train", pool, transform=transform, view=v, mode=mode,
                           batch_size=batch_size)
        if not torch.equal(f["labels"][rows], labels):
            raise ValueError(f"labels of the training items differ from the pool's in {dataset_name}")
        out.append({"global": f["global"][rows], "dense": f["dense"][rows], "labels": labels})
    return out


def train_pool(dataset_name: str, data_root, choice: str) -> list[Datum] | None:
    """The `pool` for `dense_train_views`: "full" = the dataset's whole train split, "fewshot" = None (encode
    only the K-shot items; the right choice where the train split is large, e.g. ImageNet)."""
    if choice not in ("full", "fewshot"):
        raise ValueError(f"train_pool must be 'full' or 'fewshot', got {choice!r}")
    if choice == "fewshot":
        return None
    from ..data import build_dataset
    return build_dataset(dataset_name, data_root).train


def fit_dense_head(module: nn.Module, views: list[dict], train_cfg, batch_size: int, seed: int,
                   out_dir=None, desc: str = "train", on_epoch_end=None) -> list[dict]:
    """Train `module(global, dense) -> logits` with cross-entropy on cached views (epoch e uses view
    e mod len(views)); the shared `Trainer` gives the schedule, checkpoints and exact resume.
    `on_epoch_end(epoch) -> dict` adds to each epoch's history record (a convergence study's validation)."""
    from .train import TrainConfig, Trainer, index_batches
    cfg = train_cfg if isinstance(train_cfg, TrainConfig) else TrainConfig.from_dict(dict(train_cfg, seed=seed))
    n = len(views[0]["labels"])
    if any(not torch.equal(v["labels"], views[0]["labels"]) for v in views):
        raise ValueError("training views disagree on labels: they must cover the same items in the same order")
    device = next(iter(module.buffers()), next(module.parameters())).device

    def step(batch):
        view, idx = batch
        d = views[view]
        logits = module(d["global"][idx].to(device), d["dense"][idx].to(device))
        return F.cross_entropy(logits, d["labels"][idx].to(device))

    def batches(epoch):
        return [(epoch % len(views), idx) for idx in index_batches(n, batch_size, seed, epoch)]

    return Trainer(module, cfg, out_dir, desc=desc).fit(step, batches, on_epoch_end)


@torch.no_grad()
def predict_dense(module: nn.Module, feats: dict, batch_size: int = 256) -> torch.Tensor:
    """Logits of `module(global, dense)` over cached features, in batches (eval mode); returned on CPU."""
    was_training = module.training
    module.eval()
    device = next(iter(module.buffers()), next(module.parameters())).device
    out = [module(g.to(device), d.to(device)).float().cpu()
           for g, d in zip(feats["global"].split(batch_size), feats["dense"].split(batch_size))]
    module.train(was_training)
    return torch.cat(out)
