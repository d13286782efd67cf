import pytest
import torch
import torch.nn.functional as F

from common.clip import zeroshot_classifier
from papers.coop.method import PromptLearner, coop_logits

NAMES = ["red square", "green_circle", "blue triangle"]


def test_init_from_a_photo_of_a_is_exactly_zero_shot(tiny_clip):
    pl = PromptLearner(tiny_clip, NAMES, ctx_init="a photo of a")
    assert pl.n_ctx == 4
    with torch.no_grad():
        ours = pl.class_embeddings()
    zs = zeroshot_classifier(tiny_clip, [n.replace("_", " ") for n in NAMES], ["a photo of a {}."], cache_dir=None)
    assert torch.allclose(ours, zs, atol=1e-5)
    feats = torch.randn(5, tiny_clip.embed_dim)
    assert torch.allclose(coop_logits(feats, ours, 100.0), coop_logits(feats, zs, 100.0), atol=1e-3)


def test_random_init_is_not_zero_shot_and_csc_equal_rows_is_unified(tiny_rn):
    torch.manual_seed(0)
    uni = PromptLearner(tiny_rn, NAMES, n_ctx=4)
    csc = PromptLearner(tiny_rn, NAMES, n_ctx=4, csc=True)
    assert csc.ctx.shape == (3, 4, uni.encoder.width)
    with torch.no_grad():
        csc.ctx.copy_(uni.ctx.unsqueeze(0).expand(3, -1, -1))
        assert torch.allclose(csc.class_embeddings(), uni.class_embeddings(), atol=1e-6)
        zs = zeroshot_classifier(tiny_rn, [n.replace("_", " ") for n in NAMES], ["a photo of a {}."], cache_dir=None)
        assert not torch.allclose(uni.class_embeddings(), zs, atol=1e-2)


@pytest.mark.parametrize("position", ["middle", "front"])
def test_class_token_positions_place_the_name(tiny_rn, position):
    """With the context set to the embeddings of 'a photo of a' split around the name, the prompt equals
    the tokenised sentence with the name at that position."""
    pl = PromptLearner(tiny_rn, ["dog"], n_ctx=4, class_token_position=position)
    words = "a photo of a".split()
    enc = pl.encoder
    with torch.no_grad():
        pl.ctx.copy_(enc.embed(tiny_rn.tokenizer(["a photo of a"]))[0, 1:5])
        sentence = {"middle": "a photo dog of a.", "front": "dog a photo of a."}[position]
        ids = tiny_rn.tokenizer([sentence])
        ref = F.normalize(tiny_rn.model.encode_text(ids), dim=-1)
        assert torch.allclose(pl.class_embeddings(), ref, atol=1e-5)
    assert words


def test_gradients_reach_only_the_context(tiny_rn):
    pl = PromptLearner(tiny_rn, NAMES, n_ctx=4)
    feats = torch.randn(6, tiny_rn.embed_dim)
    loss = F.cross_entropy(coop_logits(feats, pl.class_embeddings(), 100.0), torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()
    assert pl.ctx.grad is not None and pl.ctx.grad.abs().sum() > 0
    assert [n for n, p in pl.named_parameters() if p.requires_grad] == ["ctx"]
    assert all(p.grad is None for p in tiny_rn.model.parameters())


def test_bad_options(tiny_rn):
    with pytest.raises(ValueError, match="class_token_position"):
        PromptLearner(tiny_rn, NAMES, class_token_position="start")
    with pytest.raises(ValueError, match="n_ctx"):
        PromptLearner(tiny_rn, NAMES, n_ctx=0)
