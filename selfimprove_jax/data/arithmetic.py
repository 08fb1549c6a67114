"""Arithmetic word prompts generated on the fly: a task a small real instruct model partly solves.

  question  "What is 47 + 38?"      answer  "85"

Operands are drawn uniformly from [``min_value``, ``max_value``] and the operator from
``operators`` ("+", "-", "*"). Example ``i`` of seed ``s`` depends only on (s, i, the options), so
the first n examples are the same whatever n is, and train and held-out prompts drawn as one
list never overlap by construction (ids are distinct; a repeated question is possible and kept).
"""
from __future__ import annotations

import operator

import numpy as np

from selfimprove_jax.data.records import Example

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def load_arithmetic(n: int, *, seed: int, min_value: int = 10, max_value: int = 99,
                    operators: str = "+", start: int = 0) -> list[Example]:
  """Examples ``start`` .. ``start + n - 1`` of the stream of ``seed``.

  Raises:
    ValueError: an empty range, or an operator not in ``OPERATORS``.
  """
  if not min_value <= max_value:
    raise ValueError(f"arithmetic: min_value={min_value} > max_value={max_value}")
  unknown = sorted(set(operators) - set(OPERATORS))
  if not operators or unknown:
    raise ValueError(f"arithmetic: operators={operators!r}; each must be one of "
                     f"{''.join(OPERATORS)}")
  examples = []
  for i in range(start, start + n):
    rng = np.random.default_rng([seed, i])
    a, b = (int(x) for x in rng.integers(min_value, max_value + 1, 2))
    op = operators[int(rng.integers(len(operators)))]
    examples.append({"id": f"arithmetic-{seed}-{i}", "question": f"What is {a} {op} {b}?",
                     "answer": str(OPERATORS[op](a, b))})
  return examples
