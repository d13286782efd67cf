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


# ------------------------------------------------------------------------ overrides typed against the shipped config
from common.errors import ConfigError  # noqa: E402


def test_numbers_as_typed_lists_from_one_value_and_type_errors(cfg_file):
    cfg = load_config(cfg_file, "embedded", ["train.lr=1e-3", "n_ctx=8.0", "seeds=2", "datasets=emb_satellite",
                                             "arch=1e5"])
    assert cfg["train"]["lr"] == 0.001 and isinstance(cfg["train"]["lr"], float)  # YAML 1.1 reads '1e-3' as text
    assert cfg["n_ctx"] == 8 and isinstance(cfg["n_ctx"], int)
    assert cfg["seeds"] == [2] and cfg["datasets"] == ["emb_satellite"]  # not the dataset 'e'
    assert cfg["arch"] == "1e5"  # a string option keeps what was typed
    for item, message in (("train.lr=fast", "train.lr: expected a number"), ("n_ctx=2.5", "n_ctx: expected an integer"),
                          ("seeds=[1, x]", r"seeds\[1\]: expected an integer"), ("seeds=null", "null is not allowed"),
                          ("train=3", "train: expected a mapping")):
        with pytest.raises(ConfigError, match=message):
            load_config(cfg_file, "embedded", [item])


def test_unused_options_are_refused_and_accepts_widens_a_type(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("unused: {shots: this paper trains on dg_shots}\naccepts: {alpha: [0.1, 0.5]}\n"
                 "defaults: {alpha: 0.5, dg_shots: null}\n")
    with pytest.raises(ConfigError, match="does not use 'shots': this paper trains on dg_shots"):
        load_config(p, "embedded", ["shots=4"])
    assert load_config(p, "embedded", ["alpha=[0.1, 1]"])["alpha"] == [0.1, 1.0]
    assert load_config(p, "embedded", ["alpha=0.3"])["alpha"] == 0.3
    assert load_config(p, "embedded", ["dg_shots=4"])["dg_shots"] == 4  # null in both profiles: any value
