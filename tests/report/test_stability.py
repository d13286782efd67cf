"""`python -m common.report --compare`: each claim's verdict on two sets of run records, side by side."""
import copy

import yaml

from common.report.__main__ import main as report_main
from common.report.stability import compare_runs, format_comparison
from common.report.verdict import NOT_REPRODUCED, REPRODUCED
from tests.report.builders import rec
from tests.report.test_verdict import BASE

CHECK = "mean(top1, method=m, shots=16) > mean(top1, method=n, shots=16)"


def _paper(root):
    claims = [{"id": "m_beats_n", "text": "t", "protocol": "fewshot", "check": CHECK, "source": "paper", "ref": "Table 1",
               "scale_free": "a test of the engine"},
              {"id": "m_above_one", "text": "t", "protocol": "fewshot", "check": "mean(top1, method=m, shots=16) > 1",
               "source": "project", "scale_free": "a test of the engine"}]
    (root / "demo").mkdir(parents=True)
    (root / "demo" / "paper.yaml").write_text(yaml.safe_dump({**copy.deepcopy(BASE), "claims": claims}))
    return root


def _runs(root, m_gain):
    """m and n on two datasets, three seeds; m is `m_gain` points above n everywhere."""
    for s in (1, 2, 3):
        for d, base in (("a", 30.0), ("b", 60.0)):
            rec(root, "n", d, {"top1": base + s}, shots=16, seed=s)
            rec(root, "m", d, {"top1": base + s + m_gain}, shots=16, seed=s)
    return root


def test_a_claim_that_flips_with_the_records_is_marked(tmp_path, capsys):
    papers = _paper(tmp_path / "papers")
    a, b = _runs(tmp_path / "runs_a", 5.0), _runs(tmp_path / "runs_b", -5.0)
    pairs = compare_runs(["demo"], a, b, papers)
    assert [(p.claim, p.a, p.b, p.same) for p in pairs] == [("m_beats_n", REPRODUCED, NOT_REPRODUCED, False),
                                                             ("m_above_one", REPRODUCED, REPRODUCED, True)]
    text = format_comparison(pairs, "A", "B")
    assert "| demo | m_beats_n | paper | reproduced | not reproduced | changed |" in text
    assert "- paper claims: 0 of 1 keep their verdict" in text and "- project claims: 1 of 1" in text
    assert "- all: 1 of 2 keep their verdict; 1 flip between reproduced and not reproduced" in text
    assert report_main(["demo", "--papers", str(papers), "--runs", str(a), "--compare", str(b)]) == 0
    assert "| demo | m_beats_n |" in capsys.readouterr().out
