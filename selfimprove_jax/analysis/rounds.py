"""How rounds compare: each round against the base model on the same held-out prompts.

``amortization_table`` (the paper's Table 1 analog, with its N ablation over several runs),
``round_change`` (greedy, T=1 and best-of-N accuracy differences paired by prompt, with bootstrap
CIs) and ``balance_by_round`` (B-STaR's per-round choice). Inputs are eval tables as in
``views``; pure NumPy, no jax.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from selfimprove_jax.analysis import estimators
from selfimprove_jax.analysis.views import _by_prompt, _per_prompt_bon, _value


def _round_summary(eval_rows: Sequence[dict]) -> tuple[float, float, float]:
  """(greedy accuracy, T=1 accuracy, mean base log-prob of the T=1 samples with one)."""
  prompts = _by_prompt(eval_rows, "amortization_table")
  samples = [r for _, _, s in prompts for r in s]
  logp = np.array([_value(r, "base_logprob") for r in samples])
  return (float(np.mean([bool(g["correct"]) for _, g, _ in prompts])),
          float(np.mean([bool(r["correct"]) for r in samples])),
          float(np.mean(logp[np.isfinite(logp)])) if np.isfinite(logp).any() else math.nan)


def amortization_table(runs: Mapping[str, Mapping[int, Sequence[dict]]]
                       | Mapping[int, Sequence[dict]]) -> list[dict[str, Any]]:
  """Does training amortize the sharpening? Each round r >= 1 against round 0 (Table 1 analog).

  Args:
    runs: run name -> {round index -> eval table}; or a single run's {round -> eval table},
      named "run". Every run needs round 0 (the base model). Several runs (e.g. N = 10, 25, 50)
      give the N ablation.
  Returns:
    One dict per (run, round >= 1): "run", "round", "greedy_acc", "t1_acc", "base_greedy_acc",
    "greedy_lift_pct" and "t1_lift_pct" (100 (acc_r - base greedy acc) / base greedy acc, NaN if
    that is 0), "base_loglik_t1" and "loglik_t1" (mean base log-prob of the T=1 samples of round
    0 and round r, nats), "loglik_lift" (their difference) and "loglik_lift_pct"
    (100 (LL_r - LL_0) / |LL_0|: positive when round r's samples are likelier under the base).
  """
  if runs and all(isinstance(k, (int, np.integer)) for k in runs):
    runs = {"run": runs}
  rows = []
  for name, rounds in runs.items():
    if 0 not in rounds:
      raise ValueError(f"amortization_table: run {name!r} has rounds {sorted(rounds)}; round 0 "
                       f"(the base model) is needed")
    g0, _, ll0 = _round_summary(rounds[0])
    for r in sorted(k for k in rounds if k >= 1):
      g, t1, ll = _round_summary(rounds[r])
      rows.append({
          "run": name, "round": int(r), "greedy_acc": g, "t1_acc": t1, "base_greedy_acc": g0,
          "greedy_lift_pct": 100.0 * (g - g0) / g0 if g0 > 0 else math.nan,
          "t1_lift_pct": 100.0 * (t1 - g0) / g0 if g0 > 0 else math.nan,
          "base_loglik_t1": ll0, "loglik_t1": ll, "loglik_lift": ll - ll0,
          "loglik_lift_pct": 100.0 * (ll - ll0) / abs(ll0) if ll0 != 0 else math.nan})
  return rows


def round_change(base_rows: Sequence[dict], rows: Sequence[dict], *, num_resamples: int = 1000,
                 seed: int = 0) -> dict[str, dict[str, float]]:
  """How a round's model differs from the base on the same held-out prompts, paired by prompt.

  Returns:
    {"greedy", "t1", "bon_n"} -> {"base", "value", "change", "low", "high"}: accuracies (greedy,
    T=1, best-of-N by base log-prob with N the fewest samples per prompt in either table), their
    difference and its 95% bootstrap CI over the prompts both tables hold.
  """
  before = {pid: (g, s) for pid, g, s in _by_prompt(base_rows, "round_change")}
  after = {pid: (g, s) for pid, g, s in _by_prompt(rows, "round_change")}
  common = [pid for pid in before if pid in after]
  if not common:
    raise ValueError("round_change: the two eval tables share no prompt_id")
  n = min(len(t[1]) for t in (*before.values(), *after.values()))

  def per_prompt(table):
    greedy = np.array([float(bool(table[p][0]["correct"])) for p in common])
    t1 = np.array([np.mean([bool(r["correct"]) for r in table[p][1]]) for p in common])
    bon = _per_prompt_bon([np.array([_value(r, "base_logprob") for r in table[p][1]])
                           for p in common],
                          [np.array([float(bool(r["correct"])) for r in table[p][1]])
                           for p in common], n)
    return {"greedy": greedy, "t1": t1, "bon_n": bon}

  b, a = per_prompt(before), per_prompt(after)
  out = {}
  for name in ("greedy", "t1", "bon_n"):
    change, low, high = estimators.bootstrap_ci(a[name] - b[name], num_resamples=num_resamples,
                                                seed=seed)
    out[name] = {"base": float(b[name].mean()), "value": float(a[name].mean()),
                 "change": change, "low": low, "high": high}
  return out


def balance_by_round(metrics_records: Sequence[dict]) -> dict[int, dict[str, float]]:
  """B-STaR's chosen (temperature, threshold) and its balance score per round.

  Args:
    metrics_records: ``metrics.jsonl`` records; stage "select" records carrying a
      "balance_score" count (a later record for the same round replaces an earlier one).
  Returns:
    {round: {"balance_score", "temperature", "threshold"}} sorted by round (absent keys NaN);
    empty when the run did not select by balance.
  """
  out: dict[int, dict[str, float]] = {}
  for rec in metrics_records:
    if rec.get("stage") == "select" and rec.get("balance_score") is not None:
      out[int(rec["round"])] = {key: _value(rec, key)
                                for key in ("balance_score", "temperature", "threshold")}
  return dict(sorted(out.items()))
