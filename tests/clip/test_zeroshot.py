import pytest
import torch
import torch.nn.functional as F

from common.clip import zeroshot_classifier

NAMES = ["cat", "dog", "red star"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def test_ensemble_is_normalised_mean_of_normalised_embeddings(tiny_rn, tmp_path):
    w = zeroshot_classifier(tiny_rn, NAMES, TEMPLATES, cache_dir=tmp_path)
    per_t = [F.normalize(tiny_rn.model.encode_text(tiny_rn.tokenizer([t.format(c) for c in NAMES])), dim=-1)
             for t in TEMPLATES]
    expected = F.normalize(torch.stack(per_t).mean(0), dim=-1)
    assert w.shape == (3, tiny_rn.embed_dim)
    assert torch.allclose(w, expected, atol=1e-6)


def test_classifier_is_cached_per_templates(tiny_rn, tmp_path):
    w1 = zeroshot_classifier(tiny_rn, NAMES, TEMPLATES, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    w2 = zeroshot_classifier(tiny_rn, NAMES, TEMPLATES, cache_dir=tmp_path)
    assert torch.equal(w1, w2) and len(list(tmp_path.glob("*.pt"))) == 1
    zeroshot_classifier(tiny_rn, NAMES, TEMPLATES[:1], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_encode_texts_normalised_cached_and_counts_texts_that_fill_the_context(tiny_rn, tmp_path):
    from common.clip import encode_texts
    long = " ".join(["word"] * 60)                   # longer than the tiny context (32 tokens)
    emb, truncated = encode_texts(tiny_rn, ["a cat.", long], cache_dir=tmp_path)
    expected = F.normalize(tiny_rn.model.encode_text(tiny_rn.tokenizer(["a cat.", long])), dim=-1)
    assert torch.allclose(emb, expected, atol=1e-6) and truncated == 1
    assert len(list(tmp_path.glob("*.pt"))) == 1
    again, t2 = encode_texts(tiny_rn, ["a cat.", long], cache_dir=tmp_path)
    assert torch.equal(again, emb) and t2 == 1 and len(list(tmp_path.glob("*.pt"))) == 1


def test_pooled_classifier_with_shared_templates_is_the_zero_shot_ensemble(tiny_rn, tmp_path):
    from common.clip import pooled_classifier
    texts = [[t.format(c) for t in TEMPLATES] for c in NAMES]
    pooled = pooled_classifier(tiny_rn, texts, cache_dir=tmp_path)
    assert torch.allclose(pooled, zeroshot_classifier(tiny_rn, NAMES, TEMPLATES, cache_dir=None), atol=1e-5)


def test_pooled_classifier_per_class_lists_of_different_lengths(tiny_rn, tmp_path):
    from common.clip import pooled_classifier
    texts = [["a cat.", "a small cat with whiskers.", "cats purr."], ["a dog."]]
    w = pooled_classifier(tiny_rn, texts, cache_dir=tmp_path)
    e = [F.normalize(tiny_rn.model.encode_text(tiny_rn.tokenizer(ts)), dim=-1) for ts in texts]
    assert torch.allclose(w, torch.stack([F.normalize(x.mean(0), dim=-1) for x in e]), atol=1e-6)
    with pytest.raises(ValueError, match="at least one text"):
        pooled_classifier(tiny_rn, [["a cat."], []], cache_dir=tmp_path)
