"""VT-CLIP (Qiu et al., arXiv 2112.02399): visual-guided texts.

The class text embeddings T (K, C) of the frozen zero-shot classifier attend, per image, over that image's
dense visual tokens V (HW, C) with a learnable cross-attention block (texts = queries, visual tokens =
keys/values, then an FFN), and the result is blended in with a fixed residual ratio alpha::

    O     = Block(T, V)                         (K, C) per image
    T_vg  = normalize(T + alpha * O)            visual-guided texts
    logit = ls * cos(f_v, T_vg)

Only the block is trained (CLIP frozen, features cached). alpha = 0 is zero-shot CLIP exactly. With
identity projections, one head, no LayerNorm/FFN, attention scale s and `normalize=False`, the alpha
term is CALIP's visual-guided text term (softmax over positions of s T V^T, times V), i.e. CALIP with
beta2 = alpha, beta3 = 0. No official code exists: the block's layout (pre-norm, FFN, heads) is ours.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class VisualGuidedAttention(nn.Module):
    """Cross-attention from the K class texts (queries) to an image's HW dense tokens (keys/values), + FFN."""

    def __init__(self, dim: int, heads: int = 8, ffn_ratio: float = 4.0, dropout: float = 0.1,
                 layer_norm: bool = True, ffn: bool = False, attn_scale: float | None = None, zero_init: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads = dim, heads
        self.attn_scale = attn_scale if attn_scale is not None else (dim // heads) ** -0.5
        self.norm_q = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.norm_kv = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.attn_drop = nn.Dropout(dropout)
        self.ffn = nn.Sequential(
            nn.LayerNorm(dim) if layer_norm else nn.Identity(), nn.Linear(dim, int(dim * ffn_ratio)), nn.GELU(),
            nn.Dropout(dropout), nn.Linear(int(dim * ffn_ratio), dim), nn.Dropout(dropout)) if ffn else None
        if zero_init:  # the block outputs exactly 0 at init, so training starts from zero-shot CLIP
            for layer in [self.out_proj] + ([self.ffn[4]] if ffn else []):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (..., L, C) -> (..., h, L, C/h)
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)

    def attention(self, text: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor | None = None):
        """text (K, C), tokens (N, HW, C), key_mask (N, HW) bool, True = attend. Returns the attended
        values (N, K, C) and the weights (N, heads, K, HW) (each row sums to 1 over positions)."""
        if text.dim() != 2 or tokens.dim() != 3 or text.shape[-1] != self.dim or tokens.shape[-1] != self.dim:
            raise ValueError(f"expected text (K, {self.dim}) and tokens (N, HW, {self.dim}), "
                             f"got {tuple(text.shape)} and {tuple(tokens.shape)}")
        q = self._split(self.q_proj(self.norm_q(text)))                  # (h, K, d): shared by all images
        kv = self.norm_kv(tokens)
        k, v = self._split(self.k_proj(kv)), self._split(self.v_proj(kv))  # (N, h, HW, d)
        # The output projection is linear, so it is applied to the HW values of each head before they are
        # mixed (N*h*HW rows) rather than to the N*K attended texts: the same result, far cheaper for K >> HW.
        w_o = self.out_proj.weight.view(self.dim, self.heads, -1)         # (C, h, d): heads are concatenated
        v_out = torch.einsum("nhjd,chd->nhjc", v, w_o)                    # (N, h, HW, C)
        logits = self.attn_scale * torch.einsum("hkd,nhjd->nhkj", q, k)
        if key_mask is not None:
            if key_mask.shape != tokens.shape[:2]:
                raise ValueError(f"key_mask must be (N, HW) = {tuple(tokens.shape[:2])}, got {tuple(key_mask.shape)}")
            if not key_mask.any(dim=1).all():
                raise ValueError("key_mask hides every token of some image: nothing to attend to")
            logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        weights = logits.softmax(dim=-1)
        out = torch.einsum("nhkj,nhjc->nkc", self.attn_drop(weights), v_out) + self.out_proj.bias
        return out, weights

    def forward(self, text: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        out, _ = self.attention(text, tokens, key_mask)
        return out + self.ffn(out) if self.ffn is not None else out


class VTCLIP(nn.Module):
    """Frozen text classifier (buffer) + the trainable visual-guided attention block + residual ratio."""

    def __init__(self, text_features: torch.Tensor, alpha: float, logit_scale: float, normalize: bool = True,
                 **block_kwargs):
        super().__init__()
        if text_features.dim() != 2:
            raise ValueError(f"text_features must be (K, C), got {tuple(text_features.shape)}")
        self.register_buffer("text_features", F.normalize(text_features.detach().float(), dim=-1))
        self.block = VisualGuidedAttention(text_features.shape[1], **block_kwargs)
        self.alpha, self.logit_scale, self.normalize = float(alpha), float(logit_scale), normalize

    def visual_guided_texts(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K, C): one adapted classifier per image (never shared across the batch)."""
        T = self.text_features
        out = T + self.alpha * self.block(T, F.normalize(tokens, dim=-1), key_mask)
        return F.normalize(out, dim=-1) if self.normalize else out

    def forward(self, image_features: torch.Tensor, tokens: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        f_v = F.normalize(image_features, dim=-1)
        return self.logit_scale * torch.einsum("nc,nkc->nk", f_v, self.visual_guided_texts(tokens, key_mask))
