"""Rows of the samples table from the models: sample, grade, score under the base model.

``generate`` writes the ``tables.GENERATED`` columns (plus the caller's, e.g. ``round``),
``grade`` adds ``extracted`` / ``correct`` and ``score_base`` the ``base_*`` columns, the
remaining ``tables.VERIFIED`` ones. Every offline stage, online RL step and eval goes through here.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from selfimprove_jax import multihost
from selfimprove_jax import scoring
from selfimprove_jax import sharding as sh
from selfimprove_jax.loop import policies
from selfimprove_jax.loop.context import Context, Prompts
from selfimprove_jax.loop.rewards import RewardInputs
from selfimprove_jax.models.transformer import param_shardings
from selfimprove_jax.sampling import Sampler
from selfimprove_jax.verifiers import self_reward


def for_sampling(ctx: Context, params: Any) -> Any:
  """``params`` (train layout) placed under the sampling rules."""
  return jax.device_put(params, param_shardings(ctx.model_config, ctx.mesh, sh.SAMPLE_RULES))


def sampler(ctx: Context, params: Any, max_new_tokens: int | None = None) -> Sampler:
  return Sampler(ctx.sample_model, for_sampling(ctx, params), ctx.tokenizer,
                 max_new_tokens=max_new_tokens or ctx.config.sample.max_new_tokens,
                 batch_size=ctx.config.sample.batch_size)


def generate(ctx: Context, sample: Sampler, examples: Sequence[dict],
             prompt_ids: Sequence[list[int]], num_samples: int, temperature: float,
             key: jax.Array, desc: str, **columns: Any) -> list[dict]:
  """``num_samples`` rows per prompt, sampled in groups of ``sample.batch_size`` prompts; rows
  grouped by prompt in input order, each starting with ``columns``."""
  c = ctx.config.sample
  rows = []
  bar = tqdm.tqdm(total=len(prompt_ids) * num_samples, desc=desc, unit="sample", leave=False,
                  disable=not ctx.bars)
  for chunk, start in enumerate(range(0, len(prompt_ids), c.batch_size)):
    ids = prompt_ids[start:start + c.batch_size]
    out = sample(ids, num_samples, rng=jax.random.fold_in(key, chunk), temperature=temperature,
                 top_k=c.top_k, top_p=c.top_p)
    for b in range(len(ids)):
      example = examples[start + b]
      for n in range(num_samples):
        tokens = out.tokens[b][n]
        rows.append({
            **columns, "prompt_id": example["id"], "sample_index": n,
            "temperature": temperature, "completion": out.texts[b][n], "tokens": tokens,
            "length": len(tokens), "finish_reason": out.finish_reasons[b][n],
            "sampler_logprob": float(np.sum(out.sampler_logprobs[b][n])),
            "model_logprob": float(np.sum(out.model_logprobs[b][n])),
            "sampler_logprobs": out.sampler_logprobs[b][n].tolist()})
    bar.update(len(ids) * num_samples)
  bar.close()
  return rows


def score(ctx: Context, params: Any, rows: Sequence[dict], prompt_ids: dict[Any, list[int]]
          ) -> scoring.Scores:
  """``scoring.Scores`` (NumPy, one entry per row) of each completion under ``params``."""
  return self_reward.score_completions(
      ctx.sample_model, for_sampling(ctx, params), [prompt_ids[r["prompt_id"]] for r in rows],
      [r["tokens"] for r in rows], batch_size=ctx.config.score.batch_size)


def grade(ctx: Context, rows: Sequence[dict], examples: dict[Any, dict]) -> None:
  """Ground-truth verdicts (``extracted``, ``correct``) of every row; each process grades
  its block of the rows (code runs in the sandbox there) and the verdicts are gathered."""
  def verdict(row):
    v = ctx.task.grade(examples[row["prompt_id"]], row["completion"])
    return v.extracted, bool(v.correct)
  for r, (extracted, correct) in zip(rows, multihost.map_blocks(verdict, rows)):
    r["extracted"], r["correct"] = extracted, correct


def score_base(ctx: Context, rows: Sequence[dict], prompt_ids: dict[Any, list[int]]) -> None:
  """The ``base_*`` columns: log-prob, mean log-prob and self-certainty under the base model."""
  scores = score(ctx, ctx.base_params, rows, prompt_ids)
  for i, r in enumerate(rows):
    r["base_logprob"] = float(scores.sum_logprob_B[i])
    r["base_mean_logprob"] = float(scores.mean_logprob_B[i])
    r["base_self_certainty"] = float(scores.self_certainty_B[i])


def reward_inputs(ctx: Context, rows: Sequence[dict], params: Any, prompts: Prompts
                  ) -> RewardInputs:
  """What ``rewards.compute`` needs for ``rows``; ``params`` is the current policy."""
  models = {"base": lambda: ctx.base_params, "current": lambda: params}
  return RewardInputs(
      rows=rows, prompts=[prompts.texts[r["prompt_id"]] for r in rows], config=ctx.config,
      scores=lambda which: score(ctx, models[which](), rows, prompts.ids),
      judge_model=lambda which: (ctx.sample_model, for_sampling(ctx, models[which]()),
                                 ctx.tokenizer))


def policy_sampler(ctx: Context, round_index: int, max_new_tokens: int | None = None) -> Sampler:
  """A sampler of round ``round_index``'s model (the base for 0)."""
  return sampler(ctx, policies.policy(ctx, round_index), max_new_tokens)
