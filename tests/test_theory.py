"""The paper's two theory facts behind sharpening, checked in pure NumPy.

(a) Greedy decoding returns the mode y* whenever pi(y*) > 1/2, and the threshold is tight: with
    mode mass <= 1/2 greedy can miss it. Models: two-step categorical, P(y1 y2) = P(y1) P(y2|y1).
(b) Best-of-N by log-prob misses y* exactly when none of N iid samples is y*: probability
    (1 - p)^N <= exp(-N p).
"""
import numpy as np
import pytest


def _greedy(first_A: np.ndarray, second_AxB: np.ndarray) -> tuple[int, int]:
  """Argmax per step: the first token, then the second given it."""
  a = int(np.argmax(first_A))
  return a, int(np.argmax(second_AxB[a]))


def _mode(first_A: np.ndarray, second_AxB: np.ndarray) -> tuple[tuple[int, int], float]:
  """The most likely sequence and its probability."""
  joint_AxB = first_A[:, None] * second_AxB
  a, b = np.unravel_index(np.argmax(joint_AxB), joint_AxB.shape)
  return (int(a), int(b)), float(joint_AxB[a, b])


def test_greedy_finds_a_mode_above_one_half():
  first = np.array([0.7, 0.3])  # tokens a, b
  second = np.array([[0.8, 0.2], [0.5, 0.5]])
  mode, mass = _mode(first, second)
  assert mass == pytest.approx(0.56) and mass > 0.5
  assert _greedy(first, second) == mode == (0, 0)


def test_greedy_misses_a_mode_at_or_below_one_half():
  # a (0.6) splits into two children of 0.3 each; b (0.4) has a single child of 0.4.
  first = np.array([0.6, 0.4])
  second = np.array([[0.5, 0.5], [1.0, 0.0]])
  mode, mass = _mode(first, second)
  assert mode == (1, 0) and mass == pytest.approx(0.4)
  greedy = _greedy(first, second)
  assert greedy[0] == 0 and first[greedy[0]] * second[greedy] == pytest.approx(0.3)
  assert greedy != mode


def test_greedy_finds_the_mode_whenever_its_mass_exceeds_one_half_random_models():
  rng = np.random.default_rng(0)
  above = misses_below = 0
  for _ in range(4_000):
    num_first, num_second = rng.integers(2, 5, size=2)
    alpha = rng.choice([0.1, 0.3, 1.0])  # small alpha: peaked models, modes above 1/2 are common
    first = rng.dirichlet(np.full(num_first, alpha))
    second = rng.dirichlet(np.full(num_second, alpha), size=num_first)
    mode, mass = _mode(first, second)
    if mass > 0.5:
      above += 1
      assert _greedy(first, second) == mode, (first, second)
    elif first[_greedy(first, second)[0]] * second[_greedy(first, second)] < mass:
      misses_below += 1
  # Both regimes occur often, so neither half of the statement is checked vacuously.
  assert above > 1_000 and misses_below > 100


@pytest.mark.parametrize("p, n", [(0.05, 10), (0.2, 3), (0.5, 2), (0.3, 8)])
def test_best_of_n_by_logprob_misses_the_mode_with_probability_one_minus_p_to_the_n(p, n):
  rng = np.random.default_rng(int(1000 * p) + n)
  # Outcome 0 is the mode (mass p); the rest share 1 - p, each below p.
  num_rest = int(np.ceil((1 - p) / p)) + 1
  probs = np.concatenate([[p], np.full(num_rest, (1 - p) / num_rest)])
  assert probs[1:].max() < p
  draws = 200_000
  samples_DxN = rng.choice(probs.size, size=(draws, n), p=probs)
  # Best-of-N by log-prob: the sample with the highest log-probability.
  logp_DxN = np.log(probs)[samples_DxN]
  selected_D = np.take_along_axis(samples_DxN, np.argmax(logp_DxN, axis=1)[:, None], 1)[:, 0]
  miss = float(np.mean(selected_D != 0))
  exact = (1 - p) ** n
  se = np.sqrt(exact * (1 - exact) / draws)
  assert abs(miss - exact) < 4 * se, (miss, exact, se)
  assert exact <= np.exp(-n * p)
