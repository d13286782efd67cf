"""Text encoder over prompt *embeddings*: the piece every prompt-learning method shares.

`PromptTextEncoder(model)(prompts, token_ids)` runs CLIP's text transformer on `(n, L, d)` token
embeddings (e.g. "[SOS] [V]_1..[V]_M classname . [EOS]" with learned [V]s), pools at the EOT position
taken from `token_ids` (the tokenized template the embeddings stand for) and projects. With the
model's own token embeddings it is exactly `model.encode_text`.

Deep prompts (MaPLe, MVLPT, UPT): `deep_prompts[i]` of shape `(m, d)` or `(n, m, d)` replaces the m
tokens after SOS at the input of transformer layer `i + 1` (layer 0 takes the prompt embeddings).
"""
from __future__ import annotations

from types import SimpleNamespace
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


def encode_prompts(encoder: PromptTextEncoder, prompts: torch.Tensor, token_ids: torch.Tensor,
                   chunk: int | None = None) -> torch.Tensor:
    """Unnormalised text features of (n, L, d) prompt embeddings, equal to `encoder(prompts, token_ids)`.

    CLIP's text transformer is causal and pools at the EOT token, so positions after the last EOT of the
    batch never reach an output: they are dropped (exact; 2-4x cheaper for CoOp prompts, 77 -> ~20 tokens).
    `chunk` bounds how many sequences are encoded at once (many classes, CoCoOp's B x K prompts)."""
    n = prompts.shape[0]
    if encoder.pool_type in ("argmax", "eos") and encoder.attn_mask is not None:
        eot = token_ids.argmax(-1) if encoder.pool_type == "argmax" else (token_ids == encoder.eos_id).int().argmax(-1)
        keep = int(eot.max()) + 1
        # The encoder's own forward on a view of its parts cut to `keep` positions (one implementation).
        enc = SimpleNamespace(transformer=encoder.transformer, positional_embedding=encoder.positional_embedding[:keep],
                              attn_mask=encoder.attn_mask[:keep, :keep], ln_final=encoder.ln_final,
                              text_projection=encoder.text_projection, pool_type=encoder.pool_type,
                              eos_id=encoder.eos_id)
        prompts, token_ids = prompts[:, :keep], token_ids[:, :keep]
    else:
        enc = encoder
    chunk = chunk or n
    outs = [PromptTextEncoder.forward(enc, prompts[i:i + chunk], token_ids[i:i + chunk]) for i in range(0, n, chunk)]
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def shared_prefix_supported(encoder: PromptTextEncoder) -> bool:
    """Whether `encode_shared_prefix` can run this text tower (causal, batch-first open_clip blocks)."""
    blocks = list(encoder.transformer.resblocks)
    return (encoder.attn_mask is not None and getattr(encoder.transformer, "batch_first", True)
            and encoder.pool_type in ("argmax", "eos")
            and all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) and b.attn._qkv_same_embed_dim
                    and b.attn.batch_first and not hasattr(b, "ln_1_kv") for b in blocks))


def encode_shared_prefix(encoder: PromptTextEncoder, prefix: torch.Tensor, suffix: torch.Tensor,
                         eot: torch.Tensor) -> torch.Tensor:
    """Text features of G x K prompts that share their first P tokens within each group: prompt (g, k) is
    ``cat(prefix[g], suffix[g, k])``. Returns (G, K, D), unnormalised, equal to `encoder` on the full prompts.

    CLIP's text transformer is causal, so the hidden states of the shared tokens (SOS and a unified learned
    context, CoOp's "[SOS] [V]_1..[V]_M" before every class name) do not depend on what follows: they are
    computed once per group, and each class's few suffix tokens attend to them. For CoOp on 51 classes this
    is about 17 + 51 x 5 token positions instead of 51 x 22, the same numbers up to float rounding.
    prefix (G, P, d), suffix (G, K, S, d) embeddings; eot (K,) or (G, K): the pooling position in the suffix."""
    G, P, _ = prefix.shape
    K, S = suffix.shape[1], suffix.shape[2]
    cast = encoder.transformer.get_cast_dtype()
    pos = encoder.positional_embedding.to(cast)
    hp = prefix.to(cast) + pos[:P]                                       # (G, P, w)
    hs = (suffix.to(cast) + pos[P:P + S]).reshape(G * K, S, -1)          # (G*K, S, w)
    allowed = torch.cat([torch.ones(S, P, dtype=torch.bool, device=hs.device),
                         torch.ones(S, S, dtype=torch.bool, device=hs.device).tril()], dim=1)
    for block in encoder.transformer.resblocks:
        mha = block.attn
        H, w = mha.num_heads, mha.embed_dim
        ap, as_ = block.ln_1(hp), block.ln_1(hs)
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = (mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None))
        heads = lambda t: t.view(*t.shape[:-1], H, w // H).transpose(-3, -2)   # (..., L, w) -> (..., H, L, w/H)
        q = heads(F.linear(as_, wq, bq))                                  # (G*K, H, S, dh)
        k = torch.cat([heads(F.linear(ap, wk, bk)).repeat_interleave(K, 0), heads(F.linear(as_, wk, bk))], dim=-2)
        v = torch.cat([heads(F.linear(ap, wv, bv)).repeat_interleave(K, 0), heads(F.linear(as_, wv, bv))], dim=-2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (G*K, H, S, dh)
        out = mha.out_proj(out.transpose(-3, -2).reshape(G * K, S, w))
        hs = hs + block.ls_1(out)
        hs = hs + block.ls_2(block.mlp(block.ln_2(hs)))
        hp = block(hp, attn_mask=encoder.attn_mask[:P, :P])
    rows = torch.arange(G * K, device=hs.device)
    idx = eot.expand(G, K).reshape(-1).to(hs.device)
    x = encoder.ln_final(hs[rows, idx])
    if encoder.text_projection is not None:
        x = encoder.text_projection(x) if isinstance(encoder.text_projection, nn.Linear) else x @ encoder.text_projection
    return x.view(G, K, -1)


def encode_text(encoder: PromptTextEncoder, token_ids: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(token_ids)` (unnormalised) computed on the tokens up to the batch's last EOT:
    the same function, 2-3x cheaper for short captions in a long context (the tiny CLIPs' pretraining)."""
    return encode_prompts(encoder, encoder.embed(token_ids), token_ids)


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
