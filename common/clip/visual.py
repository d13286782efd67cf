"""Visual hooks on open_clip image towers, in one place for every method that needs them.

`encode_image_hooked(model, images, ...)`:
- `pixel_prompt`: a module or tensor added to the normalised pixels (VP's padding prompt is a module);
- `deep_prompts`: ViT only. `deep_prompts[0]` (m, w) or (n, m, w) is *inserted* after CLS at the
  transformer input; `deep_prompts[i]` (i >= 1) *replaces* those m tokens at the input of layer i
  (VPT-deep / MaPLe). A list of length 1 is VPT-shallow. An entry may also be a callable
  `f(tokens) -> (n, m', w)`: before that layer the current prompt tokens are dropped and f's output, computed
  from the layer's input WITHOUT prompts ((n, 1+h*w, w), batch first), is inserted after CLS (any m', the
  class-aware prompts of CAVPT/DPT); an entry of None drops the prompts from that layer on. A tensor entry
  whose token count differs from the current one is swapped in the same way.
- `return_dense`: also return per-location features in the joint embedding space, (n, h*w, D):
  ViT: `ln_post(patch tokens) @ proj`; ResNet: the attention pool's value path (v_proj -> c_proj)
  at every location, the dense trick of MaskCLIP/DenseCLIP. `dense_mode="value"` on ViT gives
  MaskCLIP's last-layer value path instead (`vit_value_path`).
With no hooks the result equals `model.encode_image` exactly.

`value_path_dense(model, images)`: MaskCLIP's dense features at any input size (ResNet: v_proj -> c_proj per
location, no positions; ViT: positional embeddings resized bicubically, last block with its attention replaced
by each token's own value), optionally with the keys of the final attention (MaskCLIP's key smoothing) and the
ordinary query-key attention outputs at every location (the naive dense use of CLIP) from the same pass.
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
    x = vit_embeds(visual, x.to(visual.conv1.weight.dtype))  # conv, CLS, positions, ln_pre: (n, 1+hw, w)
    n_prompt = 0
    if deep_prompts and deep_prompts[0] is not None:
        x, n_prompt = _swap_prompts(x, 0, deep_prompts[0])
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    last_input = None
    for i, block in enumerate(blocks):
        if deep_prompts is not None and 1 <= i < len(deep_prompts):
            p = deep_prompts[i]
            if p is not None and not callable(p) and p.shape[-2] == n_prompt:
                x = _replace_tokens(x, p.to(x.dtype), start=1, batch_first=batch_first)
            else:   # generated from this layer's input, dropped (None), or another count: swap the prompt tokens
                x = x if batch_first else x.transpose(0, 1)
                x, n_prompt = _swap_prompts(x, n_prompt, p)
                x = x if batch_first else x.transpose(0, 1)
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
            tokens = visual.ln_post(vit_value_path(blocks[-1], last_input)[:, 1 + n_prompt:])
        else:
            raise ValueError(f"dense_mode must be 'tokens' or 'value', got {dense_mode!r}")
        dense = tokens @ visual.proj if visual.proj is not None else tokens
    return pooled, dense


def _swap_prompts(x: torch.Tensor, n_prompt: int, prompts) -> tuple[torch.Tensor, int]:
    """(n, 1+m+hw, w) batch-first tokens with their m prompt tokens (after CLS) replaced by `prompts`: a tensor
    (m', w) or (n, m', w), a callable of the prompt-free tokens (n, 1+hw, w) returning one, or None (no prompts).
    Returns the new tokens and m'."""
    base = torch.cat([x[:, :1], x[:, 1 + n_prompt:]], dim=1) if n_prompt else x
    if prompts is None:
        return base, 0
    p = prompts(base) if callable(prompts) else prompts
    p = p.to(x.dtype)
    p = p.unsqueeze(0).expand(x.shape[0], -1, -1) if p.dim() == 2 else p
    return torch.cat([base[:, :1], p, base[:, 1:]], dim=1), p.shape[1]


def vit_embeds(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's `VisionTransformer._embeds` (patch conv, CLS, positions, patch dropout, ln_pre) at any input
    size: the patch positions are resized bicubically to the input's grid (align_corners=False, as mmseg's ViT
    does for MaskCLIP); at the model's own size this is `_embeds` exactly."""
    return _vit_embeds_grid(visual, x)[0]


def _vit_embeds_grid(visual: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    x = visual.conv1(x)
    h, w = x.shape[-2:]
    x = x.reshape(x.shape[0], x.shape[1], h * w).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding.to(x.dtype)
    if pos.shape[0] != h * w + 1:
        side = int(round((pos.shape[0] - 1) ** 0.5))
        if side * side != pos.shape[0] - 1:
            raise ValueError(f"cannot resize {pos.shape[0] - 1} patch positions: not a square grid")
        grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)
    x = x + pos
    x = visual.patch_dropout(x)
    return visual.ln_pre(x), (h, w)


def vit_value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's last ViT block: every token's attention output is its own value (no query-key mixing):
    x + out_proj(W_v ln_1(x) + b_v), then the block's MLP with its residual (the official mmseg ViT's
    `return_qkv` path). Equals the block run with an attention mask that lets each token see only itself."""
    attn = block.attn
    y = block.ln_1(x)
    w_v = attn.in_proj_weight[2 * attn.embed_dim:]
    b_v = attn.in_proj_bias[2 * attn.embed_dim:] if attn.in_proj_bias is not None else None
    x = x + block.ls_1(attn.out_proj(F.linear(y, w_v, b_v)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def vit_keys(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Keys of a ViT block's attention as MaskCLIP's key smoothing reads them: out_proj(W_k ln_1(x) + b_k)
    (the official code pushes q, k and v alike through the output projection)."""
    attn = block.attn
    e = attn.embed_dim
    w_k = attn.in_proj_weight[e:2 * e]
    b_k = attn.in_proj_bias[e:2 * e] if attn.in_proj_bias is not None else None
    return attn.out_proj(F.linear(block.ln_1(x), w_k, b_k))


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


def attention_pool_tokens(attnpool: nn.Module, fmap: torch.Tensor, with_position: bool = True,
                          resize: str | None = None) -> torch.Tensor:
    """All HW+1 outputs (n, 1+HW, D) of a CLIP `AttentionPool2d` run on [mean token; HW tokens] of a (n, C, h, w)
    map; [:, 0] is its usual output. `with_position=False` skips the positional embedding (MaskCLIP's
    `attn_pooling` switch, which works at any map size). `resize` ("bilinear", "bicubic") lets a map of another
    size use the pool's spatial positions interpolated to its grid (align_corners=False; the global position is
    kept), as DenseCLIP's `AttentionPool2d` does; without it another size is refused."""
    n, c, h, w = fmap.shape
    x = fmap.reshape(n, c, h * w).permute(2, 0, 1)                    # (HW, n, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)           # (HW+1, n, C)
    if with_position:
        pos = attnpool.positional_embedding
        if pos.shape[0] != h * w + 1:
            if resize is None:
                raise ValueError(f"feature map {h}x{w} does not match the attention pool's {pos.shape[0] - 1} "
                                 f"positions; encode images at the model's own resolution")
            pos = resized_positions(pos, h, w, resize)
        x = x + pos[:, None, :].to(x.dtype)
    x, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=attnpool.num_heads,
        q_proj_weight=attnpool.q_proj.weight, k_proj_weight=attnpool.k_proj.weight,
        v_proj_weight=attnpool.v_proj.weight, in_proj_weight=None,
        in_proj_bias=torch.cat([attnpool.q_proj.bias, attnpool.k_proj.bias, attnpool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=attnpool.c_proj.weight, out_proj_bias=attnpool.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False)
    return x.permute(1, 0, 2)


def resized_positions(pos: torch.Tensor, h: int, w: int, mode: str = "bilinear") -> torch.Tensor:
    """(1 + h*w, C) positional embedding from a (1 + s*s, C) one: the spatial s x s grid interpolated to h x w
    (`mode`, align_corners=False), the first (global / class) position unchanged."""
    side = int(round((pos.shape[0] - 1) ** 0.5))
    if side * side != pos.shape[0] - 1:
        raise ValueError(f"cannot resize {pos.shape[0] - 1} positions: not a square grid")
    if (side, side) == (h, w):
        return pos
    grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode=mode, align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)


def value_path_dense(model: nn.Module, images: torch.Tensor, keys: bool = False,
                     attention: bool = False) -> dict:
    """MaskCLIP's dense features of `images` at their own size (any size), from one pass of the image tower.

    Returns {"dense": (n, h, w, D) in the joint space (not normalised), "keys": (n, h*w, C) or None,
    "attention": (n, h, w, D) or None}:
    - ResNet: on the last-stage map X, dense = c_proj(v_proj(X)) per location (1x1 convolutions, no positional
      embedding); keys = k_proj(X); attention = the attention pool's full query-key attention over
      [mean; HW tokens] without positions, its HW location outputs (the official head's `attn_pooling`).
    - ViT: blocks 1..L-1 as usual (positions resized to the grid), the last block through `vit_value_path`,
      then ln_post and proj on the patch tokens; keys = `vit_keys` of the last block's input (patch tokens);
      attention = the ordinary last block's patch tokens through ln_post and proj.
    """
    if is_vit(model):
        visual = model.visual
        if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok":
            raise ValueError("value_path_dense supports CLIP ViTs (CLS pooling, no attentional pooler)")
        x, (h, w) = _vit_embeds_grid(visual, images.to(visual.conv1.weight.dtype))
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for block in blocks[:-1]:
            x = block(x)
        out_attn = blocks[-1](x) if attention else None
        if not batch_first:
            x = x.transpose(0, 1)
            out_attn = out_attn.transpose(0, 1) if out_attn is not None else None

        def head(t):
            t = visual.ln_post(t[:, 1:])
            t = t @ visual.proj if visual.proj is not None else t
            return t.reshape(t.shape[0], h, w, -1)
        return {"dense": head(vit_value_path(blocks[-1], x)),
                "keys": vit_keys(blocks[-1], x)[:, 1:] if keys else None,
                "attention": head(out_attn) if attention else None}
    if is_resnet(model):
        pool = model.visual.attnpool
        fmap = resnet_feature_map(model, images)
        n, c, h, w = fmap.shape
        tokens = fmap.reshape(n, c, h * w).permute(0, 2, 1)
        dense = pool.c_proj(pool.v_proj(tokens)).reshape(n, h, w, -1)
        att = attention_pool_tokens(pool, fmap, with_position=False)[:, 1:].reshape(n, h, w, -1) if attention else None
        return {"dense": dense, "keys": pool.k_proj(tokens) if keys else None, "attention": att}
    raise TypeError(f"unsupported image tower {type(model.visual).__name__}")


def vit_width(model: nn.Module) -> int:
    """Token width of a ViT image tower (the size of a deep visual prompt token)."""
    if not is_vit(model):
        raise ValueError("this model's image tower is not a ViT")
    return int(model.visual.class_embedding.shape[-1])


def vit_depth(model: nn.Module) -> int:
    return len(model.visual.transformer.resblocks)
