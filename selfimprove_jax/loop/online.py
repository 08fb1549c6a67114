"""Online RL (``loop.mode="online"``): each of a round's ``train.steps`` steps samples a group per
prompt from the current model, grades and rewards it, and takes one policy-gradient update with
group-relative advantages. Step s of round r draws prompt batch (r - 1) * steps + s - 1; its rows
(``tables.RL_COLUMNS``) land in ``round_RRR/samples/step_SSSSS.jsonl``.
"""
from __future__ import annotations

import numpy as np

from selfimprove_jax import tables
from selfimprove_jax.loop import config as loop_config
from selfimprove_jax.loop import policies, rewards, rollouts, updates
from selfimprove_jax.loop.context import Context
from selfimprove_jax.loop.workdir import Journal
from selfimprove_jax.training import group_advantages


def train(ctx: Context, journal: Journal, r: int) -> int:
  """Round ``r``'s RL steps; returns their number."""
  c, steps = ctx.config, ctx.config.train.steps
  G = c.sample.num_samples
  parts = ctx.workdir.step_samples(r)
  reference = ctx.base_params if (loop_config.loss_options(c).get("reference") == "params"
                                  and ctx.lora is None) else None

  def drop_redone_parts(done: int) -> None:
    if ctx.writer:
      parts.mkdir(parents=True, exist_ok=True)
      for p in parts.iterdir():  # steps after the checkpoint are redone
        if p.name.startswith("step_") and p.name.endswith(".jsonl") and int(p.stem[5:]) > done:
          p.unlink()

  def step_batch(i: int, state) -> tuple[dict[str, np.ndarray], list[dict]]:
    params = policies.current(ctx, r, state.params)
    examples = ctx.round_prompts((r - 1) * steps + i)
    prompts = ctx.prompts(examples)
    rows = rollouts.generate(ctx, rollouts.sampler(ctx, params), examples,
                             [prompts.ids[e["id"]] for e in examples], G,
                             loop_config.temperature(c, r), ctx.key(r, "train", i),
                             f"step {i + 1} sample", round=r, step=i + 1, source="current")
    rollouts.grade(ctx, rows, prompts.examples)
    inputs = rollouts.reward_inputs(ctx, rows, params, prompts)
    reward_R = rewards.compute(inputs)
    # Base-model scores only when the reward asked for them: a gold or majority reward never does.
    rollouts.set_base_columns(rows, inputs.scores.computed("base"))
    reward_R = np.array([0.0 if x is None else x for x in reward_R], np.float32)
    adv, std = group_advantages(reward_R, G, estimator=c.train.advantage.estimator,
                                scale=c.train.advantage.scale)
    for row, reward, a in zip(rows, reward_R, np.asarray(adv)):
      row["reward"], row["advantage"], row["selected"] = float(reward), float(a), True
    packed = [updates.pack(ctx, prompts.ids[row["prompt_id"]], row["tokens"]) for row in rows]
    return {"tokens_BxL": np.stack([p[0] for p in packed]),
            "input_mask_BxL": np.stack([p[1] for p in packed]),
            "loss_mask_BxL": np.stack([p[2] for p in packed]),
            "advantages_B": np.asarray(adv, np.float32), "rewards_B": reward_R,
            "reward_group_std_B": np.asarray(std, np.float32),
            "truncated_B": np.array([row["finish_reason"] == "length" for row in rows])}, rows

  def after_step(i: int, rows: list[dict], metrics: dict[str, float]) -> None:
    metrics["correct"] = tables.column_mean(rows, "correct")
    if rows[0]["base_logprob"] is not None:
      metrics["base_logprob"] = tables.column_mean(rows, "base_logprob")
    if ctx.writer:
      tables.write_table(parts / f"step_{i + 1:05d}.jsonl", rows, tables.RL_COLUMNS)

  return updates.train(ctx, journal, r, start=policies.start(ctx, r), total=steps,
                       desc=f"round {r} RL", shown="reward", step_batch=step_batch,
                       after_step=after_step, reference=reference, on_resume=drop_redone_parts)
