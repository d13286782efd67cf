"""WiSE-FT (Wortsman et al., CVPR 2022): fine-tune a zero-shot CLIP classifier, then ensemble the
zero-shot and fine-tuned weights, theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1.

The classifier is the image tower followed by a linear head on the L2-normalised image feature. The
zero-shot head (theta_0) holds the normalised text classifier multiplied by exp(logit_scale), bias 0, so
the temperature lives inside the head and is fine-tuned and interpolated like every other weight (the
official `ClassificationHead`). The text tower is only used to build that head.

Two fine-tuning variants (official `--freeze-encoder` flag):
- end-to-end (E2E): image tower + head trained from theta_0;
- linear classifier (LC): tower frozen, head trained on cached features. The tower is shared, so the
  weight ensemble equals the logit ensemble (1 - alpha) f(x; theta_0) + alpha f(x; theta_1).

End-to-end fine-tuning runs data-parallel under torchrun (common.engine.distributed): every step's batch of
the single-process schedule is split across ranks, DDP averages the gradients and each rank's loss is weighted
so the average is the whole batch's mean. Each training image's augmentation is drawn from a generator seeded by
(seed, epoch, image index), so a crop does not depend on which process, worker or batch position decodes it:
the weights are the single-process ones up to float rounding.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms as T

from common.clip import ClipBundle, logit_scale, zeroshot_classifier
from common.data import Datum, ImageListDataset
from common.engine import TrainConfig, Trainer, distributed, index_batches
from common.engine.cache import mean_std
from common.engine.convergence import keep_history
from common.errors import ConfigError

ALPHA_DECIMALS = 6


# ----------------------------------------------------------------------------------------- the model
class ClassificationHead(nn.Linear):
    """logits = W normalize(x) + b (official `ClassificationHead(normalize=True, ...)`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, normalize: bool = True):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features)
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias if bias is not None else torch.zeros(out_features))
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return F.linear(features, self.weight, self.bias)


class ImageClassifier(nn.Module):
    """CLIP's image tower (`model.visual`, projection included) + classification head."""

    def __init__(self, visual: nn.Module, head: ClassificationHead):
        super().__init__()
        self.visual = visual
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images))


def zeroshot_head(bundle: ClipBundle, classnames: Sequence[str], templates: Sequence[str]) -> ClassificationHead:
    """theta_0's head: exp(logit_scale) * normalised text classifier (template ensemble), bias 0."""
    weights = zeroshot_classifier(bundle, list(classnames), list(templates)).float().cpu()
    return ClassificationHead(weights * logit_scale(bundle))


def zeroshot_model(bundle: ClipBundle, classnames: Sequence[str], templates: Sequence[str]) -> ImageClassifier:
    """theta_0: a trainable fp32 copy of the image tower with the zero-shot head; the text tower is
    not part of it (and the bundle's own model is left untouched)."""
    visual = copy.deepcopy(bundle.model.visual).float()
    model = ImageClassifier(visual, zeroshot_head(bundle, classnames, templates)).to(bundle.device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------------- weight ensembling
def interpolate(theta_0: dict[str, torch.Tensor], theta_1: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * theta_0 + alpha * theta_1 on every entry (weights and buffers). Float entries are
    mixed in fp32 and cast back; integer buffers (BatchNorm counters) are mixed and rounded."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if set(theta_0) != set(theta_1):
        diff = sorted(set(theta_0) ^ set(theta_1))
        raise ValueError(f"state dicts differ in keys ({len(diff)}), e.g. {diff[:5]}: not the same architecture")
    out = {}
    for key, a in theta_0.items():
        b = theta_1[key]
        if a.shape != b.shape:
            raise ValueError(f"{key}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.is_floating_point():
            out[key] = ((1.0 - alpha) * a.float() + alpha * b.float()).to(a.dtype)
        else:
            out[key] = torch.round((1.0 - alpha) * a.double() + alpha * b.double()).to(a.dtype)
    return out


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def alpha_grid(step: float) -> list[float]:
    """0, step, ..., 1 (rounded so that 0.1 * 3 prints as 0.3)."""
    if not 0 < step <= 1:
        raise ValueError(f"alpha step must be in (0, 1], got {step}")
    n = round(1 / step)
    if abs(n * step - 1) > 1e-9:
        raise ValueError(f"alpha step {step} does not divide [0, 1] evenly")
    return [round(i / n, ALPHA_DECIMALS) for i in range(n + 1)]


def alpha_name(alpha: float) -> str:
    return f"{alpha:g}"


# ---------------------------------------------------------------------------------- class projection
def class_projection(source: Sequence[str], target: Sequence[str]) -> torch.Tensor | None:
    """Columns of the source head that answer a target's classes (ImageNet-A/-R keep 200 of the 1000
    classes: WiSE-FT scores them on the projected logits). None when the class lists are identical."""
    if list(source) == list(target):
        return None
    index = {c: i for i, c in enumerate(source)}
    missing = [c for c in target if c not in index]
    if missing:
        raise ValueError(f"{len(missing)} target classes are not classes of the fine-tuned head, e.g. "
                         f"{missing[:5]}: WiSE-FT evaluates shifts of the training label set only")
    return torch.tensor([index[c] for c in target], dtype=torch.long)


# -------------------------------------------------------------------------------------------- data
def train_transform(image_size: int, mean, std, scale=(0.9, 1.0)) -> T.Compose:
    """The official fine-tuning augmentation: RandomResizedCrop(scale 0.9-1, bicubic), no flip."""
    return T.Compose([T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
                      T.ToTensor(), T.Normalize(mean, std)])


class SeededImages(ImageListDataset):
    """Images whose random augmentation is a function of (seed, epoch, index): the transform of image i runs
    under a generator state seeded by them (the process's own random state is left untouched)."""

    def __init__(self, items, transform, seed: int):
        super().__init__(items, transform)
        self.seed, self.epoch = seed, 0

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + i)
            return super().__getitem__(i)


class EpochImages:
    """Index batches for the Trainer (a pure function of seed and epoch, so resume is exact) and a
    DataLoader that decodes and augments exactly those batches (under torchrun: this rank's share of each),
    in workers if asked."""

    def __init__(self, items: Sequence[Datum], transform, batch_size: int, seed: int, num_workers: int = 0):
        if not items:
            raise ValueError("no training images")
        self.dataset = SeededImages(items, transform, seed)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self._it = None

    def __len__(self) -> int:
        return len(self.dataset)

    def steps_per_epoch(self) -> int:
        return len(index_batches(len(self.dataset), self.batch_size, self.seed, 0))

    def batches(self, epoch: int) -> list[torch.Tensor]:
        idx = index_batches(len(self.dataset), self.batch_size, self.seed, epoch)
        self.dataset.epoch = epoch
        self._it = iter(DataLoader(self.dataset, batch_sampler=[distributed.shard(b).tolist() for b in idx],
                                   num_workers=self.num_workers))
        return idx

    def load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's images and labels of the batch `idx` (all of them in a single process)."""
        images, labels, ids = next(self._it)
        if not torch.equal(ids, distributed.shard(idx)):
            raise RuntimeError("image loader out of step with the trainer's batches")
        return images, labels


def load_images(items: Sequence[Datum], transform, batch_size: int = 256, num_workers: int = 0) -> torch.Tensor:
    """Decode and transform `items` into one (N, 3, H, W) tensor (evaluation sets that fit in memory)."""
    loader = DataLoader(ImageListDataset(items, transform), batch_size=batch_size, num_workers=num_workers)
    return torch.cat([x for x, _, _ in loader])


@torch.no_grad()
def predict(model: nn.Module, images, batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits of `model` on a (N, 3, H, W) tensor or on an iterable of (images, ...) batches."""
    model.eval()
    chunks = images.split(batch_size) if isinstance(images, torch.Tensor) else (b[0] for b in images)
    out = [model(x.to(device)).float().cpu() for x in chunks]
    return torch.cat(out) if out else torch.empty(0)


# ------------------------------------------------------------------------------------- fine-tuning
def train_config(opts: dict, steps_per_epoch: int, seed: int) -> TrainConfig:
    """The official schedule: AdamW, linear warm-up over `warmup_steps` then cosine, per step;
    `grad_clip` 1.0 for E2E. Warm-up steps become the Trainer's (fractional) warm-up epochs."""
    warmup = min(float(opts.get("warmup_steps", 0)) / max(steps_per_epoch, 1), float(opts["epochs"]))
    return TrainConfig(epochs=int(opts["epochs"]), lr=float(opts["lr"]), optimizer="adamw",
                       weight_decay=float(opts["weight_decay"]), warmup_epochs=warmup, warmup_type="linear",
                       schedule="cosine", schedule_unit="iter", grad_clip=opts.get("grad_clip"),
                       amp=bool(opts.get("amp", False)), seed=seed)


def batch_loss(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int,
               smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of this process's `images` of a `batch`-image step: their summed loss weighted so that the
    gradient (DDP's average over ranks under torchrun) is that of the whole batch's mean loss."""
    loss = F.cross_entropy(net(images), labels, label_smoothing=smoothing, reduction="sum")
    return loss * distributed.loss_weight(len(labels), batch)


def finetune_end_to_end(theta0_model: ImageClassifier, items: Sequence[Datum], opts: dict, image_size: int,
                        mean, std, seed: int, out_dir=None, desc: str = "wise_ft e2e",
                        val_score=None) -> ImageClassifier:
    """Standard fine-tuning of tower + head from theta_0 with cross-entropy (optional label smoothing).
    Returns a new model; `theta0_model` is not modified. Under torchrun: data parallel (module docstring).
    `val_score(model) -> float`: a convergence study's validation, logged after every epoch."""
    model = copy.deepcopy(theta0_model)
    for p in model.parameters():
        p.requires_grad_(True)
    device = next(model.parameters()).device
    batch = int(opts["batch_size"])
    if batch < distributed.world_size():
        raise ConfigError(f"e2e.batch_size {batch} is smaller than the {distributed.world_size()} data-parallel "
                          f"processes: give every process at least one image per step")
    data = EpochImages(items, train_transform(image_size, mean, std, opts.get("crop_scale", (0.9, 1.0))),
                       batch, seed, int(opts.get("num_workers", 0)))
    cfg = train_config(opts, data.steps_per_epoch(), seed)
    smoothing = float(opts.get("label_smoothing", 0.0))
    net = distributed.wrap(model)      # DDP under torchrun, else the model itself

    def step(idx):
        images, labels = data.load(idx)
        return batch_loss(net, images.to(device), labels.to(device), len(idx), smoothing)

    def validate(epoch):
        out = {"val": float(val_score(model))}
        model.train()
        return out

    history = Trainer(model, cfg, out_dir, desc=desc).fit(step, data.batches, validate if val_score else None)
    for p in model.parameters():
        p.requires_grad_(False)
    return keep_history(model.eval(), history)


def finetune_linear(head0: ClassificationHead, features: torch.Tensor, labels: torch.Tensor, opts: dict,
                    seed: int, out_dir=None, desc: str = "wise_ft lc") -> ClassificationHead:
    """The LC variant: only the head is trained (warm-started from theta_0's head) on frozen features."""
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} features but {len(labels)} labels")
    head = copy.deepcopy(head0)
    for p in head.parameters():
        p.requires_grad_(True)
    device = head.weight.device
    feats, labels = features.float().to(device), labels.to(device)
    bs = int(opts["batch_size"])
    steps = len(index_batches(len(feats), bs, seed, 0))
    cfg = train_config(opts, steps, seed)
    smoothing = float(opts.get("label_smoothing", 0.0))

    def step(idx):
        return F.cross_entropy(head(feats[idx]), labels[idx], label_smoothing=smoothing)

    Trainer(head, cfg, out_dir, desc=desc).fit(step, lambda epoch: index_batches(len(feats), bs, seed, epoch))
    for p in head.parameters():
        p.requires_grad_(False)
    return head.eval()


__all__ = ["ClassificationHead", "ImageClassifier", "alpha_grid", "alpha_name", "batch_loss", "class_projection",
           "finetune_end_to_end", "finetune_linear", "interpolate", "load_images",
           "mean_std", "predict", "state_of", "train_config", "train_transform", "zeroshot_head", "zeroshot_model"]
