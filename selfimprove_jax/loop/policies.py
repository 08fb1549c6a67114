"""The models of a run's rounds: the base, the policy after each round, and where a round starts.

Round r saves its trained tree in ``round_RRR/params``: the full params, or under LoRA only the
adapters. A finished round's model is merged once (the next round starts from it); while a round
trains, its model is the start model with the adapters beside it (``current``), never merged. The
model of the last round trained or loaded is kept in memory (``Context.caches["policy"]``).
"""
from __future__ import annotations

from typing import Any

import jax

from selfimprove_jax import sharding as sh
from selfimprove_jax.checkpoint import trees
from selfimprove_jax.loop.context import Context
from selfimprove_jax.models.transformer import LoraParams, param_logical_names
from selfimprove_jax.training import lora
from selfimprove_jax.training.state import trainable_shapes_and_shardings


def policy(ctx: Context, round_index: int) -> Any:
  """The model after round ``round_index`` (the base for 0): full params, train shardings."""
  if round_index == 0:
    return ctx.base_params
  cache = ctx.caches["policy"]
  if round_index not in cache:
    trainable = trees.restore_tree(ctx.workdir.params(round_index), saved_target(ctx),
                                   check=ctx.config.checkpoint.verify)
    remember(ctx, round_index, trainable)
  return cache[round_index]


def start(ctx: Context, round_index: int) -> Any:
  """What round ``round_index`` trains from: the base, or the previous round's model."""
  return ctx.base_params if ctx.config.loop.restart_from_base else policy(ctx, round_index - 1)


def remember(ctx: Context, round_index: int, trainable: Any) -> None:
  """Keeps round ``round_index``'s model (from its trained tree) as the one in memory."""
  params = full(ctx, round_index, trainable)
  ctx.caches["policy"].clear()
  ctx.caches["policy"][round_index] = params


def current(ctx: Context, round_index: int, trainable: Any) -> Any:
  """Round ``round_index``'s model while it trains: its params, or under LoRA the start model
  with the adapters applied beside it (``models.LoraParams``, no merged copy)."""
  if ctx.lora is None:
    return trainable
  return LoraParams(base=start(ctx, round_index), adapters=trainable, scale=ctx.lora.scale)


def full(ctx: Context, round_index: int, trainable: Any) -> Any:
  """Round ``round_index``'s full params from its trainable tree (LoRA: merged onto its start)."""
  if ctx.lora is None:
    return trainable
  return lora.merge(start(ctx, round_index), trainable, ctx.lora)


def trainable_of(ctx: Context, params: Any) -> Any:
  """The trainable tree of a model that has not moved from ``params`` (LoRA: fresh adapters)."""
  if ctx.lora is None:
    return params
  return lora.init_lora(params, ctx.lora, jax.random.key(0),
                        base_names=param_logical_names(ctx.model_config))


def saved_target(ctx: Context) -> Any:
  """Abstract tree (with shardings) of a round's saved trainable params."""
  _, shardings = trainable_shapes_and_shardings(ctx.model_config, ctx.mesh, sh.TRAIN_RULES,
                                                ctx.lora)
  return sh.abstract(jax.eval_shape(lambda p: trainable_of(ctx, p), ctx.base_params), shardings)
