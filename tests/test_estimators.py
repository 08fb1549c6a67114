"""Sampling estimators against brute force over every k-subset, literal hand cases, bootstrap
coverage in simulation, and input validation."""
import itertools
import math

import numpy as np
import pytest

from selfimprove_jax.analysis import (bon_at_k, bon_at_k_batch, bon_at_k_ragged, bootstrap_ci,
                                      greedy_vs_bon_lift, maj_at_k, pass_at_k)
from selfimprove_jax.verifiers.voting import majority_vote

SEEDS = range(6)


def _subsets(n, k):
  return list(itertools.combinations(range(n), k))


def _random_case(seed):
  """n <= 8 samples with heavily tied scores, a few NaNs and infinities, random correctness."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 9))
  scores = rng.choice([-np.inf, 0.0, 1.0, 2.0, np.inf, np.nan], size=n, p=[.1, .25, .25, .2, .1, .1])
  correct = rng.random(n) < 0.5
  return scores, correct


# ---------------------------------------------------------------------------------------- pass@k


def test_pass_at_k_literal():
  np.testing.assert_allclose(pass_at_k([4, 5, 5, 10, 3], [1, 0, 5, 3, 1], 2),
                             [0.5, 0.0, 1.0, 1 - math.comb(7, 2) / math.comb(10, 2), 2 / 3])
  np.testing.assert_allclose(pass_at_k(10, 3, 1), [0.3])


def test_pass_at_k_matches_enumeration():
  # Every (n, c) with n <= 8, every k; the vectorized call takes all prompts with n >= k at once.
  pairs = [(n, c) for n in range(1, 9) for c in range(n + 1)]
  for k in range(1, 9):
    n_P, c_P = np.array([(n, c) for n, c in pairs if n >= k]).T
    brute_P = [np.mean([any(i < c for i in s) for s in _subsets(n, k)]) for n, c in zip(n_P, c_P)]
    np.testing.assert_allclose(pass_at_k(n_P, c_P, k), brute_P, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------- BoN@k


def _brute_bon(scores, correct, k, ties):
  key = [(bool(np.isnan(s)), 0.0 if np.isnan(s) else -s) for s in scores]
  values = []
  for subset in _subsets(len(scores), k):
    best = min(key[i] for i in subset)
    top = [i for i in subset if key[i] == best]  # subset is ascending: top[0] = earliest index
    values.append(correct[top[0]] if ties == "first" else np.mean(correct[top]))
  return np.mean(values)


def test_bon_at_k_literal():
  # Ranked by score: idx0 (wrong), idx2, idx1 (correct), idx3 (wrong); P(rank j) = (3, 2, 1, 0)/6.
  scores, correct = [3.0, 1.0, 2.0, 0.0], [0, 1, 1, 0]
  assert bon_at_k(scores, correct, 2) == pytest.approx(0.5)
  assert bon_at_k(scores, correct, 1) == pytest.approx(0.5)  # k=1: mean correctness
  assert bon_at_k(scores, correct, 4) == pytest.approx(0.0)  # k=n: the top sample
  assert bon_at_k([1.0, 1.0], [1, 0], 2) == 1.0  # ties: the earlier index wins
  assert bon_at_k([1.0, 1.0], [1, 0], 2, ties="average") == pytest.approx(0.5)
  assert bon_at_k([np.nan, 0.0], [1, 0], 2) == 0.0  # NaN ranks last


@pytest.mark.parametrize("ties", ["first", "average"])
@pytest.mark.parametrize("seed", SEEDS)
def test_bon_at_k_matches_enumeration(seed, ties):
  for case in range(8):
    scores, correct = _random_case(100 * seed + case)
    for k in range(1, len(scores) + 1):
      assert bon_at_k(scores, correct, k, ties=ties) == pytest.approx(
          _brute_bon(scores, correct, k, ties), abs=1e-12), (scores, correct, k)


@pytest.mark.parametrize("ties", ["first", "average"])
def test_bon_at_k_batch_and_ragged_match_single(ties):
  rng = np.random.default_rng(0)
  scores_PxN = rng.choice([0.0, 1.0, 2.0, np.nan], size=(5, 7))
  correct_PxN = rng.random((5, 7)) < 0.5
  single_P = [bon_at_k(s, c, 3, ties=ties) for s, c in zip(scores_PxN, correct_PxN)]
  np.testing.assert_allclose(bon_at_k_batch(scores_PxN, correct_PxN, 3, ties=ties), single_P)
  ragged = [(s[:n], c[:n]) for s, c, n in zip(scores_PxN, correct_PxN, [3, 7, 4, 5, 6])]
  np.testing.assert_allclose(
      bon_at_k_ragged([s for s, _ in ragged], [c for _, c in ragged], 3, ties=ties),
      [bon_at_k(s, c, 3, ties=ties) for s, c in ragged])


def test_bon_at_k_large_n_is_stable():
  rng = np.random.default_rng(0)
  n = 4000
  scores, correct = rng.normal(size=n), rng.random(n) < 0.3
  order = np.argsort(-scores)
  for k in (1, 2, 50, 1000, n - 1, n):
    value = bon_at_k(scores, correct, k)
    assert np.isfinite(value) and 0.0 <= value <= 1.0, k
    assert bon_at_k(scores, np.ones(n), k) == pytest.approx(1.0, abs=1e-9), k  # weights sum to 1
  assert bon_at_k(scores, correct, 1) == pytest.approx(correct.mean())
  assert bon_at_k(scores, correct, n) == correct[order[0]]
  # k = n - 1: the top sample unless it is the one left out (probability 1/n).
  assert bon_at_k(scores, correct, n - 1) == pytest.approx(
      (1 - 1 / n) * correct[order[0]] + correct[order[1]] / n)


# ---------------------------------------------------------------------------------------- maj@k


def _brute_maj(answers, is_correct, k):
  winners = [majority_vote([answers[i] for i in s]) for s in _subsets(len(answers), k)]
  return np.mean([w is not None and is_correct(w) for w in winners])


def test_maj_at_k_literal_ties_and_none():
  # 2-2 tie over all four samples: "b" occurs first, so it wins.
  assert maj_at_k(["b", "a", "a", "b"], {"a": True}, 4) == 0.0
  assert maj_at_k(["a", "b", "a", "b"], {"a": True}, 4) == 1.0
  # Subsets of 2: {None, None} has no answer (wrong); the other two vote "x".
  assert maj_at_k([None, None, "x"], {"x": True}, 2) == pytest.approx(2 / 3)
  assert maj_at_k([None, None], [0, 0], 1) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_maj_at_k_matches_enumeration(seed):
  rng = np.random.default_rng(seed)
  for _ in range(6):
    n = int(rng.integers(1, 9))
    answers = [None if a == "-" else a for a in rng.choice(list("abc-"), size=n)]
    gold = {"a": True, "c": rng.random() < 0.5}
    correct_N = [a is not None and gold.get(a, False) for a in answers]
    for k in range(1, n + 1):
      expected = _brute_maj(answers, lambda w: gold.get(w, False), k)
      assert maj_at_k(answers, gold, k) == pytest.approx(expected, abs=1e-12), (answers, k)
      assert maj_at_k(answers, correct_N, k) == pytest.approx(expected, abs=1e-12), (answers, k)


def test_maj_at_k_monte_carlo_close_to_exact():
  rng = np.random.default_rng(1)
  answers = list(rng.choice(["a", "b", "c", None], size=14, p=[0.35, 0.3, 0.2, 0.15]))
  for k in (3, 6, 9):
    exact = maj_at_k(answers, {"a": True}, k)  # C(14, k) <= 3432 <= exact_limit
    mc = maj_at_k(answers, {"a": True}, k, exact_limit=0, num_subsets=20_000, rng=3)
    assert abs(mc - exact) < 0.02, (k, mc, exact)  # standard error <= 0.0035
    assert mc == maj_at_k(answers, {"a": True}, k, exact_limit=0, num_subsets=20_000, rng=3)
    one_subset = {maj_at_k(answers, {"a": True}, k, exact_limit=0, num_subsets=1, rng=s)
                  for s in range(20)}
    assert one_subset == {0.0, 1.0}, one_subset  # really sampled, one subset at a time


def test_maj_at_k_inconsistent_correctness_raises():
  with pytest.raises(ValueError, match=r"correct\[2\]"):
    maj_at_k(["a", "b", "a"], [1, 0, 0], 2)


# ----------------------------------------------------------------------------- bootstrap, lift


def test_bootstrap_ci_literal():
  assert bootstrap_ci([0.25] * 10) == (0.25, 0.25, 0.25)
  mean, low, high = bootstrap_ci([0.0, 0.0, 1.0] * 30, seed=1)
  assert mean == pytest.approx(1 / 3) and low < 1 / 3 < high


def test_bootstrap_ci_coverage():
  rng = np.random.default_rng(0)
  true_mean, covered = 0.6, 0
  for seed in range(200):
    _, low, high = bootstrap_ci((rng.random(100) < true_mean).astype(float), seed=seed)
    covered += low <= true_mean <= high
  assert 0.90 <= covered / 200 <= 0.99, covered


def test_greedy_vs_bon_lift():
  assert greedy_vs_bon_lift(0.6, 0.5) == pytest.approx(20.0)
  assert greedy_vs_bon_lift(0.4, 0.5) == pytest.approx(-20.0)
  assert math.isnan(greedy_vs_bon_lift(0.3, 0.0))


# ---------------------------------------------------------------------------------- bad inputs


BAD_INPUTS = [  # (id, call, what the message must name)
    ("pass-k>n", lambda: pass_at_k([4, 2], [1, 1], 3), r"k=3.*n=2"),
    ("pass-k<1", lambda: pass_at_k([4], [1], 0), r"k=0"),
    ("pass-shapes", lambda: pass_at_k([4, 4], [1], 1), r"num_correct_P"),
    ("pass-c>n", lambda: pass_at_k([4], [5], 1), r"num_correct_P\[0\]=5"),
    ("bon-k>n", lambda: bon_at_k([1.0, 2.0], [1, 0], 3), r"k=3.*n=2"),
    ("bon-k<1", lambda: bon_at_k([1.0, 2.0], [1, 0], 0), r"k=0"),
    ("bon-shapes", lambda: bon_at_k([1.0, 2.0], [1, 0, 1], 1), r"correct_N"),
    ("bon-ties", lambda: bon_at_k([1.0, 2.0], [1, 0], 1, ties="random"), r"ties='random'"),
    ("bon_batch-shapes", lambda: bon_at_k_batch(np.zeros((2, 3)), np.zeros((3, 2)), 1),
     r"correct_PxN"),
    ("bon_ragged-lengths", lambda: bon_at_k_ragged([[1.0]], [[1], [0]], 1), r"correct arrays"),
    ("maj-k>n", lambda: maj_at_k(["a", "b"], {"a": True}, 3), r"k=3.*n=2"),
    ("maj-k<1", lambda: maj_at_k(["a", "b"], {"a": True}, 0), r"k=0"),
    ("maj-shapes", lambda: maj_at_k(["a", "b"], [1, 0, 0], 1), r"correct has shape"),
    ("boot-empty", lambda: bootstrap_ci([]), r"per_prompt_values_P"),
    ("boot-nan", lambda: bootstrap_ci([0.5, np.nan]), r"per_prompt_values_P"),
    ("boot-confidence", lambda: bootstrap_ci([0.5], confidence=1.0), r"confidence=1.0"),
    ("lift-range", lambda: greedy_vs_bon_lift(1.5, 0.5), r"acc_bon=1.5"),
]


@pytest.mark.parametrize("call, match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
