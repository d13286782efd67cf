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
