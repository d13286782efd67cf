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
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .records import FILTER_KEYS, Missing

EPS = 1e-9
SELECTORS = ("mean", "per")
SELECTION_KEYS = FILTER_KEYS + ("by", "exclude")
VEC_FUNCS = {"count", "all", "any", "frac", "n", "argmax", "argmin", "increasing", "nondecreasing"}
FUNCS = set(SELECTORS) | VEC_FUNCS | {"min", "max", "abs", "hm"}
_CMP = {ast.Gt: ">", ast.GtE: ">=", ast.Lt: "<", ast.LtE: "<=", ast.Eq: "==", ast.NotEq: "!="}
_BIN = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


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
        return all(isinstance(v, bool) for v in self.values.values())


def _key_order(k):
    return (0, k, "") if isinstance(k, (int, float)) else (1, 0, str(k))


@dataclass
class Step:
    """One scalar comparison met while evaluating (shown in reports as the deciding arithmetic)."""
    left: str
    left_value: Any
    op: str
    right: str
    right_value: Any
    result: Any


@dataclass
class Trace:
    steps: list[Step] = field(default_factory=list)


class Expression:
    """A parsed, validated claim check. ``evaluate(resolver)`` computes its truth value, where
    ``resolver(selection)`` returns a float (``mean``) or a :class:`Vec` (``per``)."""

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
        first = node.args[0] if node.args else None
        names_metric = isinstance(first, ast.Name) or (isinstance(first, ast.Constant)
                                                       and isinstance(first.value, str))
        if fn in SELECTORS and names_metric:
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
            out = self.evaluate(fake)[0]
        except ZeroDivisionError:
            return
        except Missing:
            return
        if not isinstance(out, bool):
            raise ExpressionError(f"{self.where}: the check must be true/false, but `{self.text}` gives "
                                  + ("a per-dataset vector: wrap it in all(), any(), count() or frac()"
                                     if isinstance(out, Vec) else f"a {type(out).__name__}"))

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, resolver: Callable[[Selection], Any]) -> tuple[Any, Trace]:
        trace = Trace()
        return self._eval(self.tree.body, resolver, trace), trace

    def _eval(self, node, res, trace):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return {"true": True, "false": False, "null": None}.get(node.id, node.id)
        if isinstance(node, ast.UnaryOp):
            v = self._eval(node.operand, res, trace)
            if isinstance(node.op, ast.Not):
                return not self._bool(node, v)
            if isinstance(node.op, ast.USub):
                return self._arith(node, -1.0, v, lambda a, b: a * b)
            return self._arith(node, 1.0, v, lambda a, b: a * b)
        if isinstance(node, ast.BoolOp):
            vals = [self._bool(n, self._eval(n, res, trace)) for n in node.values]  # no short-circuit
            return all(vals) if isinstance(node.op, ast.And) else any(vals)
        if isinstance(node, ast.BinOp):
            a, b = self._eval(node.left, res, trace), self._eval(node.right, res, trace)
            op = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y,
                  ast.Mult: lambda x, y: x * y, ast.Div: lambda x, y: x / y}[type(node.op)]
            return self._arith(node, a, b, op)
        if isinstance(node, ast.Compare):
            return self._compare(node, res, trace)
        if isinstance(node, ast.Call):
            return self._call(node, res, trace)
        raise self._err(node, f"'{type(node).__name__}' syntax is not allowed")

    def _bool(self, node, v):
        if not isinstance(v, bool):
            raise self._err(node, "and/or/not need true/false operands"
                            + (" (wrap a per-dataset vector in all()/any())" if isinstance(v, Vec) else ""))
        return v

    def _num(self, node, v):
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
        result: Any = True
        for i, op in enumerate(node.ops):
            sym = _CMP[type(op)]
            a, b = values[i], values[i + 1]
            if isinstance(a, Vec) or isinstance(b, Vec):
                r = _vec_apply(self, node, a, b, lambda x, y, s=sym: _cmp(self, node, x, s, y))
                result = r if result is True else _vec_apply(self, node, result, r, lambda x, y: x and y)
            else:
                r = _cmp(self, node, a, sym, b)
                trace.steps.append(Step(self._src(operands[i]), a, sym, self._src(operands[i + 1]), b, r))
                result = r if result is True else (result and r)
        return result

    def _call(self, node: ast.Call, res, trace):
        sel = self._sel_of.get(id(node))
        if sel is not None:
            return res(sel)
        fn = node.func.id
        args = [self._eval(a, res, trace) for a in node.args]
        if fn == "hm":
            return self._arith(node, args[0], args[1],
                               lambda a, b: 0.0 if a + b == 0 else 2 * a * b / (a + b))
        if fn == "abs":
            return self._arith(node, args[0], 0.0, lambda a, _: abs(a))
        if fn in ("min", "max"):
            pick = min if fn == "min" else max
            if len(args) == 1 and isinstance(args[0], Vec):
                return pick(self._num(node, v) for v in self._values(node, args[0]))
            return pick(self._num(node, a) for a in args)
        if fn == "mean":  # mean of a vector
            v = self._vec(node, args[0])
            return math.fsum(self._num(node, x) for x in self._values(node, v)) / len(v.values)
        v = self._vec(node, args[0])
        vals = self._values(node, v)
        if fn in ("count", "all", "any", "frac"):
            if not v.is_bool():
                raise self._err(node, f"{fn}() needs a comparison between vectors, e.g. {fn}(per(...) > per(...))")
            return {"count": lambda: sum(vals), "all": lambda: all(vals), "any": lambda: any(vals),
                    "frac": lambda: sum(vals) / len(vals)}[fn]()
        if fn == "n":
            return len(vals)
        if fn in ("argmax", "argmin"):
            nums = {k: self._num(node, x) for k, x in v.values.items()}
            best = (max if fn == "argmax" else min)(nums.values())
            return next(k for k, x in nums.items() if x == best)  # first in key order on ties
        if fn in ("increasing", "nondecreasing"):
            nums = [self._num(node, x) for x in vals]
            strict = fn == "increasing"
            return all((b > a + EPS) if strict else (b >= a - EPS) for a, b in zip(nums, nums[1:]))
        raise self._err(node, f"unknown function '{fn}'")

    def _vec(self, node, v) -> Vec:
        if not isinstance(v, Vec):
            raise self._err(node, f"{node.func.id}() needs a per-dataset vector (per(...)), got {_kind(v)}")
        return v

    def _values(self, node, v: Vec) -> list:
        if not v.values:
            raise Missing(f"`{self._src(node)}` has no common dataset/shot to compare")
        return list(v.values.values())


def _kind(v) -> str:
    if isinstance(v, Vec):
        return f"a vector over {v.by}"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, str):
        return f"the name '{v}'"
    return "a number" if isinstance(v, (int, float)) else type(v).__name__


def _cmp(expr: Expression, node, a, sym: str, b) -> bool:
    if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        if sym not in ("==", "!="):
            raise expr._err(node, f"cannot order {_kind(a)} and {_kind(b)}")
        from .records import norm
        same = norm(a) == norm(b) if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) else a == b
        return same if sym == "==" else not same
    x, y = expr._num(node, a), expr._num(node, b)
    return {">": x > y + EPS, ">=": x >= y - EPS, "<": x < y - EPS, "<=": x <= y + EPS,
            "==": abs(x - y) <= EPS, "!=": abs(x - y) > EPS}[sym]


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
