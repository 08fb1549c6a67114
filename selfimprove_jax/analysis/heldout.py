"""Held-out metrics of one eval table: what ``eval.json`` holds for every round. Pure NumPy.

The table (``tables.EVAL_COLUMNS``) has one greedy row and N T=1 rows per prompt, each graded and
scored under the base model. Expectations over k-subsets are exact (``estimators``).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from selfimprove_jax import tables
from selfimprove_jax.analysis import estimators

# What eval_metrics reads.
COLUMNS = ("kind", "prompt_id", "length", "extracted", "correct", "base_logprob",
           "base_mean_logprob", "base_self_certainty")


def eval_metrics(rows: Sequence[dict], num_samples: int, bon_k: Sequence[int]) -> dict:
  """Greedy accuracy, T=1 accuracy (pass@1), pass@k, maj@k, best-of-k by the base model's
  log-prob, mean log-prob and self-certainty, the mean base log-prob and length of T=1 samples,
  for every k in ``bon_k`` (each <= ``num_samples``, the T=1 samples per prompt)."""
  tables.require(rows, COLUMNS, "eval_metrics")
  greedy = [r for r in rows if r["kind"] == "greedy"]
  samples = [r for r in rows if r["kind"] == "sample"]
  by_prompt: dict = {}
  for r in samples:
    by_prompt.setdefault(r["prompt_id"], []).append(r)
  column = lambda name: np.array([[s[name] for s in v] for v in by_prompt.values()], float)
  correct_PxN, logp_PxN = column("correct"), column("base_logprob")
  n_P = np.full(len(by_prompt), num_samples)
  bon = lambda scores_PxN, k: float(np.mean(estimators.bon_at_k_batch(scores_PxN, correct_PxN, k)))

  def maj(k: int) -> float:
    per_prompt = []
    for v in by_prompt.values():
      truth: dict = {}
      for s in v:
        truth.setdefault(s["extracted"], bool(s["correct"]))
      per_prompt.append(estimators.maj_at_k([s["extracted"] for s in v], truth, k,
                                            exact_limit=2_000, num_subsets=1_000))
    return float(np.mean(per_prompt))

  return {
      "greedy_acc": float(np.mean([r["correct"] for r in greedy])),
      "t1_acc": float(correct_PxN.mean()),
      "mean_base_logprob_t1": float(logp_PxN.mean()),
      "mean_length_t1": float(np.mean([r["length"] for r in samples])),
      "pass": {str(k): float(np.mean(estimators.pass_at_k(n_P, correct_PxN.sum(1), k)))
               for k in bon_k},
      "bon_logprob": {str(k): bon(logp_PxN, k) for k in bon_k},
      "bon_mean_logprob": {str(k): bon(column("base_mean_logprob"), k) for k in bon_k},
      "bon_self_certainty": {str(k): bon(column("base_self_certainty"), k) for k in bon_k},
      "maj": {str(k): maj(k) for k in bon_k},
      "num_prompts": len(by_prompt),
  }
