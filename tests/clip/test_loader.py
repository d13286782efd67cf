import logging
import time

import pytest
import torch

from common.clip import WeightsNotFoundError, load_clip, save_clip_checkpoint


def test_unknown_arch_and_missing_pretrained_are_clear():
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        load_clip("NoSuchNet", "random")
    with pytest.raises(ValueError, match="pretrained. is required"):
        load_clip("tiny-rn", None)
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        load_clip("RN50", "not-a-tag")


def test_missing_tag_weights_fail_fast_with_guidance(tmp_path):
    t0 = time.time()
    with pytest.raises(WeightsNotFoundError) as err:
        load_clip("ViT-B-16", "openai", cache_dir=str(tmp_path))
    assert time.time() - t0 < 5, "must not retry downloads"
    msg = str(err.value)
    assert "ViT-B-16" in msg and "openai" in msg and str(tmp_path) in msg and "embedded" in msg


def test_missing_checkpoint_file_names_it(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="tiny-rn.pt does not exist"):
        load_clip("tiny-rn", tmp_path / "tiny-rn.pt")


def test_checkpoint_round_trip_and_content_hash(tmp_path, tiny_clip):
    path = save_clip_checkpoint(tiny_clip.model, tmp_path / "m.pt")
    b = load_clip(tiny_clip.arch, path)
    x = torch.randn(2, 3, tiny_clip.image_size, tiny_clip.image_size)
    ids = tiny_clip.tokenizer(["a photo of a cat."])
    assert torch.equal(b.model.encode_image(x), tiny_clip.model.encode_image(x))
    assert torch.equal(b.model.encode_text(ids), tiny_clip.model.encode_text(ids))
    assert not any(p.requires_grad for p in b.model.parameters()), "loaded CLIP must be frozen"
    # a changed checkpoint gets a new id (which keys every cache)
    with torch.no_grad():
        b.model.logit_scale.add_(1.0)
    path2 = save_clip_checkpoint(b.model, tmp_path / "m2.pt")
    assert load_clip(tiny_clip.arch, path2).checkpoint_id != b.checkpoint_id


def test_loading_a_checkpoint_does_not_say_random_init(tmp_path, tiny_rn, caplog):
    path = save_clip_checkpoint(tiny_rn.model, tmp_path / "m.pt")
    with caplog.at_level(logging.WARNING):
        load_clip("tiny-rn", path)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    with caplog.at_level(logging.WARNING):  # asked for: open_clip's notice stays
        load_clip("tiny-rn", "random")
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_openai_style_wrapped_state_dict(tmp_path, tiny_rn):
    sd = {"state_dict": {"module." + k: v for k, v in tiny_rn.model.state_dict().items()}}
    torch.save(sd, tmp_path / "wrapped.pt")
    b = load_clip("tiny-rn", tmp_path / "wrapped.pt")
    assert torch.equal(b.model.visual.conv1.weight, tiny_rn.model.visual.conv1.weight)


def test_wrong_arch_and_corrupt_checkpoint(tmp_path, tiny_rn):
    path = save_clip_checkpoint(tiny_rn.model, tmp_path / "rn.pt")
    with pytest.raises(ValueError, match="does not match arch"):
        load_clip("tiny-vit", path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read CLIP checkpoint"):
        load_clip("tiny-rn", bad)


def test_reduced_precision_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        load_clip("tiny-rn", "random", precision="fp16")
