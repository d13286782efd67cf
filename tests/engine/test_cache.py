import torch

from common.clip import load_clip, save_clip_checkpoint
from common.data import build_dataset
from common.engine import FeatureCache, cached_features
from tests.fixtures.toy import write_toy


def test_cache_hit_miss_and_invalidation_on_new_checkpoint(tmp_path, tiny_rn):
    write_toy(tmp_path / "data")
    ds = build_dataset("toy", tmp_path / "data")
    ckpt = save_clip_checkpoint(tiny_rn.model, tmp_path / "a.pt")
    bundle = load_clip("tiny-rn", ckpt)
    cache = FeatureCache(tmp_path / "cache")
    f1 = cached_features(bundle, "toy", "test", ds.test, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1)
    f2 = cached_features(bundle, "toy", "test", ds.test, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(f1["features"], f2["features"])
    # the cached features are those of the encoder
    x = torch.stack([bundle.preprocess_val(__import__("PIL.Image").Image.open(d.impath).convert("RGB"))
                     for d in ds.test[:2]])
    assert torch.allclose(f1["features"][:2], bundle.model.encode_image(x), atol=1e-4)
    assert f1["labels"].tolist() == [d.label for d in ds.test]
    # another split / item list / view is another entry
    cached_features(bundle, "toy", "train", ds.train, cache=cache)
    cached_features(bundle, "toy", "train", ds.train, transform="train", view=1, cache=cache)
    assert cache.misses == 3
    # the same path overwritten with other weights: new content hash, so a miss, never stale features
    with torch.no_grad():
        bundle.model.visual.conv1.weight.mul_(2)
    save_clip_checkpoint(bundle.model, ckpt)
    bundle2 = load_clip("tiny-rn", ckpt)
    f3 = cached_features(bundle2, "toy", "test", ds.test, cache=cache)
    assert cache.misses == 4 and not torch.equal(f3["features"], f1["features"])


def test_augmented_views_are_reproducible(tmp_path, tiny_rn):
    write_toy(tmp_path / "data")
    ds = build_dataset("toy", tmp_path / "data")
    a = cached_features(tiny_rn, "toy", "train", ds.train, transform="train", view=2, cache=FeatureCache(tmp_path / "c1"))
    b = cached_features(tiny_rn, "toy", "train", ds.train, transform="train", view=2, cache=FeatureCache(tmp_path / "c2"))
    c = cached_features(tiny_rn, "toy", "train", ds.train, transform="train", view=3, cache=FeatureCache(tmp_path / "c2"))
    assert torch.equal(a["features"], b["features"]) and not torch.equal(a["features"], c["features"])
