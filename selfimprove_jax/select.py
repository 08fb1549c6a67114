"""Selection: which scored samples become training data. Pure NumPy over flat arrays.

Every function takes the samples of many prompts as flat arrays aligned on rows, with
``group_R`` naming each row's prompt (any hashable-free int id). Rewards are float arrays
where NaN means "no reward" (the row is never selected by reward). Ties always go to the
earliest row, so a selection is a pure function of the table.

Returns are row indices (``(S,)`` int64, sorted) or pairs (``(P, 2)`` int64: [first, second],
for DPO [chosen, rejected]).

Legend: R rows (samples), S selected rows, P pairs.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def _groups(group_R: np.ndarray) -> list[np.ndarray]:
  """Row indices of each group, groups in order of first appearance, rows in table order."""
  group_R = np.asarray(group_R)
  _, first, inverse = np.unique(group_R, return_index=True, return_inverse=True)
  order = np.argsort(first, kind="stable")
  return [np.flatnonzero(inverse == g) for g in order]


def _ranked(rows: np.ndarray, reward_R: np.ndarray) -> np.ndarray:
  """``rows`` with a reward, best first; ties keep table order."""
  rows = rows[~np.isnan(reward_R[rows])]
  return rows[np.argsort(-reward_R[rows], kind="stable")]


def dedup(group_R: np.ndarray, keys_R: Sequence[Hashable | None], rows: np.ndarray) -> np.ndarray:
  """Keeps the first of ``rows`` (in the given order) per (group, key); None keys are unique."""
  seen, keep = set(), []
  for r in rows:
    key = keys_R[r]
    if key is not None:
      if (group_R[r], key) in seen:
        continue
      seen.add((group_R[r], key))
    keep.append(r)
  return np.asarray(keep, np.int64)


def top_k(group_R: np.ndarray, reward_R: np.ndarray, k: int, *,
          keys_R: Sequence[Hashable | None] | None = None) -> np.ndarray:
  """The ``k`` highest-reward rows of each group (after dedup by ``keys_R`` when given)."""
  if k < 1:
    raise ValueError(f"top_k: k={k} must be >= 1")
  reward_R = np.asarray(reward_R, np.float64)
  out = []
  for rows in _groups(group_R):
    ranked = _ranked(rows, reward_R)
    if keys_R is not None:
      ranked = dedup(group_R, keys_R, ranked)
    out.extend(ranked[:k])
  return np.sort(np.asarray(out, np.int64))


def where(group_R: np.ndarray, keep_R: np.ndarray, *, max_per_group: int = 0,
          keys_R: Sequence[Hashable | None] | None = None) -> np.ndarray:
  """Rows with ``keep_R`` true (e.g. correct, or reward >= threshold), deduplicated by ``keys_R``,
  at most ``max_per_group`` per group in table order (0 = no cap)."""
  keep_R = np.asarray(keep_R, bool)
  out = []
  for rows in _groups(group_R):
    rows = rows[keep_R[rows]]
    if keys_R is not None:
      rows = dedup(group_R, keys_R, rows)
    out.extend(rows[:max_per_group] if max_per_group else rows)
  return np.sort(np.asarray(out, np.int64))


def best_worst_pairs(group_R: np.ndarray, reward_R: np.ndarray, *,
                     min_margin: float = 0.0) -> np.ndarray:
  """(chosen, rejected) = (highest, lowest reward) of each group, when they differ by more than
  ``min_margin`` (a group whose rewards are all equal gives no pair)."""
  reward_R = np.asarray(reward_R, np.float64)
  pairs = []
  for rows in _groups(group_R):
    ranked = _ranked(rows, reward_R)
    if len(ranked) >= 2:
      best = ranked[0]
      worst = ranked[np.flatnonzero(reward_R[ranked] == reward_R[ranked[-1]])[0]]
      if reward_R[best] - reward_R[worst] > min_margin:
        pairs.append((best, worst))
  return np.asarray(pairs, np.int64).reshape(-1, 2)


def consecutive_pairs(group_R: np.ndarray, eligible_R: np.ndarray | None = None) -> np.ndarray:
  """(rows 0, 1), (2, 3), ... of each group's eligible rows: independent sample pairs (y, y')
  for the sharpening pair loss. An odd last row is left out."""
  eligible_R = np.ones(len(group_R), bool) if eligible_R is None else np.asarray(eligible_R, bool)
  pairs = []
  for rows in _groups(group_R):
    rows = rows[eligible_R[rows]]
    pairs.extend(zip(rows[0:len(rows) - 1:2], rows[1::2]))
  return np.asarray(pairs, np.int64).reshape(-1, 2)


def cross_pairs(group_R: np.ndarray, first_R: np.ndarray) -> np.ndarray:
  """The i-th ``first_R`` row of each group with its i-th other row (XPO: the on-policy sample y
  with the base sample y~); extra rows on either side are left out."""
  first_R = np.asarray(first_R, bool)
  pairs = []
  for rows in _groups(group_R):
    pairs.extend(zip(rows[first_R[rows]], rows[~first_R[rows]]))
  return np.asarray(pairs, np.int64).reshape(-1, 2)


def balance_score(group_R: np.ndarray, selected_R: np.ndarray, correct_R: np.ndarray,
                  keys_R: Sequence[Hashable | None], n_star: int) -> float:
  """B-STaR's balance score, averaged over prompts: min(n'/n*, 1) * n'/n per prompt, with n the
  selected rows and n' the unique (by ``keys_R``) correct selected rows; 0 when n = 0."""
  if n_star < 1:
    raise ValueError(f"balance_score: n_star={n_star} must be >= 1")
  selected_R, correct_R = np.asarray(selected_R, bool), np.asarray(correct_R, bool)
  scores = []
  for rows in _groups(group_R):
    chosen = rows[selected_R[rows]]
    n = len(chosen)
    unique = len(dedup(group_R, keys_R, chosen[correct_R[chosen]]))
    scores.append(min(unique / n_star, 1.0) * unique / n if n else 0.0)
  return float(np.mean(scores)) if scores else 0.0
