"""The claim expression language: what it accepts, what it refuses, and its arithmetic."""
import pytest

from common.report.expr import EPS, Expression, ExpressionError, Vec
from common.report.records import Missing


def run(text, values):
    """Evaluate with selections replaced by ``values[selection text]`` (a float or a dict for per())."""
    e = Expression(text)

    def res(sel):
        v = values[sel.text]
        return Vec(sel.by, dict(v)) if isinstance(v, dict) else v
    return e.evaluate(res)


def test_selections_are_parsed_with_their_filters():
    e = Expression("mean(novel, method=cocoop, protocol=base2novel) > mean(novel, method=coop, shots=[8, 16]) - 1.0")
    a, b = e.selections
    assert (a.func, a.metric, a.filter_dict()) == ("mean", "novel", {"method": ("cocoop",), "protocol": ("base2novel",)})
    assert b.filter_dict() == {"method": ("coop",), "shots": (8, 16)}
    assert not a.pinned and Expression("mean(top1, method=a, dataset=x) > 1").selections[0].pinned
    sel = Expression("increasing(per(top1, method=lp, by=shots, exclude=[d1]))").selections[0]
    assert (sel.func, sel.by, sel.exclude) == ("per", "shots", ("d1",))
    assert Expression("mean(top1, method=z, shots=null) > 0").selections[0].filter_dict()["shots"] == (None,)


@pytest.mark.parametrize("text, match", [
    ("__import__('os').system('true')", "Attribute|unknown function"),
    ("mean(top1, method=a).real > 1", "Attribute"),
    ("[x for x in y]", "ListComp"),
    ("(lambda: 1)() > 0", "Lambda|unknown function"),
    ("mean(top1, method=a)[0] > 1", "Subscript"),
    ("open('f') > 1", "unknown function 'open'"),
    ("mean(top1, method=a, colour=red) > 1", "unknown filter 'colour'"),
    ("mean(top1, variant=a) > 1", "name the method"),
    ("mean(top1, method=a, method=b) > 1", "given twice"),
    ("mean(top1, **{'method': 'a'}) > 1", r"\*\* arguments"),
    ("per(method=a) > 1", "needs a metric name"),
    ("per(top1, method=a, by=seed) > 1", "by= takes"),
    ("mean(top1, method=a, by=shots) > 1", "by= takes"),
    ("mean(top1, method=a, shots=mean(top1, method=b)) > 1", "takes a name, a number"),
    ("mean(top1, method=a) ** 2 > 1", "Pow"),
    ("mean(top1, method=a) > ", "syntax error"),
    ("mean(top1, method=a)", "must be true/false"),
    ("per(top1, method=a) > 1", "wrap it in all"),
    ("per(top1, method=a) > 1 and true", "and/or/not need true/false"),
    ("count(per(top1, method=a)) > 1", "needs a comparison between vectors"),
    ("mean(top1, method=a) > emb_dtd", "cannot order a number and the name 'emb_dtd'"),
    ("mean(top1, method=a) + emb_dtd > 1", "expected a number, got the name 'emb_dtd'"),
    ("argmax(per(top1, method=a)) > 2", "cannot order"),
    ("per(top1, method=a, by=shots) > per(top1, method=b)", "vector over shots with one over dataset"),
    ("hm(1) > 0", "takes 2 argument"),
    ("mean(top1, method=a, backbone=ViT-B/16) > 0", "quote names containing - or /, e.g. backbone='ViT-B/16'"),
])
def test_malformed_expressions_are_refused_with_a_clear_error(text, match):
    with pytest.raises(ExpressionError, match=match):
        Expression(text, where="claims[0] (x).check")


def test_error_names_the_place():
    with pytest.raises(ExpressionError, match=r"claims\[3\] \(foo\)\.check: unknown function 'eval' .* at column 1 in `eval"):
        Expression("eval('1') > 0", where="claims[3] (foo).check")


def test_arithmetic_and_comparison_trace():
    ok, trace = run("mean(top1, method=a) - mean(top1, method=b) >= 2 * 1.5",
                    {"mean(top1, method=a)": 70.0, "mean(top1, method=b)": 66.5})
    assert ok is True
    (step,) = trace.steps
    assert (step.left_value, step.op, step.right_value) == (3.5, ">=", 3.0)


@pytest.mark.parametrize("a, op, expected", [
    (69.0, ">=", True),       # exactly at the tolerance boundary: 69 >= 70 - 1
    (69.0, ">", False),
    (69.0 - 1e-6, ">=", False),
    (69.0 + 1e-6, ">", True),
])
def test_tolerance_boundaries(a, op, expected):
    ok, _ = run(f"mean(top1, method=a) {op} mean(top1, method=b) - 1.0",
                {"mean(top1, method=a)": a, "mean(top1, method=b)": 70.0})
    assert ok is expected


def test_float_rounding_does_not_decide_a_boundary():
    # 0.1 + 0.2 != 0.3 in binary floating point; the comparison slack absorbs it
    ok, _ = run("mean(top1, method=a) + 0.2 <= 0.3", {"mean(top1, method=a)": 0.1})
    assert ok is True and 0.1 + 0.2 > 0.3 and EPS < 1e-6


def test_vectors_align_on_common_keys_and_reduce():
    vals = {"per(top1, method=a)": {"x": 60.0, "y": 50.0, "z": 40.0},
            "per(top1, method=b)": {"x": 55.0, "y": 52.0, "w": 1.0}}
    assert run("count(per(top1, method=a) > per(top1, method=b)) == 1", vals)[0]
    assert run("frac(per(top1, method=a) > per(top1, method=b)) == 0.5", vals)[0]
    assert not run("all(per(top1, method=a) > per(top1, method=b))", vals)[0]
    assert run("any(per(top1, method=a) > per(top1, method=b))", vals)[0]
    assert run("n(per(top1, method=a) - per(top1, method=b)) == 2", vals)[0]
    assert run("mean(per(top1, method=a) - per(top1, method=b)) == 1.5", vals)[0]   # (5 - 2) / 2
    assert run("argmax(per(top1, method=a) - per(top1, method=b)) == x", vals)[0]
    assert run("argmin(per(top1, method=a)) == Z", vals)[0]            # names compare case-insensitively
    assert run("max(per(top1, method=a)) == 60 and min(per(top1, method=a)) == 40", vals)[0]
    assert run("all(abs(per(top1, method=a) - 50) <= 10)", vals)[0]


def test_disjoint_vectors_are_missing_not_false():
    with pytest.raises(Missing, match="share no dataset"):
        run("all(per(top1, method=a) > per(top1, method=b))",
            {"per(top1, method=a)": {"x": 1.0}, "per(top1, method=b)": {"y": 2.0}})


def test_monotonicity_in_shot_order():
    curve = {"per(top1, method=a, by=shots)": {16: 60.0, 1: 30.0, 4: 45.0, 2: 45.0}}
    assert not run("increasing(per(top1, method=a, by=shots))", curve)[0]       # 2 -> 4 is flat
    assert run("nondecreasing(per(top1, method=a, by=shots))", curve)[0]
    curve["per(top1, method=a, by=shots)"][4] = 44.0
    assert not run("nondecreasing(per(top1, method=a, by=shots))", curve)[0]


def test_chained_comparison_and_boolean_ops():
    vals = {"mean(hm, method=a)": 77.0, "mean(hm, method=b)": 76.2, "mean(hm, method=c)": 75.8}
    ok, trace = run("mean(hm, method=a) > mean(hm, method=b) > mean(hm, method=c)", vals)
    assert ok and len(trace.steps) == 2
    assert not run("mean(hm, method=a) > 80 or not mean(hm, method=b) > 76", vals)[0]
    assert run("hm(mean(hm, method=a), mean(hm, method=c)) < mean(hm, method=a)", vals)[0]


def test_margins_say_how_far_a_check_is_from_flipping():
    vals = {"per(top1, method=a)": {"x": 60.0, "y": 50.0, "z": 40.0},
            "per(top1, method=b)": {"x": 55.0, "y": 52.0, "z": 30.0}}
    e = Expression("count(per(top1, method=a) > per(top1, method=b)) >= 2")
    ok, trace = e.evaluate(lambda s: Vec(s.by, vals[s.text]))
    assert ok and trace.margin == 5.0                 # element margins 5, -2, 10: the 2nd largest decides
    e = Expression("count(per(top1, method=a) > per(top1, method=b)) >= 3")
    ok, trace = e.evaluate(lambda s: Vec(s.by, vals[s.text]))
    assert not ok and trace.margin == -2.0
    ok, trace = Expression("argmax(per(top1, method=a)) == x").evaluate(lambda s: Vec(s.by, vals[s.text]))
    assert ok and trace.margin == 10.0                # x leads y by 10
    ok, _ = Expression("argmax(per(top1, method=a)) == argmax(per(top1, method=b))").evaluate(
        lambda s: Vec(s.by, vals[s.text]))
    assert ok                                         # both pick x (an argmax compared with an argmax)
    ok, trace = Expression("mean(top1, method=a) > 1 and mean(top1, method=b) < 5").evaluate(
        lambda s: {"mean(top1, method=a)": 3.0, "mean(top1, method=b)": 4.5}[s.text])
    assert ok and trace.margin == 0.5                 # and: the smaller margin


def test_batched_evaluation_over_replicates():
    import numpy as np
    e = Expression("mean(top1, method=a) > mean(top1, method=b)")
    t = e.evaluate_batch(lambda s: np.array([1.0, 2.0, 3.0]) if s.text.endswith("a)") else np.array([2.0, 2.0, 2.0]))
    assert t.value.tolist() == [False, False, True] and t.margin.tolist() == [-1.0, 0.0, 1.0]
