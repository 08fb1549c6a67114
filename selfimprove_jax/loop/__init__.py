"""ROUND: the self-improvement loop, rounds of generate → verify → select → distill, resumable.

``run(config, workdir)`` (or ``Loop(config, workdir).run()``) does every pending stage of every
round; rerunning the same command after a crash resumes. The modules, bottom to top:

  registry   named entries for config keys, the config error format, per-round schedules
  rewards    REWARDS: what ``score.reward`` names (self-rewards, gold, majority, judge)
  selectors  SELECTORS: what ``select.kind`` names (top-k, thresholds, B-STaR, pairs)
  config     every config key with its default, and the checks run before any work
  workdir    the run's files: paths, config check, progress, metrics and tables (Journal)
  context    the frozen run context: task, tokenizer, models, mesh, base params, caches
  policies   the model of each round (LoRA adapters merged), what a round starts from
  rollouts   rows from the models: sample, grade, score under the base model, reward inputs
  stages     sample, score, select, evaluate: functions of (context, round, rows)
  updates    the update loop both training modes share: resume, checkpoints, logging
  offline    epochs over the round's selection (SFT, DPO, sharpening, XPO)
  online     RL steps: sample a group per prompt, reward, update (GRPO family)
  driver     Loop: what is pending, running it, summary.json and the report
  study      several arms of one config side by side, one shared base, one report

The samples table's columns are declared in ``selfimprove_jax.tables``.
"""
from selfimprove_jax.loop.driver import OFFLINE_STAGES, ONLINE_STAGES, Loop, run
from selfimprove_jax.loop.study import run_study
from selfimprove_jax.loop.workdir import WorkdirError
from selfimprove_jax.tables import read_table

__all__ = ["Loop", "OFFLINE_STAGES", "ONLINE_STAGES", "WorkdirError", "read_table", "run",
           "run_study"]
