"""MBPP asserts judged on the host: the program computes its calls' values, the host compares.

Sandbox runs use the real sandbox; the splitting, the host evaluator and the value codec are also
checked on their own, without a sandbox.
"""
import ast
import json
import math
import textwrap

import pytest

from selfimprove_jax import verifiers as v
from selfimprove_jax.verifiers import _code_checks as checks
from selfimprove_jax.verifiers import _code_eval
from selfimprove_jax.verifiers import _sandbox_prelude as prelude

CFG = v.SandboxConfig(timeout_s=5, memory_bytes=256 << 20)
# Distinct ints whose hashes are all 0 (hash(n) is n mod 2**61 - 1): sets and dicts of them take
# quadratic time to build.
COLLIDING = [k * (2 ** 61 - 1) for k in range(1, 200)]

# (tests, right, wrong): one assert shape each that the host judges itself.
SHAPES = [
    (["assert math.isclose(area(2), 12.566, rel_tol=1e-3)"],
     "import math\ndef area(r):\n  return math.pi * r * r", "def area(r):\n  return 3 * r * r"),
    (["assert set(common([1, 2, 3], [3, 2])) == set((2, 3))"],
     "def common(a, b):\n  return list(set(a) & set(b))", "def common(a, b):\n  return a"),
    (["assert sorted(pairs(2), key=lambda p: -p[1]) == [(0, 1), (0, 0)]"],
     "def pairs(n):\n  return [(0, 0), (0, 1)]", "def pairs(n):\n  return [(0, 0)]"),
    (["assert abs(mean([1, 2]) - 1.5) < 1e-9"],
     "def mean(xs):\n  return sum(xs) / len(xs)", "def mean(xs):\n  return 1"),
    (["assert [square(i) for i in range(4)] == [0, 1, 4, 9]"],
     "def square(x):\n  return x * x", "def square(x):\n  return x + x"),
    (["assert counts('abca') == {'a': 2, 'b': 1, 'c': 1}"],
     "from collections import Counter\ndef counts(s):\n  return Counter(s)",
     "def counts(s):\n  return dict.fromkeys(s, 1)"),
    (["assert point(1, 2) == (1, 2)", "assert isinstance(point(0, 0), tuple)"],
     "from collections import namedtuple\nP = namedtuple('P', 'x y')\ndef point(x, y):\n"
     "  return P(x, y)", "def point(x, y):\n  return [x, y]"),
    (["assert not is_even(3)", "assert is_even(4)", "assert is_even(0) is True"],
     "def is_even(n):\n  return n % 2 == 0", "def is_even(n):\n  return n % 2"),
    (["assert biggest([]) == float('-inf')", "assert biggest([2, 5]) == 5"],
     "def biggest(xs):\n  return max(xs, default=float('-inf'))",
     "def biggest(xs):\n  return max(xs, default=0)"),
    (["assert split_bytes(b'ab') == [b'a', b'b'] and len(split_bytes(b'')) == 0"],
     "def split_bytes(b):\n  return [b[i:i+1] for i in range(len(b))]",
     "def split_bytes(b):\n  return list(b)"),
]


def test_assert_shapes_judged_on_the_host():
  completions, tests = [], []
  for asserts, right, wrong in SHAPES:
    completions += [right, wrong]
    tests += [asserts, asserts]
  got = v.mbpp_reward(CFG)(["p"] * len(completions), completions, test_list=tests)
  assert got == [1.0, 0.0] * len(SHAPES)


@pytest.mark.parametrize("test", [
    "assert all(f(i) == i for i in range(3))",      # a comparison inside the program's part
    "assert check(f(1), [1])",                      # the outer call is the setup code's
    "x = f(1)\nassert x == 1",                      # a statement other than assert
    "assert f(1) ==",                               # does not parse
    "assert max([1, 2]) == 2",                      # no program call (a builtin's name): constant
    "assert pow(2, 3) == 8 and f(1) == 1",          # the same, for one of its comparisons
])
def test_tests_that_cannot_be_split_safely_are_unjudged(test):
  setup = "def check(a, b):\n  return a == b"
  [result] = v.run_mbpp(["def f(x):\n  return x"], [[test]], [setup], CFG)
  assert (result.passed, result.status, result.run) == (False, "unjudged", None)
  assert v.mbpp_reward(CFG)(["p"], ["def f(x):\n  return x"], test_list=[[test]],
                            test_setup_code=[setup]) == [None]


def test_expected_sides_that_need_code_run_without_the_program():
  # The expected values come from a separate run of the setup code alone (and stdlib imports),
  # so a program that rebinds K or patches math.factorial changes only its own side.
  tests = [["assert g() == K", "assert fact(5) == math.factorial(5)"]] * 3
  right = "import math\ndef g():\n  return 7\ndef fact(n):\n  return math.factorial(n)"
  rebinds = "import math\nK = 0\nmath.factorial = lambda n: 0\ndef g():\n  return 0\n" \
            "def fact(n):\n  return 0"
  wrong = "def g():\n  return K + 1\ndef fact(n):\n  return n"
  got = v.mbpp_reward(CFG)(["p"] * 3, [right, rebinds, wrong], test_list=tests,
                           test_setup_code=["K = 7"] * 3)
  assert got == [1.0, 0.0, 0.0]


def test_the_program_never_sees_an_expected_value():
  # It reads its files, its command line and every string held in a container of its process;
  # the needle is built after the search so that the search does not find itself.
  spy = textwrap.dedent("""
      import gc, os
      seen = [open(n, errors="replace").read() for n in os.listdir(".")]
      seen.append(open("/proc/self/cmdline", "rb").read().decode(errors="replace"))
      for o in gc.get_objects():
        items = list(o.items()) if isinstance(o, dict) else o if type(o) in (list, tuple) else ()
        seen += [str(x) for x in items if isinstance(x, (str, tuple))]
      text = "".join(seen)
      print(str(987654320 + 1) in text, str(12344 + 1) in text)
      def f(x):
        return x
      """)
  [result] = v.run_mbpp([spy], [["assert f(12345) == 987654321"]], config=CFG)
  assert result.status == "failed" and result.run.stdout == "False True\n", result
  assert "f(12345) -> 12345" in result.detail


def test_a_failing_run_keeps_its_sandbox_status():
  [result] = v.run_mbpp(["def f():\n  while True:\n    pass"], [["assert f() == 1"]],
                        config=v.SandboxConfig(timeout_s=1))
  assert (result.passed, result.status) == (False, "timeout")


def test_split_names_the_program_leaves_and_the_host_structure():
  plan = checks.plan(["assert set(f(1)) == {1} and not g(2)",
                      "assert f(5) == math.factorial(5)"], setup_code="")
  assert plan.candidate == ("f(1)", "g(2)", "f(5)")
  assert (plan.trusted, plan.modules) == (("math.factorial(5)",), ("math",))
  assert [ast.unparse(c.expr) for c in plan.checks] == [
      "set(__c0) == {1} and (not __c1)", "__c2 == __t0"]


@pytest.mark.parametrize("source,env", [
    ("'x' * __c0", {"__c0": 10 ** 9}),              # a repetition past the size guard
    ("__c0 ** 10 ** 6", {"__c0": 3}),               # a power past the size guard
    ("list(range(__c0))", {"__c0": 10 ** 12}),      # a range past the size guard
    ("sum(__c0, [])", {"__c0": [[1]] * 10}),        # sum of lists (quadratic): numbers only
    ("'%0999999999d' % __c0", {"__c0": 1}),         # string formatting
    ("[(a, b) for a in __c0 for b in __c0]", {"__c0": list(range(2000))}),  # the step budget
    ("divmod(__c0, __c0 - 1)", {"__c0": 1 << 200_000}),  # an int past the size guard of // and %
    ("set(__c0)", {"__c0": COLLIDING}),             # a set of equal hashes (quadratic)
    ("{x: 1 for x in __c0}", {"__c0": COLLIDING}),
    ("dict(zip(__c0, __c0))", {"__c0": COLLIDING}),
])
def test_the_host_evaluator_refuses_unbounded_work(source, env):
  expr = ast.parse(source, mode="eval").body
  with pytest.raises((ValueError, TypeError, RuntimeError)):
    _code_eval.host_eval(expr, env)


def test_the_value_codec_round_trips_plain_data_only():
  class Int(int):
    def __eq__(self, other):
      return True
    __hash__ = int.__hash__
  value = [None, True, Int(3), 2 ** 100, -1.5, math.inf, 1 + 2j, "é\ud800", b"\x00",
           bytearray(b"x"), (1, (2,)), {1: {"a": frozenset({3})}}, {4}]
  decoded = prelude.decode(json.loads(json.dumps(prelude.encode(value))))
  assert decoded[:2] + decoded[3:] == value[:2] + value[3:] and type(decoded[2]) is int
  deep = []
  for _ in range(prelude.MAX_DEPTH + 1):
    deep = [deep]
  for bad in (object(), iter([]), lambda: 1, range(3), deep):
    with pytest.raises((TypeError, ValueError)):
      prelude.encode(bad)
  colliding = [["i", hex(n)] for n in COLLIDING]
  for garbage in (5, "s", ["i", 5], ["zz", []], ["set", [["l", []]]], ["d", [[1]]],
                  ["set", colliding], ["fs", colliding], ["d", [[k, None] for k in colliding]]):
    with pytest.raises((TypeError, ValueError)):
      prelude.decode(garbage)


def test_a_failing_value_too_big_to_print_fails_its_row_only():
  # repr() of an int past sys.get_int_max_str_digits() raises; the detail must not.
  got = v.run_mbpp(["def f(x):\n  return [2 ** 15000 + 1]", "def f(x):\n  return [x]"],
                   [["assert f(1) == [1]"]] * 2, config=CFG)
  assert [(r.passed, r.status) for r in got] == [(False, "failed"), (True, "passed")]
  assert "f(1) -> [<int of 15001 bits>]" in got[0].detail
