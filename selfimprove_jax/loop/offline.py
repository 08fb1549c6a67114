"""Offline training (``loop.mode="offline"``): epochs over the round's selection.

The selected rows (SFT) or pairs (dpo, sharpen, xpo) of round r's table become fixed-length
examples; ``train.epochs`` shuffled passes over them run through ``updates.train``. The shuffle is
a pure function of (seed, round), so a resumed round sees the same batches.
"""
from __future__ import annotations

import numpy as np

from selfimprove_jax.checkpoint import trees
from selfimprove_jax.loop import config as loop_config
from selfimprove_jax.loop import policies, rollouts, updates
from selfimprove_jax.loop.context import STAGE_IDS, Context
from selfimprove_jax.loop.workdir import Journal


def examples(ctx: Context, r: int, rows: list[dict]) -> list[dict[str, np.ndarray]]:
  """One dict of arrays per training example: a sequence (``*_BxL`` keys, one row of the batch
  each) or a pair stacked on axis 0 (``*_Bx2xL``, with the pair's base and reference log-probs)."""
  ids = ctx.prompts(ctx.round_prompts(r - 1)).ids
  if ctx.config.train.loss not in loop_config.PAIR_LOSSES:
    out = []
    for row in rows:
      if row["selected"]:
        t, im, lm = updates.pack(ctx, ids[row["prompt_id"]], row["tokens"])
        out.append({"tokens_BxL": t, "input_mask_BxL": im, "loss_mask_BxL": lm})
    return out
  by_pair: dict[int, dict[str, dict]] = {}
  for row in rows:
    if row["pair"] is not None:
      by_pair.setdefault(row["pair"], {})[row["pair_role"]] = row
  pairs = [(by_pair[p]["first"], by_pair[p]["second"]) for p in sorted(by_pair)]
  ref = None
  if ctx.config.train.loss == "dpo" and ctx.config.train.reference == "round_start":
    flat = [row for pair in pairs for row in pair]
    ref = rollouts.score(ctx, policies.start(ctx, r), flat, ids).sum_logprob_B.reshape(-1, 2)
  out = []
  for i, (first, second) in enumerate(pairs):
    packed = [updates.pack(ctx, ids[first["prompt_id"]], x["tokens"]) for x in (first, second)]
    base = np.array([first["base_logprob"], second["base_logprob"]], np.float32)
    out.append({"tokens_Bx2xL": np.stack([x[0] for x in packed]),
                "input_mask_Bx2xL": np.stack([x[1] for x in packed]),
                "loss_mask_Bx2xL": np.stack([x[2] for x in packed]),
                "base_logps_Bx2": base,
                "ref_logps_Bx2": base if ref is None else ref[i].astype(np.float32)})
  return out


def batch(chosen: list[dict[str, np.ndarray]], batch_size: int) -> dict[str, np.ndarray]:
  """Stacks ``chosen`` examples, filling to ``batch_size`` with loss-free copies."""
  filler = dict(chosen[0])
  for k in filler:
    if k.startswith("loss_mask"):
      filler[k] = np.zeros_like(filler[k])
  chosen = chosen + [filler] * (batch_size - len(chosen))
  return {k: np.stack([e[k] for e in chosen]) for k in chosen[0]}


def train(ctx: Context, journal: Journal, r: int) -> int:
  """Round ``r``'s offline training; returns the update steps it took (0: nothing selected)."""
  c = ctx.config.train
  data = examples(ctx, r, journal.read_round_table(r, "select"))
  per_epoch = -(-len(data) // c.batch_size)
  total = per_epoch * c.epochs
  start = policies.start(ctx, r)
  if total == 0:  # nothing selected: the round's model is its starting model
    journal.log(r, "train", journal.progress.global_step(r), {"num_examples": 0})
    journal.flush()  # saved params mean the stage is over: its record must be on storage
    trees.save_tree(ctx.workdir.params(r), policies.trainable_of(ctx, start),
                    meta={"round": r, "steps": 0})
    return 0
  rng = np.random.default_rng([ctx.config.seed, r, STAGE_IDS["train"]])
  order = np.concatenate([rng.permutation(len(data)) for _ in range(c.epochs)])

  def step_batch(i: int, state) -> tuple[dict[str, np.ndarray], None]:
    del state
    epoch, j = divmod(i, per_epoch)
    indices = order[epoch * len(data):(epoch + 1) * len(data)][j * c.batch_size:(j + 1) * c.batch_size]
    return batch([data[k] for k in indices], c.batch_size), None

  return updates.train(ctx, journal, r, start=start, total=total, desc=f"round {r} train",
                       shown="loss", step_batch=step_batch)
