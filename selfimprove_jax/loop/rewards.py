"""The rewards ``score.reward`` names: one function per reward, registered under its name.

A reward maps the rows of one batch (graded and scored under the base model) to one float per row,
or None for "no reward" (never selected; 0 in online RL). Add one with::

    @rewards.register("shortest")
    def shortest(inputs: rewards.RewardInputs) -> list[float | None]:
      return [-float(row["length"]) for row in inputs.rows]

and set ``--config.score.reward=shortest``; the config check takes its names from ``REWARDS``.
Rewards that need a model take it from ``inputs`` (``scores``, ``judge_model``), so this module
knows nothing of the loop that calls it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from selfimprove_jax import scoring
from selfimprove_jax.loop.registry import Registry
from selfimprove_jax.verifiers import self_reward, voting
from selfimprove_jax.verifiers.judge import RubricJudge, YesNoJudge

MODELS = ("base", "current")


@dataclasses.dataclass(frozen=True)
class RewardInputs:
  """What a reward sees.

  rows: the batch's rows, with their ``tables.GENERATED`` columns and the gold verdict
    (``prompt_id``, ``completion``, ``tokens``, ``length``, ``extracted``, ``correct``, ...).
  prompts: each row's rendered prompt text.
  config: the run's config; ``score.*`` holds the reward's options (``reward_model``, ``judge``).
  scores: ``scores(which)``, which in MODELS: ``scoring.Scores`` (NumPy, one entry per row) of
    every completion under that model, computed on call.
  judge_model: ``judge_model(which)``: (model, params in the sampling layout, tokenizer).
  """

  rows: Sequence[dict]
  prompts: Sequence[str]
  config: ml_collections.ConfigDict
  scores: Callable[[str], scoring.Scores]
  judge_model: Callable[[str], tuple[Any, Any, Any]]


RewardFn = Callable[[RewardInputs], Sequence[float | None]]
REWARDS: Registry[RewardFn] = Registry("score.reward")


def register(name: str) -> Callable[[RewardFn], RewardFn]:
  """``@register(name)``: makes ``name`` a value of ``score.reward``."""
  return REWARDS.decorator(name, lambda fn: fn)


def compute(inputs: RewardInputs) -> list[float | None]:
  """The configured reward (``config.score.reward``) of every row."""
  out = list(REWARDS.get(inputs.config.score.reward)(inputs))
  if len(out) != len(inputs.rows):
    raise ValueError(f"reward {inputs.config.score.reward!r} returned {len(out)} values for "
                     f"{len(inputs.rows)} rows")
  return out


def _self_reward(kind: str) -> RewardFn:
  """A self-reward (``verifiers.self_reward``) under ``score.reward_model``."""
  def reward(inputs: RewardInputs) -> list[float | None]:
    return self_reward.rewards_from_scores(inputs.scores(inputs.config.score.reward_model), kind)
  reward.__name__ = kind
  return reward


for _kind in self_reward.SELF_REWARD_KINDS:  # logprob, mean_logprob, self_certainty
  REWARDS.add(_kind, _self_reward(_kind))


@register("correct")
def correct(inputs: RewardInputs) -> list[float]:
  """1 for a completion the task's grader accepts, else 0."""
  return [float(row["correct"]) for row in inputs.rows]


@register("majority")
def majority(inputs: RewardInputs) -> list[float]:
  """1 when the extracted answer is its prompt's most common one (``voting.majority_vote``)."""
  votes: dict[Any, list] = {}
  for row in inputs.rows:
    votes.setdefault(row["prompt_id"], []).append(row["extracted"])
  winner = {pid: voting.majority_vote(answers) for pid, answers in votes.items()}
  return [float(row["extracted"] is not None and row["extracted"] == winner[row["prompt_id"]])
          for row in inputs.rows]


@register("judge")
def judge(inputs: RewardInputs) -> list[float | None]:
  """An LLM judge (``score.judge``): the base or current model asked for a yes/no or a score."""
  c = inputs.config.score
  model, params, tokenizer = inputs.judge_model(c.reward_model)
  template, labels = c.judge.template, tuple(c.judge.labels)
  if inputs.config.task.name == "synthetic_addition" and not template:
    # The character vocabulary has no words: judge "<question><answer> >" by digit labels.
    template = "{prompt}{completion} >"
    labels = labels or (("1", "0") if c.judge.kind == "yes_no" else tuple("012345"))
  kwargs: dict[str, Any] = {"template": template} if template else {}
  if c.judge.kind == "yes_no":
    if labels:
      kwargs.update(yes=labels[0], no=labels[1])
    fn = YesNoJudge(model, params, tokenizer, **kwargs)
  else:
    if labels:
      kwargs["scores"] = {label: float(label.strip()) for label in labels}
    fn = RubricJudge(model, params, tokenizer, **kwargs)
  return fn(list(inputs.prompts), [row["completion"] for row in inputs.rows])
