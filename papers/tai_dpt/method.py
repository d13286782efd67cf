"""TaI-DPT (Guo et al., CVPR 2023): texts as images in prompt tuning, double-grained prompts.

Captions stand in for images: prompts are trained on text only and tested on images.

- Labels of a caption (`LabelParser`): lower-cased words, lemmatised (WordNet in the official code; here a small
  rule-based noun lemmatiser, `lemmatize`, or NLTK's when asked and installed), then class i is positive if any
  of its synonyms occurs as a whole word, compound (multi-word) names matched and removed first; a caption with
  no class is dropped (official `datasets/*_distill.py`).
- Corpus (`caption_corpus`): the labelled captions, plus per class 9 copies of "a photo of a {c}." and the 80
  CLIP ImageNet templates as single-label sentences (official: `default_prompt_num - 1` copies + templates).
- Prompts (`DoubleGrainedPrompt`): two unified CoOp contexts of 16 tokens (papers.coop.method.PromptLearner,
  imported), global G_i = [SOS] g_1..g_16 <class_i> . and local L_i = [SOS] l_1..l_16 <class_i> . ; random
  N(0, 0.02) init. Only the two contexts are trained; CLIP is frozen.
- Features: at training, a caption's EOT feature (global, u) and every token's `ln_final(h_k) @ text_projection`
  (local, u_k; padding id 0 masked) (`encode_caption_tokens`); at test, the image's attention-pool output and
  its value-path dense features, both WITHOUT the positional embedding (official `if_pos=False`,
  `encode_image_global_dense`).
- Scores: s^g = lambda cos(u, t^g); s^l = lambda sum_k softmax_k(tau cos(u_k, t^l)) cos(u_k, t^l); lambda = 4,
  tau = 50 on text tokens and 40 on image locations (official VOC/COCO); merged = 0.5 s^g + 0.5 s^l.
- Loss (`ranking_loss`): mean over samples of sum_{i pos} sum_{j neg} max(0, 1 - s_i + s_j), on each branch,
  summed (official `LOSSFUNC: double_ranking`, `ranking_loss(scale_=1, margin_=1)`).
- Combination with image-trained prompts (`ensemble`): each whole score matrix min-max normalised (one min and
  max over the matrix), then (1 - r) s_TaI-DPT + r s_other (official `ensemble_score.py`).
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import ClipBundle
from common.clip.text import PromptTextEncoder, encode_prompts
from common.clip.visual import (attention_pool_tokens, encode_image_hooked, is_resnet, resnet_dense_features,
                                resnet_feature_map)

from papers.coop.method import PromptLearner

SCALE = 4.0          # lambda: fixed logit scale (official IF_LEARN_SCALE False -> 4.0)
TAU_TEXT = 50.0      # spatial_SCALE_text
TAU_IMAGE = 40.0     # spatial_SCALE_image (VOC / COCO; NUS-WIDE 4)
MERGE_RATE = 0.5     # weight of the global branch in the merged score (official 0.5 / 0.5)
DEFAULT_TEMPLATE = "a photo of a {}."
N_DEFAULT = 9        # copies of the default template per class (official default_prompt_num - 1)


# ------------------------------------------------------------------------------------------- label parsing
_IRREGULAR = {"men": "man", "women": "woman", "people": "person", "children": "child", "mice": "mouse",
              "geese": "goose", "teeth": "tooth", "feet": "foot", "knives": "knife", "leaves": "leaf",
              "wolves": "wolf", "shelves": "shelf", "halves": "half", "loaves": "loaf", "scarves": "scarf",
              "wives": "wife", "lives": "life", "calves": "calf", "shoes": "shoe", "tomatoes": "tomato",
              "potatoes": "potato", "mangoes": "mango", "heroes": "hero", "oxen": "ox", "dice": "die",
              "buses": "bus", "octopi": "octopus", "cacti": "cactus", "skis": "ski", "taxis": "taxi"}
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def words(text: str) -> list[str]:
    """Lower-cased word tokens; hyphenated words ("t-shirt") stay one token, punctuation and '#' are dropped."""
    return _WORD.findall(text.lower())


def lemmatize(word: str) -> str:
    """Noun lemma by rule (a stand-in for WordNet's lemmatiser on plural nouns): irregular plurals by table,
    -ies -> -y, -sses/-shes/-ches/-xes/-zes -> drop -es, a final -s dropped unless -ss/-us/-is; words of <= 3
    letters unchanged. Applied to captions and synonyms alike, so both sides meet in the same form."""
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) <= 3:
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("sses", "shes", "ches", "xes", "zes")):
        return w[:-2]
    if w.endswith(("ss", "us", "is")):
        return w
    if w.endswith("s"):
        return w[:-1]
    return w


def _nltk_lemmatizer():
    try:
        from nltk import pos_tag, word_tokenize
        from nltk.corpus import wordnet
        from nltk.stem import WordNetLemmatizer
    except ImportError:
        raise ImportError("lemmatizer 'nltk' needs nltk with punkt, averaged_perceptron_tagger and wordnet "
                          "(pip install nltk); or use lemmatizer=rules") from None
    wnl = WordNetLemmatizer()
    tags = {"J": wordnet.ADJ, "V": wordnet.VERB, "N": wordnet.NOUN, "R": wordnet.ADV}

    def lemmas(text: str) -> list[str]:
        return [wnl.lemmatize(w, pos=tags.get(t[:1], wordnet.NOUN)) for w, t in pos_tag(word_tokenize(text.lower()))]
    return lemmas


class LabelParser:
    """Class labels of a caption from per-class synonym lists (`synonyms[i]`: the names of class i).

    Official rule: the caption's lemmas joined by spaces; every compound name (with a space) found as
    " name " marks its class and is cut out, then every single-word name (and each compound written without its
    spaces, as the official `nameset` adds) likewise."""

    def __init__(self, synonyms: Sequence[Sequence[str]], lemmatizer: str = "rules"):
        if lemmatizer not in ("rules", "nltk"):
            raise ValueError(f"lemmatizer must be 'rules' or 'nltk', got {lemmatizer!r}")
        self.num_classes = len(synonyms)
        self._lemmas = _nltk_lemmatizer() if lemmatizer == "nltk" else (lambda t: [lemmatize(w) for w in words(t)])
        compound: dict[str, int] = {}
        single: dict[str, int] = {}
        for i, names in enumerate(synonyms):
            if not names:
                raise ValueError(f"class {i} has no name to match")
            for n in names:
                lem = " ".join(lemmatize(w) for w in words(n))
                if not lem:
                    raise ValueError(f"synonym {n!r} of class {i} has no word")
                for table, key in ((compound, lem), (single, lem.replace(" ", ""))) if " " in lem else ((single, lem),):
                    if table.get(key, i) != i:
                        raise ValueError(f"name {n!r} is a synonym of two classes ({table[key]} and {i})")
                    table[key] = i
        # longest compounds first, so "ice cream cone" is cut before "ice cream"
        self.compound = sorted(compound.items(), key=lambda kv: (-len(kv[0]), kv[0]))
        self.single = sorted(single.items())

    def labels(self, caption: str) -> list[int]:
        text = " " + " ".join(self._lemmas(caption)) + " "
        found = set()
        for table in (self.compound, self.single):
            for name, i in table:
                key = f" {name} "
                if key in text:
                    found.add(i)
                    text = text.replace(key, " ")
        return sorted(found)

    def targets(self, captions: Sequence[str]) -> torch.Tensor:
        """(N, C) 0/1 targets of the captions."""
        y = torch.zeros(len(captions), self.num_classes)
        for n, c in enumerate(captions):
            for i in self.labels(c):
                y[n, i] = 1.0
        return y


def caption_corpus(captions: Sequence[str], classnames: Sequence[str], parser: LabelParser,
                   templates: Sequence[str] = (), n_default: int = N_DEFAULT,
                   default_template: str = DEFAULT_TEMPLATE) -> tuple[list[str], torch.Tensor, int]:
    """(texts, targets (N, C), number of captions kept): the captions with at least one class, then per class
    `n_default` copies of the default template and one sentence per template, each labelled with that class only."""
    y = parser.targets(captions)
    keep = y.sum(1) > 0
    texts = [c for c, k in zip(captions, keep.tolist()) if k]
    ys = [y[keep]]
    C = len(classnames)
    for i, name in enumerate(classnames):
        sents = [default_template.format(name)] * int(n_default) + [t.format(name) for t in templates]
        if sents:
            texts += sents
            ys.append(F.one_hot(torch.full((len(sents),), i), C).float())
    return texts, torch.cat(ys), int(keep.sum())


# ------------------------------------------------------------------------------------------- text side
@torch.no_grad()
def encode_caption_tokens(encoder: PromptTextEncoder, token_ids: torch.Tensor, batch_size: int = 512) -> dict:
    """Frozen text-side features of tokenised captions (N, L), normalised:
    {"eot": (N, D) the EOT feature (= encode_text), "tokens": (T, D) every non-padding position's
    ln_final(h_k) @ text_projection packed caption after caption, "start": (N,), "length": (N,)}.
    Non-padding = token id != 0 (official mask; SOT and EOT included). Positions past the batch's last EOT are
    padding and CLIP's text transformer is causal, so each chunk runs only up to its last EOT (exact)."""
    eots, toks, lengths = [], [], []
    cast = encoder.transformer.get_cast_dtype()
    for ids in token_ids.split(batch_size):
        ids = ids.to(encoder.token_embedding.weight.device)
        eot = ids.argmax(-1)
        keep = int(eot.max()) + 1
        ids = ids[:, :keep]
        x = encoder.token_embedding(ids).to(cast) + encoder.positional_embedding[:keep].to(cast)
        batch_first = getattr(encoder.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for block in encoder.transformer.resblocks:
            x = block(x, attn_mask=encoder.attn_mask[:keep, :keep])
        x = x if batch_first else x.transpose(0, 1)
        x = encoder.ln_final(x)
        proj = encoder.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else (x @ proj if proj is not None else x)
        x = F.normalize(x.float(), dim=-1)
        eots.append(x[torch.arange(len(ids)), eot].cpu())
        valid = ids != 0
        toks.append(x[valid].cpu())
        lengths.append(valid.sum(1).cpu())
    length = torch.cat(lengths)
    start = torch.cat([torch.zeros(1, dtype=torch.long), length.cumsum(0)[:-1]])
    return {"eot": torch.cat(eots), "tokens": torch.cat(toks), "start": start, "length": length}


def gather_tokens(feats: dict, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Lmax, D) token features of captions `idx` and the (B, Lmax) mask of real positions (padding rows are
    copies of a valid row, masked out)."""
    length = feats["length"][idx]
    L = int(length.max())
    pos = torch.arange(L)
    valid = pos[None] < length[:, None]
    rows = feats["start"][idx][:, None] + torch.minimum(pos[None], (length - 1)[:, None])
    return feats["tokens"][rows], valid


# ------------------------------------------------------------------------------------------- image side
def encode_image_global_dense(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(n, 1+hw, D), not normalised: index 0 the global embedding, then the dense features. ResNet (the paper):
    the attention pool on [mean; F_1..F_hw] WITHOUT positional embedding (official `attnpool(.., if_pos=False)`),
    and c_proj(v_proj(F_k)) per location, also without positions. ViT (not in the paper): the CLS output and the
    patch tokens through ln_post and proj."""
    if is_resnet(model):
        pool = model.visual.attnpool
        fmap = resnet_feature_map(model, images)
        g = attention_pool_tokens(pool, fmap, with_position=False)[:, :1]
        return torch.cat([g, resnet_dense_features(pool, fmap, with_position=False)], dim=1)
    pooled, dense = encode_image_hooked(model, images, return_dense=True)
    return torch.cat([pooled.unsqueeze(1), dense], dim=1)


# ------------------------------------------------------------------------------------------- scores and loss
def global_scores(u: torch.Tensor, t_g: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    """(B, C) = lambda cos(u, t^g) of global features (B, D) against normalised prompt features (C, D)."""
    return scale * F.normalize(u, dim=-1) @ t_g.t()


def local_scores(tokens: torch.Tensor, t_l: torch.Tensor, tau: float, valid: torch.Tensor | None = None,
                 scale: float = SCALE) -> torch.Tensor:
    """(B, C) = lambda sum_k softmax_k(tau cos(u_k, t^l)) cos(u_k, t^l) over the valid positions k of token / dense
    features (B, K, D); masked positions get zero weight (the official -1e4 before the softmax)."""
    sim = F.normalize(tokens, dim=-1) @ t_l.t()                     # (B, K, C)
    logits = tau * sim
    if valid is not None:
        logits = logits.masked_fill(~valid[..., None], float("-inf"))
    w = logits.softmax(dim=1)
    return scale * (w * sim).sum(1)


def merged_scores(s_g: torch.Tensor, s_l: torch.Tensor, rate: float = MERGE_RATE) -> torch.Tensor:
    return rate * s_g + (1 - rate) * s_l


def ranking_loss(scores: torch.Tensor, targets: torch.Tensor, margin: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """Pairwise ranking loss (official `ranking_loss`): mean over samples of sum over (positive i, negative j) of
    max(0, margin - scale s_i + scale s_j)."""
    s = scale * scores
    y = targets.to(s.dtype)
    hinge = (margin - s[:, :, None] + s[:, None, :]).clamp(min=0)     # [n, i, j]: i positive, j negative
    return (hinge * y[:, :, None] * (1 - y[:, None, :])).sum((1, 2)).mean()


def minmax(x: torch.Tensor) -> torch.Tensor:
    """The whole matrix scaled to [0, 1] by its global min and max (not per class)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp(min=1e-12)


def ensemble(s_tai: torch.Tensor, s_other: torch.Tensor, rate: float) -> torch.Tensor:
    """(1 - rate) minmax(s_TaI-DPT) + rate minmax(s_other) (official ensemble_score.py)."""
    return (1 - rate) * minmax(s_tai) + rate * minmax(s_other)


# ------------------------------------------------------------------------------------------- model
class DoubleGrainedPrompt(nn.Module):
    """A global and a local unified CoOp context over the same class names (`glob`, `loc`)."""

    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], n_ctx: int = 16, ctx_init: str | None = None,
                 init_std: float = 0.02):
        super().__init__()
        self.bundle = bundle
        self.init_kwargs = dict(n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std)
        self.glob = PromptLearner(bundle, classnames, n_ctx=n_ctx, ctx_init=ctx_init, csc=False, init_std=init_std)
        self.loc = PromptLearner(bundle, classnames, n_ctx=n_ctx, ctx_init=ctx_init, csc=False, init_std=init_std)
        self.classnames = self.glob.classnames

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def encoder(self) -> PromptTextEncoder:
        return self.glob.encoder

    def token_ids(self) -> torch.Tensor:
        return torch.cat([self.glob.token_ids, self.loc.token_ids])

    def prompts(self, ctx_g: torch.Tensor | None = None, ctx_l: torch.Tensor | None = None) -> torch.Tensor:
        """(2C, L, d): [global prompts; local prompts]."""
        return torch.cat([self.glob.construct_prompts(self.glob.ctx if ctx_g is None else ctx_g),
                          self.loc.construct_prompts(self.loc.ctx if ctx_l is None else ctx_l)])

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (t^g, t^l), each (C, D), the 2C prompts encoded in one pass."""
        f = F.normalize(encode_prompts(self.encoder, self.prompts(), self.token_ids()), dim=-1)
        return f[:self.num_classes], f[self.num_classes:]

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def forward_text(self, eot: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                     tau: float = TAU_TEXT) -> tuple[torch.Tensor, torch.Tensor]:
        """(s^g, s^l) of captions (training)."""
        t_g, t_l = self.text_features()
        return global_scores(eot, t_g), local_scores(tokens, t_l, tau, valid)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def predict(model: DoubleGrainedPrompt, feats: torch.Tensor, tau: float = TAU_IMAGE,
            merge_rate: float = MERGE_RATE, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """{"global", "local", "merged"}: (N, C) scores of cached image features (N, 1+hw, D), prompts encoded once."""
    t_g, t_l = model.text_features()
    g, l = [], []
    for f in feats.split(batch_size):
        f = f.to(t_g.device)
        g.append(global_scores(f[:, 0], t_g).float().cpu())
        l.append(local_scores(f[:, 1:], t_l, tau).float().cpu())
    g, l = torch.cat(g), torch.cat(l)
    return {"global": g, "local": l, "merged": merged_scores(g, l, merge_rate)}
