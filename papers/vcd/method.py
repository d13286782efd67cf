"""Classification by description (Menon & Vondrick, ICLR 2023): score each class by the mean similarity of the image
to sentences built from the class's LLM descriptors.

    s(c, x) = 1/|D(c)| * sum_{d in D(c)} cos(f(x), g("{c}, {which-clause(d)}"))        predict argmax_c s(c, x)

Sentences follow the official loader (sachit-menon/classify_by_description_release, `load_gpt_descriptions` with
category_name_inclusion="prepend", between_text=", ", descriptor modification on): the class name, ", ", then
`make_descriptor_sentence(d)`: "which is d" for a descriptor starting with the letter "a" (meant for a/an; it also
fires on "antennae"), "which d" for has/often/typically/may/can, "which is d" for "used", else "which has d";
ImageNet adds a final "." to every sentence and to the baseline's class name. An empty descriptor list becomes
[""] ("oysters, which has "), as the official code does. Because s is a mean of cosines it equals <f^(x), m_c>
with m_c the (not renormalised) mean of the normalised sentence embeddings: one matrix product per image batch,
and the per-descriptor terms of that mean are the explanation.
Variants: ``vcd`` (the official phrasing), ``which_has`` (always "{c}, which has {d}", the paper's wording),
``no_name`` (the which-clause alone, the official code's category_name_inclusion=None), ``shuffled`` (descriptor
lists permuted across classes, the class names kept: a content control). Baseline ``clip_classname``: CLIP with the
bare class name as the only text (the paper's baseline, no "a photo of a").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from common.clip import ClipBundle, encode_texts
from common.data.descriptors import derangement

VARIANTS = ("vcd", "which_has", "no_name", "shuffled")
PHRASINGS = ("official", "which_has")


def wordify(name: str) -> str:
    return str(name).replace("_", " ")


def which_clause(descriptor: str, phrasing: str = "official") -> str:
    """The official `make_descriptor_sentence` (case-sensitive startswith, as released), or always "which has"."""
    d = descriptor
    if phrasing == "which_has":
        return f"which has {d}"
    if phrasing != "official":
        raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
    if d.startswith("a"):               # the official test: also "an", and any word starting with "a"
        return f"which is {d}"
    if d.startswith(("has", "often", "typically", "may", "can")):
        return f"which {d}"
    if d.startswith("used"):
        return f"which is {d}"
    return f"which has {d}"


def class_sentences(name: str, descriptors: Sequence[str], phrasing: str = "official", with_name: bool = True,
                    end: str = "") -> list[str]:
    """The texts of one class; an empty descriptor list is the official [""]."""
    ds = list(descriptors) or [""]
    if with_name:
        return [f"{wordify(name)}, {which_clause(d, phrasing)}{end}" for d in ds]
    return [f"{which_clause(d, phrasing)}{end}" for d in ds]


def variant_descriptors(variant: str, descriptors: Sequence[Sequence[str]], seed: int = 0) -> list[list[str]]:
    """The descriptor lists a variant scores each class with (only `shuffled` moves them: class i gets the list
    of class perm[i] != i)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown VCD variant {variant!r}; known: {', '.join(VARIANTS)}")
    if variant != "shuffled":
        return [list(d) for d in descriptors]
    return [list(descriptors[j]) for j in derangement(len(descriptors), seed)]


def variant_sentences(variant: str, names: Sequence[str], descriptors: Sequence[Sequence[str]],
                      phrasing: str = "official", end: str = "", seed: int = 0) -> tuple[list[list[str]], list[list[str]]]:
    """(sentences per class, the descriptors they were built from) of one variant."""
    descs = variant_descriptors(variant, descriptors, seed)
    ph = "which_has" if variant == "which_has" else phrasing
    sents = [class_sentences(n, d, ph, with_name=variant != "no_name", end=end) for n, d in zip(names, descs)]
    return sents, [list(d) or [""] for d in descs]


@dataclass
class DescriptorHead:
    """Normalised sentence embeddings (N, D) and the class each belongs to; scores are mean cosines per class."""

    emb: torch.Tensor
    owner: torch.Tensor
    num_classes: int
    truncated: int = 0

    @property
    def class_means(self) -> torch.Tensor:
        """(K, D) m_c = mean of the class's normalised sentence embeddings (not renormalised)."""
        sums = torch.zeros(self.num_classes, self.emb.shape[1]).index_add_(0, self.owner, self.emb)
        counts = torch.bincount(self.owner, minlength=self.num_classes).clamp_min(1).unsqueeze(1)
        return sums / counts

    def scores(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, K) s(c, x): mean cosine of each image to its class's sentences."""
        return F.normalize(image_features.float(), dim=-1) @ self.class_means.t()

    def descriptor_scores(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, N) cosine of each image to every sentence (the terms of the class means)."""
        return F.normalize(image_features.float(), dim=-1) @ self.emb.t()


def descriptor_head(bundle: ClipBundle, sentences: Sequence[Sequence[str]]) -> DescriptorHead:
    flat = [s for ss in sentences for s in ss]
    owner = torch.repeat_interleave(torch.arange(len(sentences)), torch.tensor([len(s) for s in sentences]))
    emb, truncated = encode_texts(bundle, flat)
    return DescriptorHead(emb, owner, len(sentences), truncated)


def classname_texts(names: Sequence[str], end: str = "") -> list[list[str]]:
    """The paper's baseline: each class's bare name (ImageNet: with a final ".")."""
    return [[f"{wordify(n)}{end}"] for n in names]
