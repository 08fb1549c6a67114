"""A markdown sharpening report for a loop workdir, recomputed from the tables on disk.

    python -m selfimprove_jax.analysis.report WORKDIR [--out_dir DIR]

reads every ``round_RRR/eval_samples.jsonl`` and ``eval.json`` plus ``metrics.jsonl``, and writes
``report.md`` with its figures (PNGs) into ``WORKDIR/report/`` by default; prints the report's path.
The report opens with the headline numbers (base model vs the last round), then the figures for
the base and the last round, then the tables. Every file is written atomically. Tables are
read through ``selfimprove_jax.tables`` (no jax), checked for the columns the views read.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
from etils import epath

from selfimprove_jax import cli
from selfimprove_jax.analysis import plots, rounds, views
from selfimprove_jax.tables import atomic_write, read_table

ROUND_DIR = re.compile(r"round_(\d+)$")


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """``metrics.jsonl`` records; a truncated last line (a killed writer) is dropped, as
  ``metrics.MetricsLog`` does; [] when the file does not exist."""
  path = epath.Path(path)
  if not path.exists():
    return []
  lines = path.read_text().split("\n")
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError as e:
      if i == len(lines) - 1:
        continue
      raise ValueError(f"read_metrics: malformed record in {path} line {i + 1}: {e}") from None
  return records


def read_rounds(workdir: str | os.PathLike) -> tuple[dict[int, list[dict]], dict[int, dict]]:
  """({round: eval table}, {round: eval.json}) for every ``round_RRR`` with an eval table."""
  workdir = epath.Path(workdir)
  if not workdir.is_dir():
    raise FileNotFoundError(f"read_rounds: workdir={os.fspath(workdir)!r} is not a directory")
  tables, evals = {}, {}
  for d in sorted(workdir.iterdir(), key=lambda p: p.name):
    m = ROUND_DIR.match(d.name)
    if not m or not (d / "eval_samples.jsonl").exists():
      continue
    if not (d / "eval.json").exists():
      raise FileNotFoundError(f"read_rounds: {os.fspath(d / 'eval_samples.jsonl')!r} exists but "
                              f"{os.fspath(d / 'eval.json')!r} does not")
    r = int(m.group(1))
    tables[r] = read_table(d / "eval_samples.jsonl", views.COLUMNS)
    evals[r] = json.loads((d / "eval.json").read_text())
  if not tables:
    raise FileNotFoundError(f"read_rounds: workdir={os.fspath(workdir)!r} has no "
                            f"round_RRR/eval_samples.jsonl")
  return tables, evals


def _fmt(x: Any, digits: int = 3, sign: bool = False) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "–"
  if isinstance(x, float) and (math.isinf(x) or abs(x) >= 1e6):
    return f"{x:.3g}"
  if isinstance(x, float):
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
  return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def headline_rows(base: dict, last: dict) -> list[tuple[str, float, float]]:
  """(metric, base value, last value) from two ``eval.json`` dicts: greedy_acc, t1_acc,
  mean_base_logprob_t1 and bon_logprob@k for every k of the base's."""
  rows = [(key, base.get(key, math.nan), last.get(key, math.nan))
          for key in ("greedy_acc", "t1_acc", "mean_base_logprob_t1")]
  for k in sorted(base.get("bon_logprob", {}), key=int):
    rows.append((f"bon_logprob@{k}", base["bon_logprob"][k],
                 last.get("bon_logprob", {}).get(k, math.nan)))
  return [(name, math.nan if b is None else float(b), math.nan if v is None else float(v))
          for name, b, v in rows]


def _headline(base_round: int, last_round: int, evals: dict[int, dict]) -> list[str]:
  rows = headline_rows(evals[base_round], evals[last_round])
  digits = {"mean_base_logprob_t1": 2}
  return _table(["metric", f"base (round {base_round})", f"round {last_round}", "change"],
                [(name, _fmt(b, digits.get(name, 3)), _fmt(v, digits.get(name, 3)),
                  _fmt(v - b, digits.get(name, 3), sign=True)) for name, b, v in rows])


def _verdict(low: float, high: float, better: str, worse: str, same: str) -> str:
  """Which way a 95% interval points: above 0, below 0, or straddling it."""
  if low > 0:
    return better
  if high < 0:
    return worse
  return same


def findings(view: dict, change: dict | None, last_round: int) -> list[str]:
  """What the numbers say, in sentences: each selector's best-of-N against greedy on the base
  model (``views.selector_lifts``), and what the last round changed (``rounds.round_change``);
  a difference counts only when its 95% interval excludes zero."""
  k = max(view["ks"])
  lines = [f"- Base model: greedy {_fmt(view['greedy_acc'])} [{_fmt(view['greedy_low'])}, "
           f"{_fmt(view['greedy_high'])}] over {view['num_prompts']} prompts; "
           f"pass@{k} {_fmt(view['selectors']['pass@k'][k]['acc'])} bounds what any selector "
           f"of {k} samples can reach."]
  for name, by_k in view["selectors"].items():
    if name == "pass@k":
      continue
    c = by_k[k]
    difference = c["acc"] - view["greedy_acc"]
    # The paired difference's interval (when greedy is 0 the difference is the accuracy).
    low, high = ((c["lift_low"], c["lift_high"]) if view["greedy_acc"] > 0 else (c["low"], c["high"]))
    verdict = _verdict(low, high, "beats greedy", "is worse than greedy",
                       "is not distinguishable from greedy at this many prompts")
    lines.append(f"- Best-of-{k} by {name}: {_fmt(c['acc'])} [{_fmt(c['low'])}, {_fmt(c['high'])}]"
                 f", {_fmt(difference, 3, True)} vs greedy: it {verdict}.")
  if view["skipped"]:
    lines.append(f"- Not computed (no scores): {', '.join(view['skipped'])}.")
  if change is not None:
    for name, label in (("greedy", "greedy accuracy"), ("t1", "T=1 accuracy"),
                        ("bon_n", "best-of-N by base log-prob")):
      c = change[name]
      verdict = _verdict(c["low"], c["high"], "improved", "got worse",
                         "did not change beyond noise")
      lines.append(f"- After round {last_round}, {label} {verdict}: {_fmt(c['base'])} -> "
                   f"{_fmt(c['value'])} ({_fmt(c['change'], 3, True)}, 95% CI "
                   f"[{_fmt(c['low'], 3, True)}, {_fmt(c['high'], 3, True)}], paired by prompt).")
  return lines


def _selector_table(view: dict) -> list[str]:
  rows = []
  for name, by_k in view["selectors"].items():
    for k, c in by_k.items():
      rows.append((name, k, f"{_fmt(c['acc'])} [{_fmt(c['low'])}, {_fmt(c['high'])}]",
                   f"{_fmt(c['lift_pct'], 1, True)} [{_fmt(c['lift_low'], 1, True)}, "
                   f"{_fmt(c['lift_high'], 1, True)}]"))
  return _table(["selector", "k", "accuracy [95% CI]", "% lift over greedy [95% CI]"], rows)


def _figures(r: int, rows: list[dict], out: epath.Path, ks: Sequence[int] | None
             ) -> tuple[list[str], dict]:
  """The three figures of one round; returns their markdown and the selector view."""
  lifts = views.selector_lifts(rows, ks)
  curve = views.lift_vs_n(rows)
  hist = views.logprob_histogram_data(rows)
  names = (f"selector_lifts_r{r:03d}.png", f"lift_vs_n_r{r:03d}.png",
           f"logprob_hist_r{r:03d}.png")
  plots.plot_selector_lifts(lifts, out / names[0])
  plots.plot_lift_vs_n(curve, out / names[1])
  plots.plot_logprob_histogram(hist, out / names[2])
  md = [f"### Round {r}", "",
        f"![best-of-k lift per selector, round {r}]({names[0]})", "",
        f"![BoN@k by base log-prob and the selected response's base log-prob vs k, round {r}]"
        f"({names[1]})", "",
        f"![base log-prob of T=1 samples, correct vs wrong, round {r}]({names[2]})", ""]
  return md, lifts


def write_report(workdir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                 ks: Sequence[int] | None = None) -> epath.Path:
  """Writes ``report.md`` and its PNGs for a loop workdir; returns the report's path.

  Args:
    workdir: the loop's workdir (``round_RRR/eval_samples.jsonl`` and ``eval.json`` per round,
      optionally ``metrics.jsonl``).
    out_dir: where to write; default ``workdir/report``.
    ks: subset sizes for the selector-lift figure and table; default the ``bon_logprob`` sizes of
      the base round's eval.json that its samples allow, plus N.
  """
  workdir = epath.Path(workdir)
  out = epath.Path(out_dir) if out_dir is not None else workdir / "report"
  tables, evals = read_rounds(workdir)
  metrics = read_metrics(workdir / "metrics.jsonl")
  out.mkdir(parents=True, exist_ok=True)
  base, last = min(tables), max(tables)
  if ks is None:
    counts: dict[Any, int] = {}
    for row in tables[base]:
      if row.get("kind") == "sample":
        counts[row.get("prompt_id")] = counts.get(row.get("prompt_id"), 0) + 1
    n = min(counts.values(), default=1)
    ks = sorted({*(int(k) for k in evals[base].get("bon_logprob", {}) if int(k) <= n), n})
  md = [f"# Sharpening report: base (round {base}) vs round {last}", "",
        *_headline(base, last, evals), "",
        f"Workdir `{os.fspath(workdir)}`; rounds with an eval: "
        f"{', '.join(str(r) for r in sorted(tables))}. Accuracies are fractions; log-probs are "
        f"summed over the response under the base model (nats); CIs are 95% bootstraps over "
        f"prompts.", "", "## Figures", ""]
  lift_views = {}
  for r in sorted({base, last}):
    fig_md, lift_views[r] = _figures(r, tables[r], out, ks)
    md += fig_md
  md += ["## Findings", "", *findings(lift_views[base],
                                       rounds.round_change(tables[base], tables[last])
                                       if last != base else None, last), ""]
  md += ["## Selector lifts (best-of-k over greedy)", ""]
  for r, view in lift_views.items():
    md += [f"Round {r}: greedy accuracy {_fmt(view['greedy_acc'])} over {view['num_prompts']} "
           f"prompts, N = {view['num_samples']}"
           + (f"; skipped (no scores): {', '.join(view['skipped'])}" if view["skipped"] else "")
           + ".", "", *_selector_table(view), ""]
  if 0 in tables and len(tables) > 1:
    amort = rounds.amortization_table({r: tables[r] for r in sorted(tables)})
    md += ["## Amortization (each round vs the base model)", "",
           *_table(["round", "greedy acc", "T=1 acc", "greedy lift %", "T=1 lift %",
                    "base log-lik (T=1)", "log-lik lift", "log-lik lift %"],
                   [(a["round"], _fmt(a["greedy_acc"]), _fmt(a["t1_acc"]),
                     _fmt(a["greedy_lift_pct"], 1, True), _fmt(a["t1_lift_pct"], 1, True),
                     _fmt(a["loglik_t1"], 2), _fmt(a["loglik_lift"], 2, True),
                     _fmt(a["loglik_lift_pct"], 1, True)) for a in amort]), "",
           "Lifts are relative to the base model's greedy accuracy; log-lik is the mean base "
           "log-prob of the T=1 samples.", ""]
  sharp = {r: views.sharpness(tables[r]) for r in sorted(tables)}
  md += ["## Sharpness", "",
         *_table(["round", "π(greedy) mean", "π(greedy) median", "frac π(greedy) > 1/2",
                  "entropy / token", "greedy = majority", "log C_cov (upper)", "T=1 acc",
                  "BoN@N acc", "G-V gap", "relative gap"],
                 [(r, _fmt(s["greedy_mass_mean"]), _fmt(s["greedy_mass_quantiles"][0.5]),
                   _fmt(s["frac_greedy_mass_over_half"]), _fmt(s["entropy_per_token"]),
                   _fmt(s["greedy_eq_majority"]), _fmt(s["log_coverage"], 2),
                   _fmt(s["t1_acc"]), _fmt(s["bon_n_acc"]), _fmt(s["gv_gap"], 3, True),
                   _fmt(s["gv_gap_rel"], 3, True)) for r, s in sharp.items()]), "",
         "π(greedy): the evaluated model's probability of its greedy response; entropy per "
         "token: -Σ log π / Σ length over the T=1 samples (nats); C_cov estimated by "
         "mean_x 1/max_j π_base(y_j|x), an upper bound; G-V gap: BoN@N by base log-prob minus "
         "T=1 accuracy, relative to 1 - T=1 accuracy.", ""]
  balance = rounds.balance_by_round(metrics)
  if balance:
    md += ["## B-STaR balance", "",
           *_table(["round", "balance score", "temperature", "threshold"],
                   [(r, _fmt(b["balance_score"]), _fmt(b["temperature"], 2),
                     _fmt(b["threshold"], 3)) for r, b in balance.items()]), ""]
  path = out / "report.md"
  atomic_write(path, "\n".join(md))
  return path


def define_flags(values: flags.FlagValues) -> None:
  """The CLI's flags; the loop's WORKDIR is positional."""
  flags.DEFINE_string("out_dir", None, "Where to write report.md and its figures (default: "
                      "WORKDIR/report).", flag_values=values)


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m selfimprove_jax.analysis.report WORKDIR [--out_dir DIR]``; prints the path."""
  v, (workdir,) = cli.parse(sys.argv[1:] if argv is None else argv, define_flags,
                            prog="python -m selfimprove_jax.analysis.report",
                            positional=("WORKDIR",))
  print(os.fspath(write_report(workdir, v.out_dir)))


if __name__ == "__main__":
  main()
