"""Host-side judging of MBPP-style asserts: the program computes inputs' outputs, the host compares.

A test such as ``assert f([3, 1]) == [1, 3]`` is parsed with ``ast`` and split into
  * host structure, evaluated here on plain data: literals, comparisons, ``and``/``or``/``not``,
    arithmetic (with size guards), subscripts, ``x if c else y``, lambdas and comprehensions over
    host values, and calls of a few builtins (``len``, ``sorted``, ``set``, ``isinstance``, ``abs``,
    ``round``, ``math.isclose``, ...; see ``FUNCS``), always the real builtins, whatever the
    program rebinds;
  * candidate leaves, the largest pieces that call the program's names (``f([3, 1])``): evaluated
    in the program's sandbox run, returned as plain data;
  * trusted leaves, pieces that use only builtins, stdlib modules and names the task's setup code
    defines (``math.factorial(5)``, ``K``): evaluated in a separate sandbox run of the setup code
    alone, which the program never sees.
The program is sent its code and the candidate leaves only, never a comparison or an expected
value, and its values are compared here, so it cannot pass by patching the runner, by reading the
tests, or by returning an object whose ``__eq__`` is always true (it can still be right by luck or
by memorizing answers). Leaves are all evaluated before the host structure, in source order, so
``and``/``or`` do not short-circuit the program's calls.

A test is *unjudged* (``Unjudged`` at parse time) when the split would show the program part of
the expected side: a statement other than ``assert``, a candidate leaf that contains a comparison
(outside a lambda or a comprehension's ``if``), or one whose outermost operation is not the
program's (``check(f(x), [1, 2])`` with ``check`` from the setup code), or an assert (or an
operand of its top-level ``and``/``or``) with no candidate leaf: it would hold or fail whatever
the program is, as when the task's function has a builtin's name (``round``, ``pow``), which the
host evaluates as the builtin. A trusted leaf whose value is not plain data (an instance of a
setup class) also leaves the test unjudged, at judging time.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import sys

from selfimprove_jax.verifiers._code_eval import FUNCS, HOST_NAMES, MATH, leaf_names


class Unjudged(ValueError):
  """The host cannot judge this test without showing the program part of its expected side."""


_BUILTIN_NAMES = frozenset(dir(builtins))
_STRUCTURE = (ast.Constant, ast.Name, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.UnaryOp,
              ast.BinOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Subscript, ast.Slice, ast.Call,
              ast.Attribute, ast.Lambda, ast.ListComp, ast.SetComp, ast.GeneratorExp,
              ast.DictComp)
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitOr,
           ast.BitAnd, ast.BitXor)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)


class _NotHost(Exception):
  pass


def bound_names(code: str) -> set[str]:
  """Names a module binds at top level (assignments, defs, classes, imports)."""
  names = set()
  for node in ast.parse(code).body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update((a.asname or a.name).split(".")[0] for a in node.names)
    else:
      names.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name)
                   and isinstance(n.ctx, ast.Store))
  return names


def _local_names(node: ast.AST) -> set[str]:
  """Names bound inside ``node`` (lambda parameters, comprehension targets, walrus targets)."""
  out = set()
  for n in ast.walk(node):
    if isinstance(n, ast.arg):
      out.add(n.arg)
    elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
      out.add(n.id)
  return out


def _free_names(node: ast.AST) -> set[str]:
  loads = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
  return loads - _local_names(node)


def _module_bases(node: ast.AST) -> set[str]:
  """Stdlib module names used as ``module.attribute`` in ``node``."""
  return {n.value.id for n in ast.walk(node) if isinstance(n, ast.Attribute)
          and isinstance(n.value, ast.Name) and n.value.id in sys.stdlib_module_names}


def _exposes_a_comparison(node: ast.AST) -> bool:
  """Whether a comparison sits in ``node`` outside lambdas and comprehension filters."""
  if isinstance(node, ast.Compare):
    return True
  if isinstance(node, ast.Lambda):
    return False
  if isinstance(node, ast.comprehension):
    return _exposes_a_comparison(node.iter)
  return any(_exposes_a_comparison(c) for c in ast.iter_child_nodes(node))


def _is_math(node: ast.AST) -> bool:
  return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id == "math" and node.attr in MATH)


def _rooted_in(node: ast.AST, names: set[str]) -> bool:
  """Whether the outermost operation of ``node`` is the program's (a call, attribute or
  subscript chain starting at one of its ``names``, or a comprehension producing such)."""
  if isinstance(node, ast.Name):
    return node.id in names
  if isinstance(node, (ast.Call, ast.Attribute, ast.Subscript)):
    return _rooted_in(node.func if isinstance(node, ast.Call) else node.value, names)
  if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp)):
    return _rooted_in(node.elt, names | _local_names(node))
  return False


@dataclasses.dataclass(frozen=True)
class Check:
  """One assert: ``expr`` with leaves replaced by names ``__c<k>`` (candidate) / ``__t<k>``."""
  source: str
  expr: ast.expr


@dataclasses.dataclass(frozen=True)
class Plan:
  """A test list split for judging: the checks, the program's leaves (expression sources, in
  order), the trusted leaves and the stdlib modules they use."""
  checks: tuple[Check, ...]
  candidate: tuple[str, ...]
  trusted: tuple[str, ...]
  modules: tuple[str, ...]


class _Splitter:
  def __init__(self, trusted_names: set[str]):
    self.trusted_names = trusted_names
    self.candidate: list[str] = []
    self.trusted: list[str] = []
    self.modules: set[str] = set()

  def leaf(self, node: ast.expr) -> ast.expr:
    free = _free_names(node)
    program = free - self.trusted_names - _module_bases(node) - _BUILTIN_NAMES
    source = ast.unparse(node)
    if not program:
      self.modules |= _module_bases(node) & free
      self.trusted.append(source)
      return ast.Name(f"__t{len(self.trusted) - 1}", ast.Load())
    if _exposes_a_comparison(node) or not _rooted_in(node, program):
      raise Unjudged(f"{source!r} would show the program part of the expected side")
    self.candidate.append(source)
    return ast.Name(f"__c{len(self.candidate) - 1}", ast.Load())

  def split(self, node: ast.AST, bound: frozenset = frozenset()) -> ast.AST:
    """``node`` with its maximal non-host subtrees replaced by leaf names."""
    saved = (len(self.candidate), len(self.trusted))
    try:
      return self._host(node, bound)
    except _NotHost:
      del self.candidate[saved[0]:], self.trusted[saved[1]:]
      if not isinstance(node, ast.expr) or _free_names(node) & bound:
        raise
      return self.leaf(node)

  def _host(self, node: ast.AST, bound: frozenset) -> ast.AST:
    if not isinstance(node, _STRUCTURE + (ast.keyword, ast.comprehension, ast.arguments, ast.arg)):
      raise _NotHost
    if isinstance(node, ast.Name) and node.id not in bound and node.id not in HOST_NAMES:
      raise _NotHost
    if isinstance(node, ast.Attribute):
      if _is_math(node) and "math" not in bound:
        return node
      raise _NotHost
    if isinstance(node, ast.Call) and not (_is_math(node.func) or (
        isinstance(node.func, ast.Name) and node.func.id in FUNCS and node.func.id not in bound)):
      raise _NotHost
    if isinstance(node, ast.keyword) and node.arg is None:
      raise _NotHost
    if isinstance(node, ast.comprehension) and node.is_async:
      raise _NotHost
    if isinstance(node, ast.BinOp) and not isinstance(node.op, _BINOPS):
      raise _NotHost
    if isinstance(node, ast.arguments) and (node.vararg or node.kwarg or node.kwonlyargs or
                                            node.defaults or node.posonlyargs):
      raise _NotHost
    if isinstance(node, (ast.Lambda, *_COMPREHENSIONS)):
      bound = bound | _local_names(node)
    new = type(node)(**{f: getattr(node, f) for f in node._fields})
    for field, value in ast.iter_fields(node):
      if isinstance(value, ast.AST) and not isinstance(value, (ast.expr_context, ast.operator,
                                                               ast.unaryop, ast.cmpop,
                                                               ast.boolop)):
        setattr(new, field, self.split(value, bound))
      elif isinstance(value, list):
        if any(v is None or isinstance(v, ast.Starred) for v in value):
          raise _NotHost
        setattr(new, field, [self.split(v, bound) if isinstance(v, ast.AST) and not isinstance(
            v, ast.cmpop) else v for v in value])
    return new


def _unjudged_part(expr: ast.expr) -> str | None:
  """The first operand of an ``and``/``or`` (or the whole assert) with no candidate leaf: its
  value does not depend on the program, as when the task's function has a builtin's name."""
  parts = expr.values if isinstance(expr, ast.BoolOp) else [expr]
  return next((ast.unparse(p) for p in parts
               if not any(n.startswith("__c") for n in leaf_names(p))), None)


def plan(tests: list[str], setup_code: str = "") -> Plan:
  """Splits a task's tests; raises ``Unjudged`` (or SyntaxError) when it cannot be judged safely."""
  splitter = _Splitter(bound_names(setup_code))
  checks = []
  for text in tests:
    for statement in ast.parse(text).body:
      if not isinstance(statement, ast.Assert):
        raise Unjudged(f"{ast.unparse(statement)!r} is not an assert")
      expr = splitter.split(statement.test)
      constant = _unjudged_part(expr)
      if constant is not None:
        raise Unjudged(f"{constant!r} calls none of the program's code")
      checks.append(Check(ast.unparse(statement), ast.fix_missing_locations(expr)))
  return Plan(tuple(checks), tuple(splitter.candidate), tuple(splitter.trusted),
              tuple(sorted(splitter.modules)))
