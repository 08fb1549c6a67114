"""Host-side evaluation of a test's host structure (see ``_code_checks``) over plain values.

Only the operations below run, on values decoded from the sandbox (None, bool, numbers, str,
bytes, containers of those) or built here: the real builtins in ``FUNCS``, a few ``math``
functions, operators with size guards (``_MAX_ITEMS``, ``_MAX_BITS``; sets and dicts refuse
keys of one hash past ``MAX_SAME_HASH``, see ``_sandbox_prelude``), and lambdas and
comprehensions interpreted here. A step budget bounds the work per test; exceeding a guard or the
budget raises, which fails that test.
"""
from __future__ import annotations

import ast
import math
from typing import Any

from selfimprove_jax.verifiers._sandbox_prelude import few_collisions

_TYPES = {t.__name__: t for t in (bool, bytes, complex, dict, float, frozenset, int, list, set,
                                  str, tuple)}
MATH = {name: getattr(math, name) for name in (
    "isclose", "sqrt", "floor", "ceil", "fabs", "pi", "e", "inf", "nan", "isnan", "isinf", "log",
    "exp", "sin", "cos", "tan")}
_MAX_ITEMS = 1_000_000   # largest sequence the host builds by repetition or range()
_MAX_BITS = 100_000      # largest int operand of *, //, %, **
_BUDGET = 1_000_000      # host evaluation steps per test


def _sum(items, start=0):
  items = list(items)
  if not all(type(x) in (bool, int, float, complex) for x in [start, *items]):
    raise TypeError("sum: the host adds numbers only")
  return sum(items, start)


def _round(x, ndigits=None):
  if ndigits is not None and abs(ndigits) > 10_000:
    raise ValueError("round: ndigits too large for the host")
  return round(x) if ndigits is None else round(x, ndigits)


def _range(*args):
  r = range(*args)
  if len(r) > _MAX_ITEMS:
    raise ValueError("range: too long for the host")
  return r


def _divmod(a, b):
  _guard(ast.FloorDiv(), a, b)  # the size guards of // and %
  return divmod(a, b)


def _set(items=()):
  return set(few_collisions(items))


def _frozenset(items=()):
  return frozenset(few_collisions(items))


def _dict(*args, **kwargs):
  if args and not isinstance(args[0], dict):  # a dict built here or decoded is already checked
    pairs = [tuple(p) for p in args[0]]
    few_collisions(p[0] for p in pairs if len(p) == 2)
    args = (pairs, *args[1:])
  return dict(*args, **kwargs)


FUNCS = {f.__name__: f for f in (abs, all, any, bool, dict, float, frozenset, int,
                                  isinstance, len, list, max, min, reversed, set, sorted, str,
                                  tuple, type, zip, enumerate)}
FUNCS.update(sum=_sum, round=_round, range=_range, divmod=_divmod)
_GUARDED = ((set, _set), (frozenset, _frozenset), (dict, _dict))  # what a call of these runs
HOST_NAMES = {**_TYPES, **FUNCS}


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b,
        ast.Mod: lambda a, b: a % b, ast.Pow: lambda a, b: a ** b, ast.BitOr: lambda a, b: a | b,
        ast.BitAnd: lambda a, b: a & b, ast.BitXor: lambda a, b: a ^ b,
        ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
        ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
        ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
        ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b,
        ast.USub: lambda a: -a, ast.UAdd: lambda a: +a, ast.Not: lambda a: not a,
        ast.Invert: lambda a: ~a}


def _guard(op: ast.operator, a: Any, b: Any) -> None:
  """Raises when ``a op b`` would be too big or slow for the host."""
  if isinstance(op, ast.Mult):
    for seq, n in ((a, b), (b, a)):
      if isinstance(seq, (str, bytes, bytearray, list, tuple)) and isinstance(n, int):
        if len(seq) * max(n, 0) > _MAX_ITEMS:
          raise ValueError("a repetition too long for the host")
  if isinstance(op, (ast.Mult, ast.FloorDiv, ast.Mod, ast.Pow)):
    if any(isinstance(x, int) and x.bit_length() > _MAX_BITS for x in (a, b)):
      raise ValueError("an integer too large for the host")
  if isinstance(op, ast.Pow) and isinstance(a, int) and isinstance(b, int) and (
      b > 0 and a.bit_length() * b > 10 * _MAX_BITS):
    raise ValueError("a power too large for the host")
  if isinstance(op, ast.Mod) and isinstance(a, (str, bytes, bytearray)):
    raise TypeError("no string formatting on the host")


def _binop(op: ast.operator, a: Any, b: Any) -> Any:
  _guard(op, a, b)
  return _OPS[type(op)](a, b)


class _Evaluator:
  """Evaluates host structure (see ``_Splitter._host``) over plain values; no program code."""

  def __init__(self, env: dict[str, Any]):
    self.env, self.steps = env, 0

  def __call__(self, node: ast.AST, scope: dict[str, Any]) -> Any:
    self.steps += 1
    if self.steps > _BUDGET:
      raise RuntimeError("the host's evaluation budget ran out")
    return getattr(self, "_" + type(node).__name__)(node, scope)

  def _Constant(self, n, s):
    return n.value

  def _Name(self, n, s):
    return s[n.id] if n.id in s else self.env[n.id] if n.id in self.env else HOST_NAMES[n.id]

  def _Attribute(self, n, s):
    return MATH[n.attr]

  def _Tuple(self, n, s):
    return tuple(self(e, s) for e in n.elts)

  def _List(self, n, s):
    return [self(e, s) for e in n.elts]

  def _Set(self, n, s):
    return {self(e, s) for e in n.elts}

  def _Dict(self, n, s):
    return {self(k, s): self(v, s) for k, v in zip(n.keys, n.values)}

  def _UnaryOp(self, n, s):
    return _OPS[type(n.op)](self(n.operand, s))

  def _BinOp(self, n, s):
    return _binop(n.op, self(n.left, s), self(n.right, s))

  def _BoolOp(self, n, s):
    value = None
    for operand in n.values:
      value = self(operand, s)
      if bool(value) == isinstance(n.op, ast.Or):
        return value
    return value

  def _Compare(self, n, s):
    left = self(n.left, s)
    for op, comparator in zip(n.ops, n.comparators):
      right = self(comparator, s)
      if not _OPS[type(op)](left, right):
        return False
      left = right
    return True

  def _IfExp(self, n, s):
    return self(n.body, s) if self(n.test, s) else self(n.orelse, s)

  def _Subscript(self, n, s):
    return self(n.value, s)[self(n.slice, s)]

  def _Slice(self, n, s):
    return slice(*(None if x is None else self(x, s) for x in (n.lower, n.upper, n.step)))

  def _Call(self, n, s):
    fn = self(n.func, s)
    fn = next((guarded for t, guarded in _GUARDED if fn is t), fn)
    return fn(*(self(a, s) for a in n.args), **{k.arg: self(k.value, s) for k in n.keywords})

  def _Lambda(self, n, s):
    params = [a.arg for a in n.args.args]

    def fn(*values):
      if len(values) != len(params):
        raise TypeError(f"a lambda of {len(params)} parameters got {len(values)} arguments")
      return self(n.body, {**s, **dict(zip(params, values))})
    return fn

  def _scopes(self, generators, scope):
    if not generators:
      yield scope
      return
    first = generators[0]
    for item in self(first.iter, scope):
      self.steps += 1
      inner = dict(scope)
      self._bind(first.target, item, inner)
      if all(self(c, inner) for c in first.ifs):
        yield from self._scopes(generators[1:], inner)

  def _bind(self, target, item, scope):
    if isinstance(target, ast.Name):
      scope[target.id] = item
      return
    items = list(item)
    if len(items) != len(target.elts):
      raise ValueError(f"cannot unpack {len(items)} values into {len(target.elts)}")
    for t, x in zip(target.elts, items):
      self._bind(t, x, scope)

  def _ListComp(self, n, s):
    return [self(n.elt, inner) for inner in self._scopes(n.generators, s)]

  _GeneratorExp = _ListComp

  def _SetComp(self, n, s):
    return _set(self(n.elt, inner) for inner in self._scopes(n.generators, s))

  def _DictComp(self, n, s):
    return _dict((self(n.key, inner), self(n.value, inner))
                 for inner in self._scopes(n.generators, s))


def leaf_names(expr: ast.AST) -> list[str]:
  return [n.id for n in ast.walk(expr) if isinstance(n, ast.Name) and n.id.startswith("__")
          and n.id[2:3] in ("c", "t") and n.id[3:].isdigit()]


def host_eval(expr: ast.expr, env: dict[str, Any]) -> Any:
  """The value of a check's ``expr`` given its leaves' plain values in ``env``."""
  return _Evaluator(env)(expr, {})
