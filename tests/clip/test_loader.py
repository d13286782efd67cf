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


# ------------------------------------------------------------------ OpenAI weights need QuickGELU; ready modules
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import open_clip  # noqa: E402
from open_clip.transformer import QuickGELU  # noqa: E402

from common.errors import ConfigError  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "common" / "clip" / "model_configs"


@pytest.fixture(scope="module")
def gelu_archs(tmp_path_factory):
    """The tiny configs without `quick_gelu`: stand-ins for open_clip's plain (GELU) ViT-B-16 and RN50 configs."""
    folder = tmp_path_factory.mktemp("configs")
    for name in ("tiny-vit", "tiny-rn"):
        cfg = json.loads((CONFIGS / f"{name}.json").read_text())
        cfg.pop("quick_gelu")
        (folder / f"gelu-{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return ["gelu-tiny-vit", "gelu-tiny-rn"]


def _openai_files(arch: str, folder: Path):
    """A QuickGELU model with fp16-exact weights saved three ways: OpenAI's TorchScript archive, OpenAI's state
    dict (its extra keys, fp16 weights) and open_clip's plain state dict (what the `openai` tag reads)."""
    torch.manual_seed(0)
    model = open_clip.create_model(arch, force_quick_gelu=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    scripted = torch.jit.trace_module(model, {"encode_image": torch.ones(1, 3, size, size),
                                              "encode_text": torch.zeros(1, model.context_length, dtype=torch.long)},
                                      check_trace=False)
    jit_path = folder / f"{arch}-jit.pt"
    torch.jit.save(scripted, str(jit_path))
    sd = {k: (v.half() if v.is_floating_point() and v.dim() > 1 else v) for k, v in model.state_dict().items()}
    sd.update(input_resolution=torch.tensor(size), context_length=torch.tensor(model.context_length),
              vocab_size=torch.tensor(model.vocab_size))
    torch.save(sd, folder / f"{arch}-openai-sd.pt")
    plain = save_clip_checkpoint(model, folder / f"{arch}-open_clip.pt")
    return model, jit_path, folder / f"{arch}-openai-sd.pt", plain


def _features(bundle, size):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, size, size, generator=g)
    ids = bundle.tokenizer(["a photo of a red square.", "a blue circle"])
    with torch.no_grad():
        return bundle.model.encode_image(images), bundle.model.encode_text(ids)


@pytest.mark.parametrize("which", [0, 1])
def test_openai_format_files_build_quickgelu_like_the_tag(tmp_path, monkeypatch, gelu_archs, which):
    arch = gelu_archs[which]
    ref, jit_path, sd_path, plain = _openai_files(arch, tmp_path)
    # the `openai` tag of this arch, as open_clip registers it (quick_gelu=True), reading open_clip's plain copy
    registry = dict(open_clip.pretrained._PRETRAINED)
    registry[arch] = {"openai": open_clip.pretrained._pcfg(file=str(plain), quick_gelu=True)}
    monkeypatch.setattr(open_clip.pretrained, "_PRETRAINED", registry)
    by_tag = load_clip(arch, "openai")
    size = by_tag.image_size
    want_img, want_txt = _features(by_tag, size)
    with torch.no_grad():
        ref_ids = by_tag.tokenizer(["a photo of a red square.", "a blue circle"])
        assert torch.allclose(want_txt, ref.encode_text(ref_ids), atol=1e-5)  # the tag builds QuickGELU too
    for path in (jit_path, sd_path):
        b = load_clip(arch, path)
        assert any(isinstance(m, QuickGELU) for m in b.model.modules()), path.name
        img, txt = _features(b, size)
        assert torch.allclose(img, want_img, atol=1e-5) and torch.allclose(txt, want_txt, atol=1e-5), path.name
        assert b.checkpoint_id.endswith("+quickgelu")  # never shares a cache with a GELU build of the same file
    # what the loader built before: the arch's GELU with OpenAI weights gives other text features
    gelu = load_clip(arch, sd_path, quick_gelu=False)
    assert not any(isinstance(m, QuickGELU) for m in gelu.model.modules())
    assert not torch.allclose(_features(gelu, size)[1], want_txt, atol=1e-3)
    # open_clip's own format keeps the arch's activation (a GELU model saved by open_clip stays GELU)
    assert not any(isinstance(m, QuickGELU) for m in load_clip(arch, plain).model.modules())


def test_embedded_checkpoints_keep_their_id_and_activation(tmp_path, tiny_rn):
    path = save_clip_checkpoint(tiny_rn.model, tmp_path / "rn.pt")
    b = load_clip("tiny-rn", path)
    from common.clip.loader import file_sha256
    assert b.checkpoint_id == file_sha256(path)  # caches of the embedded profile stay valid
    assert any(isinstance(m, QuickGELU) for m in b.model.modules())


def test_a_ready_model_gives_the_same_bundle(tmp_path, tiny_clip):
    model = open_clip.create_model(tiny_clip.arch)
    model.load_state_dict(tiny_clip.model.state_dict())
    b = load_clip(model, "my-finetune")
    assert b.model is model and not any(p.requires_grad for p in model.parameters()) and not model.training
    assert b.image_size == tiny_clip.image_size and b.embed_dim == tiny_clip.embed_dim and b.pretrained == "my-finetune"
    text = ["a photo of a red square."]
    assert torch.equal(b.tokenizer(text), tiny_clip.tokenizer(text))
    from PIL import Image
    im = Image.new("RGB", (70, 50), (200, 30, 30))
    assert torch.equal(b.preprocess_val(im), tiny_clip.preprocess_val(im))
    x = torch.randn(1, 3, b.image_size, b.image_size)
    with torch.no_grad():
        assert torch.equal(b.model.encode_image(x), tiny_clip.model.encode_image(x))
    # the id follows the weights: same weights, same id; changed weights, new id
    assert load_clip(model).checkpoint_id == b.checkpoint_id
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    assert load_clip(model).checkpoint_id != b.checkpoint_id
    with pytest.raises(ConfigError, match="lacks .*token_embedding"):
        load_clip(torch.nn.Linear(2, 2))
