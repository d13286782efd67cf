import torch

from common.clip import PromptTextEncoder, tokenize

TEXTS = ["a photo of a dog.", "a red star on a blue background.", "x"]


def test_prompt_encoder_equals_encode_text(tiny_clip):
    enc = PromptTextEncoder(tiny_clip.model)
    ids = tokenize(tiny_clip, TEXTS)
    ref = tiny_clip.model.encode_text(ids)
    out = enc(enc.embed(ids), ids)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_deep_prompt_equal_to_layer_input_is_identity(tiny_rn):
    """Replacing tokens 1..m at layer 1's input with exactly what is there must not change anything,
    and any other value must: this pins the position and the layer of the replacement."""
    enc = PromptTextEncoder(tiny_rn.model)
    ids = tokenize(tiny_rn, TEXTS)
    captured = {}
    h = enc.transformer.resblocks[1].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].clone()))
    ref = enc(enc.embed(ids), ids)
    h.remove()
    m = 3
    same = captured["x"][:, 1:1 + m]
    assert torch.allclose(enc(enc.embed(ids), ids, deep_prompts=[same]), ref, atol=1e-6)
    other = enc(enc.embed(ids), ids, deep_prompts=[torch.zeros(m, enc.width)])
    assert not torch.allclose(other, ref, atol=1e-3)


def test_gradients_reach_prompt_embeddings_only(tiny_rn):
    enc = PromptTextEncoder(tiny_rn.model)
    ids = tokenize(tiny_rn, TEXTS)
    ctx = torch.zeros(4, enc.width, requires_grad=True)
    emb = enc.embed(ids).clone()
    emb[:, 1:5] = ctx
    enc(emb, ids).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_rn.model.parameters())


def test_tokenize_refuses_truncation(tiny_rn):
    import pytest
    with pytest.raises(ValueError, match="does not fit the context length"):
        tokenize(tiny_rn, ["word " * 60])


def test_shared_prefix_encoding_equals_full_prompts(tiny_clip):
    """Prompts that share their first P tokens (SOS + a unified context) encode the same through the shared-prefix
    path: values and the gradient that reaches the context, for several groups with different contexts."""
    from common.clip.text import encode_prompts, encode_shared_prefix, shared_prefix_supported
    from papers.coop.method import PromptLearner
    for p in tiny_clip.model.parameters():
        p.requires_grad_(False)
    names = ["star", "lightning bolt", "sky blue t-shirt"]
    learners = [PromptLearner(tiny_clip, names, n_ctx=4) for _ in range(2)]
    assert shared_prefix_supported(learners[0].encoder)
    P = 1 + learners[0].n_ctx
    eot = learners[0].token_ids.argmax(-1) - P
    S = int(eot.max()) + 1
    ctx = torch.stack([l.ctx.detach() for l in learners]).requires_grad_(True)
    prompts = torch.stack([l.construct_prompts(ctx[g]) for g, l in enumerate(learners)])      # (G, K, L, d)
    fast = encode_shared_prefix(learners[0].encoder, prompts[:, 0, :P], prompts[:, :, P:P + S], eot)
    weights = torch.randn(fast.shape, generator=torch.Generator().manual_seed(0))
    (fast * weights).sum().backward()
    g_fast = ctx.grad.clone()
    ctx.grad = None
    full = torch.stack([encode_prompts(l.encoder, prompts[g], l.token_ids) for g, l in enumerate(learners)])
    (full * weights).sum().backward()
    assert torch.allclose(fast, full, atol=1e-5) and not torch.allclose(full[0], full[1])
    assert torch.allclose(g_fast, ctx.grad, rtol=1e-4, atol=1e-3)     # gradients up to ~200 on a random tower
