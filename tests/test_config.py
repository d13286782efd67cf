import pytest

from common.config import load_config, parse_override


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("source: test\ndefaults:\n  n_ctx: 16\n  train: {lr: 0.002, epochs: 50}\n"
                 "profiles:\n  embedded:\n    train: {epochs: 5}\n  real:\n    arch: ViT-B-16\n")
    return p


def test_layering_and_overrides(cfg_file):
    emb = load_config(cfg_file, "embedded", ["train.lr=0.01", "datasets=[toy]"])
    assert emb["train"] == {"lr": 0.01, "epochs": 5} and emb["datasets"] == ["toy"]
    assert emb["arch"] == "tiny-rn" and emb["profile"] == "embedded"
    real = load_config(cfg_file, "real")
    assert real["arch"] == "ViT-B-16" and real["train"]["epochs"] == 50 and real["seeds"] == [1, 2, 3]


def test_bad_keys_and_values(cfg_file, tmp_path):
    with pytest.raises(KeyError, match="unknown config key 'train.lrr'"):
        load_config(cfg_file, "embedded", ["train.lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        parse_override("novalue")
    with pytest.raises(ValueError, match="unknown profile"):
        load_config(cfg_file, "gpu")
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: {}\n")
    with pytest.raises(ValueError, match="unknown top-level keys"):
        load_config(bad)
