"""The update loop both training modes share: state, compiled step, resume, checkpoints, logging.

``train`` runs a round's updates from its start model: it restores the latest train-state
checkpoint of an interrupted round, runs the remaining steps (each one's batch from the mode's
``step_batch``), logs every step, checkpoints every ``checkpoint.every_steps`` and at the end, and
saves the round's params. A restarted round redoes exactly the steps after its checkpoint, so it
ends bit-identical to an uninterrupted one.

The optimizer and the jitted update step are built once per run (per set of frozen trees) and
kept in ``Context.caches``. The learning rate is an argument of the step, taken from the round's
schedule on the host, so rounds of any length share one compiled step.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
import tqdm

from selfimprove_jax import multihost, scoring
from selfimprove_jax import sharding as sh
from selfimprove_jax.checkpoint import trees
from selfimprove_jax.loop import config as loop_config
from selfimprove_jax.loop import policies
from selfimprove_jax.loop.context import Context
from selfimprove_jax.loop.workdir import Journal
from selfimprove_jax.models import count_params
from selfimprove_jax.training import (TrainState, create_train_state, make_loss, make_optimizer,
                                      make_schedule, make_update_step, run_step, state_shardings)

# step_batch(i, state) -> (batch, extra): the batch of round step i (0-based) and anything the
# mode's after_step(i, extra, metrics) needs once the step has run.
StepBatch = Callable[[int, TrainState], tuple[dict[str, np.ndarray], Any]]
AfterStep = Callable[[int, Any, dict[str, float]], None]


def schedule(ctx: Context, total_steps: int) -> optax.Schedule:
  """The learning rate of a stage of ``total_steps`` updates, by step (decays end at the stage's
  last step)."""
  c = ctx.config.train.optimizer
  total = max(total_steps, 1) if c.schedule != "constant" else None
  return make_schedule(c.schedule, c.learning_rate, total_steps=total, warmup_steps=c.warmup_steps)


def optimizer(ctx: Context) -> optax.GradientTransformation:
  """The run's optimizer (AdamW with clipping; its learning rate is set on every step)."""
  cache = ctx.caches["optimizer"]
  if "adamw" not in cache:
    c = ctx.config.train.optimizer
    cache["adamw"] = make_optimizer(c.learning_rate, max_grad_norm=c.max_grad_norm or None)
  return cache["adamw"]


def update_step(ctx: Context, frozen_keys: tuple[str, ...]) -> Callable:
  """The jitted update step (``training.make_update_step``) of the configured loss, compiled once
  per set of frozen trees."""
  cache = ctx.caches["step"]
  if frozen_keys not in cache:
    c = ctx.config.train
    opt = optimizer(ctx)
    cache[frozen_keys] = make_update_step(
        ctx.train_model, make_loss(c.loss, **loop_config.loss_options(ctx.config)), opt,
        state_shardings=state_shardings(ctx.model_config, opt, ctx.mesh, sh.TRAIN_RULES,
                                        lora_config=ctx.lora, frozen_keys=frozen_keys),
        num_microbatches=c.num_microbatches, lora_config=ctx.lora,
        compute_dtype=c.compute_dtype or ctx.model_config.dtype,
        remat=loop_config.remat_policy(ctx.config, count_params(ctx.model_config)), mesh=ctx.mesh)
  return cache[frozen_keys]


def pack(ctx: Context, prompt: list[int], completion: list[int]
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One training sequence of ``seq_len``: (tokens_L, input_mask_L, loss_mask_L), the loss on
  the completion's tokens only (cut at ``seq_len``)."""
  completion = completion[:max(ctx.seq_len - len(prompt), 0)]
  one = scoring.pack_sequences([prompt[:ctx.seq_len]], [completion], ctx.seq_len,
                               ctx.tokenizer.pad_id)
  return one["tokens_BxL"][0], one["input_mask_BxL"][0], one["loss_mask_BxL"][0]


def train_states(ctx: Context, r: int) -> trees.Checkpoints:
  """Round ``r``'s train-state checkpoints, saved asynchronously; older ones are removed as
  newer ones commit (all of them once the round's params are saved)."""
  return trees.Checkpoints(ctx.workdir.train_states(r), keep=1, async_save=True, verified=False)


def latest_checkpoint(ctx: Context, r: int) -> int | None:
  """Steps done at round ``r``'s newest committed train-state checkpoint, if any."""
  ckpts = train_states(ctx, r)
  try:
    return ckpts.latest()
  finally:
    ckpts.close()


def _checkpointed(state: TrainState) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "rng": jax.random.key_data(state.rng)}


def save_state(ctx: Context, journal: Journal, ckpts: trees.Checkpoints, r: int,
               state: TrainState, step: int) -> None:
  """Checkpoints round ``r``'s train state after ``step`` steps, in the background; the older
  one is removed once this one is committed."""
  journal.flush()  # a resume from this checkpoint keeps the records up to it
  ckpts.save(step, _checkpointed(state), meta={"round": r, "round_step": step})


def restore_state(ckpts: trees.Checkpoints, state: TrainState, step: int) -> TrainState:
  """``state`` (fresh, for its structure and shardings) with checkpoint ``step`` loaded."""
  got = ckpts.restore(step, _checkpointed(state))
  return state.replace(step=got["step"], params=got["params"], opt_state=got["opt_state"],
                       rng=jax.random.wrap_key_data(got["rng"]))


def finish(ctx: Context, r: int, trainable: Any, steps: int) -> None:
  """Saves round ``r``'s trained tree, keeps its model in memory, drops its train states."""
  trees.save_tree(ctx.workdir.params(r), trainable, meta={"round": r, "steps": steps})
  policies.remember(ctx, r, trainable)
  drop_train_states(ctx, r)


def saved_steps(ctx: Context, r: int) -> int | None:
  """The update steps of round ``r``'s saved params, if a run saved them (and was then killed
  before marking its train stage done); None if there are none."""
  path = ctx.workdir.params(r)
  return trees.read_meta(path)["steps"] if trees.exists(path) else None


def drop_train_states(ctx: Context, r: int) -> None:
  """Removes round ``r``'s train-state checkpoints (``trees.delete``: a removal cut short never
  leaves something a rerun takes for a checkpoint)."""
  if ctx.writer:
    trees.delete(ctx.workdir.train_states(r))
  multihost.sync("drop_train_states")


def train(ctx: Context, journal: Journal, r: int, *, start: Any, total: int, desc: str,
          shown: str, step_batch: StepBatch, after_step: AfterStep | None = None,
          reference: Any = None, on_resume: Callable[[int], None] | None = None) -> int:
  """Round ``r``'s ``total`` updates from the params ``start``; returns ``total``.

  ``reference``: frozen reference params for losses with ``reference="params"``.
  ``on_resume(done)``: called with the steps already done before the first step runs.
  ``shown``: the metric on the progress bar.
  """
  state = create_train_state(ctx.model_config, optimizer(ctx), ctx.key(0, "train"), mesh=ctx.mesh,
                             params=start, lora_config=ctx.lora, reference_params=reference)
  step_fn = update_step(ctx, tuple(state.frozen or {}))
  learning_rate = schedule(ctx, total)
  ckpts = train_states(ctx, r)
  try:
    done = ckpts.latest() or 0
    if done:
      state = restore_state(ckpts, state, done)
    if on_resume is not None:
      on_resume(done)
    offset = journal.progress.global_step(r)
    bar = tqdm.trange(done, total, desc=desc, unit="step", leave=False, disable=not ctx.bars)
    for i in bar:
      batch, extra = step_batch(i, state)
      ctx.profiler.before_step(offset + i + 1)
      state, metrics = run_step(step_fn, state, batch, learning_rate=learning_rate(i))
      ctx.profiler.after_step(offset + i + 1, state)
      if after_step is not None:
        after_step(i, extra, metrics)
      bar.set_postfix({shown: f"{metrics[shown]:.3f}"})
      journal.log(r, "train", offset + i + 1, metrics, round_step=i + 1)
      if (i + 1) % ctx.config.checkpoint.every_steps == 0 or i + 1 == total:
        save_state(ctx, journal, ckpts, r, state, i + 1)
    bar.close()
  finally:
    ckpts.close()  # waits for the last save to commit
  finish(ctx, r, state.params, total)
  return total
