import pytest
import torch

from common.clip import encode_image_hooked, vit_width


def _images(bundle, n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, bundle.image_size, bundle.image_size, generator=g)


def test_no_hooks_equals_encode_image(tiny_clip):
    x = _images(tiny_clip)
    assert torch.equal(encode_image_hooked(tiny_clip.model, x), tiny_clip.model.encode_image(x))
    pooled, dense = encode_image_hooked(tiny_clip.model, x, return_dense=True)
    assert torch.equal(pooled, tiny_clip.model.encode_image(x))
    assert dense.shape[0] == 3 and dense.shape[2] == tiny_clip.embed_dim


def test_pixel_prompt_zero_is_identity_and_nonzero_is_not(tiny_clip):
    x = _images(tiny_clip)
    ref = tiny_clip.model.encode_image(x)
    assert torch.equal(encode_image_hooked(tiny_clip.model, x, pixel_prompt=torch.zeros_like(x[0])), ref)
    assert not torch.allclose(encode_image_hooked(tiny_clip.model, x, pixel_prompt=lambda im: im + 0.5), ref)


def test_vit_deep_prompts_replace_per_layer(tiny_vit):
    """VPT-deep with layer-i prompts equal to the layer-i input tokens equals VPT-shallow."""
    model, x, m = tiny_vit.model, _images(tiny_vit), 2
    first = torch.randn(m, vit_width(model))
    blocks = model.visual.transformer.resblocks
    captured = {}
    hooks = [blocks[i].register_forward_pre_hook(lambda mod, a, i=i: captured.__setitem__(i, a[0][:, 1:1 + m].clone()))
             for i in (1, 2)]
    shallow = encode_image_hooked(model, x, deep_prompts=[first])
    for h in hooks:
        h.remove()
    deep_same = encode_image_hooked(model, x, deep_prompts=[first, captured[1], captured[2]])
    assert torch.allclose(deep_same, shallow, atol=1e-6)
    deep_other = encode_image_hooked(model, x, deep_prompts=[first, torch.zeros(m, vit_width(model))])
    assert not torch.allclose(deep_other, shallow, atol=1e-4)
    _, dense = encode_image_hooked(model, x, deep_prompts=[first], return_dense=True)
    grid = (tiny_vit.image_size // model.visual.conv1.kernel_size[0]) ** 2
    assert dense.shape == (3, grid, tiny_vit.embed_dim), "prompt tokens must not appear among patch tokens"


def test_vit_generated_and_dropped_prompts(tiny_vit):
    """Callable entries see the layer input without prompts and may change the prompt count; None drops them.
    Reference: the official DPT order (prompts appended after the patches, removed after every block)."""
    model, x = tiny_vit.model, _images(tiny_vit)
    v, w = model.visual, vit_width(model)
    torch.manual_seed(1)
    vpt = [torch.randn(3, w), torch.randn(3, w)]
    extra = torch.randn(len(x), 5, w)
    seen = {}

    def gen(tokens):
        seen["tokens"] = tokens
        return extra + tokens[:, :1]          # depends on the prompt-free input

    got = encode_image_hooked(model, x, deep_prompts=[vpt[0], vpt[1], gen])
    t = v.conv1(x).flatten(2).transpose(1, 2)
    t = v.ln_pre(torch.cat([v.class_embedding.expand(len(x), 1, -1), t], 1) + v.positional_embedding)
    blocks = v.transformer.resblocks
    for i, block in enumerate(blocks):
        if i < 2:
            p = vpt[i].expand(len(x), -1, -1)
        elif i == 2:
            assert torch.allclose(seen["tokens"], t, atol=1e-6)
            p = extra + t[:, :1]
        else:
            p = None
        if p is None:      # layers past the list keep the last prompts' outputs (VPT-shallow rule)
            t = block(t)
            continue
        t = block(torch.cat([t, p], 1))
        if i < len(blocks) - 1 and i < 2:
            t = t[:, :-p.shape[1]]
    ref = v.ln_post(t[:, 0]) @ v.proj
    assert torch.allclose(got, ref, atol=1e-5)
    none = encode_image_hooked(model, x, deep_prompts=[vpt[0], None])
    t = v.conv1(x).flatten(2).transpose(1, 2)
    t = v.ln_pre(torch.cat([v.class_embedding.expand(len(x), 1, -1), t], 1) + v.positional_embedding)
    t = blocks[0](torch.cat([t, vpt[0].expand(len(x), -1, -1)], 1))[:, :-3]
    for block in blocks[1:]:
        t = block(t)
    assert torch.allclose(none, v.ln_post(t[:, 0]) @ v.proj, atol=1e-5)


def test_resnet_dense_value_path_is_exact(tiny_rn):
    """With q/k projections zeroed the attention pool averages its values uniformly, so the pooled
    feature must equal the mean of the dense (value-path) features and the mean-token's value."""
    import copy
    model = copy.deepcopy(tiny_rn.model)
    pool = model.visual.attnpool
    with torch.no_grad():
        for proj in (pool.q_proj, pool.k_proj):
            proj.weight.zero_()
            proj.bias.zero_()
    x = _images(tiny_rn)
    pooled, dense = encode_image_hooked(model, x, return_dense=True)
    from common.clip import resnet_feature_map
    fmap = resnet_feature_map(model, x)
    mean_tok = fmap.flatten(2).mean(-1) + pool.positional_embedding[0]
    mean_val = pool.c_proj(pool.v_proj(mean_tok))
    expected = (mean_val + dense.sum(1)) / (dense.shape[1] + 1)
    assert torch.allclose(pooled, expected, atol=1e-5)


def test_deep_prompts_need_vit(tiny_rn):
    with pytest.raises(ValueError, match="need a ViT"):
        encode_image_hooked(tiny_rn.model, _images(tiny_rn), deep_prompts=[torch.zeros(2, 8)])


def test_vit_value_dense_mode(tiny_vit):
    x = _images(tiny_vit)
    _, tok = encode_image_hooked(tiny_vit.model, x, return_dense=True)
    _, val = encode_image_hooked(tiny_vit.model, x, return_dense=True, dense_mode="value")
    assert tok.shape == val.shape and not torch.allclose(tok, val)
    with pytest.raises(ValueError, match="dense_mode"):
        encode_image_hooked(tiny_vit.model, x, return_dense=True, dense_mode="nope")


def test_attention_pool_tokens_resize_positions(tiny_rn):
    """`resize`: at the pool's own grid nothing changes; another grid uses the spatial positions interpolated to it
    (the global position kept), and without `resize` another grid is refused."""
    import torch.nn.functional as F
    from common.clip.visual import attention_pool_tokens, resized_positions
    pool = tiny_rn.model.visual.attnpool
    c = pool.positional_embedding.shape[1]
    fmap = torch.randn(2, c, 2, 2)
    with torch.no_grad():
        assert torch.equal(attention_pool_tokens(pool, fmap, resize="bilinear"), attention_pool_tokens(pool, fmap))
        pos = resized_positions(pool.positional_embedding, 4, 4, "bilinear")
        grid = pool.positional_embedding[1:].reshape(1, 2, 2, c).permute(0, 3, 1, 2)
        want = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(16, c)
        assert torch.equal(pos[0], pool.positional_embedding[0]) and torch.allclose(pos[1:], want)
        assert attention_pool_tokens(pool, torch.randn(1, c, 4, 4), resize="bilinear").shape[1] == 17
    with pytest.raises(ValueError, match="does not match"):
        attention_pool_tokens(pool, torch.randn(1, c, 4, 4))
