"""Rows of the samples table from the models: sample, grade, score under the base model.

``generate`` writes the ``tables.GENERATED`` columns (plus the caller's, e.g. ``round``),
``grade`` adds ``extracted`` / ``correct`` and ``set_base_columns`` the ``base_*`` columns, the
remaining ``tables.VERIFIED`` ones. Every offline stage, online RL step and eval goes through here.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from selfimprove_jax import multihost
from selfimprove_jax import scoring
from selfimprove_jax.loop import policies
from selfimprove_jax.loop.context import Context, Prompts
from selfimprove_jax.loop.rewards import RewardInputs
from selfimprove_jax import sharding as sh
from selfimprove_jax.models.transformer import (LoraParams, cast_floats, param_logical_names,
                                                param_shapes)
from selfimprove_jax.training import lora
from selfimprove_jax.sampling import Sampler
from selfimprove_jax.verifiers import self_reward


def _to_sampling(ctx: Context, tree: Any, kind: str) -> Any:
  """``tree`` (the model's params, or LoRA adapters: ``kind``) in the compute dtype, placed on
  the sampling mesh by one jitted program per kind, built and compiled once per run."""
  programs = ctx.caches["sampling"]
  if kind not in programs:
    shapes, names = param_shapes(ctx.model_config), param_logical_names(ctx.model_config)
    shardings = (sh.tree_shardings(names, shapes, ctx.sample_mesh, sh.SAMPLE_RULES)
                 if kind == "params" else
                 lora.adapter_shardings(shapes, names, ctx.lora, ctx.sample_mesh, sh.SAMPLE_RULES))
    dtype = jnp.dtype(ctx.model_config.dtype)
    programs[kind] = (shardings,
                      jax.jit(lambda t: cast_floats(t, dtype), out_shardings=shardings))
  shardings, convert = programs[kind]
  dtype = jnp.dtype(ctx.model_config.dtype)
  if all(x.dtype == dtype and x.sharding == s for x, s in
         zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))):
    return tree
  return convert(tree)


def for_sampling(ctx: Context, params: Any) -> Any:
  """``params`` as the sampler and scorer take them: in the compute dtype (``model.dtype``), on
  ``ctx.sample_mesh``. A float32 master or a training-layout model gets one copy, kept for the
  base and the latest other model; under LoRA the adapters alone are converted each call."""
  if isinstance(params, LoraParams):
    return params.replace(base=for_sampling(ctx, params.base),
                          adapters=_to_sampling(ctx, params.adapters, "adapters"))
  kept = ctx.caches["sampling"].setdefault("copies", [])
  for source, copy in kept:
    if source is params:
      return copy
  copy = _to_sampling(ctx, params, "params")
  kept[:] = [entry for entry in kept if entry[0] is ctx.base_params] + [(params, copy)]
  return copy


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
    with ctx.profiler.sampling_call():
      out = sample(ids, num_samples, rng=jax.random.fold_in(key, chunk),
                   temperature=temperature, top_k=c.top_k, top_p=c.top_p)
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
  """``scoring.Scores`` (NumPy, one entry per row, in order) of each completion under
  ``params``. Rows are grouped by prompt and each prompt is read once for all of its rows
  (``self_reward.score_groups``), padded to the run's ``score_lengths`` (one compiled scorer per
  group size); ``score.batch_size`` sequences per call."""
  if not rows:
    return scoring.empty_scores(ctx.score_lengths[1])
  order: dict[Any, list[int]] = {}
  for i, r in enumerate(rows):
    order.setdefault(r["prompt_id"], []).append(i)
  min_prompt, min_completion = ctx.score_lengths
  grouped = self_reward.score_groups(
      ctx.sample_model, for_sampling(ctx, params), [prompt_ids[pid] for pid in order],
      [[rows[i]["tokens"] for i in members] for members in order.values()],
      batch_size=ctx.config.score.batch_size, min_prompt_len=min_prompt,
      min_completion_len=min_completion)
  back = np.argsort(np.concatenate([np.asarray(m, int) for m in order.values()]), kind="stable")
  return jax.tree.map(lambda x: x[back], grouped)


def grade(ctx: Context, rows: Sequence[dict], examples: dict[Any, dict]) -> None:
  """Ground-truth verdicts (``extracted``, ``correct``) of every row; each process grades
  its block of the rows (code runs in the sandbox there) and the verdicts are gathered."""
  def verdict(row):
    v = ctx.task.grade(examples[row["prompt_id"]], row["completion"])
    return v.extracted, bool(v.correct)
  for r, (extracted, correct) in zip(rows, multihost.map_blocks(verdict, rows)):
    r["extracted"], r["correct"] = extracted, correct


class ModelScores:
  """``scores(which)``: the rows' ``scoring.Scores`` under the base or the current model, each
  computed on first request only (online RL with a gold reward never scores under the base)."""

  def __init__(self, ctx: Context, rows: Sequence[dict], params: Any, prompt_ids: dict):
    self._models = {"base": lambda: ctx.base_params, "current": lambda: params}
    self._score = lambda which: score(ctx, self._models[which](), rows, prompt_ids)
    self._done: dict[str, scoring.Scores] = {}

  def __call__(self, which: str) -> scoring.Scores:
    if which not in self._done:
      self._done[which] = self._score(which)
    return self._done[which]

  def computed(self, which: str) -> scoring.Scores | None:
    return self._done.get(which)


def set_base_columns(rows: Sequence[dict], scores: scoring.Scores | None) -> None:
  """The ``base_*`` columns: log-prob, mean log-prob and self-certainty under the base model
  (None when the base model did not score the rows)."""
  for i, r in enumerate(rows):
    r["base_logprob"] = None if scores is None else float(scores.sum_logprob_B[i])
    r["base_mean_logprob"] = None if scores is None else float(scores.mean_logprob_B[i])
    r["base_self_certainty"] = None if scores is None else float(scores.self_certainty_B[i])


def reward_inputs(ctx: Context, rows: Sequence[dict], params: Any, prompts: Prompts
                  ) -> RewardInputs:
  """What ``rewards.compute`` needs for ``rows``; ``params`` is the current policy. Its
  ``scores`` is a ``ModelScores``."""
  models = {"base": lambda: ctx.base_params, "current": lambda: params}
  return RewardInputs(
      rows=rows, prompts=[prompts.texts[r["prompt_id"]] for r in rows], config=ctx.config,
      scores=ModelScores(ctx, rows, params, prompts.ids),
      judge_model=lambda which: (ctx.sample_model, for_sampling(ctx, models[which]()),
                                 ctx.tokenizer))


def policy_sampler(ctx: Context, round_index: int, max_new_tokens: int | None = None) -> Sampler:
  """A sampler of round ``round_index``'s model (the base for 0)."""
  return sampler(ctx, policies.policy(ctx, round_index), max_new_tokens)
