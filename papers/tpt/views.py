"""TPT's augmented views of a test image, drawn from a seed and rendered for many images at once.

The official `AugMixAugmenter` (azshue/TPT data/datautils.py) returns, per test image, the plain test view
(resize + center crop) and N-1 random views: `RandomResizedCrop(224)` (scale 0.08-1, ratio 3/4-4/3, bicubic)
and a horizontal flip of the *original* image, followed for the non-ImageNet sets by AugMix (severity 1,
three chains of 1-3 ops from autocontrast, equalize, posterize, rotate, solarize, shear_x/y, translate_x/y,
Dirichlet(1,1,1) chain weights, a Beta(1,1) mix with the cropped view). It runs PIL per view; here:

- `draw_views` draws every random number of every view of a whole test split from one seeded generator, up
  front, in fixed shapes: image i's views depend on (seed, split, i) only, never on which images share a
  batch or whether a subset is evaluated (a subset takes its rows);
- `render_views` renders the views of several images in a few batched tensor operations: a resized crop is
  a linear map per axis, so each view is `A_rows @ image @ A_cols^T` with resampling matrices taken from
  `torch.nn.functional.interpolate` (bicubic, antialias: PIL's kernel, as torchvision's `resized_crop` on
  tensors), rounded to uint8 as PIL's crop is; the AugMix ops run on uint8 tensors grouped by op, with the
  official magnitudes (severity 1) and PIL's semantics (autocontrast, posterize and solarize as PIL's lookup
  tables, torchvision's PIL-matching equalize, the affine ops as `grid_sample` of PIL's output->input map);
  they equal PIL's ops pixel for pixel, the affine ones up to a rare pixel one level off (tests/papers/test_tpt.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

N_ATTEMPTS = 10                         # torchvision RandomResizedCrop.get_params tries 10 boxes, then the center
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x",
       "translate_y")                   # data/augmix_ops.py `augmentations` (the ImageNet-C overlapping ops left out)
AFFINE = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
WIDTH, MAX_DEPTH = 3, 3                 # AugMix chains and ops per chain (np.random.randint(1, 4))
SEVERITY = 1


@dataclass
class ViewDraws:
    """The random numbers of V views of each of N images (leading axes (N, V)); `take(idx)` selects images."""
    u_scale: torch.Tensor      # (N, V, 10) uniform [0, 1): the area fraction of each crop attempt
    u_ratio: torch.Tensor      # (N, V, 10): its log aspect ratio
    u_top: torch.Tensor        # (N, V): where the crop starts (rows), as a fraction of the free range
    u_left: torch.Tensor       # (N, V)
    flip: torch.Tensor         # (N, V) bool
    weights: torch.Tensor      # (N, V, 3) Dirichlet(1, 1, 1) chain weights
    mix: torch.Tensor          # (N, V) Beta(1, 1) weight of the plain crop
    depth: torch.Tensor        # (N, V, 3) ops per chain, 1..3
    op: torch.Tensor           # (N, V, 3, 3) op index into OPS per chain step
    level: torch.Tensor        # (N, V, 3, 3) sample_level(severity): uniform [0.1, severity)
    negate: torch.Tensor       # (N, V, 3, 3) bool: the sign coin of rotate / shear / translate

    def take(self, idx) -> "ViewDraws":
        return ViewDraws(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @property
    def n_views(self) -> int:
        return int(self.flip.shape[1])


def draw_views(n_images: int, n_views: int, seed: int) -> ViewDraws:
    """Every random number of `n_views` augmented views of `n_images` images (a whole test split), from one
    generator seeded by `seed`, in a fixed order and fixed shapes; image i's views are the i-th rows. The AugMix
    numbers are drawn for every set; sets without AugMix do not use them."""
    if n_images < 0 or n_views < 0:
        raise ValueError(f"n_images and n_views must be >= 0, got {n_images}, {n_views}")
    g = torch.Generator().manual_seed(int(seed))
    N, V = n_images, n_views

    def u(*shape):
        return torch.rand(N, V, *shape, generator=g)
    gamma = -torch.log1p(-u(WIDTH))           # Dirichlet(1,1,1) = normalised Exp(1) draws
    return ViewDraws(u_scale=u(N_ATTEMPTS), u_ratio=u(N_ATTEMPTS), u_top=u(), u_left=u(), flip=u() < 0.5,
                     weights=gamma / gamma.sum(-1, keepdim=True), mix=u(),
                     depth=1 + (u(WIDTH) * MAX_DEPTH).long().clamp(max=MAX_DEPTH - 1),
                     op=(u(WIDTH, MAX_DEPTH) * len(OPS)).long().clamp(max=len(OPS) - 1),
                     level=0.1 + (SEVERITY - 0.1) * u(WIDTH, MAX_DEPTH), negate=u(WIDTH, MAX_DEPTH) > 0.5)


def crop_boxes(d: ViewDraws, height: int, width: int) -> torch.Tensor:
    """(N, V, 4) boxes (top, left, h, w) by torchvision's `RandomResizedCrop.get_params`: the first of 10
    (area, log-ratio) attempts that fits, else the central crop of the clamped aspect ratio."""
    area = height * width
    target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * d.u_scale.double())
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * d.u_ratio.double())
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.long().argmax(-1, keepdim=True)                          # first fitting attempt (0 if none)
    h, w, found = h.gather(-1, first)[..., 0], w.gather(-1, first)[..., 0], ok.any(-1)
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        cw, ch = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        cw, ch = int(round(height * RATIO[1])), height
    else:
        cw, ch = width, height
    h, w = torch.where(found, h, ch), torch.where(found, w, cw)
    top = torch.where(found, (d.u_top * (height - h + 1)).long().clamp(max=height - h), (height - ch) // 2)
    left = torch.where(found, (d.u_left * (width - w + 1)).long().clamp(max=width - w), (width - cw) // 2)
    return torch.stack([top, left, h, w], -1)


_BANKS: dict[tuple[int, int], torch.Tensor] = {}


def resample_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of a 1-D bicubic antialiased resize (torch's `interpolate`, PIL's kernel): column k
    is the resized unit impulse at k. A 2-D resize is this matrix on each axis (the kernel is separable)."""
    eye = torch.eye(n_in, dtype=torch.float64).view(1, n_in, n_in, 1).expand(-1, -1, -1, 4)  # (width 1 reads 0)
    out = F.interpolate(eye, size=(n_out, 4), mode="bicubic", antialias=True, align_corners=False)
    return out[0, :, :, 0].t().float()


def _bank(size: int, out: int) -> torch.Tensor:
    """(size + 1, out, size): entry n = the resize matrix of a length-n crop, zero-padded to `size` columns."""
    key = (size, out)
    if key not in _BANKS:
        bank = torch.zeros(size + 1, out, size)
        for n in range(1, size + 1):
            bank[n, :, :n] = resample_matrix(n, out)
        _BANKS[key] = bank
    return _BANKS[key]


def axis_maps(start: torch.Tensor, length: torch.Tensor, size: int, out: int) -> torch.Tensor:
    """(..., out, size) matrices that crop [start, start + length) of an axis of `size` and resize it to `out`."""
    k = torch.arange(size) - start.unsqueeze(-1)                            # (..., size): position inside the crop
    inside = (k >= 0) & (k < length.unsqueeze(-1))
    rows = _bank(size, out)[length]                                         # (..., out, size)
    picked = rows.gather(-1, k.clamp(0, size - 1).unsqueeze(-2).expand_as(rows))
    return picked * inside.unsqueeze(-2)


def crop_flip(images: torch.Tensor, d: ViewDraws, out: int) -> torch.Tensor:
    """(N, V, C, out, out) uint8 random resized crops (+ flips) of uint8 images (N, C, H, W)."""
    N, C, H, W = images.shape
    V = d.n_views
    box = crop_boxes(d, H, W)
    rows = axis_maps(box[..., 0], box[..., 2], H, out)                      # (N, V, out, H)
    cols = axis_maps(box[..., 1], box[..., 3], W, out)                      # (N, V, out, W)
    cols = torch.where(d.flip[..., None, None], cols.flip(-2), cols)        # a flip reverses the output columns
    # rows: one (V*out, H) @ (H, C*W) product per image; columns: one (C*out, W) @ (W, out) product per view
    x = torch.bmm(rows.reshape(N, V * out, H), images.float().permute(0, 2, 1, 3).reshape(N, H, C * W))
    x = x.view(N * V, out, C, W).transpose(1, 2).reshape(N * V, C * out, W)
    x = torch.bmm(x, cols.reshape(N * V, out, W).transpose(1, 2))
    return x.view(N, V, C, out, out).round_().clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------- AugMix ops

def _int_parameter(level: torch.Tensor, maxval: float) -> torch.Tensor:
    return (level.double() * maxval / 10).long()       # augmix_ops.int_parameter: int(level * maxval / 10)


def _lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Apply per-image, per-channel lookup tables (B, C, 256) to uint8 images (B, C, H, W)."""
    B, C, H, W = x.shape
    return lut.to(torch.uint8).gather(-1, x.reshape(B, C, H * W).long()).view(B, C, H, W)


def affine_matrices(op: torch.Tensor, level: torch.Tensor, negate: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 2, 3) PIL affine data (output pixel -> input position) of the affine ops `OPS[op]` at their levels
    (augmix_ops.py with IMAGE_SIZE = `size`): rotate(deg) about the centre (PIL's inverse map uses -deg),
    shear_x/y by float_parameter(level, 0.3), translate_x/y by int_parameter(level, size / 3) pixels."""
    B = op.shape[0]
    sign = torch.where(negate, -1.0, 1.0).double()
    name = [OPS[k] for k in op.tolist()]
    is_ = lambda n: torch.tensor([x == n for x in name])
    a = -torch.deg2rad(sign * _int_parameter(level, 30).double())
    a = torch.where(is_("rotate"), a, 0.0)
    c, s, half = torch.cos(a), torch.sin(a), size / 2.0
    m = torch.stack([torch.stack([c, s, half - c * half - s * half], -1),
                     torch.stack([-s, c, half + s * half - c * half], -1)], 1)     # identity where a = 0
    shear = sign * level.double() * 0.3 / 10
    shift = sign * _int_parameter(level, size / 3).double()
    m[:, 0, 1] += torch.where(is_("shear_x"), shear, 0.0)
    m[:, 1, 0] += torch.where(is_("shear_y"), shear, 0.0)
    m[:, 0, 2] += torch.where(is_("translate_x"), shift, 0.0)
    m[:, 1, 2] += torch.where(is_("translate_y"), shift, 0.0)
    return m


def pil_affine(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """PIL `Image.transform(AFFINE, m, BILINEAR)` of uint8 images (B, C, S, S): output pixel centre (x, y)
    reads the input at m @ (x, y, 1) (continuous coordinates, pixel centres at +0.5); PIL's bilinear filter
    repeats border pixels inside the image, gives the fill (0) for a source outside it, and truncates. The map
    and the resampling are float32 (1e-3 before truncation absorbs the rounding, so exact shifts stay exact)."""
    B, _, S, _ = x.shape
    centre = torch.arange(S, dtype=torch.float32) + 0.5
    px, py = centre.view(1, 1, S), centre.view(1, S, 1)
    m = m.float().view(B, 2, 3, 1, 1)
    sx = m[:, 0, 0] * px + m[:, 0, 1] * py + m[:, 0, 2]               # (B, S, S) source positions
    sy = m[:, 1, 0] * px + m[:, 1, 1] * py + m[:, 1, 2]
    inside = ((sx >= 0) & (sx < S) & (sy >= 0) & (sy < S)).unsqueeze(1)
    grid = torch.stack([sx, sy], -1) * (2.0 / S) - 1                   # grid_sample's coordinates, align_corners=False
    y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where(inside, y + 1e-3, 0.0).floor_().clamp_(0, 255).to(torch.uint8)


def apply_op(op: str, x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
    """One AugMix op (augmix_ops.py, PIL semantics; `level` = sample_level(severity)) on uint8 images (B, C, S, S)."""
    B, C = x.shape[:2]
    i = torch.arange(256, dtype=torch.float64)
    if op == "autocontrast":  # ImageOps.autocontrast: int(i * scale + offset), scale = 255 / (hi - lo), per channel
        lo = x.amin((-2, -1)).double().unsqueeze(-1)
        hi = x.amax((-2, -1)).double().unsqueeze(-1)
        span = (hi - lo).clamp(min=1)
        scale = torch.full_like(span, 255.0) / span      # a true division, as Python's (not 255 * (1 / span))
        lut = (i * scale + (-lo * scale)).floor_().clamp_(0, 255)
        return _lut(x, torch.where(hi > lo, lut, i))
    if op == "equalize":      # torchvision's equalize is PIL's ImageOps.equalize, per image and channel
        return TF.equalize(x)
    if op == "posterize":     # ImageOps.posterize(img, 4 - int_parameter(level, 4)): keep the top bits
        bits = (4 - _int_parameter(level, 4)).view(-1, 1, 1)
        return _lut(x, (i.long() & ((255 << (8 - bits)) & 255)).expand(B, C, 256))
    if op == "solarize":      # ImageOps.solarize(img, 256 - int_parameter(level, 256)): invert from the threshold up
        threshold = (256 - _int_parameter(level, 256)).view(-1, 1, 1)
        return _lut(x, torch.where(i >= threshold, 255 - i, i).expand(B, C, 256))
    if op in AFFINE:
        k = torch.full((B,), OPS.index(op))
        return pil_affine(x, affine_matrices(k, level, negate, x.shape[-1]))
    raise ValueError(f"unknown AugMix op {op!r}; expected one of {OPS}")


def augmix(crops: torch.Tensor, d: ViewDraws) -> torch.Tensor:
    """AugMix of uint8 crops (N, V, C, S, S) -> float [0, 1]: m * crop + (1 - m) * sum_c w_c * chain_c(crop)
    (data/datautils.py `augmix`; its mix of normalised views is this mix, normalised, as the weights sum to 1).
    Each chain step runs each op once on the views that drew it; the affine ops share one resampling."""
    N, V, C, S, _ = crops.shape
    flat = crops.reshape(N * V, C, S, S)
    depth, op = d.depth.reshape(-1, WIDTH), d.op.reshape(-1, WIDTH, MAX_DEPTH)
    level, negate = d.level.reshape(-1, WIDTH, MAX_DEPTH), d.negate.reshape(-1, WIDTH, MAX_DEPTH)
    affine_ids = torch.tensor([OPS.index(a) for a in AFFINE])
    mixed = torch.zeros(N * V, C, S, S)
    for c in range(WIDTH):
        x = flat.clone()
        for t in range(MAX_DEPTH):
            live, k = depth[:, c] > t, op[:, c, t]
            for j, name in enumerate(OPS):
                if name in AFFINE:
                    continue
                rows = (live & (k == j)).nonzero()[:, 0]
                if rows.numel():
                    x[rows] = apply_op(name, x[rows], level[rows, c, t], negate[rows, c, t])
            rows = (live & torch.isin(k, affine_ids)).nonzero()[:, 0]
            if rows.numel():
                m = affine_matrices(k[rows], level[rows, c, t], negate[rows, c, t], S)
                x[rows] = pil_affine(x[rows], m)
        mixed += d.weights.reshape(-1, WIDTH)[:, c].view(-1, 1, 1, 1) * x.float()
    m = d.mix.reshape(-1, 1, 1, 1)
    return ((m * flat.float() + (1 - m) * mixed) / 255).view(N, V, C, S, S)


def render_views(images: torch.Tensor, d: ViewDraws, out: int, use_augmix: bool, mean, std) -> torch.Tensor:
    """(N, V, C, out, out) normalised views of uint8 images (N, C, H, W): crop + flip, then AugMix if asked."""
    crops = crop_flip(images, d, out)
    x = augmix(crops, d) if use_augmix else crops.float() / 255
    mean = torch.tensor(mean).view(1, 1, -1, 1, 1)
    std = torch.tensor(std).view(1, 1, -1, 1, 1)
    return (x - mean) / std
