"""CoOp's prompt learner: M learnable context vectors in front of (or around) each class name.

Prompt of class k (class token "end"): [SOS] [V]_1 .. [V]_M [CLASS_k] . [EOS]. The SOS prefix and the
"CLASS . EOS pad" suffix are frozen token embeddings (buffers); only the context is learned, either
shared by all classes (unified) or one per class (class-specific context, CSC). Initialised from a
phrase ("a photo of a": M = its token count, context = its token embeddings) the prompts are exactly
the tokenised "a photo of a {class}.", so CoOp starts at zero-shot CLIP.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import ClipBundle, PromptTextEncoder, tokenize

POSITIONS = ("end", "middle", "front")


class PromptLearner(nn.Module):
    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], n_ctx: int = 16, ctx_init: str | None = None,
                 csc: bool = False, class_token_position: str = "end", init_std: float = 0.02):
        super().__init__()
        if class_token_position not in POSITIONS:
            raise ValueError(f"class_token_position must be one of {POSITIONS}, got {class_token_position!r}")
        if not classnames:
            raise ValueError("PromptLearner needs at least one class name")
        self.encoder = PromptTextEncoder(bundle.model)
        names = [c.replace("_", " ") for c in classnames]
        embed = self.encoder.token_embedding
        with torch.no_grad():
            if ctx_init:
                ctx_init = ctx_init.replace("_", " ").strip()
                init_ids = tokenize(bundle, [ctx_init])
                n_ctx = int(init_ids.argmax(-1).item()) - 1   # BPE tokens between SOS and EOT
                ctx = embed(init_ids)[0, 1:1 + n_ctx].clone()
                if csc:  # the official code ignores CSC with an init phrase; we honour it: every class starts equal
                    ctx = ctx.unsqueeze(0).repeat(len(names), 1, 1)
                prefix_text = ctx_init
            else:
                if n_ctx < 1:
                    raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
                shape = (len(names), n_ctx, self.encoder.width) if csc else (n_ctx, self.encoder.width)
                ctx = torch.empty(shape).normal_(0, init_std)
                prefix_text = " ".join(["X"] * n_ctx)
            token_ids = tokenize(bundle, [f"{prefix_text} {name}." for name in names])
            embedding = embed(token_ids)
            name_lens = [int(tokenize(bundle, [n]).argmax(-1).item()) - 1 for n in names]
        self.ctx = nn.Parameter(ctx.to(self.encoder.dtype))
        self.n_ctx, self.csc, self.position = n_ctx, csc, class_token_position
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)         # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:].clone(), persistent=False)  # CLASS . EOS pad
        self.name_lens = name_lens
        self.classnames = list(names)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def construct_prompts(self, ctx: torch.Tensor) -> torch.Tensor:
        """(K, L, d) prompt embeddings from context (M, d) or (K, M, d)."""
        K = self.num_classes
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(K, -1, -1)
        prefix, suffix = self.token_prefix, self.token_suffix
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        half = self.n_ctx // 2
        rows = []
        for i, n in enumerate(self.name_lens):  # K rows: the class span differs per class
            cls, rest = suffix[i:i + 1, :n], suffix[i:i + 1, n:]
            if self.position == "middle":
                rows.append(torch.cat([prefix[i:i + 1], ctx[i:i + 1, :half], cls, ctx[i:i + 1, half:], rest], dim=1))
            else:
                rows.append(torch.cat([prefix[i:i + 1], cls, ctx[i:i + 1], rest], dim=1))
        return torch.cat(rows, dim=0)

    def forward(self) -> torch.Tensor:
        return self.construct_prompts(self.ctx)

    def class_embeddings(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text features (K, D) of the prompts; gradients flow to the context."""
        prompts = self.construct_prompts(self.ctx if ctx is None else ctx)
        return F.normalize(self.encoder(prompts, self.token_ids), dim=-1)


def coop_logits(image_features: torch.Tensor, class_embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP head: logit_scale * cos(image, class prompt)."""
    return logit_scale * F.normalize(image_features, dim=-1) @ class_embeddings.t()
