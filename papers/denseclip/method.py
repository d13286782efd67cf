"""DenseCLIP (Rao et al., CVPR 2022): language-guided dense prediction with context-aware prompting.

The segmentor (official `segmentation/denseclip/denseclip.py`, `models.py`, `heads.py`):

- **Image tower** (fine-tuned at lr x `backbone_lr_mult`, or frozen: `freeze_backbone`): ModifiedResNet stem +
  layer1..4 give C2..C5 (strides 4..32); the attention pool runs on *every* token [mean(C5); C5_1..C5_hw] with its
  spatial positions bilinearly resized to the grid, output 0 = global embedding z̄, outputs 1..hw = dense
  embeddings z (`common.clip.visual.attention_pool_tokens(resize="bilinear")`). ViT: block outputs at
  `vit_out_indices` turned into a 4-level pyramid by deconvolution / identity / max-pool necks (the official
  patch-8 or patch-16 arrangement); ln_post + proj on all final tokens give z̄ (class token) and z.
- **Text** (`ClassPrompts`): per class "[SOS] p_1..p_N <name tokens> [EOS]" (names cut to `class_len` tokens,
  no template, no period), N learnable context vectors shared by the classes (trunc-normal init, std 1 as
  `nn.init.trunc_normal_` defaults), through CLIP's frozen text transformer (`common.clip.PromptTextEncoder`),
  EOT pooled at the name's EOT + N. Variant `fixed` uses the hand-written "a photo of a {}." instead.
- **Context-aware prompting, post-model** (`ContextDecoder`): queries LN->Linear(D->w) of the K text embeddings,
  memory LN->Linear(D->w)->LN of [z̄; z]; `layers` pre-norm decoder layers (self-attention over the K queries,
  cross-attention to the memory, MLP x4; dropout 0.1; bias-free q/k/v as the official `Attention`);
  LN->Linear(w->D) gives v; t <- t + gamma * v with gamma in R^D initialised to 1e-4.
- **Pre-model prompting** (`PreModelPrompter`, described in Sec. 3.3 but not released): N learnable queries attend
  to [z̄; z] through the same decoder; their outputs, projected to the token width, are the per-image context
  "[SOS] v_1..v_N <name> [EOS]" fed into the text encoder (which then runs per image).
- **Pixel-text score map** s = ẑ t̂ᵀ (cosine, (n, K, h, w)), concatenated to the pyramid level
  `score_concat_index` (RN: C5) before the FPN neck.
- **Semantic FPN**: FPN neck (1x1 laterals, nearest top-down sum, 3x3 outputs, `fpn_channels`) and FPNHead
  (per level 3x3 conv-BN-ReLU + 2x bilinear up to stride 4, summed; dropout 0.1, 1x1 classifier).
- **Loss**: per-pixel CE of the head (ignore 255) + `aux_weight` x per-pixel CE on s / tau (tau 0.07), both upsampled
  bilinearly to the label size and averaged over all pixels (mmseg 0.19 `BaseDecodeHead.losses`; the score-map term
  is the official `IdentityHead`).

The baseline (`clip_fpn`, the paper's "RN50-CLIP"): the same FPN on the CLIP image tower's C2..C5, no attention
pool, no text. Training: AdamW, poly schedule (power 0.9, min 1e-6) with linear warm-up (ratio 1e-6), norm layers
without weight decay (`norm` decay_mult 0), the image tower at lr x 0.1, the text tower frozen.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import PromptTextEncoder, is_resnet, is_vit, tokenize
from common.clip.text import encode_prompts
from common.clip.visual import attention_pool_tokens, resized_positions

IGNORE_INDEX = 255
VARIANTS = ("post", "no_context", "pre_model", "fixed", "no_aux", "baseline")
# variant -> (text prompt, prompting, aux loss); "baseline" has no language at all
VARIANT_SPEC = {
    "post": ("learned", "post", True),           # the released model (post-model context-aware prompting)
    "no_context": ("learned", "none", True),     # w/o context-aware prompting (learnable context only)
    "pre_model": ("pre", "pre", True),           # visual context fed into the text encoder (not released)
    "fixed": ("fixed", "none", True),            # hand-written "a photo of a {}." (no learned context)
    "no_aux": ("learned", "post", False),        # the released model without the pixel-text loss
    "baseline": (None, None, False),             # FPN on the CLIP image tower, no language ("RN50-CLIP")
}
FIXED_TEMPLATE = "a photo of a {}."


# ----------------------------------------------------------------------------------------- the math
def score_map(dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Pixel-text score map (n, K, h, w): cosine of dense features (n, D, h, w) with class embeddings (K, D) or
    per image (n, K, D), the official `einsum('bchw,bkc->bkhw')` on L2-normalised inputs."""
    dense = F.normalize(dense, dim=1)
    text = F.normalize(text, dim=-1)
    if text.dim() == 2:
        text = text.unsqueeze(0).expand(dense.shape[0], -1, -1)
    return torch.einsum("bchw,bkc->bkhw", dense, text)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """mmseg 0.19's decode-head loss: logits (n, K, h, w) resized bilinearly (align_corners=False) to the label size
    (n, H, W), per-pixel cross-entropy (0 at ignored pixels), averaged over *all* pixels (`avg_non_ignore` only
    arrived in mmseg 0.23; DenseCLIP pins 0.19)."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none").mean()


def denseclip_loss(out: dict, target: torch.Tensor, aux_weight: float, tau: float) -> tuple[torch.Tensor, dict]:
    """L = CE(head) + aux_weight * CE(score_map / tau) (the auxiliary term only when the model has a score map)."""
    main = seg_loss(out["logits"], target)
    logs = {"loss_seg": float(main.detach())}
    if aux_weight > 0 and out.get("score_map") is not None:
        aux = seg_loss(out["score_map"] / tau, target)
        logs["loss_aux"] = float(aux.detach())
        return main + aux_weight * aux, logs
    return main, logs


# ------------------------------------------------------------------------------ context decoder
class Attention(nn.Module):
    """The official decoder attention: bias-free q/k/v projections, softmax(q k^T / sqrt(d)) v, output projection
    with dropout."""

    def __init__(self, dim: int, heads: int, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder width {dim} is not divisible by {heads} heads")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, q, k, v):
        B, N, C = q.shape
        M = k.shape[1]
        h = self.heads
        q = self.q_proj(q).reshape(B, N, h, C // h)
        k = self.k_proj(k).reshape(B, M, h, C // h)
        v = self.v_proj(v).reshape(B, M, h, C // h)
        attn = (torch.einsum("bnhc,bmhc->bhnm", q, k) * self.scale).softmax(dim=-1)
        x = torch.einsum("bhnm,bmhc->bnhc", attn, v).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm: x += SA(LN x); x += CA(LN x, memory); x += Dropout(MLP(LN x))."""

    def __init__(self, width: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = Attention(width, heads, dropout)
        self.cross_attn = Attention(width, heads, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(width, width * 4), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(width * 4, width))

    def forward(self, x, mem):
        y = self.norm1(x)
        x = x + self.self_attn(y, y, y)
        x = x + self.cross_attn(self.norm2(x), mem, mem)
        return x + self.dropout(self.mlp(self.norm3(x)))


def _init_decoder(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ContextDecoder(nn.Module):
    """Vision-to-language decoder (official `ContextDecoder`): v = Dec(text queries, visual memory), (B, K, D)."""

    def __init__(self, visual_dim: int, width: int = 256, heads: int = 4, layers: int = 3, dropout: float = 0.1,
                 out_dim: int | None = None):
        super().__init__()
        self.memory_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width))
        self.decoder = nn.ModuleList([DecoderLayer(width, heads, dropout) for _ in range(layers)])
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim or visual_dim))
        self.apply(_init_decoder)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        mem = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.decoder:
            x = layer(x, mem)
        return self.out_proj(x)


def context_aware_update(text: torch.Tensor, visual_context: torch.Tensor, decoder: ContextDecoder,
                         gamma: torch.Tensor) -> torch.Tensor:
    """Post-model prompting: t (B, K, D) <- t + gamma * Dec(t, [z̄; z]) for text (K, D) or (B, K, D)."""
    B = visual_context.shape[0]
    if text.dim() == 2:
        text = text.unsqueeze(0).expand(B, -1, -1)
    return text + gamma * decoder(text, visual_context)


# ----------------------------------------------------------------------------------------- text side
class ClassPrompts(nn.Module):
    """Class text embeddings from "[SOS] ctx_1..ctx_N <name> [EOS]" through CLIP's frozen text transformer.

    `mode`: "learned" (N learnable vectors shared by the classes, official trunc-normal init), "fixed" (the tokens
    of FIXED_TEMPLATE, nothing learned) or "pre" (the context is given per image by `PreModelPrompter`)."""

    def __init__(self, bundle, classnames: Sequence[str], mode: str = "learned", n_ctx: int = 8, class_len: int = 5,
                 init_std: float = 1.0):
        super().__init__()
        if mode not in ("learned", "fixed", "pre"):
            raise ValueError(f"prompt mode must be learned, fixed or pre, got {mode!r}")
        self.encoder = PromptTextEncoder(bundle.model)
        self.mode, self.n_ctx, self.class_len = mode, int(n_ctx), int(class_len)
        embed = self.encoder.token_embedding
        device = embed.weight.device
        L = self.encoder.positional_embedding.shape[0]
        names = [c.replace("_", " ") for c in classnames]
        with torch.no_grad():
            if mode == "fixed":
                ids = tokenize(bundle, [FIXED_TEMPLATE.format(n) for n in names], device=device)
                self.register_buffer("token_ids", ids, persistent=False)
                self.register_buffer("fixed_embeddings", embed(ids), persistent=False)
                return
            name_ids = tokenize(bundle, names, device=device)          # (K, L): SOS name EOT 0...
            eot = name_ids.argmax(-1)
            too_long = [n for n, e in zip(names, eot.tolist()) if e >= class_len]
            if too_long:
                raise ValueError(f"class names longer than class_len-2={class_len - 2} tokens: {too_long[:3]}; "
                                 f"raise class_len")
            if 1 + n_ctx + class_len - 1 > L:
                raise ValueError(f"n_ctx {n_ctx} + class_len {class_len} exceeds the text context length {L}")
            K = len(names)
            ids = torch.zeros(K, L, dtype=torch.long, device=device)
            ids[:, 0] = name_ids[:, 0]
            ids[:, 1 + n_ctx:n_ctx + class_len] = name_ids[:, 1:class_len]   # name tokens, EOT, padding
            emb = embed(ids)
        self.register_buffer("token_ids", ids, persistent=False)          # EOT argmax = name EOT + n_ctx
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone(), persistent=False)
        if mode == "learned":
            ctx = torch.empty(n_ctx, self.encoder.width)
            nn.init.trunc_normal_(ctx, std=init_std, a=-2 * init_std, b=2 * init_std)
            self.ctx = nn.Parameter(ctx.to(device=device, dtype=self.encoder.dtype))

    @property
    def num_classes(self) -> int:
        return self.token_ids.shape[0]

    def assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """(K, L, d) prompts from context (N, d), or (B, K, L, d) from per-image context (B, N, d)."""
        K = self.num_classes
        if ctx.dim() == 2:
            return torch.cat([self.prefix, ctx.unsqueeze(0).expand(K, -1, -1).to(self.prefix.dtype), self.suffix], 1)
        B = ctx.shape[0]
        return torch.cat([self.prefix.expand(B, -1, -1, -1), ctx.unsqueeze(1).expand(B, K, -1, -1).to(self.prefix.dtype),
                          self.suffix.expand(B, -1, -1, -1)], dim=2)

    def forward(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """(K, D) class embeddings; with per-image context (B, N, d) ("pre"), (B, K, D)."""
        if self.mode == "fixed":
            return encode_prompts(self.encoder, self.fixed_embeddings, self.token_ids)
        if self.mode == "learned":
            return encode_prompts(self.encoder, self.assemble(self.ctx), self.token_ids)
        if ctx is None:
            raise ValueError("pre-model prompting needs the per-image context")
        B, K = ctx.shape[0], self.num_classes
        prompts = self.assemble(ctx).reshape(B * K, self.token_ids.shape[1], -1)
        out = encode_prompts(self.encoder, prompts, self.token_ids.repeat(B, 1))
        return out.reshape(B, K, -1)


class PreModelPrompter(nn.Module):
    """Pre-model prompting: N learnable queries attend to the visual context [z̄; z] through the context decoder;
    the outputs, in the text tower's token width, are the per-image context (B, N, d_token)."""

    def __init__(self, visual_dim: int, token_width: int, n_ctx: int = 8, width: int = 256, heads: int = 4,
                 layers: int = 3, dropout: float = 0.1):
        super().__init__()
        self.queries = nn.Parameter(torch.empty(n_ctx, visual_dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.decoder = ContextDecoder(visual_dim, width, heads, layers, dropout, out_dim=token_width)

    def forward(self, visual_context: torch.Tensor) -> torch.Tensor:
        B = visual_context.shape[0]
        return self.decoder(self.queries.unsqueeze(0).expand(B, -1, -1), visual_context)


# -------------------------------------------------------------------------------------- image side
class CLIPBackbone(nn.Module):
    """The CLIP image tower as a dense backbone: forward(x) -> ([4 pyramid maps], global (n, D) or None,
    dense (n, D, h, w) or None). `embeddings=False`: the plain pyramid (the baseline's CLIPResNet without its
    attention pool). The tower is a copy of the bundle's, trainable unless `freeze`."""

    def __init__(self, model: nn.Module, embeddings: bool = True, freeze: bool = False,
                 vit_out_indices: Sequence[int] | None = None):
        super().__init__()
        import copy
        self.visual = copy.deepcopy(model.visual)
        self.embeddings, self.frozen = embeddings, freeze
        self.kind = "vit" if is_vit(model) else "rn" if is_resnet(model) else None
        if self.kind is None:
            raise TypeError(f"unsupported image tower {type(model.visual).__name__}")
        if self.kind == "rn":
            self.channels = [self.visual.layer1[-1].conv3.out_channels, self.visual.layer2[-1].conv3.out_channels,
                             self.visual.layer3[-1].conv3.out_channels, self.visual.layer4[-1].conv3.out_channels]
            self.strides = [4, 8, 16, 32]
            if not embeddings:
                self.visual.attnpool = None
        else:
            v = self.visual
            depth = len(v.transformer.resblocks)
            self.out_indices = list(vit_out_indices) if vit_out_indices else \
                [round((i + 1) * depth / 4) - 1 for i in range(4)]
            if len(self.out_indices) != 4 or any(not 0 <= i < depth for i in self.out_indices):
                raise ValueError(f"vit_out_indices must be 4 block indices in [0, {depth}), got {self.out_indices}")
            width = int(v.class_embedding.shape[-1])
            patch = int(v.conv1.kernel_size[0])
            self.channels = [width] * 4
            up = lambda: nn.ConvTranspose2d(width, width, 2, 2)   # noqa: E731
            if patch == 16:   # strides 4, 8, 16, 32 from a stride-16 grid
                self.necks = nn.ModuleList([
                    nn.Sequential(nn.GroupNorm(1, width), up(), nn.BatchNorm2d(width), nn.GELU(), up()),
                    nn.Sequential(nn.GroupNorm(1, width), up()), nn.GroupNorm(1, width),
                    nn.Sequential(nn.GroupNorm(1, width), nn.MaxPool2d(2, 2))])
                self.strides = [4, 8, 16, 32]
            elif patch == 8:  # strides 4, 8, 16, 32 from a stride-8 grid
                self.necks = nn.ModuleList([
                    nn.Sequential(nn.GroupNorm(1, width), up()), nn.GroupNorm(1, width),
                    nn.Sequential(nn.GroupNorm(1, width), nn.MaxPool2d(2, 2)),
                    nn.Sequential(nn.GroupNorm(1, width), nn.MaxPool2d(4, 4))])
                self.strides = [4, 8, 16, 32]
            else:
                raise ValueError(f"ViT patch size {patch}: the official necks exist for patch 8 and 16")
        self.embed_dim = self._embed_dim()
        for p in self.visual.parameters():
            p.requires_grad_(not freeze)

    def _embed_dim(self) -> int:
        if self.kind == "rn":
            return self.visual.attnpool.c_proj.out_features if self.visual.attnpool is not None else 0
        return int(self.visual.proj.shape[1]) if self.visual.proj is not None else int(self.visual.class_embedding.shape[-1])

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:             # a frozen tower keeps its BatchNorm statistics
            self.visual.eval()
        return self

    def forward(self, x: torch.Tensor):
        v = self.visual
        x = x.to(v.conv1.weight.dtype)
        if self.kind == "rn":
            x = v.stem(x)
            c2 = v.layer1(x)
            c3 = v.layer2(c2)
            c4 = v.layer3(c3)
            c5 = v.layer4(c4)
            feats = [c2, c3, c4, c5]
            if not self.embeddings:
                return feats, None, None
            tokens = attention_pool_tokens(v.attnpool, c5, resize="bilinear")    # (n, 1+hw, D)
            n, _, h, w = c5.shape
            dense = tokens[:, 1:].transpose(1, 2).reshape(n, -1, h, w)
            return feats, tokens[:, 0], dense
        x = v.conv1(x)
        n, c, h, w = x.shape
        x = x.reshape(n, c, h * w).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1) + resized_positions(v.positional_embedding, h, w, "bilinear").to(x.dtype)
        x = v.ln_pre(x)
        batch_first = getattr(v.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        feats = []
        for i, block in enumerate(v.transformer.resblocks):
            x = block(x)
            if i in self.out_indices:
                t = x if batch_first else x.transpose(0, 1)
                feats.append(t[:, 1:].transpose(1, 2).reshape(n, c, h, w))
        feats = [neck(f) for neck, f in zip(self.necks, feats)]
        if not self.embeddings:
            return feats, None, None
        x = x if batch_first else x.transpose(0, 1)
        x = v.ln_post(x)
        if v.proj is not None:
            x = x @ v.proj
        return feats, x[:, 0], x[:, 1:].transpose(1, 2).reshape(n, -1, h, w)


# -------------------------------------------------------------------------------------- Semantic FPN
class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FPN(nn.Module):
    """mmseg/mmdet FPN (no norm): 1x1 laterals, top-down nearest upsampling and sum, 3x3 output convs."""

    def __init__(self, in_channels: Sequence[int], channels: int):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, channels, 1) for c in in_channels])
        self.output = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels])

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        lat = [l(f) for l, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        return [o(x) for o, x in zip(self.output, lat)]


class FPNHead(nn.Module):
    """mmseg's FPNHead: level i gets max(1, log2(s_i / s_0)) conv-BN-ReLU blocks, each followed by a 2x bilinear
    upsampling while above stride s_0; the levels are summed, then dropout and a 1x1 classifier."""

    def __init__(self, channels: int, num_classes: int, strides: Sequence[int], dropout: float = 0.1):
        super().__init__()
        heads = []
        for s in strides:
            n = max(1, int(math.log2(s) - math.log2(strides[0])))
            layers = []
            for k in range(n):
                layers.append(ConvBNReLU(channels, channels))
                if s != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            heads.append(nn.Sequential(*layers))
        self.scale_heads = nn.ModuleList(heads)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](feats[0])
        for head, f in zip(self.scale_heads[1:], feats[1:]):
            out = out + F.interpolate(head(f), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv_seg(self.dropout(out))


# -------------------------------------------------------------------------------------- the segmentor
class DenseCLIP(nn.Module):
    """DenseCLIP segmentor (or its no-language baseline) on a CLIP bundle. forward(images) ->
    {"logits": (n, K, H/4, W/4), "score_map": (n, K, h, w) or None, "text": (n, K, D) or None}."""

    def __init__(self, bundle, classnames: Sequence[str], variant: str = "post", n_ctx: int = 8,
                 class_len: int = 5, decoder_width: int = 256, decoder_heads: int = 4, decoder_layers: int = 3,
                 decoder_dropout: float = 0.1, gamma_init: float = 1e-4, fpn_channels: int = 256,
                 head_dropout: float = 0.1, score_concat_index: int | None = None, freeze_backbone: bool = False,
                 vit_out_indices: Sequence[int] | None = None, ctx_init_std: float = 1.0):
        super().__init__()
        if variant not in VARIANT_SPEC:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        prompt, prompting, self.aux = VARIANT_SPEC[variant]
        self.language = prompt is not None
        self.prompting = prompting
        self.num_classes = len(classnames)
        self.backbone = CLIPBackbone(bundle.model, embeddings=self.language, freeze=freeze_backbone,
                                     vit_out_indices=vit_out_indices)
        K = self.num_classes
        in_ch = list(self.backbone.channels)
        if self.language:
            self.text = ClassPrompts(bundle, classnames, prompt, n_ctx, class_len, init_std=ctx_init_std)
            for p in self.text.encoder.parameters():
                p.requires_grad_(False)
            D = self.backbone.embed_dim
            if prompting == "post":
                self.context_decoder = ContextDecoder(D, decoder_width, decoder_heads, decoder_layers, decoder_dropout)
                self.gamma = nn.Parameter(torch.full((D,), float(gamma_init)))
            elif prompting == "pre":
                self.prompter = PreModelPrompter(D, self.text.encoder.width, n_ctx, decoder_width, decoder_heads,
                                                 decoder_layers, decoder_dropout)
            if score_concat_index is None:
                score_concat_index = 3 if self.backbone.kind == "rn" else self.backbone.strides.index(
                    8 if int(self.backbone.visual.conv1.kernel_size[0]) == 8 else 16)
            if not 0 <= score_concat_index < 4:
                raise ValueError(f"score_concat_index must be 0..3, got {score_concat_index}")
            self.score_concat_index = int(score_concat_index)
            in_ch[self.score_concat_index] += K
        self.neck = FPN(in_ch, fpn_channels)
        self.head = FPNHead(fpn_channels, K, self.backbone.strides, head_dropout)
        self._text_cache: torch.Tensor | None = None

    def text_embeddings(self, visual_context: torch.Tensor | None = None) -> torch.Tensor:
        """Class embeddings before context-aware prompting: (K, D), or (B, K, D) with pre-model prompting. In eval
        mode the K fixed-context embeddings are encoded once and reused."""
        if self.prompting == "pre":
            return self.text(self.prompter(visual_context))
        constant = self.text.mode == "fixed"          # nothing learned on the text side: encode once
        if (constant or not self.training) and self._text_cache is not None:
            return self._text_cache
        if constant:
            with torch.no_grad():
                t = self.text()
        else:
            t = self.text()
        if constant or not self.training:
            self._text_cache = t
        return t

    def train(self, mode: bool = True):
        if getattr(self, "text", None) is None or self.text.mode != "fixed":
            self._text_cache = None
        return super().train(mode)

    def forward(self, images: torch.Tensor) -> dict:
        return self.forward_features(*self.backbone(images))

    def forward_features(self, feats: Sequence[torch.Tensor], z_global: torch.Tensor | None,
                         z: torch.Tensor | None) -> dict:
        """Everything after the image tower, from its pyramid and embeddings (cached when the tower is frozen)."""
        feats = list(feats)
        s, text = None, None
        if self.language:
            n, D, h, w = z.shape
            visual_context = torch.cat([z_global.unsqueeze(1), z.flatten(2).transpose(1, 2)], dim=1)  # (n, 1+hw, D)
            text = self.text_embeddings(visual_context)
            if self.prompting == "post":
                text = context_aware_update(text, visual_context, self.context_decoder, self.gamma)
            s = score_map(z, text)
            i = self.score_concat_index
            if feats[i].shape[-2:] != s.shape[-2:]:
                raise ValueError(f"score map {tuple(s.shape[-2:])} does not match pyramid level {i} "
                                 f"{tuple(feats[i].shape[-2:])}; set score_concat_index")
            feats[i] = torch.cat([feats[i], s.to(feats[i].dtype)], dim=1)
        logits = self.head(self.neck(feats))
        return {"logits": logits, "score_map": s, "text": text}

    def param_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 0.1) -> list[dict]:
        """AdamW groups as the official paramwise_cfg: the image tower at lr x backbone_lr_mult, the text tower
        frozen (lr x 0: left out), norm layers without weight decay."""
        norm_types = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
        norm_params = {id(p) for m in self.modules() if isinstance(m, norm_types) for p in m.parameters()}
        backbone = {id(p) for p in self.backbone.parameters()}
        groups: dict[tuple, list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            mult = backbone_lr_mult if id(p) in backbone else 1.0
            decay = 0.0 if id(p) in norm_params else weight_decay
            groups.setdefault((mult, decay), []).append(p)
        return [{"params": ps, "lr": lr * m, "lr_mult": m, "weight_decay": d} for (m, d), ps in sorted(groups.items())]


def poly_lr(base: float, it: float, max_iters: int, power: float = 0.9, min_lr: float = 1e-6,
            warmup_iters: int = 0, warmup_ratio: float = 1e-6) -> float:
    """mmcv's poly policy with linear warm-up: (base - min) (1 - it/max)^power + min; during warm-up times
    1 - (1 - it/warmup)(1 - ratio)."""
    lr = (base - min_lr) * (1 - min(it, max_iters) / max_iters) ** power + min_lr
    if warmup_iters and it < warmup_iters:
        lr *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return lr
