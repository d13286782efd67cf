"""Text encoder over prompt *embeddings*: the piece every prompt-learning method shares.

`PromptTextEncoder(model)(prompts, token_ids)` runs CLIP's text transformer on `(n, L, d)` token
embeddings (e.g. "[SOS] [V]_1..[V]_M classname . [EOS]" with learned [V]s), pools at the EOT position
taken from `token_ids` (the tokenized template the embeddings stand for) and projects. With the
model's own token embeddings it is exactly `model.encode_text`.

Deep prompts (MaPLe, MVLPT, UPT): `deep_prompts[i]` of shape `(m, d)` or `(n, m, d)` replaces the m
tokens after SOS at the input of transformer layer `i + 1` (layer 0 takes the prompt embeddings).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class PromptTextEncoder(nn.Module):
    """Shares (does not copy) the frozen text tower of an open_clip `CLIP` model."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        for attr in ("transformer", "positional_embedding", "ln_final", "text_projection", "token_embedding"):
            if not hasattr(clip_model, attr):
                raise TypeError(f"PromptTextEncoder needs an open_clip CLIP text tower; model lacks {attr!r}")
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.token_embedding = clip_model.token_embedding
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)
        self.pool_type = getattr(clip_model, "text_pool_type", "argmax")
        self.eos_id = getattr(clip_model, "text_eos_id", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (n, L, d) of tokenized text (n, L)."""
        return self.token_embedding(token_ids)

    def forward(self, prompts: torch.Tensor, token_ids: torch.Tensor,
                deep_prompts: Sequence[torch.Tensor] | None = None, normalize: bool = False) -> torch.Tensor:
        n, L, d = prompts.shape
        if token_ids.shape != (n, L):
            raise ValueError(f"token_ids shape {tuple(token_ids.shape)} does not match prompts {(n, L)}")
        if deep_prompts is not None and len(deep_prompts) > len(self.transformer.resblocks) - 1:
            raise ValueError(f"{len(deep_prompts)} deep prompts for a {len(self.transformer.resblocks)}-layer "
                             f"text transformer (at most layers-1 can be replaced)")
        cast = self.transformer.get_cast_dtype()
        x = prompts.to(cast) + self.positional_embedding.to(cast)
        batch_first = getattr(self.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for i, block in enumerate(self.transformer.resblocks):
            if deep_prompts is not None and 1 <= i <= len(deep_prompts):
                x = _replace_tokens(x, deep_prompts[i - 1].to(cast), start=1, batch_first=batch_first)
            x = block(x, attn_mask=self.attn_mask)
        if not batch_first:
            x = x.transpose(0, 1)
        x = self.ln_final(x)
        x = _pool(x, token_ids, self.pool_type, self.eos_id)
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x


def _pool(x: torch.Tensor, token_ids: torch.Tensor, pool_type: str, eos_id: int | None) -> torch.Tensor:
    rows = torch.arange(x.shape[0], device=x.device)
    if pool_type == "argmax":
        return x[rows, token_ids.argmax(dim=-1)]
    if pool_type == "eos":
        return x[rows, (token_ids == eos_id).int().argmax(dim=-1)]
    if pool_type == "first":
        return x[:, 0]
    if pool_type == "last":
        return x[:, -1]
    raise ValueError(f"unsupported text pool type {pool_type!r}")


def _replace_tokens(x: torch.Tensor, prompt: torch.Tensor, start: int, batch_first: bool) -> torch.Tensor:
    """Replace tokens [start, start+m) of every sequence with `prompt` ((m, d) or (n, m, d))."""
    if not batch_first:
        x = x.transpose(0, 1)
    n = x.shape[0]
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(n, -1, -1)
    m = prompt.shape[1]
    x = torch.cat([x[:, :start], prompt, x[:, start + m:]], dim=1)
    return x.transpose(0, 1) if not batch_first else x


def tokenize(bundle_or_tokenizer, texts: Sequence[str], device=None) -> torch.Tensor:
    """Tokenize with the model's tokenizer, failing loudly if a text would be truncated."""
    tok = getattr(bundle_or_tokenizer, "tokenizer", bundle_or_tokenizer)
    ids = tok(list(texts))
    full = ids[torch.arange(len(ids)), -1] != 0
    if bool(full.any()):
        bad = [t for t, f in zip(texts, full.tolist()) if f][:3]
        raise ValueError(f"text does not fit the context length ({ids.shape[1]} tokens with SOS/EOT): {bad}")
    return ids.to(device) if device is not None else ids
