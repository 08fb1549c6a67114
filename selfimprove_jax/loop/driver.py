"""The driver: which stages are pending, in what order, and what a finished stage leaves on disk.

Round 0 is the evaluation of the base model. Round r >= 1 runs, offline,
sample → score → select → train → eval (``stages``, ``offline``), or online, train → eval
(``online``). A stage counts as done only once its result is written, so rerunning the same
command after a crash or a preempted VM resumes at the first unfinished stage (a train stage
from its last checkpoint) and ends bit-identical to an uninterrupted run. Before anything is
written, every checkpoint the resumed run reads is verified, so a damaged one fails with the
workdir untouched.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import tqdm

from selfimprove_jax.checkpoint import trees
from selfimprove_jax.loop import context, offline, online, policies, stages, updates
from selfimprove_jax.loop.workdir import Journal, commit, flatten
from selfimprove_jax.tables import atomic_write

OFFLINE_STAGES = ("sample", "score", "select", "train", "eval")
ONLINE_STAGES = ("train", "eval")
# The offline stages that turn the round's table into its next version: (the stage whose
# table they read, the stage function).
_TABLE_STAGES = {"score": ("sample", stages.score), "select": ("score", stages.select)}


class Loop:
  """One run of a loop config in a workdir. ``run()`` does every pending stage of every round.

  ``ctx`` is the run's ``context.Context`` (task, tokenizer, models, mesh, base params);
  ``journal`` its ``workdir.Journal`` (progress, metrics, tables).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
               progress_bars: bool = True):
    if config.study.arms:
      raise ValueError(f"config.study.arms={sorted(config.study.arms)}: a study runs each arm "
                       "in WORKDIR/ARM; use loop.run_study (python -m selfimprove_jax.main does)")
    self.ctx = context.build(config, workdir, progress_bars=progress_bars)
    self.journal = Journal(self.ctx.workdir, writer=self.ctx.writer)

  @property
  def base_params(self) -> Any:
    return self.ctx.base_params

  def policy_params(self, round_index: int) -> Any:
    """The model after round ``round_index`` (the base for 0), full params, train shardings."""
    return policies.policy(self.ctx, round_index)

  def pending(self) -> list[tuple[int, str]]:
    """(round, stage) of every stage not done yet, in run order."""
    done = self.journal.progress.done
    names = OFFLINE_STAGES if self.ctx.config.loop.mode == "offline" else ONLINE_STAGES
    todo = [] if done(0, "eval") else [(0, "eval")]
    for r in range(1, self.ctx.config.loop.num_rounds + 1):
      todo += [(r, s) for s in names if not done(r, s)]
    return todo

  def run(self, stop_after: str | None = None, *, started: float | None = None) -> dict:
    """Runs the pending stages in order (stopping after the first ``stop_after`` stage run).

    ``started`` (a ``time.time()``) is when the invocation began, for ``summary.json``'s
    runtime (default: now). Returns the last round's eval metrics.
    """
    started = time.time() if started is None else started
    if stop_after is not None and stop_after not in OFFLINE_STAGES:
      raise ValueError(f"stop_after={stop_after!r}: must be one of {OFFLINE_STAGES}")
    ctx, journal = self.ctx, self.journal
    todo = self.pending()
    resume = self._resume_point(todo)  # restores (and so verifies) checkpoints before any write
    commit(ctx.workdir, ctx.config, ctx.writer)
    journal.open_metrics(self._keeper(resume), ctx.config)
    try:
      if todo:  # every stage reads the base: load (or pretrain) it first, timed on its own
        start = time.perf_counter()
        jax.block_until_ready(ctx.base_params)
        if ctx.bars:
          tqdm.tqdm.write(f"base model: {time.perf_counter() - start:.1f} s")
      for round_index, stage in todo:
        start = time.perf_counter()
        self.run_stage(round_index, stage)
        if ctx.bars:
          tqdm.tqdm.write(f"round {round_index} {stage}: {time.perf_counter() - start:.1f} s")
        if stage == "eval":
          self._print_round(round_index)
        if stage == stop_after:
          break
      else:
        self._finish(todo, started)
    finally:
      ctx.profiler.close()
      journal.close()
    evals = [int(r) for r, done in journal.progress.completed.items() if "eval" in done]
    last = max(evals, default=0)
    return journal.eval_result(last) if journal.progress.done(last, "eval") else {}

  def run_stage(self, r: int, stage: str) -> None:
    """Runs one stage of round ``r``, writes its result and records, and then marks it done:
    the mark is the last write, so a stage marked done owes nothing to a rerun."""
    ctx, journal = self.ctx, self.journal
    if stage == "sample":
      rows = stages.sample(ctx, r)
      journal.write_round_table(r, rows, "sample")
      prompts = len({row["prompt_id"] for row in rows})
      journal.log(r, stage, journal.progress.global_step(r),
                  {"num_samples": len(rows), "samples_per_prompt": len(rows) / max(prompts, 1)})
      journal.mark_done(r, stage)
    elif stage in _TABLE_STAGES:
      previous, fn = _TABLE_STAGES[stage]
      rows, metrics = fn(ctx, r, journal.read_round_table(r, previous))
      journal.write_round_table(r, rows, stage)
      journal.log(r, stage, journal.progress.global_step(r), metrics)
      journal.mark_done(r, stage)
    elif stage == "train":
      steps = updates.saved_steps(ctx, r)  # a run killed after saving the round's params
      if steps is None:
        mode = offline if ctx.config.loop.mode == "offline" else online
        steps = mode.train(ctx, journal, r)
      else:
        updates.drop_train_states(ctx, r)
      journal.mark_done(r, stage, train_steps=steps)
    else:
      rows, result = stages.evaluate(ctx, r)
      journal.write_eval(r, rows, result)
      journal.log(r, "eval", journal.progress.global_step(r + 1), flatten(result))
      self._log_round(r)
      journal.mark_done(r, "eval")

  def _finish(self, todo: list[tuple[int, str]], started: float) -> None:
    """After the last stage: ``summary.json`` and the report (process 0)."""
    ctx = self.ctx
    if not ctx.writer:
      return
    finished = self.journal.progress.done(ctx.config.loop.num_rounds, "eval")
    if finished and (todo or not (ctx.workdir.root / "summary.json").exists()):
      self.write_summary(started)  # a rerun with nothing left keeps the run's own runtime
    report_md = ctx.workdir.root / "report" / "report.md"
    if ctx.config.loop.report and (todo or not report_md.exists()):
      from selfimprove_jax.analysis import report  # pylint: disable=g-import-not-at-top
      path = report.write_report(ctx.workdir.root)
      if ctx.progress_bars:
        tqdm.tqdm.write(f"report: {path}")

  def _resume_point(self, todo: list[tuple[int, str]]) -> tuple[int, int] | None:
    """Verifies every checkpoint the first pending stage reads and returns (round, steps done) of
    an interrupted train stage, if that is where the run resumes."""
    if not todo:
      return None
    ctx = self.ctx
    round_index, stage = todo[0]
    check = trees.verify if ctx.config.checkpoint.verify else trees.read_meta
    if trees.exists(ctx.workdir.base):
      check(ctx.workdir.base)
    for r in range(1, round_index):
      if self.journal.progress.done(r, "train"):
        check(ctx.workdir.params(r))
    if stage != "train":
      return None
    if trees.exists(ctx.workdir.params(round_index)):  # trained, killed before the mark
      check(ctx.workdir.params(round_index))
      return round_index, updates.saved_steps(ctx, round_index)
    step = updates.latest_checkpoint(ctx, round_index)  # committed (orbax), not checksummed
    return None if step is None else (round_index, step)

  def _keeper(self, resume: tuple[int, int] | None) -> Callable[[dict], bool]:
    """Which metrics records survive a restart: those of finished stages and of checkpointed
    steps of the interrupted train stage."""
    progress = self.journal.progress

    def keep(record: dict) -> bool:
      r, stage = record.get("round"), record.get("stage")
      if r is None or stage is None:
        return True
      if stage == "round":
        return progress.done(r, "eval")
      if progress.done(r, stage):
        return True
      if resume is not None and stage == "train" and r == resume[0]:
        return record.get("round_step", 0) <= resume[1]
      return False
    return keep

  def _print_round(self, r: int) -> None:
    e = self.journal.eval_result(r)
    if self.ctx.writer:
      tqdm.tqdm.write(f"round {r}: greedy {e['greedy_acc']:.3f}  T=1 {e['t1_acc']:.3f}  "
                      f"base log-prob (T=1) {e['mean_base_logprob_t1']:.2f}  "
                      + "  ".join(f"BoN@{k} {v:.3f}" for k, v in e["bon_logprob"].items()))

  def _log_round(self, r: int) -> None:
    """The round's headline metrics as one ``round`` record (part of what its eval owes)."""
    e = self.journal.eval_result(r)
    self.journal.log(r, "round", self.journal.progress.global_step(r + 1),
                     {"greedy_acc": e["greedy_acc"], "t1_acc": e["t1_acc"],
                      "mean_base_logprob_t1": e["mean_base_logprob_t1"],
                      **{f"bon_logprob@{k}": v for k, v in e["bon_logprob"].items()}})

  def write_summary(self, started: float) -> dict:
    """``summary.json``: held-out metrics of the base (round 0) and of the last round's model,
    and ``runtime_s``, the wall time of the invocation that finished the run."""
    keys = ("greedy_acc", "t1_acc", "mean_base_logprob_t1", "bon_logprob")
    pick = lambda r: {k: v for k, v in self.journal.eval_result(r).items() if k in keys}
    summary = {"heldout": {"base": pick(0), "sharpened": pick(self.ctx.config.loop.num_rounds)},
               "runtime_s": round(time.time() - started, 1)}
    atomic_write(self.ctx.workdir.root / "summary.json", json.dumps(summary, indent=1))
    return summary


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
        stop_after: str | None = None, started: float | None = None, **kwargs) -> dict:
  """``Loop(config, workdir).run()``: every pending stage, resuming where a previous run stopped."""
  started = time.time() if started is None else started
  return Loop(config, workdir, **kwargs).run(stop_after=stop_after, started=started)
