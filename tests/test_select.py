"""Selection functions on literal tables: ties go to the earliest row, NaN rewards never win."""
import numpy as np
import pytest

from selfimprove_jax import select as sel

NAN = float("nan")
GROUP = np.array(["a", "a", "a", "b", "b", "c"])
REWARD = np.array([1.0, 3.0, 3.0, NAN, -2.0, NAN])


def test_top_k_ties_to_earliest_and_skips_nan():
  np.testing.assert_array_equal(sel.top_k(GROUP, REWARD, 1), [1, 4])
  np.testing.assert_array_equal(sel.top_k(GROUP, REWARD, 2), [1, 2, 4])
  with pytest.raises(ValueError, match="k=0"):
    sel.top_k(GROUP, REWARD, 0)


def test_top_k_with_dedup_takes_next_distinct():
  keys = ["x", "y", "y", "z", "z", None]
  np.testing.assert_array_equal(sel.top_k(GROUP, REWARD, 2, keys_R=keys), [0, 1, 4])


def test_where_caps_and_dedups_in_table_order():
  keep = np.array([True, True, True, True, True, False])
  np.testing.assert_array_equal(sel.where(GROUP, keep, max_per_group=2), [0, 1, 3, 4])
  keys = ["s", "s", "t", "u", "u", "v"]
  np.testing.assert_array_equal(sel.where(GROUP, keep, keys_R=keys), [0, 2, 3])


def test_best_worst_pairs():
  reward = np.array([1.0, 3.0, 1.0, 2.0, 2.0, 5.0])
  np.testing.assert_array_equal(sel.best_worst_pairs(GROUP, reward), [[1, 0]])  # b tied, c alone
  assert sel.best_worst_pairs(GROUP, reward, min_margin=2.0).shape == (0, 2)


def test_consecutive_and_cross_pairs():
  group = np.array([0, 0, 0, 0, 0, 1, 1])
  np.testing.assert_array_equal(sel.consecutive_pairs(group), [[0, 1], [2, 3], [5, 6]])
  first = np.array([True, False, True, False, False, False, True])
  np.testing.assert_array_equal(sel.cross_pairs(group, first), [[0, 1], [2, 3], [6, 5]])


def test_balance_score_literal():
  # a: 3 selected, 2 correct but identical -> n'=1: min(1/2, 1) * 1/3; b: 1 selected, correct,
  # n'=1: 1/2 * 1; c: nothing selected -> 0.
  group = np.array(["a", "a", "a", "b", "c"])
  selected = np.array([True, True, True, True, False])
  correct = np.array([True, True, False, True, True])
  keys = ["p", "p", "q", "r", "s"]
  want = np.mean([0.5 / 3, 0.5, 0.0])
  assert sel.balance_score(group, selected, correct, keys, n_star=2) == pytest.approx(want)
