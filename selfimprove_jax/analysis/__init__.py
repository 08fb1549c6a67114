"""ANALYSE: sharpening metrics recomputed offline from the per-round sample tables.

Modules:
  estimators  pass@k, exact best-of-k under a selector, maj@k, percentile bootstrap CIs over
              prompts, greedy-vs-BoN lift. Pure NumPy.
"""
from selfimprove_jax.analysis.estimators import (bon_at_k, bon_at_k_batch, bon_at_k_ragged,
                                                 bootstrap_ci, greedy_vs_bon_lift, maj_at_k,
                                                 pass_at_k)

__all__ = ["bon_at_k", "bon_at_k_batch", "bon_at_k_ragged", "bootstrap_ci", "greedy_vs_bon_lift",
           "maj_at_k", "pass_at_k"]
