"""The pretraining recipe sweep: a variant's overrides reach the run, and its record holds the probe rows."""
from __future__ import annotations

import json

import pytest

from common.data.synthetic import suite, sweep


def test_variant_overrides_reach_the_run_and_the_record(tmp_path):
    root = tmp_path / "embedded"
    suite.write_suite(root, seed=3, only=["emb_counting"], scale=0.05, progress=False)
    out = tmp_path / "sweep.jsonl"
    recs = sweep.run_variant("b256_s1200_nocount", str(out), str(root), ["emb_counting"], device="cpu", scale=0.002,
                             workdir=str(tmp_path))
    (rec,) = recs
    assert rec["cfg"]["batch"] == 256 and rec["cfg"]["curriculum"] == 0.5 and rec["cfg"]["steps"] == 2
    assert tuple(rec["counts"]) == sweep.OLD_COUNTS  # the variant's stream, not the pipeline's
    zs, lp = rec["rows"]["emb_counting"]
    assert 0 <= zs <= 100 and 0 <= lp <= 100
    assert [json.loads(line)["variant"] for line in out.read_text().splitlines()] == ["b256_s1200_nocount"]
    with pytest.raises(ValueError, match="unknown variant"):
        sweep.run_variant("nope", str(out), str(root))


def test_sweep_table_lists_every_record(tmp_path):
    from common.data.synthetic.readme import sweep_table

    rows = {"emb_objects": [40.0, 30.0], "emb_counting": [30.0, 45.0]}
    recs = [{"variant": v, "arch": "tiny-rn", "cfg": {"steps": 10, "batch": 8, "seed": 0, "curriculum": 0.3},
             "counts": [0.55, 0.15, 0.15, 0.15], "evals": [{"object": q}], "rows": rows} for v, q in (("a", 0.2), ("b", 0.5))]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    table = sweep_table([path]).splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| b", "| a"]  # best quick check first
    assert "| 45% | 50% | 40.0 / 30.0 |" in table[2] and table[2].endswith("| 30.0 / 45.0 |  |")
