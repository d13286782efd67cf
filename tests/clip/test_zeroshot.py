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
