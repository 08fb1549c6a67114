"""The MATH grader against tests/fixtures/math_grading_table.jsonl: (style, gold, prediction,
expected) rows whose verdicts are what a careful human grader of MATH would say ("why" explains
the less obvious ones; "batch": "held_out" marks rows written after the grader was tuned).

benchmarks/math_grading.py prints the same table's accuracy for the previous grader and for plain
math-verify; here the shipped grader must agree with every row.
"""
import collections
import json
import pathlib
import threading

import pytest

from selfimprove_jax import verifiers as v
from selfimprove_jax.verifiers import sympy_check

TABLE = pathlib.Path(__file__).parent / "fixtures" / "math_grading_table.jsonl"
ROWS = [json.loads(line) for line in TABLE.read_text(encoding="utf-8").splitlines()]


def test_table_has_enough_rows_both_verdicts_and_styles():
  verdicts = collections.Counter(r["expected"] for r in ROWS)
  styles = collections.Counter(r["style"] for r in ROWS)
  assert len(ROWS) >= 200
  assert 0.35 <= verdicts[True] / len(ROWS) <= 0.65, verdicts
  assert len(styles) >= 25, styles
  assert all(isinstance(r["gold"], str) and isinstance(r["prediction"], str) for r in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[f"{i}-{r['style']}" for i, r in enumerate(ROWS)])
def test_grade_math_agrees_with_table(row):
  verdict = v.grade_math(row["prediction"], row["gold"])
  assert verdict.correct == row["expected"], (row, verdict)


def test_solutions_boxed_one_by_one_are_the_answer_together():
  completion = "So $x = \\boxed{3}$ or $x = \\boxed{5}$."
  assert v.grade_math(completion, "3, 5") == v.Verdict(True, True, "3, 5")
  assert v.grade_math(completion, "3, 7") == v.Verdict(False, True, "5")
  assert v.grade_math("First \\boxed{3}; corrected: \\boxed{4}", "4") == v.Verdict(True, True, "4")


def test_math_verify_verdicts_hold_off_the_main_thread():
  # math-verify's own timeouts are signal alarms, which refuse to run off the main thread; the
  # grader runs it in the worker process, so a thread pool gets the same verdicts.
  results = {}

  def grade():
    results["set"] = v.grade_math("\\boxed{\\{5, 3\\}}", "3, 5").correct
    results["matrix"] = v.grade_math(
        "\\boxed{\\begin{bmatrix} 2 & 0 \\\\ 0 & 2 \\end{bmatrix}}",
        "\\begin{pmatrix} 2 & 0 \\\\ 0 & 2 \\end{pmatrix}").correct

  thread = threading.Thread(target=grade)
  thread.start()
  thread.join()
  assert results == {"set": True, "matrix": True}


def test_verify_latex_overrun_is_killed_and_counts_as_unequal():
  checker = sympy_check.SympyChecker(timeout_s=1.0)
  try:
    assert not checker.verify_latex("10^{10^{10}}", "1")
    assert checker.timeouts == 1
    assert checker.verify_latex("5, 3", "3, 5")  # a fresh worker after the kill
  finally:
    checker.close()


@pytest.mark.parametrize("answer,want", [
    ("0.\\overline{6}", "\\frac{2}{3}"), ("1.1\\overline{6}", "\\frac{7}{6}"),
    ("2\\frac{1}{2}", "\\frac{5}{2}"), ("-1\\tfrac34", "-\\frac{7}{4}"),
    ("sqrt(3)/3", "\\sqrt{3}/3"), ("pi/2", "\\pi/2"), ("1 \\text{ and } 2", "1,2"),
    ("24\\,\\text{m}", "24"), ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
                               "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\u22123", "-3"), ("1\\,234\\,567", "1234567"), ("40 \\text{ percent}", "40"),
])
def test_normalize_math_new_forms(answer, want):
  assert v.normalize_math(answer) == want


class _SilentChecker(sympy_check.SympyChecker):
  """A checker whose worker starts but never answers: every comparison overruns its timeout."""

  def _start(self):
    import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)


def test_grade_math_overruns_at_most_one_timeout():
  # A hostile completion that sends several comparisons to the worker (its two boxes are tried
  # alone, then joined and split into parts): the grade has one overall deadline, so one overrun
  # ends it instead of one per comparison.
  checker = _SilentChecker(timeout_s=0.2)
  try:
    hostile = "x = \\boxed{10^{10^{10}}} or x = \\boxed{10^{10^{11}}}"
    verdict = v.grade_math(hostile, "1, 2", checker)
    assert not verdict.correct and verdict.parsed
    assert checker.timeouts == 1
    assert not v.math_equal("10^{10^{10}}, 10^{10^{11}}", "(1, 2)", checker)
    assert checker.timeouts == 2
  finally:
    checker.close()


@pytest.mark.parametrize("where", ["no_history", "unknown_commit"])
def test_benchmark_previous_grader_says_when_git_history_is_missing(where, tmp_path, monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).parent.parent / "benchmarks" / "math_grading.py"
  spec = importlib.util.spec_from_file_location("math_grading_benchmark", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  if where == "no_history":
    monkeypatch.setattr(bench, "REPO", str(tmp_path))  # a copy of the tree without .git
  commit = "ac1da3e" if where == "no_history" else "0" * 40
  with pytest.raises(SystemExit, match=f"cannot read .*math_answers.py at {commit}.*--old-commit"):
    bench.previous_grader(commit)
