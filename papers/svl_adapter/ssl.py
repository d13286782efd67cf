"""SVL-Adapter's self-supervised branch: a ResNet trained with SimCLR on the target dataset's own
(unlabelled) train + val images, then used frozen as a feature extractor.

- `nt_xent`: SimCLR's normalised-temperature cross-entropy over the 2N views of a batch (each view's
  positive is the other view of the same image; the other 2N - 2 views are its negatives).
- `SimCLRAugment`: the official augmentations (random resized crop 0.2-1, horizontal flip, colour
  distortion of strength 0.5 = jitter(0.4, 0.4, 0.4, 0.1) with p 0.8 + grayscale with p 0.2, ImageNet
  mean/std), applied to a whole batch of images at once with per-image random parameters.
- `build_encoder`: `resnet_tiny` (embedded) or a torchvision ResNet (`resnet18`, `resnet50`), from
  scratch or from torchvision's ImageNet weights (the official code's default init).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.ops import roi_align

from common.data import Datum, ImageListDataset
from common.engine import TrainConfig, Trainer
from common.engine.cache import FeatureCache, cache_key, items_digest

from .method import all_batches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------- loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Mean over the 2N views of -log softmax(cos / tau) at the positive, the view itself left out."""
    if z1.shape != z2.shape or z1.dim() != 2 or len(z1) < 1:
        raise ValueError(f"nt_xent needs two (N, D) views of the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


# --------------------------------------------------------------------------------------- augmentation
def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV in [0, 1]."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / d) % 6, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h)) % 1.0
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hsv`: channel n of RGB is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + 6 * h) % 6
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma with torchvision's rgb_to_grayscale weights."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _per_image(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f.to(x).view(-1, 1, 1, 1)


# Per-image versions of torchvision's adjust_* (a factor per image of the batch), same formulas and clamping.
def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _per_image(f, x)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    m = _gray(x).mean((1, 2, 3), keepdim=True)
    f = _per_image(f, x)
    return (f * x + (1 - f) * m).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _per_image(f, x)
    return (f * x + (1 - f) * _gray(x)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    h = (hsv[:, :1] + _per_image(shift, x)) % 1.0
    return hsv_to_rgb(torch.cat([h, hsv[:, 1:]], 1))


class SimCLRAugment:
    """Batched SimCLR views of (B, 3, H, W) images in [0, 1] (or uint8), each image with its own random
    crop, flip and colour distortion; returns normalised (B, 3, size, size) float tensors.

    As torchvision's ColorJitter, brightness / contrast / saturation factors are drawn from
    [1 - 0.8 s, 1 + 0.8 s] and the hue shift from [-0.2 s, 0.2 s] (s = colour strength), results clamped
    to [0, 1]; the four run in a fixed order (torchvision shuffles it per image)."""

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5,
                 color_strength: float = 0.5, jitter_p: float = 0.8, gray_p: float = 0.2,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.flip_p, self.s, self.jitter_p, self.gray_p = flip_p, color_strength, jitter_p, gray_p
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def crop_boxes(self, b: int, h: int, w: int, gen: torch.Generator | None = None) -> torch.Tensor:
        """(B, 4) boxes x0, y0, x1, y1 in pixels: area fraction ~ U(scale), log aspect ~ U(log ratio);
        sides larger than the image are clipped to it (torchvision retries instead)."""
        area = h * w * (self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(b, generator=gen))
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        logr = lo + (hi - lo) * torch.rand(b, generator=gen)
        bw = torch.sqrt(area * torch.exp(logr)).clamp(1, w)
        bh = torch.sqrt(area / torch.exp(logr)).clamp(1, h)
        x0 = (w - bw) * torch.rand(b, generator=gen)
        y0 = (h - bh) * torch.rand(b, generator=gen)
        return torch.stack([x0, y0, x0 + bw, y0 + bh], 1)

    def color(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Colour jitter with strength s: brightness, contrast, saturation in [1 - 0.8 s, 1 + 0.8 s], hue
        shift in [-0.2 s, 0.2 s], one draw per image."""
        b, s = len(x), self.s

        def draw(lo, hi):
            return lo + (hi - lo) * torch.rand(b, generator=gen)

        x = adjust_brightness(x, draw(1 - 0.8 * s, 1 + 0.8 * s))
        x = adjust_contrast(x, draw(1 - 0.8 * s, 1 + 0.8 * s))
        x = adjust_saturation(x, draw(1 - 0.8 * s, 1 + 0.8 * s))
        return adjust_hue(x, draw(-0.2 * s, 0.2 * s))

    def __call__(self, images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        b, _, h, w = x.shape
        boxes = self.crop_boxes(b, h, w, gen).to(x)  # random draws on the CPU (one stream), applied on x's device
        rois = torch.cat([torch.arange(b, dtype=x.dtype, device=x.device).unsqueeze(1), boxes], 1)
        x = roi_align(x, rois, output_size=self.size, spatial_scale=1.0, sampling_ratio=2, aligned=True)

        def mask(p):
            return (torch.rand(b, generator=gen) < p).view(b, 1, 1, 1).to(x.device)

        x = torch.where(mask(self.flip_p), x.flip(-1), x)
        x = torch.where(mask(self.jitter_p), self.color(x, gen), x)
        x = torch.where(mask(self.gray_p), _gray(x).expand_as(x), x)
        return (x - self.mean.to(x)) / self.std.to(x)


def eval_transform(res: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """The official SSL test transform: plain resize to res x res (no crop), ImageNet mean/std."""
    return T.Compose([T.Resize((res, res), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(),
                      T.Normalize(mean, std)])


def load_uint8(items: Sequence[Datum], size: int, batch_size: int = 256) -> torch.Tensor:
    """All images of `items` resized to size x size, as one uint8 (N, 3, size, size) tensor (SSL pool)."""
    tf = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR), T.PILToTensor()])
    loader = DataLoader(ImageListDataset(items, tf), batch_size=batch_size)
    return torch.cat([x for x, _, _ in loader])


# -------------------------------------------------------------------------------------------- encoder
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A CIFAR-style ResNet for small images: 3x3 stem (stride `stem_stride`), four stages of BasicBlocks
    (widths w, 2w, 4w, 8w, stride 2 from the second on), global average pooling; `feature_dim` = 8w."""

    def __init__(self, width: int = 16, layers: Sequence[int] = (1, 1, 1, 1), stem_stride: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        blocks, cin = [], width
        for i, n in enumerate(layers):
            cout = width * 2 ** i
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = cin

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


def _torchvision_weights_file(arch: str) -> tuple[Path, str]:
    import torchvision
    weights = {"resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
               "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1}[arch]
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name, weights.url


def build_encoder(arch: str, init: str = "scratch", width: int = 16, layers: Sequence[int] = (1, 1, 1, 1),
                  stem_stride: int = 1) -> nn.Module:
    """The SSL backbone with its classifier removed; `.feature_dim` is its output size."""
    if init not in ("scratch", "imagenet"):
        raise ValueError(f"ssl init must be scratch or imagenet, got {init!r}")
    if arch == "resnet_tiny":
        if init != "scratch":
            raise ValueError("resnet_tiny has no ImageNet weights: use ssl.init=scratch")
        return TinyResNet(width, layers, stem_stride)
    if arch not in ("resnet18", "resnet50"):
        raise ValueError(f"unknown SSL backbone {arch!r}; expected resnet_tiny, resnet18 or resnet50")
    import torchvision
    enc = getattr(torchvision.models, arch)(weights=None)
    if init == "imagenet":
        path, url = _torchvision_weights_file(arch)
        if not path.is_file():
            raise FileNotFoundError(
                f"ImageNet weights for the SSL backbone {arch} are not on this machine: put {url} at {path} "
                f"(torchvision's cache), or train from scratch with --set ssl.init=scratch; the embedded profile "
                f"needs neither (ssl.arch=resnet_tiny).")
        enc.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    enc.feature_dim = enc.fc.in_features
    enc.fc = nn.Identity()
    return enc


class SimCLR(nn.Module):
    """Encoder + the standard SimCLR projector (feature -> 512 -> ReLU -> proj_dim)."""

    def __init__(self, encoder: nn.Module, proj_hidden: int = 512, proj_dim: int = 128):
        super().__init__()
        self.encoder = encoder
        self.projector = nn.Sequential(nn.Linear(encoder.feature_dim, proj_hidden), nn.ReLU(inplace=True),
                                       nn.Linear(proj_hidden, proj_dim))

    def forward(self, x):
        return self.projector(self.encoder(x))


def pretrain_simclr(images: torch.Tensor, opts: dict, seed: int, out_dir=None, device="cpu",
                    desc: str = "simclr") -> SimCLR:
    """SimCLR on a uint8 image pool: SGD(momentum 0.9, wd 5e-4), lr = lr_mult * batch / 256, cosine per
    step (official `ssl_pretraining.py`), checkpoint each epoch into `out_dir` (resumable)."""
    if len(images) < 2:
        raise ValueError(f"SimCLR needs at least 2 unlabelled images, got {len(images)}")
    torch.manual_seed(seed)  # the initial weights
    encoder = build_encoder(opts["arch"], opts["init"], opts.get("width", 16), opts.get("layers", (1, 1, 1, 1)),
                            opts.get("stem_stride", 1))
    model = SimCLR(encoder, opts["proj_hidden"], opts["proj_dim"]).to(device)
    aug = SimCLRAugment(opts["res"], tuple(opts["crop_scale"]), color_strength=opts["color_strength"])
    bs = min(int(opts["batch_size"]), len(images))
    cfg = TrainConfig(epochs=int(opts["epochs"]), lr=float(opts["lr_mult"]) * bs / 256, optimizer="sgd",
                      momentum=0.9, weight_decay=float(opts["weight_decay"]), warmup_epochs=0,
                      schedule="cosine", schedule_unit="iter", seed=seed)
    tau = float(opts["temperature"])

    def step(idx):
        x = images[idx].to(device)
        v1, v2 = aug(x), aug(x)
        z = model(torch.cat([v1, v2]))
        return nt_xent(z[: len(idx)], z[len(idx):], tau)

    Trainer(model, cfg, out_dir, desc=desc).fit(step, lambda epoch: all_batches(len(images), bs, seed, epoch))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def state_hash(module: nn.Module) -> str:
    """Content hash of a module's weights and buffers (keys the SSL feature cache)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


@torch.no_grad()
def ssl_features(encoder: nn.Module, dataset: str, split: str, items: Sequence[Datum], res: int,
                 cache: FeatureCache | None = None, batch_size: int = 256, encoder_id: str | None = None) -> dict:
    """{"features": (N, D), "labels": (N,)} of the frozen SSL encoder (eval transform), cached on disk
    under their own key (kind svl_ssl + the encoder's weights hash)."""
    cache = cache or FeatureCache()
    key = cache_key(kind="svl_ssl", encoder=encoder_id or state_hash(encoder), dataset=dataset, split=split,
                    items=items_digest(items), res=res)

    def compute() -> dict:
        encoder.eval()
        device = next(encoder.parameters()).device
        loader = DataLoader(ImageListDataset(items, eval_transform(res)), batch_size=batch_size)
        feats = [encoder(x.to(device)).float().cpu() for x, _, _ in loader]
        return {"features": torch.cat(feats) if feats else torch.empty(0),
                "labels": torch.tensor([d.label for d in items], dtype=torch.long)}

    return cache.get_or_compute(key, compute)
