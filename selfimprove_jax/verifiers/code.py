"""MBPP-style code rewards: the completion's code runs in the sandbox, its asserts are judged here.

The program is never shown its tests: each assert is split on the host (``_code_checks``) into
the calls of the program's functions, which the sandbox evaluates after the completion's code
(``sandbox.evaluate``), and the rest (the expected values, the comparison), which the host
evaluates on the returned plain data. So a completion passes only if its values compare equal to
the expected ones by Python's own rules for plain data; patching the runner, exiting early,
reading the tests from disk or memory, or an object whose ``__eq__`` is always true gets it
nothing. Expected sides that are not literals or builtins (``math.factorial(5)``, a name from the
task's setup code) are evaluated in a second sandbox run of the setup code alone, once per
distinct test list in a batch. A test list that cannot be split safely (see ``_code_checks``) is
"unjudged": ``mbpp_reward`` scores it None, never a pass.

What still leaks: the setup code and the program's leaves (the inputs) are in the program's work
directory; a dataset file holding the tests is readable if it is world-readable (see
``sandbox``); without root, a program can read the work directory of a concurrent run (a trusted
run's leaves included, though not their values).
"""
from __future__ import annotations

import dataclasses
import re
import reprlib
from collections.abc import Sequence
from typing import Any

from selfimprove_jax.verifiers import _code_checks as checks
from selfimprove_jax.verifiers._code_eval import host_eval, leaf_names
from selfimprove_jax.verifiers.base import RewardFn, check_batch
from selfimprove_jax.verifiers.sandbox import SandboxConfig, SandboxResult, evaluate, map_runs

_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.S | re.I)
_MBPP_MARKERS_RE = re.compile(r"\[BEGIN\](.*?)(?:\[DONE\]|$)", re.S)


class _ShortRepr(reprlib.Repr):
  """reprlib's short repr, but an int too long for ``repr`` (past the interpreter's limit on
  int-to-str digits, which raises) is shown by its size."""

  def repr_int(self, x, level):
    try:
      return super().repr_int(x, level)
    except ValueError:
      return f"<int of {x.bit_length()} bits>"


_REPR = _ShortRepr()
_REPR.maxstring, _REPR.maxother = 80, 80


def extract_code(completion: str) -> str:
  """The code in a completion: the first fenced block (```python or bare ```), else the text
  between MBPP's [BEGIN] and [DONE] markers, else the whole completion."""
  m = _FENCE_RE.search(completion)
  if m:
    return m.group(1)
  m = _MBPP_MARKERS_RE.search(completion)
  return m.group(1).strip("\n'\" ") if m else completion


def mbpp_program(code: str, tests: Sequence[str], setup_code: str = "") -> str:
  """Setup code, the solution, then every assert in order, as one program: how MBPP states a
  task. Not how rewards are judged (a program that sees its asserts can fake passing them)."""
  if isinstance(tests, str) or not tests:
    raise ValueError(f"mbpp_program: tests={tests!r} must be a non-empty list of assert lines")
  return "\n\n".join(part for part in (setup_code, code, "\n".join(tests)) if part) + "\n"


@dataclasses.dataclass(frozen=True)
class CodeResult:
  """Verdict on one completion.

  passed: every assert held, judged on the host.
  status: "passed", "failed" (an assert is false or raised), "unjudged" (the tests cannot be
    judged safely; see ``_code_checks``) or the sandbox status that ended the run early
    ("timeout", "memory", ...).
  detail: the failing assert and the program's values, or why the run ended, in words.
  run: the sandbox run of the completion (None when unjudged).
  """
  passed: bool
  status: str
  detail: str
  run: SandboxResult | None


def _plan(tests: Sequence[str], setup: str) -> checks.Plan | str:
  if isinstance(tests, str) or not tests:
    raise ValueError(f"run_mbpp: tests={tests!r} must be a non-empty list of assert lines")
  try:
    return checks.plan(list(tests), setup)
  except (checks.Unjudged, SyntaxError) as e:
    return f"{type(e).__name__}: {e}"


def _judge(plan: checks.Plan, run: SandboxResult, trusted: SandboxResult | None) -> CodeResult:
  if trusted is not None and not trusted.passed:
    return CodeResult(False, "unjudged", f"the tests' expected side failed: {trusted.detail}", run)
  env = {f"__t{k}": v for k, v in enumerate(trusted.values if trusted else ())}
  env.update({f"__c{k}": v for k, v in enumerate(run.values)})
  for check in plan.checks:
    names = leaf_names(check.expr)
    if not all(n in env for n in names):
      return CodeResult(False, "failed" if run.status == "passed" else run.status,
                        f"{check.source}: not reached ({run.detail})", run)
    try:
      holds = bool(host_eval(check.expr, env))
      why = "is false"
    except Exception as e:  # pylint: disable=broad-except
      holds, why = False, f"raised {type(e).__name__}: {e}"
    if not holds:
      got = ", ".join(f"{plan.candidate[int(n[3:])]} -> {_REPR.repr(env[n])}"
                      for n in names if n.startswith("__c"))
      return CodeResult(False, "failed", f"{check.source} {why} (the program's values: {got})", run)
  if run.status != "passed":
    return CodeResult(False, run.status, run.detail, run)
  return CodeResult(True, "passed", "", run)


def run_mbpp(completions: Sequence[str], test_lists: Sequence[Sequence[str]],
             setup_codes: Sequence[str] | None = None, config: SandboxConfig = SandboxConfig(),
             *, max_workers: int = 2) -> list[CodeResult]:
  """Judges each completion's code against its tests (sandbox runs in parallel); see the module
  docstring. The setup code runs before the completion's code, in the same namespace."""
  setup_codes = [s or "" for s in (setup_codes or [""] * len(completions))]
  plans: dict[tuple, checks.Plan | str] = {}
  rows = []
  for tests, setup in zip(test_lists, setup_codes):
    key = (tuple(tests) if not isinstance(tests, str) else tests, setup)
    if key not in plans:
      plans[key] = _plan(tests, setup)
    rows.append(plans[key])
  trusted_jobs = sorted({(setup, p.trusted, p.modules) for (_, setup), p in plans.items()
                         if isinstance(p, checks.Plan) and p.trusted})
  candidate_jobs = [(i, setup) for i, (p, setup) in enumerate(zip(rows, setup_codes))
                    if isinstance(p, checks.Plan)]

  def job(item):
    if item[0] == "trusted":
      setup, leaves, modules = item[1]
      module = "\n".join([setup, *(f"import {m}" for m in modules)])
      return evaluate(module, [("eval", leaf) for leaf in leaves], config)
    i, setup = item[1]
    code = "\n\n".join(part for part in (setup, extract_code(completions[i])) if part) + "\n"
    return evaluate(code, [("eval", leaf) for leaf in rows[i].candidate], config)

  results = map_runs(job, [("trusted", t) for t in trusted_jobs] +
                     [("candidate", c) for c in candidate_jobs], max_workers=max_workers)
  trusted_runs = dict(zip(trusted_jobs, results[:len(trusted_jobs)]))
  candidate_runs = dict(zip((i for i, _ in candidate_jobs), results[len(trusted_jobs):]))
  out = []
  for i, (plan, setup) in enumerate(zip(rows, setup_codes)):
    if isinstance(plan, str):
      out.append(CodeResult(False, "unjudged", plan, None))
      continue
    trusted = trusted_runs.get((setup, plan.trusted, plan.modules)) if plan.trusted else None
    out.append(_judge(plan, candidate_runs[i], trusted))
  return out


def mbpp_reward(config: SandboxConfig = SandboxConfig(), *, max_workers: int = 2,
                tests_column: str = "test_list", setup_column: str = "test_setup_code"
                ) -> RewardFn:
  """Reward function: 1.0 when the completion's code passes all of its row's asserts, else 0.0
  (any failure, timeout or limit). None for rows whose ``tests_column`` entry is None and for
  rows whose tests cannot be judged safely (see the module docstring)."""

  def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
    if tests_column not in columns:
      raise ValueError(f"mbpp_reward: needs the column {tests_column!r}; got {sorted(columns)}")
    tests = columns[tests_column]
    setups = columns.get(setup_column) or [""] * len(completions)
    check_batch("mbpp_reward", prompts, completions, **{tests_column: tests, setup_column: setups})
    rows = [i for i, t in enumerate(tests) if t is not None]
    results = run_mbpp([completions[i] for i in rows], [tests[i] for i in rows],
                       [setups[i] for i in rows], config, max_workers=max_workers)
    scores: list[float | None] = [None] * len(completions)
    for i, result in zip(rows, results):
      scores[i] = None if result.status == "unjudged" else float(result.passed)
    return scores

  reward.__name__ = "mbpp_reward"
  return reward
