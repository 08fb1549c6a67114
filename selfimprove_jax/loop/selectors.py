"""The selection rules ``select.kind`` names: which scored samples of a round become training data.

A rule maps the round's scored rows to a ``Selection`` (rows for SFT, or pairs for a pair loss),
built from the primitives of ``selfimprove_jax.select``. Add one with::

    @selectors.register("longest")
    def longest(x: selectors.SelectInputs) -> selectors.Selection:
      length_R = np.array([row["length"] for row in x.rows], float)
      return selectors.Selection(select.top_k(x.group_R, length_R, 1))

and set ``--config.select.kind=longest``; the config check takes its names from ``SELECTORS``.
``register``'s options declare what else a rule needs: ``pairs`` (it feeds a pair loss), ``check``
(config checks of its own), ``temperatures`` (it samples at several temperatures).

Legend: R rows of the round's table, S selected rows, Q pairs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import ml_collections
import numpy as np

from selfimprove_jax import select as sel
from selfimprove_jax.loop.registry import Registry, check, scheduled

DEDUPS = ("none", "exact", "answer")


@dataclasses.dataclass(frozen=True)
class SelectInputs:
  """The round's scored rows (``tables.ROUND_COLUMNS["score"]``) as the arrays rules work on.

  group_R: each row's prompt id. reward_R: float rewards, NaN for none. correct_R: bool gold
  verdicts. keys_R: ``select.dedup``'s key per row (None: no deduplication). config: the run's
  config (``select.*`` holds the rule's options). round_index: the round (1-based).
  """

  rows: Sequence[dict]
  group_R: np.ndarray
  reward_R: np.ndarray
  correct_R: np.ndarray
  keys_R: Sequence[Hashable | None] | None
  config: ml_collections.ConfigDict
  round_index: int


@dataclasses.dataclass(frozen=True)
class Selection:
  """picked_S: selected row indices, sorted. pairs_Qx2: (first, second) rows for a pair loss
  (DPO: chosen, rejected). info: numbers logged with the select stage."""

  picked_S: np.ndarray
  pairs_Qx2: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2), np.int64))
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def of_pairs(cls, pairs_Qx2: np.ndarray) -> Selection:
    return cls(np.unique(pairs_Qx2).astype(np.int64), np.asarray(pairs_Qx2, np.int64))


@dataclasses.dataclass(frozen=True)
class Rule:
  """select: the rule. pairs: it makes pairs (for dpo, sharpen, xpo). check: ``check(config)``
  raises on settings the rule cannot use. temperatures: ``temperatures(config, round)``, the
  sampling temperatures the rule needs, instead of the round's one."""

  select: Callable[[SelectInputs], Selection]
  pairs: bool = False
  check: Callable[[ml_collections.ConfigDict], None] | None = None
  temperatures: Callable[[ml_collections.ConfigDict, int], tuple[float, ...]] | None = None


SELECTORS: Registry[Rule] = Registry("select.kind")


def register(name: str, *, pairs: bool = False, check: Callable | None = None,  # pylint: disable=redefined-outer-name
             temperatures: Callable | None = None) -> Callable:
  """``@register(name, ...)``: makes ``name`` a value of ``select.kind``."""
  return SELECTORS.decorator(name, lambda fn: Rule(fn, pairs, check, temperatures))


def select(rows: Sequence[dict], config: ml_collections.ConfigDict, round_index: int) -> Selection:
  """Runs the configured rule (``config.select.kind``) on a round's scored rows."""
  mode = config.select.dedup
  keys = None if mode == "none" else [
      row["completion"] if mode == "exact" else row["extracted"] for row in rows]
  inputs = SelectInputs(
      rows=rows, group_R=np.array([row["prompt_id"] for row in rows]),
      reward_R=np.array([np.nan if row["reward"] is None else row["reward"] for row in rows], float),
      correct_R=np.array([bool(row["correct"]) for row in rows]), keys_R=keys, config=config,
      round_index=round_index)
  return SELECTORS.get(config.select.kind).select(inputs)


def _where(x: SelectInputs, keep_R: np.ndarray, **info: Any) -> Selection:
  """Rows with ``keep_R`` (and correct ones only with ``select.require_correct``), at most
  ``select.k`` per prompt."""
  c = x.config.select
  if c.require_correct:
    keep_R = keep_R & x.correct_R
  return Selection(sel.where(x.group_R, keep_R, max_per_group=c.k, keys_R=x.keys_R), info=info)


@register("top1")
def top1(x: SelectInputs) -> Selection:
  """The best-rewarded sample of each prompt (SFT-sharpening)."""
  return Selection(sel.top_k(x.group_R, x.reward_R, 1, keys_R=x.keys_R))


def _check_topk(config: ml_collections.ConfigDict) -> None:
  check("select.k", config.select.k, config.select.k >= 1, "select.kind='topk' needs k >= 1")


@register("topk", check=_check_topk)
def topk(x: SelectInputs) -> Selection:
  """The ``select.k`` best-rewarded samples of each prompt."""
  return Selection(sel.top_k(x.group_R, x.reward_R, x.config.select.k, keys_R=x.keys_R))


@register("threshold")
def threshold(x: SelectInputs) -> Selection:
  """Samples rewarded at least ``select.threshold`` (or this round's ``threshold_schedule``)."""
  c = x.config.select
  return _where(x, x.reward_R >= scheduled(c.threshold_schedule, x.round_index, c.threshold))


@register("all_correct")
def all_correct(x: SelectInputs) -> Selection:
  """Every correct sample (STaR, ReST-EM, RFT), at most ``select.k`` per prompt."""
  return Selection(sel.where(x.group_R, x.correct_R, max_per_group=x.config.select.k,
                             keys_R=x.keys_R))


def _check_balance(config: ml_collections.ConfigDict) -> None:
  c = config.select
  check("select.temperatures", c.temperatures, len(c.temperatures) >= 1,
        "select.kind='balance' needs candidate temperatures")
  check("select.thresholds", c.thresholds, len(c.thresholds) >= 1,
        "select.kind='balance' needs candidate thresholds")
  check("select.n_star", c.n_star, c.n_star >= 1, "must be >= 1")


@register("balance", check=_check_balance,
          temperatures=lambda config, round_index: tuple(config.select.temperatures))
def balance(x: SelectInputs) -> Selection:
  """B-STaR: samples at every ``select.temperatures``; keeps the (temperature, threshold) with the
  best mean balance score min(n'/n_star, 1) * n'/n this round, and selects by it."""
  c = x.config.select
  temperature_R = np.array([row["temperature"] for row in x.rows])
  texts = [row["completion"] for row in x.rows]
  best = None
  for t in c.temperatures:
    mask_R = temperature_R == t
    for tau in c.thresholds:
      chosen_R = mask_R & (x.reward_R >= tau) & (x.correct_R if c.require_correct else True)
      score = sel.balance_score(x.group_R[mask_R], chosen_R[mask_R], x.correct_R[mask_R],
                                [k for k, m in zip(texts, mask_R) if m], c.n_star)
      if best is None or score > best[2]:
        best = (float(t), float(tau), score, mask_R)
  t, tau, score, mask_R = best
  return _where(x, (x.reward_R >= tau) & mask_R, temperature=t, threshold=tau,
                balance_score=score)


@register("best_worst", pairs=True)
def best_worst(x: SelectInputs) -> Selection:
  """(best, worst) by reward per prompt, skipping margins under ``select.min_margin``."""
  return Selection.of_pairs(sel.best_worst_pairs(x.group_R, x.reward_R,
                                                 min_margin=x.config.select.min_margin))


def _check_base_pairs(config: ml_collections.ConfigDict) -> None:
  check("sample.model", config.sample.model, config.sample.model == "base",
        "select.kind='base_pairs' pairs base samples: set sample.model='base'")
  check("sample.num_samples", config.sample.num_samples, config.sample.num_samples % 2 == 0,
        "select.kind='base_pairs' needs an even number of samples per prompt")


@register("base_pairs", pairs=True, check=_check_base_pairs)
def base_pairs(x: SelectInputs) -> Selection:
  """Consecutive base samples of each prompt as pairs (RLHF-sharpening)."""
  return Selection.of_pairs(sel.consecutive_pairs(x.group_R))


def _check_xpo_pairs(config: ml_collections.ConfigDict) -> None:
  check("sample.model", config.sample.model, config.sample.model == "both",
        "select.kind='xpo_pairs' pairs a current and a base sample: set sample.model='both'")


@register("xpo_pairs", pairs=True, check=_check_xpo_pairs)
def xpo_pairs(x: SelectInputs) -> Selection:
  """(current-model sample, base sample) pairs of each prompt (XPO)."""
  return Selection.of_pairs(sel.cross_pairs(
      x.group_R, np.array([row["source"] == "current" for row in x.rows])))
