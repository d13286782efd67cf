"""A small, safe expression language for claims, parsed with :mod:`ast` and evaluated node by node.

Only whitelisted syntax is accepted (no attribute access, subscripts, lambdas, comprehensions, ...),
and nothing is ever passed to ``eval``. Grammar, by example::

    mean(novel, method=cocoop) > mean(novel, method=coop) + 5       # averages over datasets
    mean(top1, method=coop, shots=16) >= mean(top1, method=zeroshot_clip, protocol=zeroshot) - 1.0
    count(per(hm, method=cocoop) > per(hm, method=coop)) >= 8        # "on at least 8 datasets"
    all(per(top1, method=a, shots=16) > per(top1, method=b, shots=16))
    increasing(per(top1, method=coop, by=shots))                     # average at each shot count
    argmax(per(top1, method=coop, shots=16) - per(top1, method=zeroshot_clip, protocol=zeroshot)) == emb_sat
    abs(mean(top1, method=a, role=source) - mean(top1, method=b, role=source)) <= 0.5

Selections (``mean``/``per`` with a metric name first) take ``key=value`` filters over run-record fields
(``value`` a bare name, a number, ``null``/``None`` or a list meaning "any of"), plus ``by=dataset|shots``
for ``per`` and ``exclude=[datasets]``. Bare names are strings. ``per`` gives a vector keyed by dataset
(or shot count); arithmetic and comparisons between vectors align on their common keys. Comparisons use
an absolute slack of 1e-9 so that tolerance boundaries are not decided by float rounding.

Evaluation is vectorised over *replicates*: a resolver may return, for every selection, an array of B
values (one per bootstrap resample or per seed) instead of one number, and the check is evaluated for all
of them at once. Every true/false result carries a signed **margin** (positive where the check holds, its
size in the check's own units): ``a > b`` has margin ``a - b``; ``and``/``all`` the smallest margin of their
parts, ``or``/``any`` the largest; ``count(v) >= n`` the n-th largest element margin (the comparison that
decides whether n elements hold); ``argmax(v) == k`` the gap between ``v[k]`` and the best other element;
``increasing(v)`` the smallest step. The verdict engine turns the margins of resampled runs into an interval.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .records import FILTER_KEYS, Missing, norm

EPS = 1e-9
SELECTORS = ("mean", "per")
SELECTION_KEYS = FILTER_KEYS + ("by", "exclude")
VEC_FUNCS = {"count", "all", "any", "frac", "n", "argmax", "argmin", "increasing", "nondecreasing"}
FUNCS = set(SELECTORS) | VEC_FUNCS | {"min", "max", "abs", "hm"}
_CMP = {ast.Gt: ">", ast.GtE: ">=", ast.Lt: "<", ast.LtE: "<=", ast.Eq: "==", ast.NotEq: "!="}
_BIN = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_FLIP = {">": "<", ">=": "<=", "<": ">", "<=": ">=", "==": "==", "!=": "!="}
# A numeric threshold beyond this many points on a point-valued comparison is an absolute magnitude.
MAGNITUDE_POINTS = 2.0


class ExpressionError(ValueError):
    """A malformed claim check (bad syntax, unknown function or filter, wrong types)."""


@dataclass(frozen=True)
class Selection:
    """One ``mean(...)``/``per(...)`` call over run records, as written in the check."""
    func: str                       # mean | per
    metric: str
    filters: tuple                  # ((key, (values...)), ...) in the written order
    by: str                         # dataset | shots
    exclude: tuple                  # datasets left out
    text: str                       # source text of the call

    @property
    def pinned(self) -> bool:
        """True when the call names its datasets (then it is not intersected with the others)."""
        return any(k == "dataset" for k, _ in self.filters)

    @property
    def pins_shots(self) -> bool:
        return any(k == "shots" for k, _ in self.filters)

    def filter_dict(self) -> dict[str, tuple]:
        return dict(self.filters)


@dataclass
class Vec:
    """Values keyed by dataset name or shot count, kept in key order."""
    by: str
    values: dict

    def __post_init__(self):
        self.values = dict(sorted(self.values.items(), key=lambda kv: _key_order(kv[0])))

    def is_bool(self) -> bool:
        return all(isinstance(v, (bool, Truth)) for v in self.values.values())


def _key_order(k):
    return (0, k, "") if isinstance(k, (int, float)) else (1, 0, str(k))


@dataclass
class Truth:
    """A true/false outcome per replicate with its signed margin (> 0 where it holds)."""
    value: np.ndarray               # bool, shape (B,) or (1,)
    margin: np.ndarray              # float, same shape


def _truth(value, margin) -> Truth:
    return Truth(np.atleast_1d(np.asarray(value, bool)), np.atleast_1d(np.asarray(margin, float)))


def _const_truth(b: bool) -> Truth:
    return _truth(b, math.inf if b else -math.inf)


@dataclass
class Count:
    """``count(v)`` (scale 1) or ``frac(v)`` (scale 1/n): the number per replicate, plus the element margins
    sorted from largest to smallest, so a comparison with a threshold knows which element decides it."""
    values: np.ndarray              # (B,)
    margins: np.ndarray             # (B, n) descending
    scale: float = 1.0

    @property
    def number(self) -> np.ndarray:
        return self.values * self.scale


@dataclass
class Pick:
    """``argmax(v)``/``argmin(v)``: the chosen key per replicate and the vector it was chosen from."""
    kind: str                       # argmax | argmin
    keys: list
    matrix: np.ndarray              # (B, n) values in key order

    def chosen(self) -> list:
        idx = (self.matrix.argmax(1) if self.kind == "argmax" else self.matrix.argmin(1))  # first on ties
        return [self.keys[i] for i in idx]


@dataclass
class Step:
    """One comparison or vector reduction met while evaluating (shown in reports as the deciding arithmetic).
    Values are numbers, or {key: number} for vector steps; ``result`` is a bool or {key: bool}."""
    left: str
    left_value: Any
    op: str
    right: str
    right_value: Any
    result: Any
    kind: str = "compare"           # compare | reduce


@dataclass
class Trace:
    steps: list[Step] = field(default_factory=list)
    margin: float = math.nan


class Expression:
    """A parsed, validated claim check. ``evaluate(resolver)`` computes its truth value, where
    ``resolver(selection)`` returns a float (``mean``) or a :class:`Vec` (``per``); ``evaluate_batch`` does
    the same for B replicates at once (the resolver returns arrays of shape (B,))."""

    def __init__(self, text: str, where: str = "check"):
        self.text = text.strip()
        self.where = where
        try:
            self.tree = ast.parse(self.text, mode="eval")
        except SyntaxError as e:
            raise ExpressionError(f"{where}: syntax error at column {e.offset}: {e.msg} in `{self.text}`") from None
        self.selections: list[Selection] = []
        self._sel_of: dict[int, Selection] = {}
        self._validate(self.tree.body)
        self._typecheck()

    # -- validation -------------------------------------------------------------------------------
    def _err(self, node: ast.AST, msg: str) -> ExpressionError:
        col = getattr(node, "col_offset", None)
        at = f" at column {col + 1}" if col is not None else ""
        return ExpressionError(f"{self.where}: {msg}{at} in `{self.text}`")

    def _src(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or ast.unparse(node)

    def _validate(self, node: ast.AST) -> None:
        if isinstance(node, ast.Compare):
            for op in node.ops:
                if type(op) not in _CMP:
                    raise self._err(node, f"comparison '{type(op).__name__}' is not allowed")
            for sub in [node.left, *node.comparators]:
                self._validate(sub)
        elif isinstance(node, ast.BoolOp):
            for sub in node.values:
                self._validate(sub)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
                raise self._err(node, f"operator '{type(node.op).__name__}' is not allowed")
            self._validate(node.operand)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BIN:
                raise self._err(node, f"operator '{type(node.op).__name__}' is not allowed (use + - * /)")
            self._validate(node.left)
            self._validate(node.right)
        elif isinstance(node, ast.Call):
            self._validate_call(node)
        elif isinstance(node, ast.Name):
            pass  # a bare name is a string (dataset or metric name)
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, str, bool)) or node.value is Ellipsis:
                raise self._err(node, f"constant {node.value!r} is not allowed")
        else:
            raise self._err(node, f"'{type(node).__name__}' syntax is not allowed")

    def _validate_call(self, node: ast.Call) -> None:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCS:
            name = node.func.id if isinstance(node.func, ast.Name) else self._src(node.func)
            raise self._err(node, f"unknown function '{name}' (allowed: {', '.join(sorted(FUNCS))})")
        fn = node.func.id
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            raise self._err(node, f"{fn}(): * and ** arguments are not allowed")
        if fn in SELECTORS and _names_metric(node):
            self._validate_selection(node)
            return
        if node.keywords:
            raise self._err(node, f"{fn}() takes no key=value arguments here"
                            + (" (a selection needs a metric name first)" if fn in SELECTORS else ""))
        arity = {"hm": (2, 2), "min": (1, 99), "max": (1, 99)}.get(fn, (1, 1))
        if not arity[0] <= len(node.args) <= arity[1]:
            raise self._err(node, f"{fn}() takes {arity[0]}" + ("" if arity[0] == arity[1] else "+")
                            + f" argument(s), got {len(node.args)}")
        if fn == "per":
            raise self._err(node, "per() needs a metric name first, e.g. per(top1, method=coop)")
        for a in node.args:
            self._validate(a)

    def _validate_selection(self, node: ast.Call) -> None:
        fn = node.func.id
        if len(node.args) != 1:
            raise self._err(node, f"{fn}(metric, key=value, ...) takes exactly one positional argument")
        a0 = node.args[0]
        metric = a0.id if isinstance(a0, ast.Name) else a0.value
        filters, by, exclude, seen = [], "dataset", (), set()
        for kw in node.keywords:
            if kw.arg not in SELECTION_KEYS:
                raise self._err(kw.value, f"{fn}(): unknown filter '{kw.arg}' "
                                f"(allowed: {', '.join(SELECTION_KEYS)})")
            if kw.arg in seen:
                raise self._err(kw.value, f"{fn}(): filter '{kw.arg}' given twice")
            seen.add(kw.arg)
            vals = self._literal_values(kw.value, kw.arg)
            if kw.arg == "by":
                if fn != "per" or len(vals) != 1 or vals[0] not in ("dataset", "shots"):
                    raise self._err(kw.value, "by= takes 'dataset' or 'shots', and only in per()")
                by = vals[0]
            elif kw.arg == "exclude":
                exclude = tuple(str(v) for v in vals)
            else:
                filters.append((kw.arg, vals))
        if "method" not in seen:
            raise self._err(node, f"{fn}(): name the method, e.g. {fn}({metric}, method=coop)")
        if by == "shots" and "shots" in seen and len(dict(filters)["shots"]) == 1:
            raise self._err(node, "per(..., by=shots) cannot also pin a single shots= value")
        sel = Selection(fn, str(metric), tuple(filters), by, exclude, self._src(node))
        self.selections.append(sel)
        self._sel_of[id(node)] = sel

    def _literal_values(self, node: ast.AST, key: str) -> tuple:
        items = node.elts if isinstance(node, (ast.List, ast.Tuple)) else [node]
        out = []
        for it in items:
            if isinstance(it, ast.Name):
                out.append(None if it.id in ("null", "None") else it.id)
            elif isinstance(it, ast.Constant) and (it.value is None or isinstance(it.value, (int, float, str))):
                out.append(it.value)
            elif isinstance(it, ast.UnaryOp) and isinstance(it.op, ast.USub) and isinstance(it.operand, ast.Constant):
                out.append(-it.operand.value)
            elif isinstance(it, ast.BinOp):
                raise self._err(it, f"filter {key}= : quote names containing - or /, e.g. {key}='{self._src(it)}'")
            else:
                raise self._err(it, f"filter {key}= takes a name, a number, null or a list of those")
        if not out:
            raise self._err(node, f"filter {key}= is an empty list")
        return tuple(out)

    def _typecheck(self) -> None:
        """Dry run on placeholder numbers so type errors surface when paper.yaml is loaded."""
        def fake(sel: Selection):
            if sel.func == "mean":
                return 1.0
            return Vec(sel.by, {1: 1.0, 2: 2.0} if sel.by == "shots" else {"a": 1.0, "b": 2.0})
        try:
            out = self._eval(self.tree.body, _point(fake), None)
        except (ZeroDivisionError, FloatingPointError, Missing):
            return
        if not isinstance(out, Truth):
            raise ExpressionError(f"{self.where}: the check must be true/false, but `{self.text}` gives "
                                  + ("a per-dataset vector: wrap it in all(), any(), count() or frac()"
                                     if isinstance(out, Vec) else f"{_kind(out)}"))

    # -- units: which constants are absolute magnitudes -------------------------------------------
    def point_thresholds(self) -> list[float]:
        """Numeric constants (|c| > MAGNITUDE_POINTS) that act as a threshold or an offset in points on an
        accuracy-valued term (``a - b >= 14``, ``a > b + 5``): the paper's absolute sizes. Multipliers
        (``2 * mean(chance, ...)``), counts (``count(...) >= 7``) and ratios are not points."""
        flagged: list[float] = []

        def unit(node) -> str:
            if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
                return "const"
            if isinstance(node, ast.UnaryOp):
                return unit(node.operand)
            if isinstance(node, ast.Call):
                if id(node) in self._sel_of:
                    return "pts"
                fn = node.func.id
                inner = [unit(a) for a in node.args]
                if fn in ("mean", "min", "max", "abs", "hm"):
                    return "pts" if "pts" in inner else ("ratio" if "ratio" in inner else "const")
                return "other"                  # count, frac, n, all, any, argmax, increasing: not points
            if isinstance(node, ast.BinOp):
                a, b = unit(node.left), unit(node.right)
                if isinstance(node.op, (ast.Add, ast.Sub)):
                    for u, other in ((a, node.right), (b, node.left)):
                        if u == "pts":
                            _flag(other)
                    return "pts" if "pts" in (a, b) else a
                if isinstance(node.op, ast.Div) and a == b == "pts":
                    return "ratio"
                return "pts" if "pts" in (a, b) else ("ratio" if "ratio" in (a, b) else a)
            if isinstance(node, ast.Compare):
                units = [unit(n) for n in [node.left, *node.comparators]]
                operands = [node.left, *node.comparators]
                for i in range(len(operands) - 1):
                    for j, k in ((i, i + 1), (i + 1, i)):
                        if units[j] == "pts":
                            _flag(operands[k])
                return "bool"
            if isinstance(node, ast.BoolOp):
                for v in node.values:
                    unit(v)
                return "bool"
            return "other"

        def _flag(node) -> None:
            val = _constant_value(node)
            if val is not None and abs(val) > MAGNITUDE_POINTS:
                flagged.append(val)

        unit(self.tree.body)
        return flagged

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, resolver: Callable[[Selection], Any]) -> tuple[bool, Trace]:
        """Point evaluation: ``resolver`` returns floats / Vec of floats. Returns (truth, trace); the trace
        holds the deciding comparisons and the margin."""
        trace = Trace()
        out = self._eval(self.tree.body, _point(resolver), trace)
        truth = self._as_truth(self.tree.body, out)
        trace.margin = float(truth.margin[0])
        return bool(truth.value[0]), trace

    def evaluate_batch(self, resolver: Callable[[Selection], Any]) -> Truth:
        """Vectorised evaluation: ``resolver`` returns arrays of shape (B,) (or Vec of them)."""
        return self._as_truth(self.tree.body, self._eval(self.tree.body, resolver, None))

    def _as_truth(self, node, out) -> Truth:
        if isinstance(out, Truth):
            return out
        raise self._err(node, f"the check must be true/false, got {_kind(out)}")

    def _eval(self, node, res, trace):
        if isinstance(node, ast.Constant):
            return _const_truth(node.value) if isinstance(node.value, bool) else node.value
        if isinstance(node, ast.Name):
            lit = {"true": True, "false": False}.get(node.id)
            if lit is not None:
                return _const_truth(lit)
            return None if node.id == "null" else node.id
        if isinstance(node, ast.UnaryOp):
            v = self._eval(node.operand, res, trace)
            if isinstance(node.op, ast.Not):
                t = self._bool(node, v)
                return Truth(~t.value, -t.margin)
            sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
            return self._arith(node, sign, v, lambda a, b: a * b)
        if isinstance(node, ast.BoolOp):
            parts = [self._bool(n, self._eval(n, res, trace)) for n in node.values]  # no short-circuit
            stack_v = np.broadcast_arrays(*[p.value for p in parts])
            stack_m = np.broadcast_arrays(*[p.margin for p in parts])
            if isinstance(node.op, ast.And):
                return Truth(np.logical_and.reduce(stack_v), np.minimum.reduce(stack_m))
            return Truth(np.logical_or.reduce(stack_v), np.maximum.reduce(stack_m))
        if isinstance(node, ast.BinOp):
            a, b = self._eval(node.left, res, trace), self._eval(node.right, res, trace)
            op = {ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply, ast.Div: _divide}[type(node.op)]
            return self._arith(node, a, b, op)
        if isinstance(node, ast.Compare):
            return self._compare(node, res, trace)
        if isinstance(node, ast.Call):
            return self._call(node, res, trace)
        raise self._err(node, f"'{type(node).__name__}' syntax is not allowed")

    def _bool(self, node, v) -> Truth:
        if not isinstance(v, Truth):
            raise self._err(node, "and/or/not need true/false operands"
                            + (" (wrap a per-dataset vector in all()/any())" if isinstance(v, Vec) else ""))
        return v

    def _num(self, node, v):
        if isinstance(v, Count):
            return v.number
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._err(node, f"expected a number, got {_kind(v)}")
        return float(v)

    def _arith(self, node, a, b, op):
        if isinstance(a, Vec) or isinstance(b, Vec):
            return _vec_apply(self, node, a, b, lambda x, y: op(self._num(node, x), self._num(node, y)))
        return op(self._num(node, a), self._num(node, b))

    def _compare(self, node, res, trace):
        operands = [node.left, *node.comparators]
        values = [self._eval(n, res, trace) for n in operands]
        result: Any = None
        for i, op in enumerate(node.ops):
            sym = _CMP[type(op)]
            a, b = values[i], values[i + 1]
            if isinstance(a, Vec) or isinstance(b, Vec):
                r = _vec_apply(self, node, a, b, lambda x, y, s=sym: self._cmp(node, x, s, y))
                if trace is not None:
                    trace.steps.append(Step(self._src(operands[i]), _shown(a), sym, self._src(operands[i + 1]),
                                            _shown(b), _shown(r)))
                result = r if result is None else _vec_apply(self, node, result, r, _and)
            else:
                r = self._cmp(node, a, sym, b)
                if trace is not None:
                    trace.steps.append(Step(self._src(operands[i]), _shown(a), sym, self._src(operands[i + 1]),
                                            _shown(b), _shown(r)))
                result = r if result is None else _and(result, r)
        return result

    def _cmp(self, node, a, sym: str, b) -> Truth:
        if isinstance(b, (Count, Pick)) and not isinstance(a, (Count, Pick)):
            a, b, sym = b, a, _FLIP[sym]
        if isinstance(a, Pick):
            return self._cmp_pick(node, a, sym, b)
        if isinstance(a, Count) and not isinstance(b, Count):
            return _cmp_count(a, sym, self._num(node, b))
        if isinstance(a, (str, Truth)) or isinstance(b, (str, Truth)) or a is None or b is None:
            if sym not in ("==", "!="):
                raise self._err(node, f"cannot order {_kind(a)} and {_kind(b)}")
            if isinstance(a, Truth) and isinstance(b, Truth):
                same = a.value == b.value
            elif isinstance(a, (np.ndarray, int, float, Count)) or isinstance(b, (np.ndarray, int, float, Count)):
                same = np.asarray(False)  # a number is never equal to a name
            else:
                same = np.asarray(norm(a) == norm(b))
            t = _truth(same, np.where(same, math.inf, -math.inf))
            return t if sym == "==" else Truth(~t.value, -t.margin)
        d = np.asarray(self._num(node, a) - self._num(node, b), float)
        value, margin = {">": (d > EPS, d), ">=": (d >= -EPS, d), "<": (d < -EPS, -d), "<=": (d <= EPS, -d),
                         "==": (np.abs(d) <= EPS, -np.abs(d)), "!=": (np.abs(d) > EPS, np.abs(d))}[sym]
        return _truth(value, margin)

    def _cmp_pick(self, node, p: Pick, sym: str, name) -> Truth:
        if sym not in ("==", "!="):
            raise self._err(node, f"cannot order {_kind(p)} and {_kind(name)}")
        if isinstance(name, Pick):       # argmax(a) == argmax(b): the same key, as firmly as the looser pick
            same = np.array([x is not None and norm(x) == norm(y) for x, y in zip(p.chosen(), name.chosen())])
            firm = np.minimum(_top_gap(p), _top_gap(name))
            t = _truth(same, np.where(same, firm, -firm))
            return t if sym == "==" else Truth(~t.value, -t.margin)
        idx = next((i for i, k in enumerate(p.keys) if norm(k) == norm(name)
                    or (isinstance(k, (int, float)) and not isinstance(name, str) and k == name)), None)
        B = p.matrix.shape[0]
        if idx is None:
            t = _truth(np.zeros(B, bool), np.full(B, -math.inf))
        else:
            chosen = p.matrix.argmax(1) if p.kind == "argmax" else p.matrix.argmin(1)
            others = np.delete(p.matrix, idx, axis=1)
            if others.shape[1] == 0:
                gap = np.full(B, math.inf)
            elif p.kind == "argmax":
                gap = p.matrix[:, idx] - others.max(1)
            else:
                gap = others.min(1) - p.matrix[:, idx]
            t = _truth(chosen == idx, gap)
        return t if sym == "==" else Truth(~t.value, -t.margin)

    def _call(self, node: ast.Call, res, trace):
        sel = self._sel_of.get(id(node))
        if sel is not None:
            return res(sel)
        fn = node.func.id
        args = [self._eval(a, res, trace) for a in node.args]
        if fn == "hm":
            return self._arith(node, args[0], args[1], _hm)
        if fn == "abs":
            return self._arith(node, args[0], 0.0, lambda a, _: np.abs(a))
        if fn in ("min", "max"):
            pick = np.minimum.reduce if fn == "min" else np.maximum.reduce
            nums = ([self._num(node, v) for v in self._values(node, args[0])]
                    if len(args) == 1 and isinstance(args[0], Vec) else [self._num(node, a) for a in args])
            return pick(np.broadcast_arrays(*[np.asarray(x, float) for x in nums]))
        if fn == "mean":  # mean of a vector
            v = self._vec(node, args[0])
            nums = np.broadcast_arrays(*[np.asarray(self._num(node, x), float) for x in self._values(node, v)])
            return np.mean(nums, axis=0)
        v = self._vec(node, args[0])
        vals = self._values(node, v)
        if fn in ("count", "all", "any", "frac"):
            if not v.is_bool():
                raise self._err(node, f"{fn}() needs a comparison between vectors, e.g. {fn}(per(...) > per(...))")
            truths = [x if isinstance(x, Truth) else _const_truth(x) for x in vals]
            V = np.stack(np.broadcast_arrays(*[t.value for t in truths]), axis=1)
            M = np.stack(np.broadcast_arrays(*[t.margin for t in truths]), axis=1)
            if fn == "all":
                out = Truth(V.all(1), M.min(1))
            elif fn == "any":
                out = Truth(V.any(1), M.max(1))
            else:
                out = Count(V.sum(1).astype(float), -np.sort(-M, axis=1), 1.0 if fn == "count" else 1.0 / V.shape[1])
            if trace is not None:
                trace.steps.append(Step(f"{fn}(…)", _shown(v), "→", "", None, _shown(out), kind="reduce"))
            return out
        if fn == "n":
            return float(len(vals))
        nums = np.stack(np.broadcast_arrays(*[np.asarray(self._num(node, x), float) for x in vals]), axis=1)
        if fn in ("argmax", "argmin"):
            out = Pick(fn, list(v.values), nums)
        else:  # increasing / nondecreasing
            steps = np.diff(nums, axis=1)
            if steps.shape[1] == 0:
                out = _truth(np.ones(nums.shape[0], bool), np.full(nums.shape[0], math.inf))
            else:
                ok = (steps > EPS) if fn == "increasing" else (steps >= -EPS)
                out = Truth(ok.all(1), steps.min(1))
        if trace is not None:
            trace.steps.append(Step(f"{fn}(…)", _shown(v), "→", "", None, _shown(out), kind="reduce"))
        return out

    def _vec(self, node, v) -> Vec:
        if not isinstance(v, Vec):
            raise self._err(node, f"{node.func.id}() needs a per-dataset vector (per(...)), got {_kind(v)}")
        return v

    def _values(self, node, v: Vec) -> list:
        if not v.values:
            raise Missing(f"`{self._src(node)}` has no common dataset/shot to compare")
        return list(v.values.values())


def _names_metric(node: ast.Call) -> bool:
    first = node.args[0] if node.args else None
    return isinstance(first, ast.Name) or (isinstance(first, ast.Constant) and isinstance(first.value, str))


def _constant_value(node) -> float | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _constant_value(node.operand)
        return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div, ast.Add, ast.Sub)):
        a, b = _constant_value(node.left), _constant_value(node.right)
        if a is not None and b is not None:
            return {ast.Mult: a * b, ast.Div: a / b if b else math.inf, ast.Add: a + b, ast.Sub: a - b}[type(node.op)]
    return None


def _top_gap(p: Pick) -> np.ndarray:
    """How far the chosen element is ahead of the runner-up (inf with one element)."""
    if p.matrix.shape[1] < 2:
        return np.full(p.matrix.shape[0], math.inf)
    s = np.sort(p.matrix, axis=1)
    return (s[:, -1] - s[:, -2]) if p.kind == "argmax" else (s[:, 1] - s[:, 0])


def _divide(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.divide(a, b)
    if np.any(np.asarray(b) == 0):
        raise ZeroDivisionError("division by zero in a claim check")
    return out


def _hm(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a + b == 0, 0.0, 2 * a * b / np.where(a + b == 0, 1.0, a + b))


def _and(x: Truth, y: Truth) -> Truth:
    return Truth(np.logical_and(x.value, y.value), np.minimum(x.margin, y.margin))


def _cmp_count(c: Count, sym: str, threshold) -> Truth:
    """count(v) OP t, with the margin of the element that decides it (see the module docstring)."""
    t = np.asarray(threshold, float) / c.scale
    if t.size > 1:
        t = t[0]  # a threshold is a constant; broadcast replicates carry the same value
    t = float(t)
    n = c.margins.shape[1]

    def at_least(k: int) -> Truth:           # count >= k
        if k <= 0:
            return _truth(np.ones(len(c.values), bool), np.full(len(c.values), math.inf))
        if k > n:
            return _truth(np.zeros(len(c.values), bool), np.full(len(c.values), -math.inf))
        return Truth(c.values >= k, c.margins[:, k - 1])

    def neg(x: Truth) -> Truth:
        return Truth(~x.value, -x.margin)

    ge = at_least(math.ceil(t - EPS))
    gt = at_least(math.floor(t + EPS) + 1)
    return {">=": ge, ">": gt, "<": neg(ge), "<=": neg(gt),
            "==": _and(ge, neg(gt)), "!=": neg(_and(ge, neg(gt)))}[sym]


def _point(resolver: Callable[[Selection], Any]) -> Callable[[Selection], Any]:
    """Wrap a float resolver so every number is a 1-element array (one replicate)."""
    def res(sel: Selection):
        v = resolver(sel)
        if isinstance(v, Vec):
            return Vec(v.by, {k: np.atleast_1d(np.asarray(x, float)) for k, x in v.values.items()})
        return np.atleast_1d(np.asarray(v, float))
    return res


def _shown(v) -> Any:
    """A value as the trace shows it (first replicate): numbers, bools, or dicts of those."""
    if isinstance(v, Vec):
        return {k: _shown(x) for k, x in v.values.items()}
    if isinstance(v, Truth):
        return bool(v.value[0])
    if isinstance(v, Count):
        return float(v.number[0]) if v.scale != 1.0 else int(v.values[0])
    if isinstance(v, Pick):
        return v.chosen()[0]
    if isinstance(v, np.ndarray):
        return float(v.reshape(-1)[0])
    return v


def _kind(v) -> str:
    if isinstance(v, Vec):
        return f"a vector over {v.by}"
    if isinstance(v, (bool, Truth)):
        return "true/false"
    if isinstance(v, str):
        return f"the name '{v}'"
    if isinstance(v, Pick):
        return f"the name chosen by {v.kind}()"
    if isinstance(v, (int, float, np.ndarray, Count)):
        return "a number"
    return type(v).__name__


def _vec_apply(expr: Expression, node, a, b, fn) -> Vec:
    """Element-wise ``fn`` with broadcasting of scalars; two vectors align on their common keys."""
    if isinstance(a, Vec) and isinstance(b, Vec):
        if a.by != b.by:
            raise expr._err(node, f"cannot combine a vector over {a.by} with one over {b.by}")
        keys = [k for k in a.values if k in b.values]
        if not keys:
            raise Missing(f"`{expr._src(node)}`: the two sides share no {a.by}")
        return Vec(a.by, {k: fn(a.values[k], b.values[k]) for k in keys})
    if isinstance(a, Vec):
        return Vec(a.by, {k: fn(x, b) for k, x in a.values.items()})
    return Vec(b.by, {k: fn(a, x) for k, x in b.values.items()})
