"""Tasks: how to load a benchmark, prompt for it, and check an answer -- and their registry.

A ``Task`` bundles a loader (returning examples ``{"id", "question", "answer", ...}``), the
prompt template (instruction + 0..k exemplars from a fixed list, rendered as a chat with
``render_chat`` or as plain text), an answer extractor (for voting) and a grader
``grader(completion, reference) -> Verdict`` from ``selfimprove_jax.verifiers``: GSM8K strict,
MATH (last box, then sympy equivalence), ProntoQA, MMLU letter, MBPP asserts in the sandbox, exact
match, generated arithmetic (the number a reader takes). Any field can be replaced per call:
``get_task("gsm8k", grader=grade_gsm8k_flexible)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from selfimprove_jax.data import arithmetic
from selfimprove_jax.data import loaders
from selfimprove_jax.data import synthetic
from selfimprove_jax.data.records import Example
from selfimprove_jax.tokenizer.chat import render_chat
from selfimprove_jax.tokenizer.template import ChatTemplate
from selfimprove_jax.verifiers import code, graders, math_answers
from selfimprove_jax.verifiers.base import Verdict


@dataclasses.dataclass(frozen=True)
class Shot:
  """One worked exemplar: the question text and the answer text the model should imitate."""
  question: str
  solution: str


@dataclasses.dataclass(frozen=True)
class Task:
  """A benchmark: loader, prompt template, extractor and grader.

  Attributes:
    name: registry name.
    load: ``load(...) -> list[Example]``; task-specific keyword arguments (paths, ``first_n``,
      ``numeric_only``, ``seed``, ...).
    extract: ``extract(completion) -> answer str or None`` (what majority voting compares).
    grader: ``grader(completion, reference) -> Verdict``; the reference is
      ``example[reference_field]``.
    exemplars: the fixed exemplar list; ``shots=k`` uses the first k.
    instruction: text put before the first question (in the first user turn of a chat).
    question_prefix, answer_prefix: plain-text framing of each question and answer.
  """
  name: str
  load: Callable[..., list[Example]]
  extract: Callable[[str], str | None]
  grader: Callable[[str, Any], Verdict]
  exemplars: tuple[Shot, ...] = ()
  instruction: str = ""
  question_prefix: str = "Question: "
  answer_prefix: str = "\nAnswer:"
  reference_field: str = "answer"

  def _shots(self, shots: int) -> tuple[Shot, ...]:
    if not 0 <= shots <= len(self.exemplars):
      raise ValueError(f"task {self.name!r}: shots={shots} not in [0, {len(self.exemplars)}] "
                       f"(the number of exemplars)")
    return self.exemplars[:shots]

  def messages(self, example: Example, shots: int = 0) -> list[dict[str, str]]:
    """The prompt as chat messages: alternating user/assistant exemplars, then the question.

    No system message (Gemma 2 rejects one): the instruction opens the first user turn.
    """
    turns: list[dict[str, str]] = []
    for shot in self._shots(shots):
      turns += [{"role": "user", "content": shot.question},
                {"role": "assistant", "content": shot.solution}]
    turns.append({"role": "user", "content": example["question"]})
    if self.instruction:
      turns[0] = {"role": "user", "content": f"{self.instruction}\n\n{turns[0]['content']}"}
    return turns

  def text(self, example: Example, shots: int = 0) -> str:
    """The prompt as plain text, ending with ``answer_prefix`` for the model to continue."""
    parts = [self.instruction + "\n\n"] if self.instruction else []
    for shot in self._shots(shots):
      parts.append(f"{self.question_prefix}{shot.question}{self.answer_prefix} "
                   f"{shot.solution}\n\n")
    parts.append(f"{self.question_prefix}{example['question']}{self.answer_prefix}")
    return "".join(parts)

  def render(self, example: Example, shots: int = 0, chat: str | ChatTemplate | None = None) -> str:
    """Plain text when ``chat`` is None, else the conversation rendered as a chat with the
    assistant header appended (``render_chat(chat, ..., add_generation_prompt=True)``): ``chat``
    is a family name (the built-in format) or a checkpoint's ``ChatTemplate``."""
    if chat is None:
      return self.text(example, shots)
    return render_chat(chat, self.messages(example, shots), add_generation_prompt=True)

  def grade(self, example: Example, completion: str) -> Verdict:
    return self.grader(completion, example[self.reference_field])

  def is_correct(self, example: Example, completion: str) -> bool:
    return self.grade(example, completion).correct


def grade_mbpp(completion: str, tests: Sequence[str]) -> Verdict:
  """Runs the completion's code and the asserts in the sandbox (default limits); parsed means
  the program ran to completion or failed an assert, not that it crashed on a syntax error."""
  [result] = code.run_mbpp([completion], [tests])
  program = code.extract_code(completion)
  return Verdict(correct=result.passed, parsed=bool(program.strip()),
                 extracted=program if program.strip() else None)


# --- Exemplars (written for this project) ----------------------------------------------------

_GSM8K_SHOTS = (
    Shot("A baker fills 4 trays with 12 muffins each and sells 30 muffins. How many muffins "
         "are left?",
         "The trays hold 4 * 12 = 48 muffins. After selling 30, 48 - 30 = 18 are left.\n#### 18"),
    Shot("Lena reads 15 pages on Monday and twice as many on Tuesday. How many pages did she "
         "read in the two days?",
         "On Tuesday she reads 2 * 15 = 30 pages. In total 15 + 30 = 45 pages.\n#### 45"),
    Shot("A ticket costs $7 and a drink costs $3. How much do 3 tickets and 2 drinks cost?",
         "Tickets cost 3 * 7 = 21 dollars and drinks 2 * 3 = 6 dollars, 21 + 6 = 27 in all."
         "\n#### 27"),
)
_MATH_SHOTS = (
    Shot("What is the sum of the roots of $x^2 - 7x + 10 = 0$?",
         "The polynomial factors as $(x-2)(x-5)$, so the roots are 2 and 5 and their sum is "
         "$\\boxed{7}$."),
    Shot("Compute $\\frac{3}{4} + \\frac{1}{6}$.",
         "With the common denominator 12, $\\frac{9}{12} + \\frac{2}{12} = "
         "\\boxed{\\frac{11}{12}}$."),
    Shot("How many positive divisors does 36 have?",
         "$36 = 2^2 \\cdot 3^2$, so it has $(2+1)(2+1) = \\boxed{9}$ positive divisors."),
)
_PRONTOQA_SHOTS = (
    Shot("Every florp is a zamble. Zambles are not red. Each blicket is a florp. Tam is a "
         "blicket.\nIs the following statement true or false? Tam is red.",
         "Tam is a blicket. Each blicket is a florp, so Tam is a florp. Every florp is a "
         "zamble, so Tam is a zamble. Zambles are not red, so Tam is not red.\n"
         "The answer is: False"),
    Shot("Wumpets are bright. Every dax is a wumpet. Rel is a dax.\nIs the following "
         "statement true or false? Rel is bright.",
         "Rel is a dax. Every dax is a wumpet, so Rel is a wumpet. Wumpets are bright, so "
         "Rel is bright.\nThe answer is: True"),
)
_MMLU_SHOTS = (
    Shot("Which organelle makes most of a eukaryotic cell's ATP?\nA. Ribosome\n"
         "B. Mitochondrion\nC. Golgi apparatus\nD. Lysosome",
         "ATP is made mainly by oxidative phosphorylation, which happens in the "
         "mitochondrion. The answer is B."),
    Shot("An object falls from rest without air resistance. How far does it fall in 2 s? "
         "(g = 10 m/s^2)\nA. 10 m\nB. 40 m\nC. 20 m\nD. 5 m",
         "The distance is g t^2 / 2 = 10 * 4 / 2 = 20 m. The answer is C."),
)
_ARITHMETIC_SHOTS = (
    Shot("What is 12 + 7?", "12 + 7 = 19. The answer is 19."),
    Shot("What is 25 + 16?", "25 + 16 = 41. The answer is 41."),
    Shot("What is 8 * 6?", "8 * 6 = 48. The answer is 48."),
)
_MBPP_SHOTS = (
    Shot("Write a function to return the largest of three numbers.\nYour code should pass "
         "these tests:\nassert max_of_three(1, 5, 3) == 5\nassert max_of_three(-1, -2, -3) == -1",
         "```python\ndef max_of_three(a, b, c):\n  return max(a, b, c)\n```"),
)


# --- Registry --------------------------------------------------------------------------------

def _gsm8k() -> Task:
  return Task("gsm8k", loaders.load_gsm8k, graders.extract_gsm8k_strict, graders.grade_gsm8k,
              _GSM8K_SHOTS,
              instruction="Solve the problem step by step. End with the final answer on its "
                          "own line as '#### <number>'.")


def _math() -> Task:
  return Task("math", loaders.load_math, math_answers.extract_math_answer, math_answers.grade_math,
              _MATH_SHOTS, instruction="Solve the problem. Put the final answer in \\boxed{}.",
              question_prefix="Problem: ", answer_prefix="\nSolution:")


def _prontoqa() -> Task:
  return Task("prontoqa", loaders.load_prontoqa, graders.extract_true_false,
              graders.grade_prontoqa, _PRONTOQA_SHOTS,
              instruction="Reason from the facts step by step, then end with 'The answer is: "
                          "True' or 'The answer is: False'.")


def _mmlu() -> Task:
  return Task("mmlu", loaders.load_mmlu, graders.extract_choice, graders.grade_mmlu, _MMLU_SHOTS,
              instruction="Answer the multiple-choice question. Explain briefly, then end "
                          "with 'The answer is X.' where X is the letter of your choice.")


def _mbpp() -> Task:
  return Task("mbpp", loaders.load_mbpp, code.extract_code, grade_mbpp, _MBPP_SHOTS,
              instruction="Write a Python function that solves the task. Reply with the code "
                          "in one ```python block.", reference_field="test_list")


def _arithmetic() -> Task:
  # The answer a reader takes: after the last "answer is", else the last number.
  return Task("arithmetic", arithmetic.load_arithmetic, graders.extract_gsm8k_flexible,
              graders.grade_gsm8k_flexible, _ARITHMETIC_SHOTS)


def _jsonl() -> Task:
  return Task("jsonl", loaders.load_jsonl, str.strip, graders.grade_exact)


def _synthetic_addition() -> Task:
  def load(n: int, *, seed: int,
           config: synthetic.AdditionConfig = synthetic.AdditionConfig(),
           start: int = 0) -> list[Example]:
    return synthetic.make_examples(config, n, seed=seed, start=start)
  return Task("synthetic_addition", load, synthetic.extract_answer, synthetic.grade,
              question_prefix="", answer_prefix="")


_FACTORIES: Mapping[str, Callable[[], Task]] = MappingProxyType({
    "gsm8k": _gsm8k,
    "math": _math,
    "prontoqa": _prontoqa,
    "mmlu": _mmlu,
    "mbpp": _mbpp,
    "jsonl": _jsonl,
    "arithmetic": _arithmetic,
    "synthetic_addition": _synthetic_addition,
})
TASK_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def get_task(name: str, **overrides: Any) -> Task:
  """The registered task ``name``, with any ``Task`` field replaced (e.g. ``grader=...``).

  Raises:
    ValueError: unknown task name or field (the valid ones are listed).
  """
  if name not in _FACTORIES:
    raise ValueError(f"unknown task {name!r}; registered: {TASK_NAMES}")
  fields = {f.name for f in dataclasses.fields(Task)} - {"name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"get_task({name!r}): unknown field(s) {unknown}; valid: {sorted(fields)}")
  task = _FACTORIES[name]()
  if "exemplars" in overrides:
    overrides["exemplars"] = tuple(_as_shot(s) for s in overrides["exemplars"])
  return dataclasses.replace(task, **overrides)


def _as_shot(shot: Shot | Sequence[str]) -> Shot:
  if isinstance(shot, Shot):
    return shot
  question, solution = shot
  return Shot(question, solution)
