"""PNG figures of the sharpening views (``views``): one function per figure type.

Each takes a view's output and a path, writes a PNG atomically (temporary sibling, then rename)
and returns the path. Figures are built on matplotlib's Agg canvas directly (no pyplot): nothing
opens a window and no global backend state is touched, so plotting is safe in servers and tests.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120
SELECTOR_LABELS = {"logprob": "log-prob", "mean_logprob": "mean log-prob",
                   "self_certainty": "self-certainty", "majority": "majority",
                   "pass@k": "pass@k (skyline)"}
MAX_GROUPED_KS = 4


def _figure(figsize: tuple[float, float]) -> Figure:
  fig = Figure(figsize=figsize, dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str | os.PathLike) -> epath.Path:
  """Writes ``fig`` as a PNG to a temporary sibling of ``path``, then renames it over ``path``."""
  path = epath.Path(path)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_bytes(buf.getvalue())
  tmp.replace(path)
  return path


def plot_selector_lifts(view: dict[str, Any], path: str | os.PathLike,
                        ks: Sequence[int] | None = None) -> epath.Path:
  """Grouped bars: % lift of best-of-k over greedy per selector, one bar per k, with the
  bootstrap CI as error bars (Fig. 1a analog).

  Args:
    view: ``views.selector_lifts`` output.
    path: the PNG to write.
    ks: which subset sizes to draw; default the largest ``MAX_GROUPED_KS`` of the view's.
  If greedy accuracy is 0 (lift undefined), the bars show accuracy instead, and the axis says so.
  """
  ks = list(ks) if ks is not None else view["ks"][-MAX_GROUPED_KS:]
  missing = [k for k in ks if k not in view["ks"]]
  if missing:
    raise ValueError(f"plot_selector_lifts: ks={ks} has {missing}, not among the view's ks "
                     f"{view['ks']}")
  names = list(view["selectors"])
  as_lift = view["greedy_acc"] > 0
  key, low, high = ("lift_pct", "lift_low", "lift_high") if as_lift else ("acc", "low", "high")
  fig = _figure((6.4, 4.0))
  ax = fig.subplots()
  width = 0.8 / len(ks)
  x = np.arange(len(names))
  for i, k in enumerate(ks):
    cells = [view["selectors"][n][k] for n in names]
    h = np.array([c[key] for c in cells])
    err = np.array([[c[key] - c[low] for c in cells], [c[high] - c[key] for c in cells]])
    ax.bar(x + (i - (len(ks) - 1) / 2) * width, h, width, yerr=np.clip(err, 0, None),
           capsize=3, label=f"k = {k}")
  if as_lift:
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("% lift over greedy accuracy")
  else:
    ax.set_ylabel("accuracy (greedy accuracy is 0)")
  ax.set_xticks(x, [SELECTOR_LABELS.get(n, n) for n in names], rotation=15, ha="right")
  ax.set_xlabel("selector (scores under the base model)")
  ax.set_title(f"Best-of-k vs greedy (greedy acc {view['greedy_acc']:.3f}, "
               f"{view['num_prompts']} prompts)")
  ax.legend(title="subset size", fontsize="small")
  ax.grid(axis="y", alpha=0.3)
  return _save(fig, path)


def plot_lift_vs_n(view: dict[str, Any], path: str | os.PathLike) -> epath.Path:
  """Two panels against k on a log2 axis (Fig. 1b analog): left, % lift over greedy of BoN@k by
  base log-prob with its CI band and the pass@k skyline; right, the expected base log-prob of the
  selected response with the greedy response's for reference.

  Args:
    view: ``views.lift_vs_n`` output.
    path: the PNG to write.
  """
  ks = np.array(view["ks"])
  fig = _figure((9.0, 3.8))
  ax_lift, ax_lp = fig.subplots(1, 2)
  g = view["greedy_acc"]
  if g > 0:
    ax_lift.plot(ks, view["lift_pct"], marker="o", label="BoN@k by base log-prob")
    ax_lift.fill_between(ks, view["lift_low"], view["lift_high"], alpha=0.25, label="95% CI")
    ax_lift.plot(ks, [100.0 * (p - g) / g for p in view["pass_at_k"]], linestyle="--",
                 color="gray", label="pass@k (skyline)")
    ax_lift.axhline(0.0, color="black", linewidth=0.8)
    ax_lift.set_ylabel("% lift over greedy accuracy")
  else:
    ax_lift.plot(ks, view["acc"], marker="o", label="BoN@k by base log-prob")
    ax_lift.fill_between(ks, view["low"], view["high"], alpha=0.25, label="95% CI")
    ax_lift.plot(ks, view["pass_at_k"], linestyle="--", color="gray", label="pass@k (skyline)")
    ax_lift.set_ylabel("accuracy (greedy accuracy is 0)")
  ax_lift.set_title(f"Accuracy vs k (greedy acc {g:.3f})")
  ax_lp.plot(ks, view["selected_logprob"], marker="o", color="tab:green",
             label="selected response")
  ax_lp.fill_between(ks, view["selected_logprob_low"], view["selected_logprob_high"],
                     alpha=0.25, color="tab:green", label="95% CI")
  if math.isfinite(view["greedy_logprob"]):
    ax_lp.axhline(view["greedy_logprob"], linestyle="--", color="gray", label="greedy response")
  ax_lp.set_ylabel("mean base log-prob (nats)")
  ax_lp.set_title("Base log-prob of the selected response")
  for ax in (ax_lift, ax_lp):
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("k (samples per best-of-k)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_logprob_histogram(view: dict[str, Any], path: str | os.PathLike,
                           bins: int = 30) -> epath.Path:
  """Overlaid histograms of the T=1 samples' base log-probs, correct vs wrong, on shared bins
  (Fig. 1c analog).

  Args:
    view: ``views.logprob_histogram_data`` output.
    path: the PNG to write.
    bins: number of shared bins.
  """
  if bins < 1:
    raise ValueError(f"plot_logprob_histogram: bins={bins} must be >= 1")
  groups = [("correct", "tab:blue"), ("wrong", "tab:red")]
  values = np.concatenate([view[name] for name, _ in groups])
  fig = _figure((6.0, 4.0))
  ax = fig.subplots()
  if values.size:
    lo, hi = float(values.min()), float(values.max())
    edges = np.linspace(lo - 0.5, hi + 0.5, bins + 1) if lo == hi else np.linspace(lo, hi, bins + 1)
    for name, color in groups:
      data = view[name]
      if data.size:
        ax.hist(data, bins=edges, alpha=0.5, color=color, edgecolor=color,
                label=f"{name} (n={data.size}, mean {data.mean():.1f})")
    ax.legend(fontsize="small")
  else:
    ax.text(0.5, 0.5, "no samples with a base log-prob", ha="center", va="center",
            transform=ax.transAxes)
  ax.set_xlabel("base log-prob log π_base(y|x) (nats)")
  ax.set_ylabel("T=1 samples")
  ax.set_title("Base log-prob of T=1 samples by correctness")
  ax.grid(alpha=0.3)
  return _save(fig, path)


TRAJECTORY_PANELS = (("greedy_acc", "greedy accuracy"), ("t1_acc", "T=1 accuracy"),
                     ("mean_base_logprob_t1", "mean base log-prob of T=1 samples (nats)"))


def plot_trajectories(runs: dict[str, dict[int, dict]], path: str | os.PathLike) -> epath.Path:
  """Per-round curves of several runs side by side: greedy accuracy, T=1 accuracy and the mean
  base log-prob of T=1 samples, one line per run (a study's arms).

  Args:
    runs: run name -> {round -> that round's ``eval.json`` dict}.
    path: the PNG to write.
  """
  if not runs:
    raise ValueError("plot_trajectories: no runs")
  fig = _figure((4.0 * len(TRAJECTORY_PANELS), 3.6))
  axes = fig.subplots(1, len(TRAJECTORY_PANELS))
  for ax, (key, label) in zip(axes, TRAJECTORY_PANELS):
    for name, evals in runs.items():
      rounds = sorted(evals)
      ax.plot(rounds, [evals[r].get(key, math.nan) for r in rounds], marker="o", label=name)
    ax.set_xlabel("round (0 = base model)")
    ax.set_title(label, fontsize="medium")
    ax.set_xticks(sorted({r for evals in runs.values() for r in evals}))
    if key != "mean_base_logprob_t1":
      ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize="small")
  return _save(fig, path)
