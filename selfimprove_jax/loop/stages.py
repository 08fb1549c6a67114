"""The offline stages and the held-out eval, as functions of (context, round, rows).

Each returns the rows of its table and the numbers it logs; the driver writes, logs and marks the
stage done, so a stage can also be called from a notebook on rows of its own.

  sample    N completions per prompt of the round's prompts (batch r - 1 of the prompt stream),
            from the current and/or the base model            → tables.ROUND_COLUMNS["sample"]
  score     gold verdicts, base-model scores, STaR rationalizations of unsolved prompts, and
            the configured reward (``rewards``)               → tables.ROUND_COLUMNS["score"]
  select    the training set, rows or pairs (``selectors``)   → tables.ROUND_COLUMNS["select"]
  evaluate  greedy and T=1 samples of the held-out prompts, scored under the base model
                                                              → tables.EVAL_COLUMNS, eval.json
"""
from __future__ import annotations

import math
from typing import Any

import jax

from selfimprove_jax import tables
from selfimprove_jax.analysis.heldout import eval_metrics
from selfimprove_jax.loop import config as loop_config
from selfimprove_jax.loop import policies, rewards, rollouts, selectors
from selfimprove_jax.loop.context import Context, Prompts

SOURCES = {"current": ("current",), "base": ("base",), "both": ("current", "base")}


def sample(ctx: Context, r: int) -> list[dict]:
  """Round ``r``'s samples, grouped by prompt in stream order."""
  c = ctx.config.sample
  examples = ctx.round_prompts(r - 1)
  ids = ctx.prompts(examples).ids
  prompt_ids = [ids[e["id"]] for e in examples]
  sources = SOURCES[c.model]
  rows = []
  for t_index, t in enumerate(loop_config.sample_temperatures(ctx.config, r)):
    for source in sources:
      params = policies.policy(ctx, r - 1) if source == "current" else ctx.base_params
      key = jax.random.fold_in(ctx.key(r, "sample", t_index), sources.index(source))
      desc = f"round {r} sample ({source}, T={t})"
      if c.adaptive.chunk:
        rows += _sample_adaptively(ctx, r, params, examples, ids, t, key, desc, source)
      else:
        rows += rollouts.generate(ctx, rollouts.sampler(ctx, params), examples, prompt_ids,
                                  c.num_samples, t, key, desc, round=r, source=source)
  # Rows of one prompt together (the table is grouped by prompt), stable within a prompt.
  order = {e["id"]: i for i, e in enumerate(examples)}
  rows.sort(key=lambda row: order[row["prompt_id"]])
  return rows


def _sample_adaptively(ctx: Context, r: int, params: Any, examples: list[dict],
                       ids: dict[Any, list[int]], t: float, key: jax.Array, desc: str,
                       source: str) -> list[dict]:
  """App. D's adaptive sampling: ``sample.adaptive.chunk`` samples per prompt at a time, scored
  under the base, until 1 / max_j pi_base(y_j|x) <= ``stop_inverse_prob`` or ``num_samples``."""
  c = ctx.config.sample
  stop_logprob = -math.log(c.adaptive.stop_inverse_prob)
  sample_fn, rows = rollouts.sampler(ctx, params), []
  pending = list(examples)
  for i, start in enumerate(range(0, c.num_samples, c.adaptive.chunk)):
    n = min(c.adaptive.chunk, c.num_samples - start)
    chunk = rollouts.generate(ctx, sample_fn, pending, [ids[e["id"]] for e in pending], n, t,
                              jax.random.fold_in(key, i), f"{desc} chunk {i}", round=r,
                              source=source)
    best = {}
    for row, logprob in zip(chunk, rollouts.score(ctx, ctx.base_params, chunk, ids).sum_logprob_B):
      row["sample_index"] += start
      best[row["prompt_id"]] = max(best.get(row["prompt_id"], -math.inf), float(logprob))
    rows += chunk
    pending = [e for e in pending if best[e["id"]] < stop_logprob]
    if not pending:
      break
  return rows


def score(ctx: Context, r: int, rows: list[dict]) -> tuple[list[dict], dict[str, float]]:
  """Grades and scores round ``r``'s samples and gives each its reward."""
  examples = ctx.round_prompts(r - 1)
  prompts = ctx.prompts(examples)
  rollouts.grade(ctx, rows, prompts.examples)
  if ctx.config.sample.rationalize:
    rows = rows + rationalize(ctx, r, rows, examples, prompts)
  inputs = rollouts.reward_inputs(ctx, rows, policies.policy(ctx, r - 1), prompts)
  rollouts.set_base_columns(rows, inputs.scores("base"))
  for row, reward in zip(rows, rewards.compute(inputs)):
    row["reward"] = reward
  return rows, {name: tables.column_mean(rows, name)
                for name in ("reward", "correct", "base_logprob", "length")}


def rationalize(ctx: Context, r: int, rows: list[dict], examples: list[dict],
                prompts: Prompts) -> list[dict]:
  """STaR: one hinted sample for every prompt without a correct sample; the hint is dropped
  from the prompt the rationale is trained on."""
  solved = {row["prompt_id"] for row in rows if row["correct"]}
  failed = [e for e in examples if e["id"] not in solved]
  if not failed:
    return []
  template = ctx.config.sample.hint_template
  hint_ids = []
  for e in failed:
    try:
      hinted = dict(e, question=template.format(**e))
    except KeyError as err:
      raise ValueError(f"config.sample.hint_template={template!r}: examples have no field "
                       f"{err}") from None
    hint_ids.append(ctx.encode(hinted))
  extra = rollouts.generate(ctx, rollouts.policy_sampler(ctx, r - 1), failed, hint_ids, 1,
                            loop_config.temperature(ctx.config, r), ctx.key(r, "rationalize"),
                            f"round {r} rationalize", round=r, source="rationalization")
  rollouts.grade(ctx, extra, prompts.examples)
  return extra


def select(ctx: Context, r: int, rows: list[dict]) -> tuple[list[dict], dict[str, Any]]:
  """Marks the training set: ``selected``, and ``pair`` / ``pair_role`` for pair losses."""
  chosen = selectors.select(rows, ctx.config, r)
  for row in rows:
    row["selected"], row["pair"], row["pair_role"] = False, None, None
  for i in chosen.picked_S:
    rows[i]["selected"] = True
  for p, (a, b) in enumerate(chosen.pairs_Qx2):
    rows[a]["pair"], rows[a]["pair_role"] = p, "first"
    rows[b]["pair"], rows[b]["pair_role"] = p, "second"
  picked = [row for row in rows if row["selected"]]
  return rows, {"num_selected": len(chosen.picked_S), "num_pairs": len(chosen.pairs_Qx2),
                "selected_correct": tables.column_mean(picked, "correct"),
                "selected_base_logprob": tables.column_mean(picked, "base_logprob"),
                **chosen.info}


def evaluate(ctx: Context, r: int) -> tuple[list[dict], dict]:
  """Round ``r``'s model on the held-out prompts: the eval table and its metrics
  (``analysis.heldout.eval_metrics``)."""
  c = ctx.config.eval
  examples = ctx.eval_examples
  prompts = ctx.prompts(examples)
  prompt_ids = [prompts.ids[e["id"]] for e in examples]
  sample_fn = rollouts.policy_sampler(ctx, r, c.max_new_tokens or None)
  greedy = rollouts.generate(ctx, sample_fn, examples, prompt_ids, 1, 0.0, ctx.key(r, "eval", 0),
                             f"round {r} eval greedy", round=r, kind="greedy")
  t1 = rollouts.generate(ctx, sample_fn, examples, prompt_ids, c.num_samples, c.temperature,
                         ctx.key(r, "eval", 1), f"round {r} eval T={c.temperature}", round=r,
                         kind="sample")
  rows = greedy + t1
  rollouts.grade(ctx, rows, prompts.examples)
  rollouts.set_base_columns(rows, rollouts.score(ctx, ctx.base_params, rows, prompts.ids))
  return rows, eval_metrics(rows, c.num_samples, tuple(c.bon_k))
