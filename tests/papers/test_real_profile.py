"""The real profile end to end on fixture trees in the real layouts, with a saved tiny checkpoint as `pretrained`."""
import papers.linear_probe.__main__ as lp
import papers.zeroshot_clip.__main__ as zs
from common.clip import save_clip_checkpoint
from common.engine import load_records
from tests.fixtures import real_layouts as rl


def _real_sets(tmp_path, bundle):
    root = tmp_path / "DATA"
    for make in (rl.make_dtd, rl.make_eurosat, rl.make_imagenet, rl.make_imagenetv2, rl.make_imagenet_sketch,
                 rl.make_imagenet_a, rl.make_imagenet_r):
        make(root)
    ckpt = save_clip_checkpoint(bundle.model, tmp_path / "rn.pt")
    sets = {"arch": "tiny-rn", "pretrained": str(ckpt), "data_root": str(root), "datasets": "[dtd, eurosat]",
            "seeds": "[1]", "shots": "[1]", "dg_source": "imagenet"}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def test_zeroshot_eval_real_profile_on_fixture_trees(tmp_path, tiny_rn):
    zs.main(["eval", "--profile", "real", *_real_sets(tmp_path, tiny_rn)])
    recs = load_records(profile="real", protocol="zeroshot")
    names = {r["dataset"] for r in recs}
    assert names == {"dtd", "eurosat", "imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
    assert all(r["backbone"] == "tiny-rn" and 0 <= r["metrics"]["top1"] <= 100 for r in recs)
    assert {r["variant"] for r in recs} == {"single", "ensemble"}


def test_linear_probe_train_real_profile_on_fixture_trees(tmp_path, tiny_rn):
    lp.main(["train", "--profile", "real", *_real_sets(tmp_path, tiny_rn)])
    recs = load_records(profile="real", protocol="fewshot", method="linear_probe")
    assert sorted(r["dataset"] for r in recs) == ["dtd", "eurosat"]
