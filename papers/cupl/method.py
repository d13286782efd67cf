"""CuPL (Pratt et al., ICCV 2023): zero-shot classification with Customized Prompts via Language models.

Per class c the text classifier is built from LLM-written sentences that describe c, each a CLIP text input
as it is (no template):  w_c = normalise( mean_{s in S(c)} normalise(E_text(s)) ),  predict argmax_c <f(x), w_c>.
Variants (sarahpratt/CuPL classify_imagenet.py):
- ``cupl``: the sentences only (the paper's "CuPL");
- ``cupl_e``: the standard hand-written templates filled with the class name *and* the sentences pooled in one
  mean, every text weighing the same (the code's ``use_both``, the paper's "CuPL + e");
- ``shuffled``: the sentence lists of the classes permuted (no class keeps its own) with the donor's class name
  replaced by the receiver's, a control for "it is only more prompts" (the right name, the wrong description);
- ``n<k>``: k sentences per class drawn at random (fixed seed), for the number-of-sentences ablation.
Nothing is trained; sentences are tokenised with truncation to the context length (``truncate=True``).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from common.clip import ClipBundle, pooled_classifier
from common.data.descriptors import derangement

BASE_VARIANTS = ("cupl", "cupl_e", "shuffled")


def wordify(name: str) -> str:
    """A class name as a prompt shows it: underscores as spaces."""
    return str(name).replace("_", " ")


def with_templates(sentences: Sequence[Sequence[str]], classnames: Sequence[str],
                   templates: Sequence[str]) -> list[list[str]]:
    """CuPL + e: per class, the templates filled with its name, then its sentences (one pooled list)."""
    return [[t.format(wordify(c)) for t in templates] + list(s) for c, s in zip(classnames, sentences)]


def rename(sentence: str, old: str, new: str) -> str:
    """`old` replaced by `new` wherever it stands as whole words (case-insensitive)."""
    return re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", lambda _: new, sentence, flags=re.IGNORECASE)


def shuffled(texts: Sequence[Sequence[str]], names: Sequence[str], seed: int) -> list[list[str]]:
    """The content control: class i gets the sentences of class perm[i] != i, with that class's name replaced by
    its own ("A platypus looks like..." describing a goldfish reads "A goldfish looks like..."): the same number
    and style of sentences and the right name, the wrong description. Without the renaming every sentence would
    name another class and the control would measure the names, not the descriptions."""
    perm = derangement(len(texts), seed)
    return [[rename(t, names[j], names[i]) for t in texts[j]] for i, j in enumerate(perm)]


def subset(texts: Sequence[Sequence[str]], k: int, seed: int) -> list[list[str]]:
    """k texts per class drawn without replacement (all of a class's texts if it has fewer), in file order."""
    if k < 1:
        raise ValueError(f"a sentence count must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    out = []
    for ts in texts:
        idx = sorted(rng.choice(len(ts), size=min(k, len(ts)), replace=False).tolist()) if ts else []
        out.append([ts[i] for i in idx])
    return out


def variant_texts(variant: str, sentences: Sequence[Sequence[str]], classnames: Sequence[str],
                  templates: Sequence[str], seed: int = 0) -> list[list[str]]:
    """The texts of every class under one variant (see the module doc)."""
    if variant == "cupl":
        return [list(s) for s in sentences]
    if variant == "cupl_e":
        return with_templates(sentences, classnames, templates)
    if variant == "shuffled":
        return shuffled(sentences, classnames, seed)
    m = re.fullmatch(r"n(\d+)", variant)
    if m:
        return subset(sentences, int(m.group(1)), seed)
    raise ValueError(f"unknown CuPL variant {variant!r}; known: {', '.join(BASE_VARIANTS)} and n<k> (k sentences "
                     f"per class)")


def cupl_weights(bundle: ClipBundle, texts: Sequence[Sequence[str]]) -> torch.Tensor:
    """(K, D) CuPL classifier: per class the renormalised mean of its texts' normalised embeddings."""
    return pooled_classifier(bundle, texts)
