"""ANALYSE: sharpening metrics recomputed offline from the per-round sample tables.

Modules:
  estimators  pass@k, exact best-of-k under a selector, maj@k, percentile bootstrap CIs over
              prompts, greedy-vs-BoN lift. Pure NumPy.
  heldout     ``eval_metrics``: the held-out numbers of one eval table (each round's eval.json).
  views       the paper's figures and tables as numbers from one eval table: per-selector lifts,
              lift vs N, log-prob histograms, sharpness. Pure NumPy.
  rounds      rounds against the base: amortization (and its N ablation), paired changes with
              bootstrap CIs, B-STaR balance per round. Pure NumPy.
  plots       PNGs of the views (matplotlib Agg canvas, no windows).
  report      ``python -m selfimprove_jax.analysis.report WORKDIR``: report.md plus figures.

``plots`` and ``report`` (matplotlib) load on first access, so the loop's imports stay light.
"""
import importlib

from selfimprove_jax.analysis.estimators import (bon_at_k, bon_at_k_batch, bon_at_k_ragged,
                                                 bootstrap_ci, greedy_vs_bon_lift, maj_at_k,
                                                 pass_at_k)
from selfimprove_jax.analysis.heldout import eval_metrics
from selfimprove_jax.analysis.rounds import amortization_table, balance_by_round, round_change
from selfimprove_jax.analysis.views import (expected_selected_value, lift_vs_n,
                                            logprob_histogram_data, selector_lifts, sharpness)

_LAZY = {"plot_selector_lifts": "plots", "plot_lift_vs_n": "plots",
         "plot_logprob_histogram": "plots", "write_report": "report"}

__all__ = ["bon_at_k", "bon_at_k_batch", "bon_at_k_ragged", "bootstrap_ci", "greedy_vs_bon_lift",
           "maj_at_k", "pass_at_k", "eval_metrics", "amortization_table", "balance_by_round",
           "expected_selected_value", "lift_vs_n", "logprob_histogram_data", "round_change",
           "selector_lifts",
           "sharpness", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"selfimprove_jax.analysis.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'selfimprove_jax.analysis' has no attribute {name!r}")
