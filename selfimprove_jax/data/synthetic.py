"""Synthetic multi-operand addition with an explicit carry scratchpad: the CPU sharpening demo.

Format, for width W = ``max_digits`` and K = ``num_operands`` (operands zero-padded to W)::

  question  "0457+1389="
  target    " 7+9+0=16 5+8+1=14 4+3+1=08 0+1+0=01 >01846"   (then EOS)

Step j (least significant column first) reads "<K digits of column j>+<carry in>=<column sum
as two digits>"; the tens digit of the sum is the next step's carry. The answer after ``>`` is
the final carry followed by the units digits of the steps, most significant first: always
W + 1 digits (K <= 10 keeps every column sum below 100 and the final carry one digit).

Corruption (for the pretraining demonstrations), applied to a fraction ``corruption_rate`` of
examples, each decided by the example's own random stream:
  "random":     one uniformly chosen step writes a wrong sum (off by 1..``max_delta``); every
                later step carries on consistently from the written sum, so the final answer
                is off by exactly delta * 10**step -- always wrong, internally consistent.
  "drop_carry": the first step that receives a non-zero carry writes carry 0 instead (the same
                mistake every time: the negative control whose wrong trace becomes the mode).
                Problems without any carry stay correct, so the realised rate is lower.
  "carry_fork": the same wrong carry at the same step, but that step then writes a uniformly
                drawn wrong column sum (any value a column can take but the true one: 19 for
                two operands) and the later steps follow from it. The fork token is drop_carry's,
                but the wrong branch scatters over many rare traces, so at rate q > 1/2 greedy
                takes the wrong carry while the correct trace stays the sequence-level mode
                (mass ~1 - q against ~q / 19): the regime where best-of-N beats greedy.

A regime ``marker`` (one letter of ``MARKERS``) opens the question, so one model pretrained on a
mixture of regimes (``make_mixture``) keeps each regime's behaviour apart.

Example ``i`` of seed ``s`` depends only on (s, i, config), never on how many are generated.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from selfimprove_jax.data.records import Example
from selfimprove_jax.tokenizer.base import Tokenizer
from selfimprove_jax.verifiers.base import Verdict

CORRUPTIONS = ("random", "drop_carry", "carry_fork")
SPECIAL_PIECES = ("<pad>", "<bos>", "<eos>")
MARKERS = "abcdefgh"  # regime markers: the first character of a question when set
CHARS = "0123456789+= >" + MARKERS

_STEP = re.compile(r"(\d(?:\+\d)+)=(\d\d)")


@dataclasses.dataclass(frozen=True)
class AdditionConfig:
  """Difficulty and corruption knobs.

  Attributes:
    min_digits, max_digits: each operand has a uniformly drawn number of digits in this range
      (no leading zero), then is zero-padded to ``max_digits``.
    num_operands: how many numbers are added (the chain length), 2 to 10.
    corruption_rate: fraction of examples whose trace is corrupted, in [0, 1].
    corruption: one of ``CORRUPTIONS``.
    max_delta: largest error of a "random" corrupted column sum.
    marker: "" or one letter of ``MARKERS``, put before the question (regime mixtures).
  """
  min_digits: int = 3
  max_digits: int = 4
  num_operands: int = 2
  corruption_rate: float = 0.0
  corruption: str = "random"
  max_delta: int = 2
  marker: str = ""

  def __post_init__(self):
    if not 1 <= self.min_digits <= self.max_digits:
      raise ValueError(f"need 1 <= min_digits <= max_digits, got min_digits={self.min_digits}, "
                       f"max_digits={self.max_digits}")
    if not 2 <= self.num_operands <= 10:
      raise ValueError(f"num_operands must be in [2, 10], got {self.num_operands}")
    if not 0.0 <= self.corruption_rate <= 1.0:
      raise ValueError(f"corruption_rate must be in [0, 1], got {self.corruption_rate}")
    if self.corruption not in CORRUPTIONS:
      raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {self.corruption!r}")
    if self.max_delta < 1:
      raise ValueError(f"max_delta must be >= 1, got {self.max_delta}")
    if self.marker and (len(self.marker) != 1 or self.marker not in MARKERS):
      raise ValueError(f"marker must be '' or one letter of {MARKERS!r}, got {self.marker!r}")


def make_example(config: AdditionConfig, seed: int, index: int) -> Example:
  """Example ``index`` of stream ``seed``.

  Returns:
    ``{"id", "question", "answer", "target", "operands", "corrupted", "corrupted_step"}``:
    ``answer`` is the true sum (decimal, no padding); ``target`` the scratchpad and final
    answer the demonstration shows (wrong when corrupted); ``corrupted_step`` the index of the
    corrupted step, -1 when clean.
  """
  rng = np.random.default_rng([seed, index])
  operands = []
  for _ in range(config.num_operands):
    d = int(rng.integers(config.min_digits, config.max_digits + 1))
    operands.append(int(rng.integers(10 ** (d - 1) if d > 1 else 0, 10 ** d)))
  corrupt = bool(rng.random() < config.corruption_rate)
  target, step = _render(operands, config, rng if corrupt else None)
  width = config.max_digits
  return {"id": f"add/{seed}/{index}",
          "question": config.marker + "+".join(f"{x:0{width}d}" for x in operands) + "=",
          "answer": str(sum(operands)), "target": target, "operands": tuple(operands),
          "corrupted": step >= 0, "corrupted_step": step}


def make_examples(config: AdditionConfig, n: int, *, seed: int, start: int = 0) -> list[Example]:
  """Examples ``start .. start + n - 1`` of stream ``seed``."""
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  return [make_example(config, seed, i) for i in range(start, start + n)]


def make_mixture(configs: Sequence[AdditionConfig], n: int, *, seed: int,
                 start: int = 0) -> list[Example]:
  """Examples ``start .. start + n - 1`` of a mixture in equal shares: example ``i`` is example
  ``i`` of ``configs[i % len(configs)]`` (give each config its own ``marker``)."""
  if not configs:
    raise ValueError("make_mixture: configs is empty")
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  return [make_example(configs[i % len(configs)], seed, i) for i in range(start, start + n)]


def parse_regimes(spec: str, base: AdditionConfig = AdditionConfig()) -> dict[str, AdditionConfig]:
  """``"random:0.4,carry_fork:0.6,drop_carry:0.6"`` -> {corruption: ``base`` with that corruption,
  rate and the marker ``MARKERS[i]`` of its position}: the regimes of one mixed pretraining.

  Raises:
    ValueError: a malformed entry, an unknown or repeated corruption, a rate outside [0, 1], or
      more regimes than markers; the message quotes the entry.
  """
  regimes: dict[str, AdditionConfig] = {}
  entries = [e.strip() for e in spec.split(",") if e.strip()]
  if not entries or len(entries) > len(MARKERS):
    raise ValueError(f"regimes {spec!r}: need 1 to {len(MARKERS)} entries 'corruption:rate'")
  for i, entry in enumerate(entries):
    name, sep, rate = entry.partition(":")
    try:
      value = float(rate)
    except ValueError:
      value = None
    if not sep or value is None or name in regimes:
      raise ValueError(f"regimes {spec!r}: entry {entry!r} is not a new 'corruption:rate'")
    try:
      regimes[name] = dataclasses.replace(base, corruption=name, corruption_rate=value,
                                          marker=MARKERS[i])
    except ValueError as e:
      raise ValueError(f"regimes {spec!r}: entry {entry!r}: {e}") from None
  return regimes


def _render(operands: Sequence[int], config: AdditionConfig,
            rng: np.random.Generator | None) -> tuple[str, int]:
  """(target text, corrupted step or -1); ``rng`` None renders the correct trace."""
  width = config.max_digits
  columns = [[x // 10 ** j % 10 for x in operands] for j in range(width)]
  bad_step, delta = -1, 0
  if rng is not None and config.corruption == "random":
    bad_step = int(rng.integers(width))
  steps, units, carry = [], [], 0
  for j, digits in enumerate(columns):
    carry_in = carry
    fork = (rng is not None and config.corruption in ("drop_carry", "carry_fork")
            and bad_step < 0 and carry > 0)
    if fork:
      bad_step, carry_in = j, 0
    total = sum(digits) + carry_in
    if fork and config.corruption == "carry_fork":
      true_total = sum(digits) + carry
      total = int(rng.choice([v for v in range(9 * len(digits) + 2) if v != true_total]))
    if j == bad_step and config.corruption == "random":
      deltas = [d for d in range(-config.max_delta, config.max_delta + 1)
                if d != 0 and 0 <= total + d <= 99]
      delta = int(rng.choice(deltas))
      total += delta
    steps.append("+".join(map(str, digits)) + f"+{carry_in}={total:02d}")
    units.append(total % 10)
    carry = total // 10
  answer = str(carry) + "".join(map(str, reversed(units)))
  return " " + " ".join(steps) + " >" + answer, bad_step


# --- Grading and checking --------------------------------------------------------------------

def extract_answer(completion: str) -> str | None:
  """Digits after the last ``>``, leading zeros dropped (``"... >01846<eos>"`` -> ``"1846"``)."""
  found = re.findall(r">(\d+)", completion)
  return (found[-1].lstrip("0") or "0") if found else None


def grade(completion: str, gold: str) -> Verdict:
  """Exact grader: the completion's final answer equals the gold sum as an integer."""
  got = extract_answer(completion)
  return Verdict(correct=got is not None and int(got) == int(gold), parsed=got is not None,
                 extracted=got)


@dataclasses.dataclass(frozen=True)
class TraceCheck:
  """Result of ``check_trace``.

  Attributes:
    well_formed: the completion parses as W steps of K+1 terms followed by ``>answer``.
    bad_steps: indices of steps that misread a digit, carry in a value other than the previous
      step's carry out, or write a wrong sum.
    answer_consistent: the final answer is the one the written steps spell out.
    messages: one line per problem found.
  """
  well_formed: bool
  bad_steps: tuple[int, ...]
  answer_consistent: bool
  messages: tuple[str, ...]

  @property
  def valid(self) -> bool:
    return self.well_formed and not self.bad_steps and self.answer_consistent


def check_trace(question: str, completion: str) -> TraceCheck:
  """Checks every step of a scratchpad ``completion`` against the operands of ``question``.

  Special pieces (``<eos>``, ``<pad>``, ``<bos>``) in the completion are ignored.
  """
  m = re.fullmatch(rf"[{MARKERS}]?(\d+(?:\+\d+)+)=", question.strip())
  if m is None:
    return TraceCheck(False, (), False, (f"question {question!r} is not 'a+b+...='",))
  texts = m.group(1).split("+")
  operands, width = [int(t) for t in texts], max(len(t) for t in texts)
  for piece in SPECIAL_PIECES:
    completion = completion.replace(piece, "")
  body, sep, answer = completion.rpartition(">")
  matches = [_STEP.fullmatch(token) for token in body.split()]
  if (not sep or not answer.strip().isdigit() or len(matches) != width
      or not all(mt and mt.group(1).count("+") == len(operands) for mt in matches)):
    return TraceCheck(False, (), False,
                      (f"expected {width} steps of {len(operands) + 1} terms and '>answer', "
                       f"got {completion!r}",))
  steps = [mt.groups() for mt in matches]
  messages, bad, carry, units = [], [], 0, []
  for j, (terms, written) in enumerate(steps):
    values = [int(t) for t in terms.split("+")]
    digits, carry_in, total = values[:-1], values[-1], int(written)
    problems = []
    if digits != [x // 10 ** j % 10 for x in operands]:
      problems.append(f"digits {digits}")
    if carry_in != carry:
      problems.append(f"carry in {carry_in}, previous carry out {carry}")
    if total != sum(values):
      problems.append(f"sum written {total}, terms add to {sum(values)}")
    if problems:
      bad.append(j)
      messages.append(f"step {j}: " + "; ".join(problems))
    carry, units = total // 10, units + [total % 10]
  spelled = int(str(carry) + "".join(map(str, reversed(units))))
  consistent = int(answer.strip()) == spelled
  if not consistent:
    messages.append(f"answer {answer.strip()} differs from the steps' {spelled}")
  return TraceCheck(True, tuple(bad), consistent, tuple(messages))


# --- Character tokenizer ---------------------------------------------------------------------

class CharTokenizer(Tokenizer):
  """One id per character of ``CHARS``; ids 0/1/2 are ``<pad>``/``<bos>``/``<eos>``."""

  def __init__(self, chars: str = CHARS):
    if len(set(chars)) != len(chars):
      raise ValueError(f"CharTokenizer: repeated characters in {chars!r}")
    self._pieces = SPECIAL_PIECES + tuple(chars)
    self._ids = {p: i for i, p in enumerate(self._pieces)}
    super().__init__(bos_id=1, eos_id=2, pad_id=0)

  @property
  def vocab_size(self) -> int:
    return len(self._pieces)

  def _lookup(self, piece: str) -> int | None:
    return self._ids.get(piece)

  def _encode_raw(self, texts: list[str]) -> list[list[int]]:
    return [self._encode_one(t) for t in texts]

  def _encode_one(self, text: str) -> list[int]:
    ids, i = [], 0
    while i < len(text):
      special = next((p for p in SPECIAL_PIECES if text.startswith(p, i)), None)
      if special is not None:
        ids.append(self._ids[special])
        i += len(special)
        continue
      if text[i] not in self._ids:
        raise ValueError(f"CharTokenizer: character {text[i]!r} at position {i} of {text!r} "
                         f"is not in the vocabulary {''.join(self._pieces[3:])!r}")
      ids.append(self._ids[text[i]])
      i += 1
    return ids

  def _decode_raw(self, batch: list[list[int]], skip_special: bool) -> list[str]:
    n = len(SPECIAL_PIECES)
    return ["".join(self._pieces[i] for i in ids if not (skip_special and i < n))
            for ids in batch]


def encode_demonstration(tokenizer: Tokenizer, example: Example) -> tuple[list[int], list[int]]:
  """(prompt ids starting with BOS, target ids ending with EOS) of one demonstration."""
  return (tokenizer.encode(example["question"], add_bos=True),
          tokenizer.encode(example["target"], add_bos=False) + [tokenizer.eos_id])
