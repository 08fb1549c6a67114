"""Abstract inputs of the checked steps, built as the loop builds the real ones: parameters in the
loop's precision, train states, the batch of every loss. Every leaf is a ``ShapeDtypeStruct``
carrying its ``NamedSharding``; nothing is allocated.

Precision (``loop.context``): full fine-tuning keeps float32 master weights and AdamW moments and
computes in the compute dtype; under LoRA the frozen base is stored in the compute dtype and only
the adapters (and their moments) are float32. Sampling and scoring take the compute-dtype copy.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from selfimprove_jax import sharding as sh
from selfimprove_jax.compile_check.memory import abstract_params, train_state_shardings
from selfimprove_jax.models import TransformerConfig
from selfimprove_jax.scoring import DEFAULT_CHUNK
from selfimprove_jax.training import lora
from selfimprove_jax.training.registry import make_loss
from selfimprove_jax.training.state import TrainState, batch_sharding, state_shardings

LOSSES = ("sft", "dpo", "sharpen", "xpo", "policy_gradient")
PAIR_LOSSES = ("dpo", "sharpen", "xpo")
LORA_TARGETS = {"attention": lora.ATTENTION_TARGETS, "all_linear": lora.ALL_LINEAR_TARGETS}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How the update step trains.

  loss: a ``LOSSES`` name; pair losses take ``batch`` pairs of two sequences.
  lora_rank: 0 trains every weight; r > 0 trains rank-r adapters on ``lora_targets``
    ("attention", "all_linear" or a path regex) beside a frozen base.
  reference: policy_gradient with a KL penalty to frozen reference parameters (GRPO with
    beta > 0); full fine-tuning then holds a compute-dtype copy of the base, LoRA uses its base.
  num_microbatches, remat, chunk_size: the step's memory knobs (``training.make_update_step``
    and the losses' vocabulary chunk).
  """

  loss: str = "sft"
  lora_rank: int = 0
  lora_targets: str = "attention"
  reference: bool = False
  num_microbatches: int = 1
  remat: str | None = "full"
  chunk_size: int | None = DEFAULT_CHUNK

  @property
  def lora_config(self) -> lora.LoraConfig | None:
    if self.lora_rank == 0:
      return None
    return lora.LoraConfig(rank=self.lora_rank, alpha=2.0 * self.lora_rank,
                           targets=LORA_TARGETS.get(self.lora_targets, self.lora_targets))

  def loss_fn(self):
    options = dict(chunk_size=self.chunk_size)
    if self.reference:
      options.update(beta=0.04, reference="params")
    return make_loss(self.loss, **options)

  def describe(self, batch: int, seq_len: int) -> str:
    rows = f"{batch} pairs x 2" if self.loss in PAIR_LOSSES else f"{batch}"
    tuning = (f"LoRA rank {self.lora_rank} ({self.lora_targets}) on a frozen base"
              if self.lora_rank else "full fine-tuning, float32 master weights")
    return (f"{self.loss}{' + KL to reference params' if self.reference else ''}, {tuning}, "
            f"batch {rows} x {seq_len} tokens, {self.num_microbatches} micro-batch(es), "
            f"remat={self.remat or 'none'}, vocabulary chunk {self.chunk_size or 'none'}")


def params(config: TransformerConfig, mesh: Mesh, dtype: Any,
           rules: sh.Rules = sh.TRAIN_RULES) -> Any:
  """Abstract parameters of ``config`` in ``dtype``, placed by ``rules``."""
  shapes, names = abstract_params(config)
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), shapes)
  return sh.abstract(shapes, sh.tree_shardings(names, shapes, mesh, rules))


def train_state(config: TransformerConfig, recipe: Recipe, optimizer, mesh: Mesh
                ) -> tuple[TrainState, dict[str, Any] | None]:
  """(the donated state: step, trainable params, AdamW state, key; the frozen trees or None)."""
  compute = config.dtype
  lora_config = recipe.lora_config
  if lora_config is None:
    shapes = abstract_params(config)[0]
    trainable = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
    frozen = {"reference": params(config, mesh, compute)} if recipe.reference else None
    shardings = train_state_shardings(config, optimizer, mesh)
  else:
    shapes, names = abstract_params(config)
    trainable = lora.adapter_shapes(shapes, names, lora_config)
    frozen = {"base": params(config, mesh, compute)}
    shardings = state_shardings(config, optimizer, mesh, sh.TRAIN_RULES,
                                lora_config=lora_config, frozen_keys=("base",)).replace(frozen=None)
  shapes = jax.eval_shape(
      lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                           rng=jax.random.key(0)), trainable)
  return sh.abstract(shapes, shardings), frozen


def update_batch(recipe: Recipe, batch: int, seq_len: int, mesh: Mesh) -> dict[str, Any]:
  """The batch keys ``recipe.loss`` reads: B rows (B pairs for pair losses) of ``seq_len`` tokens.
  (The loop also passes keys a loss ignores; jit drops unread arguments, so they cost nothing.)"""
  data = batch_sharding(mesh, sh.TRAIN_RULES)
  leaf = lambda shape, dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=data)
  if recipe.loss in PAIR_LOSSES:
    shape = (batch, 2, seq_len)
    logps = "ref_logps_Bx2" if recipe.loss == "dpo" else "base_logps_Bx2"
    return {"tokens_Bx2xL": leaf(shape, "int32"), "input_mask_Bx2xL": leaf(shape, "bool"),
            "loss_mask_Bx2xL": leaf(shape, "bool"), logps: leaf((batch, 2), "float32")}
  out = {"tokens_BxL": leaf((batch, seq_len), "int32"),
         "input_mask_BxL": leaf((batch, seq_len), "bool"),
         "loss_mask_BxL": leaf((batch, seq_len), "bool")}
  if recipe.loss == "policy_gradient":
    out.update(advantages_B=leaf((batch,), "float32"), rewards_B=leaf((batch,), "float32"),
               reward_group_std_B=leaf((batch,), "float32"))
  return out
