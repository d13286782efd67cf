"""DenseCLIP's data, training and evaluation passes.

Two regimes, chosen by `freeze_backbone`:
- **frozen image tower** (the embedded profile): the tower's outputs (the 4-level pyramid, z̄ and z) are computed
  once per image and per view (the image and its horizontal flip) and kept in memory (`FeatureBank`); every step
  trains the text context, the context decoder, gamma and the Semantic FPN on them. RandomFlip(0.5) is exact on
  the cached views (the mask is flipped with its view).
- **fine-tuned image tower** (the official recipe, real profile): images are loaded and augmented per step
  (mmseg's ADE20K pipeline: keep-ratio resize to (2048, 512) x U(0.5, 2), random crop with cat_max_ratio 0.75,
  flip 0.5, CLIP mean/std, pad to the crop with 0 / 255), evaluated with sliding windows.

Training: AdamW in the official parameter groups (`DenseCLIP.param_groups`), mmcv's poly schedule with linear
warm-up over the same fraction of the run as 1500 of 80k iterations, the shared `Trainer` (checkpoints, resume,
NaN guard). mIoU (common.metrics) from confusion matrices of the head's prediction and of the score map's argmax.
"""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from common import metrics
from common.data.images import load_image
from common.data.real import load_mask
from common.engine.seed import seed_everything
from common.engine.train import TrainConfig, Trainer, index_batches

from .method import IGNORE_INDEX, DenseCLIP, denseclip_loss, poly_lr

OFFICIAL_WARMUP_FRACTION = 1500 / 80000   # linear warm-up iterations / total iterations (official schedule)


# --------------------------------------------------------------------------------------------- images
def to_tensor(im: Image.Image, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def rescale_size(w: int, h: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale to fit (long, short) = `scale`: factor min(long / max(w, h), short / min(w, h))."""
    long_side, short_side = max(scale), min(scale)
    f = min(long_side / max(w, h), short_side / min(w, h))
    return int(w * f + 0.5), int(h * f + 0.5)


def read_pair(d, reduce_zero_label: bool, ignore_index: int) -> tuple[Image.Image, np.ndarray]:
    im = load_image(d.impath)
    mask = load_mask(d.mask, reduce_zero_label, ignore_index)
    if mask.shape != (im.height, im.width):
        raise ValueError(f"mask {d.mask} is {mask.shape[1]}x{mask.shape[0]}, image {d.impath} is {im.width}x{im.height}")
    return im, mask


def preload(items, size: int, mean, std, reduce_zero_label: bool = False,
            ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) normalised images resized bilinearly to the network input and (N, H, W) masks at the
    images' own size (all the same size: the embedded set)."""
    xs, ms = [], []
    for d in items:
        im, mask = read_pair(d, reduce_zero_label, ignore_index)
        if ms and mask.shape != ms[0].shape:
            raise ValueError("preload needs images of one size; use the image loader (freeze_backbone=false)")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        xs.append(to_tensor(im, mean, std))
        ms.append(torch.from_numpy(mask))
    return torch.stack(xs), torch.stack(ms).long()


def augment(im: Image.Image, mask: np.ndarray, scale: Sequence[int], crop: int, rng: random.Random, mean, std,
            ratio=(0.5, 2.0), cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX):
    """mmseg's ADE20K training pipeline without the photometric distortion: resize, crop, flip, normalise, pad."""
    r = rng.uniform(*ratio)
    w, h = rescale_size(im.width, im.height, [int(s * r) for s in scale])
    im = im.resize((w, h), Image.BILINEAR)
    mask = np.asarray(Image.fromarray(mask.astype(np.int32)).resize((w, h), Image.NEAREST), dtype=np.int64)
    ch, cw = min(crop, h), min(crop, w)
    for _ in range(10):
        y0, x0 = rng.randint(0, h - ch), rng.randint(0, w - cw)
        m = mask[y0:y0 + ch, x0:x0 + cw]
        _, counts = np.unique(m[m != ignore_index], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    im = im.crop((x0, y0, x0 + cw, y0 + ch))
    mask = mask[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        im, mask = im.transpose(Image.FLIP_LEFT_RIGHT), mask[:, ::-1]
    x = to_tensor(im, mean, std)
    out_x = torch.zeros(3, crop, crop)
    out_m = torch.full((crop, crop), ignore_index, dtype=torch.long)
    out_x[:, :ch, :cw] = x
    out_m[:ch, :cw] = torch.from_numpy(np.ascontiguousarray(mask))
    return out_x, out_m


# ----------------------------------------------------------------------------------------- feature bank
@torch.no_grad()
def backbone_outputs(model: DenseCLIP, images: torch.Tensor, batch_size: int = 64) -> tuple:
    """The frozen tower's (pyramid, z̄, z) of every image, concatenated over batches (eval mode)."""
    model.backbone.eval()
    device = next(model.parameters()).device
    outs = []
    for x in images.split(batch_size):
        feats, g, z = model.backbone(x.to(device))
        outs.append((list(feats), g, z))
    feats = [torch.cat([o[0][i] for o in outs]) for i in range(len(outs[0][0]))]
    g = torch.cat([o[1] for o in outs]) if outs[0][1] is not None else None
    z = torch.cat([o[2] for o in outs]) if outs[0][2] is not None else None
    return feats, g, z


class FeatureBank:
    """Frozen-tower outputs of a set of images: view 0 = the images, view 1 (`flip`) = their horizontal flips, stored
    one after the other (row v * N + i) so a batch of mixed views is one index per tensor."""

    def __init__(self, model: DenseCLIP, images: torch.Tensor, flip: bool, batch_size: int = 64):
        views = [backbone_outputs(model, images, batch_size)]
        if flip:
            views.append(backbone_outputs(model, images.flip(-1), batch_size))
        self.n, self.n_views = len(images), len(views)
        cat = lambda ts: None if ts[0] is None else torch.cat(ts)   # noqa: E731
        self.feats = [cat([v[0][i] for v in views]) for i in range(len(views[0][0]))]
        self.z_global, self.z = cat([v[1] for v in views]), cat([v[2] for v in views])

    def gather(self, idx: torch.Tensor, view: torch.Tensor | None = None) -> tuple:
        """Rows `idx`, each from its view (0 when `view` is None)."""
        rows = idx if view is None else idx + view.clamp(max=self.n_views - 1) * self.n
        pick = lambda t: None if t is None else t.index_select(0, rows)   # noqa: E731
        return [pick(f) for f in self.feats], pick(self.z_global), pick(self.z)


# -------------------------------------------------------------------------------------------- training
class PolyTrainer(Trainer):
    """The shared Trainer with the official AdamW parameter groups and mmcv's iteration-wise poly schedule."""

    def __init__(self, model: DenseCLIP, cfg: TrainConfig, iters_per_epoch: int, backbone_lr_mult: float,
                 out_dir=None, desc: str = "train", power: float = 0.9, min_lr: float = 1e-6,
                 warmup_ratio: float = 1e-6):
        groups = model.param_groups(cfg.lr, cfg.weight_decay, backbone_lr_mult)
        super().__init__(model, cfg, out_dir, params=[p for g in groups for p in g["params"]], desc=desc)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)
        self.ipe = int(iters_per_epoch)
        self.max_iters = cfg.epochs * self.ipe
        self.warmup = int(round(OFFICIAL_WARMUP_FRACTION * self.max_iters))
        self.power, self.min_lr, self.warmup_ratio = power, min_lr, warmup_ratio

    def _set_lr(self, epoch: float) -> float:
        it = epoch * self.ipe
        lr = poly_lr(self.cfg.lr, it, self.max_iters, self.power, self.min_lr, self.warmup, self.warmup_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        return lr


def train_config(tcfg: dict, seed: int, epochs: int | None = None, lr: float | None = None) -> TrainConfig:
    return TrainConfig(epochs=int(epochs if epochs is not None else tcfg["epochs"]),
                       lr=float(lr if lr is not None else tcfg["lr"]), optimizer="adamw",
                       weight_decay=float(tcfg["weight_decay"]), warmup_epochs=0, schedule_unit="iter", seed=seed,
                       checkpoint_every=int(tcfg.get("checkpoint_every", 10**6)))


def fit_cached(model: DenseCLIP, bank: FeatureBank, masks: torch.Tensor, tcfg: TrainConfig, batch_size: int,
               aux_weight: float, tau: float, backbone_lr_mult: float, out_dir=None, desc: str = "denseclip",
               on_epoch_end=None) -> list[dict]:
    """Train on a FeatureBank (frozen tower): per sample a seeded coin picks the image or its flip."""
    n = len(masks)
    n_batches = len(index_batches(n, batch_size, tcfg.seed, 0))
    device = next(model.parameters()).device
    n_views = bank.n_views

    def batches(epoch):
        g = torch.Generator().manual_seed(tcfg.seed * 7919 + epoch)
        flips = torch.randint(0, n_views, (n,), generator=g)
        return [(idx, flips[idx]) for idx in index_batches(n, batch_size, tcfg.seed, epoch)]

    def step(batch):
        idx, view = batch
        feats, z_global, z = bank.gather(idx, view)
        target = masks[idx]
        target = torch.where(view.view(-1, 1, 1).bool(), target.flip(-1), target).to(device)
        out = model.forward_features([f.to(device) for f in feats], None if z_global is None else z_global.to(device),
                                     None if z is None else z.to(device))
        return denseclip_loss(out, target, aux_weight if model.aux else 0.0, tau)

    trainer = PolyTrainer(model, tcfg, n_batches, backbone_lr_mult, out_dir, desc)
    return trainer.fit(step, batches, on_epoch_end)


def fit_images(model: DenseCLIP, items, tcfg: TrainConfig, batch_size: int, aux_weight: float, tau: float,
               backbone_lr_mult: float, scale, crop: int, mean, std, reduce_zero_label: bool, ignore_index: int,
               workers: int = 4, out_dir=None, desc: str = "denseclip", on_epoch_end=None) -> list[dict]:
    """The official regime: the image tower is trained, images are read and augmented every step."""
    n = len(items)
    n_batches = len(index_batches(n, batch_size, tcfg.seed, 0))
    device = next(model.parameters()).device
    pool = ThreadPoolExecutor(max(1, workers))

    def load(arg):
        i, epoch = arg
        im, mask = read_pair(items[i], reduce_zero_label, ignore_index)
        rng = random.Random(tcfg.seed * 1_000_003 + epoch * 100_003 + i)
        return augment(im, mask, scale, crop, rng, mean, std, ignore_index=ignore_index)

    def batches(epoch):
        return [(idx, epoch) for idx in index_batches(n, batch_size, tcfg.seed, epoch)]

    def step(batch):
        idx, epoch = batch
        pairs = list(pool.map(load, [(int(i), epoch) for i in idx]))
        x = torch.stack([p[0] for p in pairs]).to(device)
        y = torch.stack([p[1] for p in pairs]).to(device)
        return denseclip_loss(model(x), y, aux_weight if model.aux else 0.0, tau)

    trainer = PolyTrainer(model, tcfg, n_batches, backbone_lr_mult, out_dir, desc)
    try:
        return trainer.fit(step, batches, on_epoch_end)
    finally:
        pool.shutdown()


# ------------------------------------------------------------------------------------------ evaluation
def _accumulate(cm: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, K: int, ignore_index: int) -> None:
    """Add the (K, K) confusion (rows truth, columns prediction) of logits upsampled bilinearly to the mask size."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    pred = logits.argmax(1)
    valid = (target != ignore_index) & (target >= 0) & (target < K)
    cm += torch.bincount((target[valid] * K + pred[valid]).cpu(), minlength=K * K).view(K, K)


@torch.no_grad()
def evaluate_cached(model: DenseCLIP, bank: FeatureBank, masks: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                    batch_size: int = 64, keep: Sequence[int] = ()) -> dict:
    """{"cm": head confusion, "cm_score": score-map confusion or None, "kept": {i: pred}} on the bank's view 0."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    K = model.num_classes
    cm = torch.zeros(K, K, dtype=torch.long)
    cms = torch.zeros(K, K, dtype=torch.long) if model.language else None
    kept, keep = {}, set(keep)
    for idx in torch.arange(len(masks)).split(batch_size):
        feats, g, z = bank.gather(idx)
        out = model.forward_features([f.to(device) for f in feats], None if g is None else g.to(device),
                                     None if z is None else z.to(device))
        target = masks[idx].to(device)
        _accumulate(cm, out["logits"], target, K, ignore_index)
        if cms is not None:
            _accumulate(cms, out["score_map"], target, K, ignore_index)
        for j, i in enumerate(idx.tolist()):
            if i in keep:
                up = F.interpolate(out["logits"][j:j + 1], size=target.shape[-2:], mode="bilinear", align_corners=False)
                kept[i] = up.argmax(1)[0].cpu().numpy().astype(np.int16)
    model.train(was)
    return {"cm": cm, "cm_score": cms, "kept": kept}


@torch.no_grad()
def slide_logits(model: DenseCLIP, img: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """mmseg's slide inference: (1, K, H, W) logits averaged over crop x crop windows at `stride`."""
    _, _, H, W = img.shape
    K = model.num_classes
    hg = max(H - crop + stride - 1, 0) // stride + 1
    wg = max(W - crop + stride - 1, 0) // stride + 1
    preds = img.new_zeros((1, K, H, W))
    count = img.new_zeros((1, 1, H, W))
    for i in range(hg):
        for j in range(wg):
            y2, x2 = min(i * stride + crop, H), min(j * stride + crop, W)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out = model(img[:, :, y1:y2, x1:x2])["logits"]
            out = F.interpolate(out, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
            preds[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


@torch.no_grad()
def evaluate_images(model: DenseCLIP, items, scale, crop: int, stride: int, mean, std, reduce_zero_label: bool,
                    ignore_index: int) -> dict:
    """Whole-split evaluation on images of any size (real profile): keep-ratio resize to `scale`, slide inference,
    logits resized to the original image, argmax."""
    model.eval()
    device = next(model.parameters()).device
    K = model.num_classes
    cm = torch.zeros(K, K, dtype=torch.long)
    for d in tqdm(items, desc="eval", leave=False, disable=len(items) < 20):
        im, mask = read_pair(d, reduce_zero_label, ignore_index)
        w, h = rescale_size(im.width, im.height, scale)
        x = to_tensor(im.resize((w, h), Image.BILINEAR), mean, std).unsqueeze(0).to(device)
        logits = slide_logits(model, x, crop, stride)
        _accumulate(cm, logits, torch.from_numpy(mask).unsqueeze(0).to(device), K, ignore_index)
    return {"cm": cm, "cm_score": None, "kept": {}}


def miou(cm: torch.Tensor | None) -> float | None:
    return None if cm is None else metrics.miou_from_confusion(cm.numpy(), classes=range(cm.shape[0]))


def build_model(bundle, classnames, variant: str, mcfg: dict, seed: int) -> DenseCLIP:
    """A seeded DenseCLIP (or baseline) from the `model` config block."""
    seed_everything(seed)
    return DenseCLIP(bundle, classnames, variant, **mcfg).to(bundle.device)
