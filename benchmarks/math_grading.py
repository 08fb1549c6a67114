"""MATH answer grading: accuracy of three graders on tests/fixtures/math_grading_table.jsonl.

    python benchmarks/math_grading.py                    # ~15 s on 2 cores
    python benchmarks/math_grading.py --json R.json      # also the numbers and every miss

Every row is (style, gold, prediction, expected verdict); the prediction is a completion, the gold a
MATH/GSM8K answer (a few are whole solutions with a box). A grader is right on a row when its
verdict equals the expected one. The contestants:

  previous       ``grade_math`` as of ``--old-commit`` (hand-written normalization, then sympy),
                 read from git and run against today's sympy worker (its ``equal`` is unchanged).
  math-verify    math-verify 0.9.0 alone, as its README shows: ``verify(parse(gold),
                 parse(prediction))`` with the default extraction configs, on the main thread.
  mv gold boxed  the same with the gold wrapped as ``\\boxed{gold}`` (a bare gold answer like
                 "3, 5" is otherwise read as its last number).
  shipped        ``selfimprove_jax.verifiers.grade_math`` now.

Printed: a markdown table of accuracy per style and overall, false accepts / false rejects, and the
rows written after the shipped grader was tuned (``"batch": "held_out"``) on their own.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(REPO, "tests", "fixtures", "math_grading_table.jsonl")
OLD_COMMIT = "ac1da3e"  # the last commit before math-verify came in
sys.path.insert(0, REPO)


def load_rows(path: str = TABLE) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def previous_grader(commit: str):
  """``grade_math`` from ``math_answers.py`` at ``commit``, as a (gold, prediction) -> bool.

  Needs git and the repository's history (a shallow clone or an exported tree has neither that
  commit nor any): exits naming what is missing otherwise.
  """
  file = "selfimprove_jax/verifiers/math_answers.py"
  try:
    source = subprocess.run(["git", "-C", REPO, "show", f"{commit}:{file}"],
                            check=True, capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    detail = (e.stderr or "").strip() if isinstance(e, subprocess.CalledProcessError) else e
    raise SystemExit(f"cannot read {file} at {commit} from git in {REPO} ({detail}): the 'previous' grader "
                     f"needs the repository's history (not a shallow clone or an exported tree) "
                     f"holding that commit; pass --old-commit to pick another") from None
  module = types.ModuleType(f"math_answers_{commit}")
  code = compile(source, f"math_answers@{commit}", "exec")
  exec(code, module.__dict__)  # pylint: disable=exec-used
  return lambda gold, prediction: module.grade_math(prediction, gold).correct


def math_verify_grader(box_gold: bool):
  from math_verify import parse, verify  # pylint: disable=g-import-not-at-top

  def grade(gold: str, prediction: str) -> bool:
    if box_gold and "\\boxed" not in gold:
      gold = "\\boxed{" + gold + "}"
    return bool(verify(parse(gold), parse(prediction)))
  return grade


def shipped_grader():
  from selfimprove_jax.verifiers import grade_math  # pylint: disable=g-import-not-at-top
  return lambda gold, prediction: grade_math(prediction, gold).correct


def measure(rows: list[dict], graders: dict) -> dict:
  """Per grader: its verdict per row and the wall seconds of the whole table."""
  out = {}
  for name, grade in graders.items():
    start = time.perf_counter()
    verdicts = [grade(r["gold"], r["prediction"]) for r in rows]
    out[name] = {"verdicts": verdicts, "seconds": time.perf_counter() - start}
  return out


def table(rows: list[dict], results: dict) -> str:
  names = list(results)
  right = {n: [v == r["expected"] for v, r in zip(results[n]["verdicts"], rows)] for n in names}
  by_style = collections.defaultdict(list)
  for i, r in enumerate(rows):
    by_style[r["style"]].append(i)
  held = [i for i, r in enumerate(rows) if r.get("batch") == "held_out"]

  def line(label: str, idx: list[int]) -> str:
    cells = [f"{sum(right[n][i] for i in idx)}/{len(idx)}" for n in names]
    return f"| {label} | {len(idx)} | " + " | ".join(cells) + " |"

  lines = ["| style | rows | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
  lines += [line(style, idx) for style, idx in sorted(by_style.items())]
  everything = list(range(len(rows)))
  lines.append(line("**overall**", everything))
  lines.append("| **overall %** | {} | {} |".format(len(rows), " | ".join(
      f"{100 * sum(right[n]) / len(rows):.1f}%" for n in names)))
  lines.append(line("held-out batch", held))
  for label, expected in (("false accepts", False), ("false rejects", True)):
    cells = [str(sum(1 for v, r in zip(results[n]["verdicts"], rows)
                     if r["expected"] is expected and v != expected)) for n in names]
    lines.append(f"| {label} | {sum(r['expected'] is expected for r in rows)} | "
                 + " | ".join(cells) + " |")
  lines.append("| ms / row | | " + " | ".join(
      f"{1000 * results[n]['seconds'] / len(rows):.1f}" for n in names) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--old-commit", default=OLD_COMMIT, help="commit of the previous grader")
  parser.add_argument("--json", help="write the verdicts and every miss here")
  args = parser.parse_args()
  rows = load_rows()
  graders = {"previous": previous_grader(args.old_commit),
             "math-verify": math_verify_grader(box_gold=False),
             "mv gold boxed": math_verify_grader(box_gold=True),
             "shipped": shipped_grader()}
  results = measure(rows, graders)
  print(table(rows, results))
  if args.json:
    misses = {n: [dict(r, verdict=v) for v, r in zip(res["verdicts"], rows) if v != r["expected"]]
              for n, res in results.items()}
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"rows": len(rows), "seconds": {n: r["seconds"] for n, r in results.items()},
                 "misses": misses}, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
  main()
