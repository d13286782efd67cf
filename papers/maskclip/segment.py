"""MaskCLIP's evaluation pass: images at the test scale, one forward of the image tower per batch, every requested
setting (variant x vocabulary) predicted from it, confusion matrices accumulated per fold of the split.

A *setting* names the dense source (`value`: MaskCLIP's value path, `attention`: the ordinary query-key attention
at every location, the naive baseline) and a `Refinement` (PD / KS thresholds). A *vocabulary* is the text
classifier (K' >= K classes, the dataset's K first); predictions of an extra (distractor) class count as errors
of the pixel's true class, and the mIoU averages the dataset's K classes only.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from common import metrics
from common.clip.visual import value_path_dense
from common.data.images import load_image
from common.data.real import load_mask

from .method import Refinement, chance_miou, class_logits, refine, upsample_predict

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SOURCES = ("value", "attention")


@dataclass(frozen=True)
class Setting:
    source: str
    refinement: Refinement = Refinement()

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"dense source must be one of {SOURCES}, got {self.source!r}")


def resized_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(w, h) after mmcv's keep-ratio rescale to fit (long_side, long_side): the long side becomes `long_side`."""
    scale = long_side / max(width, height)
    return int(width * scale + 0.5), int(height * scale + 0.5)


def pixel_stats(kind: str, bundle) -> tuple[tuple, tuple]:
    if kind == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if kind == "model":
        from common.engine.cache import mean_std
        return mean_std(bundle)
    raise ValueError(f"pixel_norm must be imagenet or model, got {kind!r}")


class SegImages(torch.utils.data.Dataset):
    """(normalised image resized to `long_side`, mask at the image's own size, index) of segmentation items."""

    def __init__(self, items, long_side: int, mean, std, reduce_zero_label: bool, ignore_index: int):
        self.items, self.long_side = list(items), int(long_side)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.reduce, self.ignore = reduce_zero_label, ignore_index

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        d = self.items[i]
        im = load_image(d.impath)
        mask = load_mask(d.mask, self.reduce, self.ignore)
        if mask.shape != (im.height, im.width):
            raise ValueError(f"mask {d.mask} is {mask.shape[1]}x{mask.shape[0]}, image {d.impath} is "
                             f"{im.width}x{im.height}")
        im = im.resize(resized_size(im.width, im.height, self.long_side), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std, torch.from_numpy(mask), i


def size_batches(items, batch_size: int) -> list[list[int]]:
    """Index batches of images of one size (so they stack), in item order within each size."""
    groups: dict[tuple, list[int]] = {}
    for i, d in enumerate(items):
        with Image.open(d.impath) as im:
            groups.setdefault(im.size, []).append(i)
    return [idx[j:j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]


def fold_ids(n: int, n_folds: int, seed: int = 0) -> torch.Tensor:
    """(n,) fold of each item: a seeded permutation cut into `n_folds` near-equal parts."""
    if n_folds < 1 or n < n_folds:
        raise ValueError(f"cannot cut {n} images into {n_folds} folds")
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    out = torch.empty(n, dtype=torch.long)
    for rank, i in enumerate(perm):
        out[i] = rank * n_folds // n
    return out


@torch.no_grad()
def run_pass(bundle, items, long_side: int, settings: dict[str, Setting], vocabs: dict[str, torch.Tensor],
             num_classes: int, folds: torch.Tensor, n_folds: int, mean, std, reduce_zero_label: bool = False,
             ignore_index: int = 255, batch_size: int = 64, keep: Sequence[int] = (), desc: str = "maskclip"):
    """Confusion matrices {(vocab, setting): (n_folds, K+1, K+1)} (rows: truth, columns: prediction; column K =
    any extra vocabulary class) over `items`, and the kept items' {index: {"image", "mask", (vocab, setting): pred}}."""
    k1 = num_classes + 1
    need_keys = any(s.refinement.t_ks > 0 for s in settings.values())
    need_attn = any(s.source == "attention" for s in settings.values())
    data = SegImages(items, long_side, mean, std, reduce_zero_label, ignore_index)
    loader = torch.utils.data.DataLoader(data, batch_sampler=size_batches(items, batch_size),
                                         collate_fn=lambda b: (torch.stack([x for x, _, _ in b]),
                                                               torch.stack([m for _, m, _ in b]),
                                                               torch.tensor([i for _, _, i in b])))
    device = bundle.device
    cms = {(v, s): torch.zeros(n_folds * k1 * k1, dtype=torch.long) for v in vocabs for s in settings}
    kept: dict[int, dict] = {}
    keep = set(keep)
    text = {v: t.to(device) for v, t in vocabs.items()}
    bundle.model.eval()
    for x, masks, idx in tqdm(loader, desc=desc, leave=False, disable=len(items) < 4 * batch_size):
        x, masks = x.to(device), masks.to(device)
        out = value_path_dense(bundle.model, x, keys=need_keys, attention=need_attn)
        target = masks.clone()
        valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
        base = folds[idx].to(device)[:, None, None] * (k1 * k1)
        for v, t in text.items():
            logits = {src: class_logits(out["dense" if src == "value" else "attention"], t)
                      for src in {s.source for s in settings.values()}}
            for sname, s in settings.items():
                scores = refine(logits[s.source], out["keys"], s.refinement)
                pred = upsample_predict(scores, x.shape[-2:], masks.shape[-2:]).clamp(max=num_classes)
                flat = (base + target.clamp(0, num_classes) * k1 + pred)[valid]
                cms[(v, sname)] += torch.bincount(flat, minlength=n_folds * k1 * k1).cpu()
                for j, i in enumerate(idx.tolist()):
                    if i in keep:
                        kept.setdefault(i, {})[(v, sname)] = pred[j].cpu().numpy().astype(np.int16)
        for j, i in enumerate(idx.tolist()):
            if i in keep:
                kept[i]["mask"] = masks[j].cpu().numpy().astype(np.int16)
                kept[i]["image"] = np.asarray(load_image(items[i].impath), dtype=np.uint8)
    return {k: c.view(n_folds, k1, k1) for k, c in cms.items()}, kept


def fold_scores(cm: torch.Tensor, num_classes: int) -> list[dict]:
    """Per fold: mIoU over the dataset's classes (NaN classes left out) and the chance floor of its ground truth."""
    out = []
    for f in range(cm.shape[0]):
        c = cm[f].numpy()
        out.append({"miou": metrics.miou_from_confusion(c, classes=range(num_classes)),
                    "chance_miou": chance_miou(torch.from_numpy(c.sum(1)[:num_classes]))})
    return out


def miou_all(cm: torch.Tensor, num_classes: int) -> float:
    return metrics.miou_from_confusion(cm.sum(0).numpy(), classes=range(num_classes))


def default_templates(kind: str) -> list[str]:
    from common.data.real.templates import MASKCLIP_TEMPLATES
    if kind == "maskclip":
        return list(MASKCLIP_TEMPLATES)
    if kind == "single":
        return ["a photo of a {}."]
    raise ValueError(f"templates must be maskclip or single, got {kind!r}")
