"""Visual hooks on open_clip image towers, in one place for every method that needs them.

`encode_image_hooked(model, images, ...)`:
- `pixel_prompt`: a module or tensor added to the normalised pixels (VP's padding prompt is a module);
- `deep_prompts`: ViT only. `deep_prompts[0]` (m, w) or (n, m, w) is *inserted* after CLS at the
  transformer input; `deep_prompts[i]` (i >= 1) *replaces* those m tokens at the input of layer i
  (VPT-deep / MaPLe). A list of length 1 is VPT-shallow.
- `return_dense`: also return per-location features in the joint embedding space, (n, h*w, D):
  ViT: `ln_post(patch tokens) @ proj`; ResNet: the attention pool's value path (v_proj -> c_proj)
  at every location, the dense trick of MaskCLIP/DenseCLIP. `dense_mode="value"` on ViT gives
  MaskCLIP's last-layer value embeddings instead.
With no hooks the result equals `model.encode_image` exactly.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .text import _replace_tokens


def is_vit(model: nn.Module) -> bool:
    return hasattr(model.visual, "class_embedding") and hasattr(model.visual, "transformer")


def is_resnet(model: nn.Module) -> bool:
    return hasattr(model.visual, "attnpool") and hasattr(model.visual, "layer4")


def encode_image_hooked(model: nn.Module, images: torch.Tensor,
                        pixel_prompt: torch.Tensor | Callable | None = None,
                        deep_prompts: Sequence[torch.Tensor] | None = None,
                        return_dense: bool = False, dense_mode: str = "tokens",
                        normalize: bool = False):
    """Image features (n, D), plus dense features (n, h*w, D) when `return_dense`."""
    if pixel_prompt is not None:
        images = pixel_prompt(images) if callable(pixel_prompt) else images + pixel_prompt
    if is_vit(model):
        pooled, dense = _vit_forward(model.visual, images, deep_prompts, return_dense, dense_mode)
    elif is_resnet(model):
        if deep_prompts is not None:
            raise ValueError("deep visual prompts need a ViT image tower; this model has a ResNet")
        pooled, dense = _resnet_forward(model.visual, images, return_dense)
    else:
        raise TypeError(f"unsupported image tower {type(model.visual).__name__}")
    if normalize:
        pooled = F.normalize(pooled, dim=-1)
        dense = F.normalize(dense, dim=-1) if dense is not None else None
    return (pooled, dense) if return_dense else pooled


def _vit_forward(visual: nn.Module, x: torch.Tensor, deep_prompts, return_dense: bool, dense_mode: str):
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("visual hooks support CLIP ViTs without attentional pooling")
    x = visual._embeds(x.to(visual.conv1.weight.dtype))  # conv, CLS, positions, ln_pre: (n, 1+hw, w)
    n_prompt = 0
    if deep_prompts:
        first = deep_prompts[0].to(x.dtype)
        first = first.unsqueeze(0).expand(x.shape[0], -1, -1) if first.dim() == 2 else first
        n_prompt = first.shape[1]
        x = torch.cat([x[:, :1], first, x[:, 1:]], dim=1)
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    last_input = None
    for i, block in enumerate(blocks):
        if deep_prompts is not None and 1 <= i < len(deep_prompts):
            x = _replace_tokens(x, deep_prompts[i].to(x.dtype), start=1, batch_first=batch_first)
        if i == len(blocks) - 1:
            last_input = x
        x = block(x)
    if not batch_first:
        x, last_input = x.transpose(0, 1), last_input.transpose(0, 1)
    # CLIP ViT: ln_post on tokens, pool by CLS ('tok'); final_ln_after_pool only changes order for 'tok'.
    if visual.pool_type != "tok":
        raise ValueError(f"visual hooks expect CLS pooling, model uses {visual.pool_type!r}")
    pooled = visual.ln_post(x[:, 0])
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    dense = None
    if return_dense:
        if dense_mode == "tokens":
            tokens = visual.ln_post(x[:, 1 + n_prompt:])
        elif dense_mode == "value":
            tokens = visual.ln_post(_value_path(blocks[-1], last_input)[:, 1 + n_prompt:])
        else:
            raise ValueError(f"dense_mode must be 'tokens' or 'value', got {dense_mode!r}")
        dense = tokens @ visual.proj if visual.proj is not None else tokens
    return pooled, dense


def _value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP: the last block's value embedding through the output projection (no q-k attention, no MLP)."""
    attn = block.attn
    y = block.ln_1(x)
    w_v = attn.in_proj_weight[2 * attn.embed_dim:]
    b_v = attn.in_proj_bias[2 * attn.embed_dim:] if attn.in_proj_bias is not None else None
    v = F.linear(y, w_v, b_v)
    return attn.out_proj(v)


def _resnet_forward(visual: nn.Module, x: torch.Tensor, return_dense: bool):
    x = x.to(visual.conv1.weight.dtype)
    x = visual.stem(x)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pooled = visual.attnpool(x)
    dense = resnet_dense_features(visual.attnpool, x) if return_dense else None
    return pooled, dense


def resnet_dense_features(attnpool: nn.Module, fmap: torch.Tensor, with_position: bool = True) -> torch.Tensor:
    """Per-location embeddings of a ModifiedResNet feature map through the attention pool's value path.

    `with_position` adds the pool's spatial positional embeddings first (DenseCLIP); MaskCLIP applies
    v_proj/c_proj as 1x1 convolutions to the raw map (`with_position=False`)."""
    n, c, h, w = fmap.shape
    tokens = fmap.reshape(n, c, h * w).permute(0, 2, 1)
    if not with_position:
        return attnpool.c_proj(attnpool.v_proj(tokens))
    pos = attnpool.positional_embedding[1:].to(tokens.dtype)
    if pos.shape[0] != h * w:  # feature map of another size: interpolate the spatial positions
        side = int(round(pos.shape[0] ** 0.5))
        pos = F.interpolate(pos.reshape(1, side, side, c).permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                            align_corners=False).permute(0, 2, 3, 1).reshape(h * w, c)
    v = attnpool.v_proj(tokens + pos)
    return attnpool.c_proj(v)


def resnet_feature_map(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The (n, C, h, w) map before the attention pool (for methods that attend over it)."""
    visual = model.visual
    x = visual.stem(images.to(visual.conv1.weight.dtype))
    return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))


def vit_width(model: nn.Module) -> int:
    """Token width of a ViT image tower (the size of a deep visual prompt token)."""
    if not is_vit(model):
        raise ValueError("this model's image tower is not a ViT")
    return int(model.visual.class_embedding.shape[-1])


def vit_depth(model: nn.Module) -> int:
    return len(model.visual.transformer.resblocks)
