"""Several loop workdirs side by side in one report: a study's arms, an N ablation, algorithms.

    python -m selfimprove_jax.analysis.compare OUT_DIR NAME=WORKDIR [NAME=WORKDIR ...]

Each workdir is read as ``report`` reads it (every round's eval table and eval.json). The report
opens with one row per run (the base model and the last round: greedy, T=1, best-of-N by base
log-prob, pass@N, mean base log-prob of T=1 samples, and the paired changes with 95% bootstrap
CIs), then a figure of every run's per-round greedy accuracy, T=1 accuracy and base log-prob,
each run's findings in words, and the amortization table over all runs (Table 1's N ablation
when the runs differ in N). Links point at each run's own report.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from etils import epath

from selfimprove_jax import cli
from selfimprove_jax.analysis import plots, rounds, views
from selfimprove_jax.analysis.report import _fmt, _table, findings, read_metrics, read_rounds
from selfimprove_jax.tables import atomic_write

FIGURE = "trajectories.png"


def _ci(change: dict) -> str:
  return (f"{_fmt(change['change'], 3, True)} [{_fmt(change['low'], 3, True)}, "
          f"{_fmt(change['high'], 3, True)}]")


def _samples_per_prompt(rows: Sequence[dict]) -> int:
  counts: dict = {}
  for r in rows:
    if r["kind"] == "sample":
      counts[r["prompt_id"]] = counts.get(r["prompt_id"], 0) + 1
  return min(counts.values(), default=0)


def _why_worse(name: str, base_eval: dict, change: dict | None, n: int) -> list[str]:
  """One sentence when sharpening lowered T=1 accuracy and the base's likelihood ranks wrong
  answers first (best-of-N by log-prob below T=1): the mode was wrong, and training moved the
  model onto it."""
  bon, t1 = base_eval.get("bon_logprob", {}).get(str(n)), base_eval.get("t1_acc")
  if change is None or change["t1"]["high"] >= 0 or bon is None or t1 is None or bon >= t1:
    return []
  return [f"- Why {name} got worse: the base model's likeliest of {n} samples is right less often "
          f"({_fmt(bon)}) than a random sample ({_fmt(t1)}), so its mode is a wrong answer, and "
          f"training on the likeliest samples moved the model onto that mode."]


def write_report(workdirs: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike
                 ) -> epath.Path:
  """Writes ``report.md`` and ``trajectories.png`` into ``out_dir``; returns the report's path.

  Args:
    workdirs: run name -> loop workdir, in the order the report lists them. Every run needs its
      round 0 (the base model) evaluated.
  """
  if not workdirs:
    raise ValueError("compare.write_report: no workdirs")
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tables, evals = {}, {}
  for name, wd in workdirs.items():
    tables[name], evals[name] = read_rounds(wd)
    if 0 not in tables[name]:
      raise ValueError(f"compare.write_report: {name}={os.fspath(wd)!r} has no round 0 eval")
  rows, sections = [], []
  for name, wd in workdirs.items():
    t, e = tables[name], evals[name]
    last = max(t)
    n = min(_samples_per_prompt(t[0]), _samples_per_prompt(t[last]))
    change = rounds.round_change(t[0], t[last]) if last else None
    drawn = [m["samples_per_prompt"] for m in read_metrics(epath.Path(wd) / "metrics.jsonl")
             if m.get("stage") == "sample" and "samples_per_prompt" in m]
    b, a = e[0], e[last]
    bon = b["bon_logprob"].get(str(n))
    closed = (100.0 * (a["t1_acc"] - b["t1_acc"]) / (bon - b["t1_acc"])
              if bon is not None and bon > b["t1_acc"] else None)
    rows.append((name, last, _fmt(b["greedy_acc"]), _fmt(b["t1_acc"]), _fmt(bon),
                 _fmt(b["pass"].get(str(n))), _fmt(a["greedy_acc"]), _fmt(a["t1_acc"]),
                 _fmt(closed, 0), _fmt(sum(drawn) / len(drawn) if drawn else None, 1),
                 _fmt(a["bon_logprob"].get(str(n))),
                 _ci(change["greedy"]) if change else "–", _ci(change["t1"]) if change else "–",
                 f"{_fmt(b['mean_base_logprob_t1'], 2)} → {_fmt(a['mean_base_logprob_t1'], 2)}"))
    own = epath.Path(wd) / "report" / "report.md"
    sections += [f"### {name}", "", *findings(views.selector_lifts(t[0]), change, last),
                 *_why_worse(name, b, change, n), "",
                 f"Its own report: `{os.fspath(own)}`." if own.exists() else "", ""]
  plots.plot_trajectories(evals, out / FIGURE)
  amort = rounds.amortization_table({name: tables[name] for name in workdirs})
  md = ["# Study: the runs side by side", "",
        *_table(["run", "rounds", "base greedy", "base T=1", "base BoN@N", "base pass@N",
                 "greedy", "T=1", "gap closed %", "samples / prompt", "BoN@N",
                 "Δ greedy [95% CI]", "Δ T=1 [95% CI]",
                 "base log-prob of T=1 samples"], rows), "",
        "Base: round 0; the next columns are the last round's model on the same held-out "
        "prompts. BoN@N: best of the N samples by base log-prob (exact expectation); gap closed: "
        "how much of the base's BoN@N − T=1 gap the last round's T=1 accuracy closed (the "
        "amortization); samples / prompt: drawn per training prompt, the mean over rounds; Δ: "
        "paired by prompt. Log-probs are summed over the response under the base model "
        "(nats).", "",
        f"![greedy accuracy, T=1 accuracy and base log-prob per round, each run]({FIGURE})", "",
        "## Findings", "", *sections,
        "## Amortization (every round vs its run's base)", "",
        *_table(["run", "round", "greedy acc", "T=1 acc", "greedy lift %", "T=1 lift %",
                 "log-lik (T=1)", "log-lik lift"],
                [(a["run"], a["round"], _fmt(a["greedy_acc"]), _fmt(a["t1_acc"]),
                  _fmt(a["greedy_lift_pct"], 1, True), _fmt(a["t1_lift_pct"], 1, True),
                  _fmt(a["loglik_t1"], 2), _fmt(a["loglik_lift"], 2, True)) for a in amort]), ""]
  path = out / "report.md"
  atomic_write(path, "\n".join(md))
  return path


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m selfimprove_jax.analysis.compare OUT_DIR NAME=WORKDIR ...``; prints the path."""
  args = list(sys.argv[1:] if argv is None else argv)
  prog = "python -m selfimprove_jax.analysis.compare"
  if len(args) < 2:
    raise cli.usage_error(prog, "usage: OUT_DIR NAME=WORKDIR [NAME=WORKDIR ...]")
  runs = {}
  for arg in args[1:]:
    name, sep, wd = arg.partition("=")
    if not sep or not name or not wd or name in runs:
      raise cli.usage_error(prog, f"{arg!r} is not a new NAME=WORKDIR")
    runs[name] = wd
  print(os.fspath(write_report(runs, args[0])))


if __name__ == "__main__":
  main()
