"""MaskCLIP (Zhou, Loy, Dai, ECCV 2022): annotation-free segmentation from CLIP's last-layer value path.

Dense features come from `common.clip.visual.value_path_dense` (ResNet: c_proj(v_proj(X)) at every location;
ViT: the last block with each token attending only to itself). The class classifier is CLIP's prompt ensemble
(the 85 MaskCLIP templates). On the feature grid the logits are plain cosines S_k(i) = cos(F(i), T_k); the two
inference refinements of the paper (Sec. 3.3) act on that grid, in the official order (`MaskClipHead.refine_output`):

- prompt denoising (PD): a class whose probability softmax(100 S)(i) stays below `t_pd` at every location of
  the image is taken as absent: its logits become -100 everywhere;
- key smoothing (KS): with P = softmax(100 S) (after PD), P(i) <- sum_j w(i, j) P(j) at the locations whose
  largest probability is below `t_ks` (1.0: everywhere), w = the similarity of the final attention's keys.
  `ks_norm="cosine"` is the paper's cosine of k_i and k_j; `"official"` is what the released code computes
  (`F.normalize(k)` on a (N, HW, C) tensor normalises each channel over the locations, not each key).

The grid scores are then upsampled bilinearly (align_corners=False) to the network input and to the image,
as mmseg's `EncoderDecoder` does, and arg-maxed. Nothing is trained.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TEMPERATURE = 100.0   # the softmax temperature of PD and KS (hard-coded in the official head)
PD_FILL = -100.0      # the logit an absent class gets (official)
KS_NORMS = ("cosine", "official")


@dataclass(frozen=True)
class Refinement:
    """One inference setting: PD threshold (0 = off), KS threshold (0 = off) and the key-similarity form."""

    t_pd: float = 0.0
    t_ks: float = 0.0
    ks_norm: str = "cosine"

    def __post_init__(self):
        if not 0.0 <= self.t_pd <= 1.0 or not 0.0 <= self.t_ks <= 1.0:
            raise ValueError(f"thresholds must lie in [0, 1], got t_pd={self.t_pd}, t_ks={self.t_ks}")
        if self.ks_norm not in KS_NORMS:
            raise ValueError(f"ks_norm must be one of {KS_NORMS}, got {self.ks_norm!r}")


def class_logits(dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(n, K, h, w) cosines of dense features (n, h, w, D) with normalised class embeddings (K, D)."""
    return torch.einsum("nhwd,kd->nkhw", F.normalize(dense.float(), dim=-1), F.normalize(text.float(), dim=-1))


def prompt_denoise(logits: torch.Tensor, t_pd: float, temperature: float = TEMPERATURE) -> torch.Tensor:
    """PD: classes whose softmax(temperature * logits) never reaches `t_pd` in the image get `PD_FILL` everywhere.
    `t_pd <= 0` is a no-op (the official `pd_thresh > 0` switch)."""
    if t_pd <= 0:
        return logits
    n, k = logits.shape[:2]
    conf = F.softmax(logits * temperature, dim=1).reshape(n, k, -1).amax(dim=-1)      # (n, K)
    absent = (conf < t_pd)[:, :, None, None].expand_as(logits)
    return logits.masked_fill(absent, PD_FILL)


def key_affinity(keys: torch.Tensor, norm: str = "cosine") -> torch.Tensor:
    """(n, HW, HW) similarity of the keys (n, HW, C): the paper's cosine, or the released code's product of keys
    normalised per channel over the locations (`F.normalize(k, p=2)` with its default dim=1)."""
    if norm == "cosine":
        k = F.normalize(keys.float(), dim=-1)
    elif norm == "official":
        k = F.normalize(keys.float(), dim=1)
    else:
        raise ValueError(f"ks_norm must be one of {KS_NORMS}, got {norm!r}")
    return k @ k.transpose(-2, -1)


def key_smooth(logits: torch.Tensor, keys: torch.Tensor, t_ks: float, norm: str = "cosine",
               temperature: float = TEMPERATURE) -> torch.Tensor:
    """KS on (n, K, h, w) logits with keys (n, h*w, C): returns probabilities (n, K, h, w) where the locations whose
    largest probability is below `t_ks` take the key-weighted sum of all locations' probabilities (the official
    code's strict `<`). `t_ks <= 0` is a no-op and returns the logits unchanged."""
    if t_ks <= 0:
        return logits
    n, k, h, w = logits.shape
    if keys.shape[:2] != (n, h * w):
        raise ValueError(f"keys {tuple(keys.shape)} do not match the {h}x{w} grid of {n} images")
    prob = F.softmax(logits * temperature, dim=1).reshape(n, k, h * w).transpose(1, 2)   # (n, HW, K)
    smoothed = key_affinity(keys, norm) @ prob
    pick = prob.amax(dim=-1, keepdim=True) < t_ks
    out = torch.where(pick, smoothed, prob)
    return out.transpose(1, 2).reshape(n, k, h, w)


def refine(logits: torch.Tensor, keys: torch.Tensor | None, r: Refinement) -> torch.Tensor:
    """PD, then KS (the official order)."""
    out = prompt_denoise(logits, r.t_pd)
    if r.t_ks > 0:
        if keys is None:
            raise ValueError("key smoothing needs the keys of the final attention")
        out = key_smooth(out, keys, r.t_ks, r.ks_norm)
    return out


def upsample_predict(scores: torch.Tensor, input_size: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """(n, H, W) class indices: grid scores resized bilinearly to the network input, then to the image (mmseg's
    `EncoderDecoder.encode_decode` + whole-image `inference`), arg-maxed over classes."""
    x = F.interpolate(scores, size=tuple(input_size), mode="bilinear", align_corners=False)
    if tuple(input_size) != tuple(image_size):
        x = F.interpolate(x, size=tuple(image_size), mode="bilinear", align_corners=False)
    return x.argmax(dim=1)


def chance_miou(pixel_counts: torch.Tensor) -> float:
    """mIoU (%) of predicting each pixel uniformly at random among the K classes, given the ground truth's pixel
    count per class (expected confusion: class k's IoU = p_k / (K p_k + 1 - p_k) with p_k its pixel share), over
    the classes present. The floor a dense prediction must clear to say anything."""
    counts = pixel_counts.double()
    k = counts.numel()
    p = counts / counts.sum()
    present = counts > 0
    iou = p[present] / (k * p[present] + 1 - p[present])
    return float(iou.mean() * 100)
