import pytest
import torch
import torch.nn.functional as F

import papers.linear_probe.__main__ as lp
from common.engine import load_records
from papers.linear_probe.method import fit_logistic_regression, search_C, train_probe
from tests.papers.helpers import toy_overrides


def _blobs(n_per, K=5, D=16, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(K, D, generator=torch.Generator().manual_seed(99))
    y = torch.arange(K).repeat_interleave(n_per)
    return mu[y] + noise * torch.randn(len(y), D, generator=g), y


def test_matches_sklearn_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(12, noise=1.5)
    C = 0.5
    ours = fit_logistic_regression(x, y, 5, C)
    ref = sklearn.LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(F.normalize(x, dim=-1).numpy(), y.numpy())
    p_ours = ours.logits(x).softmax(-1)
    p_ref = torch.tensor(ref.predict_proba(F.normalize(x, dim=-1).numpy()), dtype=torch.float32)
    assert torch.allclose(p_ours, p_ref, atol=2e-3)


def test_c_search_uses_val_and_prefers_regularisation_on_ties():
    x, y = _blobs(16, noise=0.3)
    xv, yv = _blobs(4, seed=1, noise=0.3)
    C = search_C(x, y, xv, yv, 5)
    assert C <= 1e-6 + 1e-12  # every C separates these blobs: the tie goes to the strongest regulariser
    with pytest.raises(ValueError, match="validation split"):
        train_probe(x, y, xv[:0], yv[:0], 5)


def test_probe_learns_what_zero_shot_cannot():
    x, y = _blobs(16, noise=1.0)
    xt, yt = _blobs(40, seed=2, noise=1.0)
    xv, yv = _blobs(4, seed=3, noise=1.0)
    probe = train_probe(x, y, xv, yv, 5)
    assert (probe.logits(xt).argmax(-1) == yt).float().mean() > 0.8


def test_reproduce_smoke(tmp_path, tiny_rn):
    lp.main(["reproduce", *toy_overrides(tmp_path, tiny_rn)])
    few = load_records(protocol="fewshot", method="linear_probe")
    assert sorted((r["shots"], r["seed"]) for r in few) == [(1, 1), (2, 1)]
    dg = load_records(protocol="domain_generalization")
    assert {r["dataset"] for r in dg} == {"toy", "toy_shift"} and all(r["source"] == "toy" for r in dg)
    # rerun skips existing records (resume at run granularity)
    assert lp.train(__import__("common.config", fromlist=["x"]).load_config(
        lp.CONFIG, "embedded", toy_overrides(tmp_path, tiny_rn)[1::2])) == []
