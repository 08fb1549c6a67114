"""MATH answers: the last ``\\boxed{}``, a LaTeX normalizer, and string-then-symbolic equivalence.

Equivalence of a completion's answer and the gold one, cheapest first:
  1. equal after ``normalize_math`` (spacing, \\left/\\right, \\dfrac, \\text{}, degrees, dollars,
     percent, trailing units, "x = ", thousands commas, "\\frac12" shorthand, decimals, mixed
     numbers, repeating decimals, plain "pi"/"sqrt(2)", "1 and 2" lists);
  2. equal as exact decimals ("0.50" and ".5");
  3. the same number of top-level comma-separated parts ("(1, 2)", "3, 5"), equal part by part;
  4. answers with words in them ("Evelyn", "\\text{odd}") only as case-folded strings;
  5. when both convert (``latex_to_sympy``: fractions, roots, powers, pi, implicit products),
     ``SympyChecker.equal``'s verdict ("\\frac{1}{2}" and "0.5"; "0.333" is not 1/3);
  6. otherwise math-verify in the same killable worker (``SympyChecker.verify_latex``): sets in
     any order, \\pm, intervals and unions, matrices, equations, ratios, scientific notation.
Steps 5-6 run in a child process, so a comparison that overruns its timeout is killed and counts
as not equal, from any thread. ``tests/fixtures/math_grading_table.jsonl`` holds the verdicts this
is measured against (``benchmarks/math_grading.py``).
"""
from __future__ import annotations

import decimal
import fractions
import re
from typing import Any

from selfimprove_jax.verifiers.base import Verdict, grader_reward
from selfimprove_jax.verifiers.sympy_check import FUNCTIONS, SympyChecker, default_checker, is_safe

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_TEXT_COMMANDS = ("\\text", "\\textbf", "\\textrm", "\\mathrm", "\\mathbf", "\\mbox", "\\textup")
_UNIT_WORDS = (
    "units", "unit", "square units", "sq units", "cubic units", "centimeters", "centimeter", "cm",
    "meters", "meter", "kilometers", "km", "millimeters", "mm", "inches", "inch", "feet", "foot",
    "ft", "yards", "yard", "miles", "mile", "mph", "hours", "hour", "minutes", "minute", "seconds",
    "second", "days", "day", "weeks", "years", "dollars", "dollar", "cents", "cent", "degrees",
    "degree", "pounds", "ounces", "grams", "kilograms", "kg", "liters", "gallons", "people",
    "students", "ways", "points", "sq", "square feet", "square inches", "square meters")
_UNITS_RE = re.compile(r"(?<=[\d}).])\s*(?:" + "|".join(
    sorted((re.escape(u) for u in _UNIT_WORDS), key=len, reverse=True)) + r")(?:\^\{?[23]\}?)?$")
_FINAL_ANSWER_RE = re.compile(r"(?i:final answer is)\s*\$?(.+?)\$?\s*\.?\s*(?:I hope|$)", re.S)


def _braced(text: str, start: int) -> tuple[str, int] | None:
  """(content, index after it) of the brace group opening at ``text[start]``; None if unbalanced."""
  if start >= len(text) or text[start] != "{":
    return None
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "{" and text[i - 1:i] != "\\":
      depth += 1
    elif text[i] == "}" and text[i - 1:i] != "\\":
      depth -= 1
      if depth == 0:
        return text[start + 1:i], i + 1
  return None


def boxed_answers(text: str) -> list[str | None]:
  """Contents of the top-level ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x`` in order (boxes
  nested inside one are kept in its content); None for one that never closes its brace."""
  pattern = re.compile("|".join(re.escape(c) for c in _BOX_COMMANDS) + r"(?![a-zA-Z])")
  found, pos = [], 0
  while m := pattern.search(text, pos):
    if text.startswith(" ", m.end()):
      word = re.match(r"\s*([^\s$]+)", text[m.end():])
      found.append(word.group(1) if word else None)
      pos = m.end() + (word.end() if word else 0)
      continue
    group = _braced(text, m.end())
    found.append(group[0] if group else None)
    pos = group[1] if group else m.end()
  return found


def last_boxed(text: str) -> str | None:
  """Content of the last top-level box (see ``boxed_answers``); None when there is none, or the
  last one is empty or never closes its brace."""
  found = boxed_answers(text)
  return found[-1] if found and found[-1] and found[-1].strip() else None


def extract_math_answer(text: str) -> str | None:
  """The last boxed answer, else the X of "The final answer is $X$" (Minerva format), else None."""
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed
  m = _FINAL_ANSWER_RE.search(text)
  return m.group(1).strip() if m and m.group(1).strip() else None


def _unwrap(s: str, commands: tuple[str, ...]) -> str:
  """Replaces every ``\\command{X}`` by X (innermost last, so nesting unwraps fully)."""
  pattern = re.compile("(?:" + "|".join(re.escape(c) for c in commands) + r")(?![a-zA-Z])\s*")
  while (m := pattern.search(s)) and (group := _braced(s, m.end())):
    s = s[:m.start()] + group[0] + s[group[1]:]
  return s


def _fix_shorthand(s: str) -> str:
  """\\frac12 -> \\frac{1}{2}, \\frac1{x} -> \\frac{1}{x}, \\sqrt2 -> \\sqrt{2}."""
  s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
  s = re.sub(r"\\frac(\d)(?=\{)", r"\\frac{\1}", s)
  s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
  return re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)


def _repeating(m: re.Match) -> str:
  """A repeating decimal as a fraction: 0.1\\overline{6} -> \\frac{1}{6}."""
  sign, whole, fixed, cycle = m.groups()
  value = fractions.Fraction(int(whole or "0")) + fractions.Fraction(
      int(fixed + cycle) - int(fixed or "0"), 10 ** len(fixed) * (10 ** len(cycle) - 1))
  return f"{sign}\\frac{{{value.numerator}}}{{{value.denominator}}}"


def normalize_math(answer: str) -> str:
  """A canonical string for a MATH answer (see the module docstring for what it removes)."""
  s = answer.strip().replace("\u2212", "-")
  s = _unwrap(s, _BOX_COMMANDS)
  # Spacing commands become spaces (a space can separate a unit); the "\\" that ends a matrix
  # row is not the "\\ " command even when a space follows it.
  s = re.sub(r"(?<!\\)\\(?:[,;: ]|q?quad(?![a-zA-Z]))", " ", s)
  s = re.sub(r"(?<!\\)\\(?:!|displaystyle(?![a-zA-Z]))|\n", "", s)
  s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
  s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
  s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\u00b0", "", s)
  s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
  # Units in a trailing \text{...} ("5\text{ cm}^2") go before the \text wrappers are dropped.
  m = re.search(r"(\s*)\\(?:text|mbox|mathrm|textrm)\{(\s*)([a-zA-Z ]+)\}(?:\^\{?[23]\}?)?\s*$",
                s)
  if m and s[:m.start()].strip() and (m.group(1) or m.group(2)
                                      or m.group(3).strip() in _UNIT_WORDS):
    s = s[:m.start()]
  s = _unwrap(s, _TEXT_COMMANDS)
  s = re.sub(r"\s+(?:and|or)\s+", ",", s)  # "1 \text{ and } 2": a list of solutions
  s = re.sub(r"\s*(?:percent|per cent)$", "", s)
  s = _UNITS_RE.sub("", s.strip())
  s = s.replace("{,}", ",")
  s = re.sub(r"\s+", "", s)
  s = _fix_shorthand(s)
  s = re.sub(r"(?<![a-zA-Z\\])pi(?![a-zA-Z])", r"\\pi", s)
  s = re.sub(r"(?<![a-zA-Z\\])sqrt\(([^()]*)\)", r"\\sqrt{\1}", s)
  s = re.sub(r"(-?)(\d*)\.(\d*)\\overline\{(\d+)\}", _repeating, s)
  if re.fullmatch(r"[a-zA-Z]\w?=.+", s):  # "x=5" -> "5"; longer left sides are kept
    s = s.split("=", 1)[1]
  if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
    s = s.replace(",", "")
  s = re.sub(r"(?<!\d)\.(?=\d)", "0.", s).removesuffix(".")
  if re.fullmatch(r"-?\d+/\d+", s):
    num, den = s.lstrip("-").split("/")
    s = ("-" if s.startswith("-") else "") + f"\\frac{{{num}}}{{{den}}}"
  if m := re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s):  # "2\frac{1}{2}": mixed
    sign, whole, num, den = m.groups()
    s = f"{sign}\\frac{{{int(whole) * int(den) + int(num)}}}{{{den}}}"
  if re.fullmatch(r"\(([A-Z])\)", s):
    s = s[1]
  number = _decimal(s)
  return s if number is None else format(number.normalize(), "f") if number else "0"


def _decimal(s: str) -> decimal.Decimal | None:
  return decimal.Decimal(s) if re.fullmatch(r"-?\d+(?:\.\d+)?", s) else None


# ------------------------------------------------------------------------------ LaTeX -> sympy

class _Unsupported(Exception):
  pass


class _Converter:
  """Recursive descent over a normalized LaTeX string to a restricted sympy expression string.

  expr := term (('+'|'-') term)* ; term := unary (('*'|'/'|implicit) unary)* ;
  unary := ('-'|'+') unary | power ; power := atom ('^' arg)? ; atom := number | letter | pi |
  (expr) | {expr} | \\frac arg arg | \\sqrt[n]? arg | \\func arg. ``arg`` is {expr} or one char.
  """

  def __init__(self, s: str):
    self.s, self.i = s, 0

  def peek(self, n: int = 1) -> str:
    return self.s[self.i:self.i + n]

  def command(self) -> str | None:
    m = re.match(r"\\([a-zA-Z]+)", self.s[self.i:])
    return m.group(1) if m else None

  def expect(self, ch: str) -> None:
    if self.peek() != ch:
      raise _Unsupported(f"expected {ch!r} at {self.i} in {self.s!r}")
    self.i += 1

  def expr(self) -> str:
    out = self.term()
    while self.peek() in ("+", "-"):
      op = self.peek()
      self.i += 1
      out = f"{out}{op}{self.term()}"
    return out

  def starts_atom(self) -> bool:
    c = self.peek()
    return bool(c) and (c.isalnum() or c in "({" or c == "." or (
        c == "\\" and self.command() in ("frac", "ln", *FUNCTIONS)))

  def term(self) -> str:
    out = self.unary()
    while True:
      cmd = self.command() if self.peek() == "\\" else None
      if self.peek() in ("*", "/") or cmd in ("cdot", "times", "div"):
        op = "/" if self.peek() == "/" or cmd == "div" else "*"
        self.i += 1 if cmd is None else len(cmd) + 1
        out = f"{out}{op}{self.unary()}"
      elif self.starts_atom():
        out = f"{out}*{self.power()}"
      else:
        return out

  def unary(self) -> str:
    if self.peek() in ("-", "+"):
      sign = self.peek()
      self.i += 1
      return f"({sign}{self.unary()})"
    return self.power()

  def power(self) -> str:
    base = self.atom()
    if self.peek() == "^":
      self.i += 1
      return f"({base})**({self.arg()})"
    return base

  def arg(self) -> str:
    if self.peek() == "{":
      return self.group()
    c = self.peek()
    if c.isalnum():
      self.i += 1
      return c
    if c == "\\":
      return self.atom()
    raise _Unsupported(f"no argument at {self.i} in {self.s!r}")

  def group(self) -> str:
    self.expect("{")
    out = self.expr()
    self.expect("}")
    return f"({out})"

  def atom(self) -> str:
    c = self.peek()
    m = re.match(r"\d+(?:\.\d+)?|\.\d+", self.s[self.i:])
    if m:
      self.i += m.end()
      whole, _, frac = m.group(0).partition(".")
      return f"({int(whole + frac)}/1{'0' * len(frac)})" if frac else str(int(whole))
    if c.isalpha():
      self.i += 1
      return c
    if c == "(":
      self.i += 1
      out = self.expr()
      self.expect(")")
      return f"({out})"
    if c == "{":
      return self.group()
    cmd = self.command() if c == "\\" else None
    if cmd is None:
      raise _Unsupported(f"unexpected {c!r} at {self.i} in {self.s!r}")
    self.i += len(cmd) + 1
    if cmd == "frac":
      return f"(({self.arg()})/({self.arg()}))"
    if cmd == "sqrt":
      if self.peek() == "[":
        self.i += 1
        index = self.expr()
        self.expect("]")
        return f"(({self.arg()})**(1/({index})))"
      return f"sqrt({self.arg()})"
    if cmd == "pi":
      return "pi"
    if cmd in FUNCTIONS or cmd == "ln":
      return f"{'log' if cmd == 'ln' else cmd}({self.arg() if self.peek() != '(' else self.atom()})"
    raise _Unsupported(f"command \\{cmd} is not supported")


def latex_to_sympy(normalized: str) -> str | None:
  """A ``sympify``-able string for a normalized LaTeX answer, or None when it uses anything else."""
  conv = _Converter(normalized)
  try:
    out = conv.expr()
  except (_Unsupported, RecursionError):
    return None
  if conv.i != len(normalized) or not out or not is_safe(out):
    return None
  # Words are text answers ("Evelyn"), not products of symbols that commute into anagrams.
  if re.search(r"[a-zA-Z]{3,}", re.sub(r"\\[a-zA-Z]+", "", normalized)):
    return None
  return out


# ------------------------------------------------------------------------------ equivalence

def _split_top_level(s: str) -> list[str]:
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(s):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(s[start:i])
      start = i + 1
  return parts + [s[start:]]


_WORD_RE = re.compile(r"[a-zA-Z]{3,}")


def _has_words(s: str) -> bool:
  """Whether a normalized answer has a run of 3+ letters outside LaTeX commands and environment
  names ("Evelyn", "odd"): words are compared as text, never as products of symbols."""
  return bool(_WORD_RE.search(re.sub(r"\\(?:begin|end)\{\w+\*?\}|\\[a-zA-Z]+", "", s)))


def _parts_equal(pa: list[str], pb: list[str], checker: SympyChecker) -> bool:
  return len(pa) == len(pb) and all(_equal_normalized(x, y, checker) for x, y in zip(pa, pb))


def _equal_normalized(a: str, b: str, checker: SympyChecker) -> bool:
  if a == b:
    return True
  da, db = _decimal(a), _decimal(b)
  if da is not None and db is not None:
    return da == db
  pa, pb = _split_top_level(a), _split_top_level(b)
  if len(pa) > 1 and _parts_equal(pa, pb, checker):
    return True
  for open_, close in ("()", "[]"):
    if a[:1] == b[:1] == open_ and a[-1:] == b[-1:] == close:  # tuples and intervals: in order
      inner_a, inner_b = _split_top_level(a[1:-1]), _split_top_level(b[1:-1])
      if len(inner_a) > 1 and _parts_equal(inner_a, inner_b, checker):
        return True
  if _has_words(a) or _has_words(b):
    return a.casefold() == b.casefold()
  if len(pa) == len(pb) == 1:
    ea, eb = latex_to_sympy(a), latex_to_sympy(b)
    if ea is not None and eb is not None:
      return checker.equal(ea, eb)
  return checker.verify_latex(a, b)


def math_equal(answer: str, reference: str, checker: SympyChecker | None = None) -> bool:
  """Whether two MATH answers (LaTeX, unboxed) are equivalent; see the module docstring. All
  the worker comparisons of one call share one deadline of ``checker.timeout_s``."""
  checker = checker or default_checker()
  with checker.deadline(checker.timeout_s):
    return _equal_normalized(normalize_math(answer), normalize_math(reference), checker)


def grade_math(completion: str, reference: Any, checker: SympyChecker | None = None) -> Verdict:
  """MATH: the completion's last boxed answer against the reference (a solution with a boxed
  answer, or the bare answer). When the reference lists several solutions ("3, 5") and the
  completion boxes them one by one ("x = \\boxed{3} or x = \\boxed{5}"), the boxes together are
  the answer (then ``extracted`` is "3, 5"). All the worker comparisons of one grade share one
  deadline of ``checker.timeout_s``: a hostile completion costs at most one timeout, not one per
  comparison it sets off."""
  checker = checker or default_checker()
  with checker.deadline(checker.timeout_s):
    return _grade_math(completion, reference, checker)


def _grade_math(completion: str, reference: Any, checker: SympyChecker) -> Verdict:
  ref = str(reference)
  gold = last_boxed(ref) if any(c in ref for c in _BOX_COMMANDS) else ref.strip()
  if not gold:
    raise ValueError(f"MATH reference={reference!r} holds no answer")
  found = extract_math_answer(completion)
  if found is None:
    return Verdict(correct=False, parsed=False, extracted=None)
  if math_equal(found, gold, checker):
    return Verdict(correct=True, parsed=True, extracted=found)
  boxes = boxed_answers(completion)
  if (len(boxes) > 1 and all(b and b.strip() for b in boxes)
      and len(_split_top_level(normalize_math(gold))) == len(boxes)):
    joined = ", ".join(b.strip() for b in boxes)
    if math_equal(joined, gold, checker):
      return Verdict(correct=True, parsed=True, extracted=joined)
  return Verdict(correct=False, parsed=True, extracted=found)


math_reward = grader_reward(grade_math, name="math")
