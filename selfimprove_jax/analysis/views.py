"""Sharpening views: the paper's figures and tables as plain numbers, computed from sample tables.

Each function takes the rows of an eval table (``tables.EVAL_COLUMNS``: a list of dicts, one
``kind="greedy"`` row and N ``kind="sample"`` rows per prompt, every row scored under the base
model; ``COLUMNS`` are the ones read here, and a table missing one fails naming it) and returns
plain dicts, lists and NumPy arrays, so plots, reports and notebooks share them.
Expectations over k-subsets are exact (``estimators``); confidence intervals are percentile
bootstraps over prompts. Definitions: reference/SHARPENING.md. Pure NumPy, no jax.

Shape letters: P prompts, N samples per prompt, K subset sizes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from selfimprove_jax import tables
from selfimprove_jax.analysis import estimators
from selfimprove_jax.verifiers.voting import majority_vote

# The eval-table columns the views read.
COLUMNS = ("kind", "prompt_id", "sample_index", "length", "extracted", "correct", "model_logprob",
           "base_logprob", "base_mean_logprob", "base_self_certainty")
# Score-based selectors: name -> base-model column of the eval table (higher = preferred).
SCORE_SELECTORS = {"logprob": "base_logprob", "mean_logprob": "base_mean_logprob",
                   "self_certainty": "base_self_certainty"}
SELECTORS = (*SCORE_SELECTORS, "majority", "pass@k")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
# Equal scores (e.g. identical completions) are broken uniformly at random, in expectation.
TIES = "average"

Prompt = tuple[Any, dict, list[dict]]  # (prompt_id, greedy row, sample rows by sample_index)


def _value(row: dict, field: str) -> float:
  """A numeric field; None (how tables store NaN) and a missing field (metrics records) read as
  NaN."""
  v = row.get(field)
  return math.nan if v is None else float(v)


def _by_prompt(eval_rows: Sequence[dict], fn: str) -> list[Prompt]:
  """Groups an eval table by prompt (first-appearance order), checking its shape."""
  greedy: dict[Any, dict] = {}
  samples: dict[Any, list[dict]] = {}
  for i, row in enumerate(eval_rows):
    kind, pid = row.get("kind"), row.get("prompt_id")
    if kind == "greedy":
      if pid in greedy:
        raise ValueError(f"{fn}: prompt_id={pid!r} has more than one kind='greedy' row")
      greedy[pid] = row
      samples.setdefault(pid, [])
    elif kind == "sample":
      samples.setdefault(pid, []).append(row)
    else:
      raise ValueError(f"{fn}: eval_rows[{i}] has kind={kind!r}; an eval table holds 'greedy' "
                       f"and 'sample' rows")
  if not samples:
    raise ValueError(f"{fn}: eval_rows is empty")
  tables.require(eval_rows, COLUMNS, fn)
  out = []
  for pid, rows in samples.items():
    if pid not in greedy:
      raise ValueError(f"{fn}: prompt_id={pid!r} has no kind='greedy' row")
    if not rows:
      raise ValueError(f"{fn}: prompt_id={pid!r} has no kind='sample' rows")
    out.append((pid, greedy[pid], sorted(rows, key=lambda r: r.get("sample_index", 0))))
  return out


def _check_ks(fn: str, ks: Sequence[int] | None, n: int) -> list[int]:
  """Subset sizes, default 1, 2, 4, ... and n; each must be an int in [1, n]."""
  if ks is None:
    return sorted({*(2 ** i for i in range(max(n - 1, 1).bit_length()) if 2 ** i < n), n})
  ks = list(ks)
  if not ks:
    raise ValueError(f"{fn}: ks is empty")
  for k in ks:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
      raise ValueError(f"{fn}: ks contains {k!r}; each k must be an int in [1, {n}] (the fewest "
                       f"samples any prompt has)")
  return [int(k) for k in ks]


def _per_prompt_bon(scores: list[np.ndarray], values: list[np.ndarray], k: int) -> np.ndarray:
  """(P,) exact expected value of the top-scored sample of a random k-subset, per prompt."""
  if len({len(s) for s in scores}) == 1:
    return estimators.bon_at_k_batch(np.stack(scores), np.stack(values), k, ties=TIES)
  return estimators.bon_at_k_ragged(scores, values, k, ties=TIES)


def expected_selected_value(scores_N: Sequence[float] | np.ndarray,
                            values_N: Sequence[float] | np.ndarray, k: int) -> float:
  """E[value of the best-scored sample of a uniformly random k-subset] for one prompt, exact.

  The BoN@k rank weights C(n-j, k-1)/C(n, k) applied to any finite per-sample value instead of
  correctness; with values = scores it is the expected score of the selected response (Fig. 1b).

  Args:
    scores_N: selector scores (N,), higher preferred; NaN ranks last, ties are averaged.
    values_N: finite per-sample values (N,), e.g. base log-probs in nats.
    k: subset size, 1 <= k <= N.
  """
  values_N = np.asarray(values_N, np.float64)
  bad = np.flatnonzero(~np.isfinite(values_N))
  if bad.size:
    raise ValueError(f"expected_selected_value: values_N[{bad[0]}]={values_N[bad[0]]} is not "
                     f"finite")
  return estimators.bon_at_k(scores_N, values_N, k, ties=TIES)


def _lift_ci(values_P: np.ndarray, greedy_P: np.ndarray, greedy_acc: float, num_resamples: int,
             seed: int) -> dict[str, float]:
  """Accuracy with CI, and % lift over greedy with the CI of the paired per-prompt difference
  (resampled over prompts) divided by the greedy accuracy, which is held fixed."""
  acc, low, high = estimators.bootstrap_ci(values_P, num_resamples=num_resamples, seed=seed)
  out = {"acc": acc, "low": low, "high": high, "lift_pct": math.nan, "lift_low": math.nan,
         "lift_high": math.nan}
  if greedy_acc > 0:
    _, d_low, d_high = estimators.bootstrap_ci(values_P - greedy_P, num_resamples=num_resamples,
                                               seed=seed)
    out.update(lift_pct=estimators.greedy_vs_bon_lift(min(acc, 1.0), greedy_acc),
               lift_low=100.0 * d_low / greedy_acc, lift_high=100.0 * d_high / greedy_acc)
  return out


def selector_lifts(eval_rows: Sequence[dict], ks: Sequence[int] | None = None, *,
                   selectors: Sequence[str] | None = None, num_resamples: int = 1000,
                   seed: int = 0, maj_subsets: int = 2000) -> dict[str, Any]:
  """Best-of-k accuracy per selector and its % lift over greedy (Fig. 1a / Fig. 2 analog).

  Selectors: "logprob" (base log-prob), "mean_logprob" (length-normalized), "self_certainty"
  (all under the base model, exact BoN@k), "majority" (maj@k of the extracted answers,
  ``estimators.maj_at_k``; exact up to 10k subsets, else ``maj_subsets`` random ones), and the
  "pass@k" coverage skyline. Every column of ``COLUMNS`` must be present (a ``SchemaError``
  names the row and the column otherwise); a score column that is None on every sample row (not
  computed) leaves its selector out, named in "skipped", unless ``selectors`` asks for it, which
  is then an error.

  Args:
    eval_rows: an eval table (one greedy row, N >= max(ks) sample rows per prompt).
    ks: subset sizes; default 1, 2, 4, ... and N.
    selectors: the selectors to compute, from ``SELECTORS``; default all that have scores.
    num_resamples, seed: bootstrap over prompts.
    maj_subsets: Monte Carlo subsets per prompt when maj@k cannot be enumerated.
  Returns:
    {"num_prompts", "num_samples" (fewest per prompt), "ks", "greedy_acc", "greedy_low",
     "greedy_high", "skipped", "selectors": {name: {k: {"acc", "low", "high", "lift_pct",
     "lift_low", "lift_high"}}}}; accuracies are fractions, lifts percent (NaN if greedy is 0).
  """
  prompts = _by_prompt(eval_rows, "selector_lifts")
  n_P = np.array([len(s) for _, _, s in prompts])
  ks = _check_ks("selector_lifts", ks, int(n_P.min()))
  greedy_P = np.array([float(bool(g["correct"])) for _, g, _ in prompts])
  greedy_acc, g_low, g_high = estimators.bootstrap_ci(greedy_P, num_resamples=num_resamples,
                                                      seed=seed)
  wanted = SELECTORS if selectors is None else tuple(selectors)
  unknown = [name for name in wanted if name not in SELECTORS]
  if unknown:
    raise ValueError(f"selector_lifts: selectors={list(wanted)} has unknown {unknown}; known: "
                     f"{list(SELECTORS)}")
  correct = [np.array([float(bool(r["correct"])) for r in s]) for _, _, s in prompts]
  per_k: dict[str, dict[int, np.ndarray]] = {}
  skipped = []
  for name, field in SCORE_SELECTORS.items():
    if name not in wanted:
      continue
    scores = [np.array([_value(r, field) for r in s]) for _, _, s in prompts]
    if all(np.isnan(s).all() for s in scores):
      if selectors is not None:
        raise ValueError(f"selector_lifts: selector {name!r} needs column {field!r}, which is "
                         "None on every sample row (not scored)")
      skipped.append(name)
      continue
    per_k[name] = {k: _per_prompt_bon(scores, correct, k) for k in ks}
  if "majority" in wanted:
    answers = [[r["extracted"] for r in s] for _, _, s in prompts]
    per_k["majority"] = {k: np.array([
        estimators.maj_at_k(a, c, k, num_subsets=maj_subsets, rng=p)
        for p, (a, c) in enumerate(zip(answers, correct))]) for k in ks}
  if "pass@k" in wanted:
    c_P = np.array([int(c.sum()) for c in correct])
    per_k["pass@k"] = {k: estimators.pass_at_k(n_P, c_P, k) for k in ks}
  return {
      "num_prompts": len(prompts), "num_samples": int(n_P.min()), "ks": ks,
      "greedy_acc": greedy_acc, "greedy_low": g_low, "greedy_high": g_high, "skipped": skipped,
      "selectors": {name: {k: _lift_ci(v, greedy_P, greedy_acc, num_resamples, seed)
                           for k, v in by_k.items()} for name, by_k in per_k.items()},
  }


def lift_vs_n(eval_rows: Sequence[dict], ks: Sequence[int] | None = None, *,
              num_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
  """BoN@k by base log-prob vs k, and the base log-prob of the response it selects (Fig. 1b).

  Both are exact expectations over uniformly random k-subsets of each prompt's N samples with the
  same rank weights; CIs bootstrap over prompts.

  Returns:
    {"ks": [K], "acc", "low", "high", "lift_pct", "lift_low", "lift_high": lists (K,) as in
     ``selector_lifts``; "pass_at_k": (K,) skyline accuracy; "selected_logprob",
     "selected_logprob_low", "selected_logprob_high": (K,) mean over prompts of the expected
     base log-prob (nats, summed over the response) of the selected sample;
     "greedy_acc"; "greedy_logprob": mean base log-prob of the greedy responses; "num_prompts"}.
  """
  prompts = _by_prompt(eval_rows, "lift_vs_n")
  n_P = np.array([len(s) for _, _, s in prompts])
  ks = _check_ks("lift_vs_n", ks, int(n_P.min()))
  scores = [np.array([_value(r, "base_logprob") for r in s]) for _, _, s in prompts]
  for (pid, _, _), s in zip(prompts, scores):
    if not np.all(np.isfinite(s)):
      raise ValueError(f"lift_vs_n: prompt_id={pid!r} has a sample with base_logprob="
                       f"{s[~np.isfinite(s)][0]}; every sample needs a finite base log-prob")
  correct = [np.array([float(bool(r["correct"])) for r in s]) for _, _, s in prompts]
  greedy_P = np.array([float(bool(g["correct"])) for _, g, _ in prompts])
  greedy_acc = float(greedy_P.mean())
  out: dict[str, Any] = {"ks": ks, "num_prompts": len(prompts), "greedy_acc": greedy_acc,
                         "greedy_logprob": float(np.nanmean([_value(g, "base_logprob")
                                                             for _, g, _ in prompts]))}
  c_P = np.array([int(c.sum()) for c in correct])
  for k in ks:
    row = _lift_ci(_per_prompt_bon(scores, correct, k), greedy_P, greedy_acc, num_resamples, seed)
    for key, v in row.items():
      out.setdefault(key, []).append(v)
    out.setdefault("pass_at_k", []).append(float(estimators.pass_at_k(n_P, c_P, k).mean()))
    lp, lo, hi = estimators.bootstrap_ci(_per_prompt_bon(scores, scores, k),
                                         num_resamples=num_resamples, seed=seed)
    for key, v in (("selected_logprob", lp), ("selected_logprob_low", lo),
                   ("selected_logprob_high", hi)):
      out.setdefault(key, []).append(v)
  return out


def logprob_histogram_data(eval_rows: Sequence[dict]) -> dict[str, np.ndarray | int]:
  """Base log-probs (nats, summed over the response) of the T=1 samples, split by correctness
  (Fig. 1c). Greedy rows are excluded.

  Returns:
    {"correct": (Nc,) float64, "wrong": (Nw,) float64, "num_missing": samples without a finite
     base log-prob (left out)}.
  """
  tables.require(eval_rows, COLUMNS, "logprob_histogram_data")
  correct, wrong, missing = [], [], 0
  for row in eval_rows:
    if row.get("kind") != "sample":
      continue
    v = _value(row, "base_logprob")
    if not math.isfinite(v):
      missing += 1
    else:
      (correct if row["correct"] else wrong).append(v)
  return {"correct": np.array(correct, np.float64), "wrong": np.array(wrong, np.float64),
          "num_missing": missing}


def sharpness(eval_rows: Sequence[dict]) -> dict[str, Any]:
  """How sharp the evaluated model is, and how much a base-log-prob verifier could still add.

  - greedy mass: pi(y_greedy|x) = exp(model_logprob of the greedy row), the sampled model's
    probability (T=1) of its own greedy response; mean, QUANTILES, and the fraction above 1/2
    (where greedy is guaranteed to return the mode).
  - entropy_per_token: per prompt, -sum_j model_logprob_j / sum_j length_j over its T=1 samples
    (nats/token): the Monte Carlo cross-entropy estimate of the sequence entropy H(pi(.|x))
    divided by the expected length (exact in expectation when sampling is at T=1 without
    top-k/top-p truncation); mean over prompts.
  - greedy_eq_majority: fraction of prompts whose greedy answer equals the majority answer of the
    T=1 samples (``voting.majority_vote``); a None greedy answer never matches.
  - coverage: C_cov = E_x[1/pi_base(y*|x)] estimated by mean_x 1/max_j pi_base(y_j|x) over every
    response of the prompt in the table (greedy and samples). max_j pi_base(y_j|x) <= pi_base(y*|x),
    so this over-estimates C_cov, tightly once the mode was drawn (probability 1-(1-pi*)^N); it is
    the quantity the adaptive SFT-Sharpening rule thresholds. "log_coverage" is its log, computed
    stably (the value itself overflows to inf for long responses).
  - generation-verification gap: gap = BoN@N accuracy with the base log-prob as verifier (the
    top-scored of all N samples) - T=1 accuracy; relative gap = gap / (1 - T=1 accuracy).

  Returns:
    a flat dict of floats (quantiles under "greedy_mass_quantiles", keyed by level).
  """
  prompts = _by_prompt(eval_rows, "sharpness")
  mass_P = np.exp([_value(g, "model_logprob") for _, g, _ in prompts])
  finite_mass = mass_P[np.isfinite(mass_P)]
  entropy_P, match_P, log_inv_mode_P, bon_P = [], [], [], []
  for _, g, samples in prompts:
    nll = -sum(_value(r, "model_logprob") for r in samples)
    tokens = sum(int(r.get("length") or 0) for r in samples)
    if tokens and math.isfinite(nll):
      entropy_P.append(nll / tokens)
    majority = majority_vote([r.get("extracted") for r in samples])
    match_P.append(g.get("extracted") is not None and g.get("extracted") == majority)
    logp = np.array([_value(r, "base_logprob") for r in (g, *samples)])
    if np.isfinite(logp).any():
      log_inv_mode_P.append(-float(np.max(logp[np.isfinite(logp)])))
    scores = np.array([_value(r, "base_logprob") for r in samples])
    bon_P.append(estimators.bon_at_k(scores, [bool(r["correct"]) for r in samples], len(samples),
                                     ties=TIES))
  t1_acc = float(np.mean([bool(r["correct"]) for _, _, s in prompts for r in s]))
  bon_acc = float(np.mean(bon_P))
  gap = bon_acc - t1_acc
  log_cov = math.nan
  if log_inv_mode_P:
    a = np.array(log_inv_mode_P)
    log_cov = float(a.max() + np.log(np.mean(np.exp(a - a.max()))))
  return {
      "num_prompts": len(prompts),
      "greedy_mass_mean": float(finite_mass.mean()) if finite_mass.size else math.nan,
      "greedy_mass_quantiles": ({q: float(v) for q, v in zip(QUANTILES, np.quantile(finite_mass,
                                                                                  QUANTILES))}
                                if finite_mass.size else {q: math.nan for q in QUANTILES}),
      "frac_greedy_mass_over_half": float(np.mean(finite_mass > 0.5)) if finite_mass.size
                                    else math.nan,
      "entropy_per_token": float(np.mean(entropy_P)) if entropy_P else math.nan,
      "greedy_eq_majority": float(np.mean(match_P)),
      "log_coverage": log_cov,
      "coverage": math.exp(log_cov) if log_cov < 700 else math.inf,
      "t1_acc": t1_acc, "bon_n_acc": bon_acc, "gv_gap": gap,
      "gv_gap_rel": gap / (1.0 - t1_acc) if t1_acc < 1.0 else math.nan,
  }
