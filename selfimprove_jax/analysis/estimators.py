"""Sampling-based accuracy estimators: pass@k, best-of-k under a selector, maj@k, bootstrap CIs.

Each estimator works on the n samples drawn for one prompt and returns the expected value over a
uniformly random k-subset of them (exactly where that is cheap); average over prompts afterwards
and put a CI on the mean with ``bootstrap_ci``. Definitions: reference/SHARPENING.md, "Metrics".
Pure NumPy, so offline analysis never needs jax.

Shape letters: P prompts, N samples per prompt, M subsets.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

_TIES = ("first", "average")
_CHUNK = 1 << 22  # elements per vectorized chunk: keeps temporaries around 32 MB


def _check_k(fn: str, k: int, n: int) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise ValueError(f"{fn}: k={k!r} must be an int")
  if k < 1:
    raise ValueError(f"{fn}: k={k} must be >= 1")
  if k > n:
    raise ValueError(f"{fn}: k={k} is larger than the number of samples n={n}")
  return int(k)


def _int_array(fn: str, name: str, x: object) -> np.ndarray:
  a = np.atleast_1d(np.asarray(x))
  if a.ndim != 1:
    raise ValueError(f"{fn}: {name} must be 1-D (one entry per prompt); got shape {a.shape}")
  if a.dtype == bool or not np.issubdtype(a.dtype, np.number) or np.any(a != np.round(a)):
    raise ValueError(f"{fn}: {name} must hold integers; got {a!r}")
  return a.astype(np.int64)


def pass_at_k(num_samples_P: Sequence[int] | np.ndarray, num_correct_P: Sequence[int] | np.ndarray,
              k: int) -> np.ndarray:
  """Unbiased pass@k per prompt (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

  Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms a large binomial; 1.0 when
  n - c < k (every k-subset holds a correct sample).

  Args:
    num_samples_P: n, samples drawn per prompt, shape (P,) (a scalar counts as P=1).
    num_correct_P: c, correct samples per prompt, shape (P,), 0 <= c <= n.
    k: subset size, 1 <= k <= min(n).
  Returns:
    float64 (P,), probability that at least one of k samples is correct.
  """
  n_P = _int_array("pass_at_k", "num_samples_P", num_samples_P)
  c_P = _int_array("pass_at_k", "num_correct_P", num_correct_P)
  if n_P.shape != c_P.shape:
    raise ValueError(f"pass_at_k: num_samples_P has shape {n_P.shape} but num_correct_P has "
                     f"shape {c_P.shape}")
  if n_P.size == 0:
    raise ValueError("pass_at_k: num_samples_P is empty")
  bad = np.flatnonzero((c_P < 0) | (c_P > n_P))
  if bad.size:
    p = bad[0]
    raise ValueError(f"pass_at_k: num_correct_P[{p}]={c_P[p]} is outside [0, n={n_P[p]}]")
  k = _check_k("pass_at_k", k, int(n_P.min()))
  out_P = np.ones(n_P.shape, np.float64)
  for p, (n, c) in enumerate(zip(n_P, c_P)):
    if n - c >= k:
      out_P[p] = 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64))
  return out_P


def _top_of_subset_probs(n: int, k: int) -> np.ndarray:
  """(N,) P(rank j is the best of a uniform k-subset) = C(n-j, k-1) / C(n, k), j = 1..n.

  By the recurrence P(1) = k/n, P(j+1) = P(j) (n-j-k+1)/(n-j): every factor is in [0, 1], so the
  product only ever underflows to 0 (no overflow, no NaN) for n in the thousands and beyond.
  """
  j = np.arange(1, n, dtype=np.float64)
  ratios = np.clip((n - j - k + 1) / (n - j), 0.0, None)
  return (k / n) * np.concatenate([[1.0], np.cumprod(ratios)])


def bon_at_k_batch(scores_PxN: np.ndarray, correct_PxN: np.ndarray, k: int, *,
                   ties: str = "first") -> np.ndarray:
  """Exact best-of-k accuracy per prompt under a selector score, no resampling.

  Samples are ranked by score, highest first; NaN scores rank last (below -inf). The top-ranked
  member of a uniformly random k-subset is the one selected, so the expected accuracy is
  sum_j C(n-j, k-1)/C(n, k) * correct[rank j].

  Args:
    scores_PxN: selector scores (e.g. self-certainty, verifier score, log-prob).
    correct_PxN: correctness (bool or 0/1; any finite per-sample reward gives expected reward).
    k: subset size, 1 <= k <= N.
    ties: how equal scores are ordered. "first": the earlier sample index wins (a stable sort, so
      the estimate is deterministic; NaNs also rank among themselves by index). "average": uniform
      random tie-breaking, in expectation; each sample of a tie group gets the group's mean
      top-of-subset probability.
  Returns:
    float64 (P,), expected correctness of the selected sample.
  """
  scores_PxN = np.asarray(scores_PxN, np.float64)
  correct_PxN = np.asarray(correct_PxN, np.float64)
  if scores_PxN.ndim != 2:
    raise ValueError(f"bon_at_k_batch: scores_PxN must be 2-D; got shape {scores_PxN.shape}")
  if correct_PxN.shape != scores_PxN.shape:
    raise ValueError(f"bon_at_k_batch: correct_PxN has shape {correct_PxN.shape} but "
                     f"scores_PxN has shape {scores_PxN.shape}")
  if not np.all(np.isfinite(correct_PxN)):
    raise ValueError("bon_at_k_batch: correct_PxN has non-finite values")
  if ties not in _TIES:
    raise ValueError(f"bon_at_k_batch: ties={ties!r} must be one of {_TIES}")
  num_prompts, n = scores_PxN.shape
  k = _check_k("bon_at_k_batch", k, n)
  is_nan_PxN = np.isnan(scores_PxN)
  # lexsort is stable; last key is primary: non-NaN first, then descending score, then index.
  order_PxN = np.lexsort((-np.where(is_nan_PxN, 0.0, scores_PxN), is_nan_PxN), axis=-1)
  sorted_correct_PxN = np.take_along_axis(correct_PxN, order_PxN, axis=-1)
  prob_N = _top_of_subset_probs(n, k)
  if ties == "first" or n == 1:
    return sorted_correct_PxN @ prob_N
  # "average": spread each tie group's probability mass evenly over its members.
  s_PxN = np.take_along_axis(scores_PxN, order_PxN, axis=-1)
  same_PxN = np.zeros((num_prompts, n), bool)  # same_PxN[:, j]: rank j ties with rank j-1
  same_PxN[:, 1:] = (s_PxN[:, 1:] == s_PxN[:, :-1]) | (np.isnan(s_PxN[:, 1:])
                                                       & np.isnan(s_PxN[:, :-1]))
  idx_N = np.arange(n)
  start_PxN = np.maximum.accumulate(np.where(same_PxN, 0, idx_N), axis=-1)
  is_last_PxN = np.ones((num_prompts, n), bool)
  is_last_PxN[:, :-1] = ~same_PxN[:, 1:]
  end_PxN = np.minimum.accumulate(np.where(is_last_PxN, idx_N, n - 1)[:, ::-1], axis=-1)[:, ::-1]
  cum_N1 = np.concatenate([[0.0], np.cumsum(prob_N)])
  avg_prob_PxN = (cum_N1[end_PxN + 1] - cum_N1[start_PxN]) / (end_PxN - start_PxN + 1)
  return np.sum(sorted_correct_PxN * avg_prob_PxN, axis=-1)


def bon_at_k(scores_N: Sequence[float] | np.ndarray, correct_N: Sequence[float] | np.ndarray,
             k: int, *, ties: str = "first") -> float:
  """Exact best-of-k accuracy for one prompt; see ``bon_at_k_batch`` (shapes (N,) here)."""
  scores_N = np.asarray(scores_N, np.float64)
  correct_N = np.asarray(correct_N, np.float64)
  if scores_N.ndim != 1:
    raise ValueError(f"bon_at_k: scores_N must be 1-D; got shape {scores_N.shape}")
  if correct_N.shape != scores_N.shape:
    raise ValueError(f"bon_at_k: correct_N has shape {correct_N.shape} but scores_N has shape "
                     f"{scores_N.shape}")
  return float(bon_at_k_batch(scores_N[None], correct_N[None], k, ties=ties)[0])


def bon_at_k_ragged(scores: Sequence[Sequence[float]], correct: Sequence[Sequence[float]], k: int,
                    *, ties: str = "first") -> np.ndarray:
  """``bon_at_k`` per prompt when prompts have different sample counts; returns (P,)."""
  if len(scores) != len(correct):
    raise ValueError(f"bon_at_k_ragged: {len(scores)} score arrays but {len(correct)} correct "
                     f"arrays")
  return np.array([bon_at_k(s, c, k, ties=ties) for s, c in zip(scores, correct)], np.float64)


def _answer_ids(answers_N: Sequence[Hashable | None], correct: object
                ) -> tuple[np.ndarray, np.ndarray]:
  """(N,) answer ids in first-occurrence order (None -> A) and (A+1,) correctness per id."""
  ids: dict[Hashable, int] = {}
  for a in answers_N:
    if a is not None:
      ids.setdefault(a, len(ids))
  num_answers = len(ids)
  ids_N = np.array([num_answers if a is None else ids[a] for a in answers_N], np.int64)
  correct_A1 = np.zeros(num_answers + 1, np.float64)  # the None slot stays 0: never correct
  if isinstance(correct, Mapping):
    for a, i in ids.items():
      correct_A1[i] = float(bool(correct.get(a, False)))
    return ids_N, correct_A1
  correct_N = np.asarray(correct, np.float64)
  if correct_N.shape != (len(answers_N),):
    raise ValueError(f"maj_at_k: correct has shape {correct_N.shape} but answers_N has "
                     f"{len(answers_N)} entries")
  seen = np.zeros(num_answers + 1, bool)
  for i, (a, c) in enumerate(zip(ids_N, correct_N)):
    if a == num_answers:
      continue
    if seen[a] and correct_A1[a] != c:
      raise ValueError(f"maj_at_k: correct[{i}]={c} disagrees with an earlier sample of the same "
                       f"answer {answers_N[i]!r}")
    seen[a], correct_A1[a] = True, c
  return ids_N, correct_A1


def _majority_correct(subsets_MxK: np.ndarray, ids_N: np.ndarray, correct_A1: np.ndarray
                      ) -> np.ndarray:
  """(M,) correctness of the majority answer of each subset (indices ascending along K)."""
  num_m, k = subsets_MxK.shape
  num_bins = correct_A1.shape[0]
  ids_MxK = ids_N[subsets_MxK]
  flat = (np.arange(num_m)[:, None] * num_bins + ids_MxK).ravel()
  counts_MxA1 = np.bincount(flat, minlength=num_m * num_bins).reshape(num_m, num_bins)
  counts_MxA1[:, -1] = 0  # None casts no vote
  votes_MxK = np.take_along_axis(counts_MxA1, ids_MxK, axis=-1)
  # argmax takes the first position with the top count; positions are in sample order, so that
  # is the tied answer whose first occurrence is earliest (voting.majority_vote's rule).
  win_M = np.take_along_axis(ids_MxK, np.argmax(votes_MxK, axis=-1)[:, None], axis=-1)[:, 0]
  return np.where(votes_MxK.max(axis=-1) > 0, correct_A1[win_M], 0.0)


def maj_at_k(answers_N: Sequence[Hashable | None],
             correct: Mapping[Hashable, bool] | Sequence[float] | np.ndarray, k: int, *,
             exact_limit: int = 10_000, num_subsets: int = 10_000,
             rng: int | np.random.Generator = 0) -> float:
  """Expected accuracy of the majority answer of a uniformly random k-subset of one prompt.

  Votes follow ``verifiers.voting.majority_vote``: the most frequent non-None answer wins; among
  tied answers, the one whose first occurrence in the subset (in original sample order) is
  earliest wins. A subset whose answers are all None has no answer and counts as wrong.

  Args:
    answers_N: extracted, normalized answer keys per sample; None = nothing extracted.
    correct: either answer -> correct (answers missing from the mapping are wrong), or per-sample
      correctness (N,), which must agree between samples with the same answer.
    k: subset size, 1 <= k <= N.
    exact_limit: enumerate all C(N, k) subsets when there are at most this many.
    num_subsets: otherwise, the Monte Carlo estimate averages this many random k-subsets.
    rng: seed or Generator for the Monte Carlo subsets (the exact path uses none).
  Returns:
    The exact expectation, or its Monte Carlo estimate (standard error <= 0.5/sqrt(num_subsets)).
  """
  n = len(answers_N)
  k = _check_k("maj_at_k", k, n)
  if exact_limit < 0:
    raise ValueError(f"maj_at_k: exact_limit={exact_limit} must be >= 0")
  ids_N, correct_A1 = _answer_ids(answers_N, correct)
  num_exact = math.comb(n, k)
  if num_exact <= exact_limit:
    flat = itertools.chain.from_iterable(itertools.combinations(range(n), k))
    subsets_MxK = np.fromiter(flat, np.int64, count=num_exact * k).reshape(num_exact, k)
    return float(np.mean(_majority_correct(subsets_MxK, ids_N, correct_A1)))
  if num_subsets < 1:
    raise ValueError(f"maj_at_k: num_subsets={num_subsets} must be >= 1")
  gen = np.random.default_rng(rng)
  chunk = max(1, _CHUNK // max(n, correct_A1.shape[0]))
  total = 0.0
  for start in range(0, num_subsets, chunk):
    m = min(chunk, num_subsets - start)
    # The k smallest of n iid uniforms are a uniform k-subset.
    subsets_MxK = np.sort(np.argpartition(gen.random((m, n)), k - 1, axis=-1)[:, :k], axis=-1)
    total += float(np.sum(_majority_correct(subsets_MxK, ids_N, correct_A1)))
  return total / num_subsets


def bootstrap_ci(per_prompt_values_P: Sequence[float] | np.ndarray, *, num_resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
  """Percentile bootstrap over prompts for the mean of a per-prompt metric.

  Args:
    per_prompt_values_P: one value per prompt (e.g. ``pass_at_k`` output), shape (P,).
    num_resamples: bootstrap resamples of P prompts with replacement.
    confidence: two-sided level in (0, 1).
    seed: for the resampling.
  Returns:
    (mean, low, high): the sample mean and the (1-confidence)/2, (1+confidence)/2 quantiles of
    the resampled means.
  """
  values_P = np.asarray(per_prompt_values_P, np.float64)
  if values_P.ndim != 1 or values_P.size == 0:
    raise ValueError(f"bootstrap_ci: per_prompt_values_P must be a non-empty 1-D array; got shape "
                     f"{values_P.shape}")
  if not np.all(np.isfinite(values_P)):
    raise ValueError("bootstrap_ci: per_prompt_values_P has non-finite values")
  if num_resamples < 1:
    raise ValueError(f"bootstrap_ci: num_resamples={num_resamples} must be >= 1")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"bootstrap_ci: confidence={confidence} must be in (0, 1)")
  num_p = values_P.size
  gen = np.random.default_rng(seed)
  chunk = max(1, _CHUNK // num_p)
  means_R = np.concatenate([
      values_P[gen.integers(0, num_p, size=(min(chunk, num_resamples - s), num_p))].mean(axis=-1)
      for s in range(0, num_resamples, chunk)])
  alpha = 1.0 - confidence
  low, high = np.quantile(means_R, [alpha / 2, 1.0 - alpha / 2])
  return float(values_P.mean()), float(low), float(high)


def greedy_vs_bon_lift(acc_bon: float, acc_greedy: float) -> float:
  """Relative lift of best-of-k over greedy in percent: 100 (bon - greedy) / greedy; NaN when
  greedy accuracy is 0. Accuracies are fractions in [0, 1]."""
  for name, acc in (("acc_bon", acc_bon), ("acc_greedy", acc_greedy)):
    if not 0.0 <= acc <= 1.0:  # also rejects NaN
      raise ValueError(f"greedy_vs_bon_lift: {name}={acc} must be an accuracy in [0, 1]")
  if acc_greedy == 0.0:
    return float("nan")
  return 100.0 * (acc_bon - acc_greedy) / acc_greedy
