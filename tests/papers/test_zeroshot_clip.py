import pytest
import torch

import papers.zeroshot_clip.__main__ as zs
from common.clip import load_clip
from common.data import build_dataset
from common.engine import load_records
from papers.zeroshot_clip.method import templates_for, zeroshot_weights
from tests.papers.helpers import toy_overrides


def test_eval_record_equals_hand_computed_zero_shot(tmp_path, tiny_rn):
    args = toy_overrides(tmp_path, tiny_rn)
    zs.main(["eval", *args])
    recs = {(r["dataset"], r["variant"]): r for r in load_records(protocol="zeroshot")}
    assert set(recs) == {(d, v) for d in ("toy", "toy_shift") for v in ("single", "ensemble")}
    bundle = load_clip("tiny-rn", tmp_path / "tiny-rn.pt")
    ds = build_dataset("toy", tmp_path / "data")
    images = torch.stack([bundle.preprocess_val(__import__("PIL.Image").Image.open(d.impath).convert("RGB"))
                          for d in ds.test])
    f = torch.nn.functional.normalize(bundle.model.encode_image(images), dim=-1)
    t = torch.nn.functional.normalize(bundle.model.encode_text(bundle.tokenizer(
        [ds.template.format(c) for c in ds.classnames])), dim=-1)
    expected = (f @ t.T).argmax(-1).eq(torch.tensor([d.label for d in ds.test])).float().mean().item() * 100
    assert recs[("toy", "single")]["metrics"]["top1"] == pytest.approx(expected, abs=1e-3)


def test_templates(tmp_path, tiny_rn):
    toy_overrides(tmp_path, tiny_rn)
    ds = build_dataset("toy", tmp_path / "data")
    assert templates_for(ds, "single") == ["a photo of a {}."]
    assert len(templates_for(ds, "ensemble")) == 3
    assert zeroshot_weights(tiny_rn, ds, "ensemble").shape == (4, tiny_rn.embed_dim)
    with pytest.raises(ValueError, match="variant"):
        templates_for(ds, "best")


def test_reproduce_writes_all_protocols(tmp_path, tiny_rn):
    zs.main(["reproduce", *toy_overrides(tmp_path, tiny_rn)])
    protos = {r["protocol"] for r in load_records()}
    assert protos == {"zeroshot", "base2novel", "domain_generalization"}
    b2n = load_records(protocol="base2novel")[0]["metrics"]
    assert set(b2n) == {"base", "novel", "hm"}


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        zs.main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "--profile" in out and "pretrained" in out and "data_root" in out
