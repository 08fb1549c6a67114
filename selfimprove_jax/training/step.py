"""The update step: one jitted function for every loss, and a host-side check for non-finite losses.

``make_update_step`` returns ``update_step(state, batch, rng, learning_rate=None) -> (state,
metrics)``. The learning rate is an argument of the compiled step (by default the schedule at
``state.step``, evaluated on the host), so one compilation serves every schedule and round length.
Inside one jit (traced once per batch shape) it
  1. splits the batch into ``num_microbatches`` strided micro-batches (rows k, k + n, k + 2n, ...:
     every device keeps its share of each micro-batch, so no rows move between devices) and scans
     over them, adding each micro-batch's gradient weighted by its ``LOSS_DENOMINATOR``; dividing
     by the summed denominators gives exactly the whole-batch mean (per token, sequence or pair);
  2. forms the forward's parameters: the frozen base with LoRA adapters beside it
     (``models.LoraParams``: x·W + s·(x·A)·B in every adapted projection, no merged copy),
     optionally cast to a compute dtype (float32 master weights stay in the state);
  3. clips and applies the optimizer update, and keeps the previous state instead when the loss or
     the gradient norm is not finite (decided on device: the old buffers are donated).
``run_step`` wraps it for drivers and tests: it blocks on the metrics (which also keeps the
XLA:CPU collectives of consecutive steps from piling up) and raises ``NonFiniteLossError``.

Metrics: ``loss`` (the whole batch's weighted mean), ``grad_norm`` (global norm before clipping),
``learning_rate`` (the schedule at the step's optimizer count), and the loss's own metrics, each
averaged with equal weight over micro-batches (TRL's convention for accumulated steps).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from selfimprove_jax.models.transformer import LoraParams, Transformer, cast_floats
from selfimprove_jax.training import lora
from selfimprove_jax.training import remat as remat_lib
from selfimprove_jax.training.losses import LOSS_DENOMINATOR, check
from selfimprove_jax.training.state import (TrainState, batch_sharding, replicated,
                                            with_learning_rate)

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


class NonFiniteLossError(FloatingPointError):
  """A step produced a non-finite loss or gradient; ``state`` is the kept (pre-step) state."""

  def __init__(self, step: int, metrics: dict, state: TrainState):
    self.step, self.metrics, self.state = step, metrics, state
    super().__init__(f"non-finite loss={metrics['loss']} / grad_norm={metrics['grad_norm']} at "
                     f"step {step}: the update was skipped and the state kept at step {step}")


def split_microbatches(batch: dict, num_microbatches: int) -> dict:
  """(B, ...) leaves -> (n, B / n, ...), micro-batch k holding rows k, k + n, k + 2n, ..."""
  def split(path, x):
    B = x.shape[0] if x.ndim else 0
    if B == 0 or B % num_microbatches:
      raise ValueError(f"num_microbatches={num_microbatches}: batch key "
                       f"{jax.tree_util.keystr(path)} has leading dim {x.shape[:1]}, not a "
                       "positive multiple of it")
    return jnp.swapaxes(x.reshape(B // num_microbatches, num_microbatches, *x.shape[1:]), 0, 1)
  return jax.tree_util.tree_map_with_path(split, batch)


def make_update_step(model: Transformer, loss_fn: Callable, optimizer: optax.GradientTransformation,
                     *, schedule: float | optax.Schedule | None = None,
                     state_shardings: TrainState | None = None, num_microbatches: int = 1,
                     lora_config: lora.LoraConfig | None = None, compute_dtype: str | None = None,
                     remat: str | None = None, mesh: Mesh | None = None) -> Callable:
  """Builds the jitted ``update_step(state, batch, rng) -> (new_state, metrics)``.

  Args:
    model: the ``Transformer``; its mesh and rules place the activations.
    loss_fn: ``(params, batch, rng, *, model, ref_params) -> (loss, aux)`` (``registry.make_loss``),
      ``aux`` containing ``LOSS_DENOMINATOR``.
    optimizer: ``state.make_optimizer(...)``, which made ``state.opt_state``.
    schedule: the learning rate (constant or schedule of the step count) used when a call passes
      none; evaluated on the host, never compiled in. None: every call passes ``learning_rate``.
    state_shardings: the state's placement, ``training.state_shardings(config, optimizer,
      mesh, rules, lora_config=..., frozen_keys=...)`` with the same LoRA config and the keys of
      ``state.frozen`` (("base",) under LoRA, plus "reference" when kept); required with a mesh.
    num_microbatches: gradient accumulation factor; must divide the batch size.
    lora_config: when set, ``state.params`` are adapters over ``state.frozen["base"]`` (what
      ``create_train_state(..., params=base, lora_config=...)`` builds); only they are trained.
    compute_dtype: cast floating params to this dtype for the forward (e.g. "bfloat16": with the
      model's ``dtype`` set alike, the forward and FSDP all-gathers run in bfloat16 while the
      gradient and update stay float32). None keeps the stored dtype.
    remat: None, or a ``remat.POLICIES`` name: rematerialize each decoder layer in the backward
      pass ("full": keep only layer inputs; "dots": also keep weight matmul outputs). See
      ``training/remat.py`` for why per layer and how without editing the model. The vocabulary
      projection is always rematerialized per chunk by ``scoring.score``.
    mesh: defaults to ``model.mesh``.
  Returns:
    ``update_step``; ``update_step.jitted`` is the jitted core ``(state without frozen, frozen,
    batch, rng, learning_rate)`` (for ``.lower``) and ``update_step.trace_count()`` counts its
    traces.
  """
  mesh = model.mesh if mesh is None else mesh
  if model.mesh is not None and mesh is not model.mesh:
    raise ValueError(f"mesh={mesh} differs from the model's mesh {model.mesh}")
  check("num_microbatches", num_microbatches,
        isinstance(num_microbatches, int) and num_microbatches > 0, "must be a positive int")
  check("compute_dtype", compute_dtype, compute_dtype is None or compute_dtype in COMPUTE_DTYPES,
        f"must be None or one of {COMPUTE_DTYPES}")
  check("remat", remat, remat is None or remat in remat_lib.POLICIES,
        f"must be None or one of {sorted(remat_lib.POLICIES)}")
  check("state_shardings", state_shardings, mesh is None or state_shardings is not None,
        "a mesh needs the state's shardings (training.state_shardings)")
  lr_fn = schedule if callable(schedule) or schedule is None else (lambda _: schedule)
  data_sharding = None if mesh is None else batch_sharding(mesh, model.rules)
  traces = [0]

  def forward_params(trainable, frozen):
    params = trainable
    if lora_config is not None:
      if "base" not in frozen:
        raise ValueError("lora_config is set but state.frozen has no 'base' parameters")
      params = LoraParams(base=frozen["base"], adapters=trainable, scale=lora_config.scale)
    # Under LoRA the base (adapters off) is the reference, unless one is given explicitly.
    reference = frozen.get("reference", frozen.get("base"))
    if compute_dtype is not None:
      params = cast_floats(params, jnp.dtype(compute_dtype))
      reference = None if reference is None else cast_floats(reference, jnp.dtype(compute_dtype))
    return params, reference

  def micro_loss(trainable, frozen, micro, key):
    params, reference = forward_params(trainable, frozen)
    with remat_lib.per_layer(remat) if remat is not None else contextlib.nullcontext():
      loss, aux = loss_fn(params, micro, key, model=model, ref_params=reference)
    if LOSS_DENOMINATOR not in aux:
      raise ValueError(f"loss_fn's aux metrics {sorted(aux)} lack {LOSS_DENOMINATOR!r}")
    return loss.astype(jnp.float32), aux

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def constrain_params(tree):
    if state_shardings is None:
      return tree
    return jax.lax.with_sharding_constraint(tree, state_shardings.params)

  def step(state: TrainState, frozen: Any, batch: dict, rng: jax.Array, learning_rate: jax.Array):
    traces[0] += 1
    frozen = {} if frozen is None else frozen
    key = jax.random.fold_in(rng, state.step)
    micro_batches = split_microbatches(batch, num_microbatches)
    if mesh is not None:
      stacked = NamedSharding(mesh, PartitionSpec(None, *data_sharding.spec))
      micro_batches = jax.lax.with_sharding_constraint(micro_batches, stacked)

    def accumulate(carry, xs):
      grad_sum, loss_sum, weight_sum = carry
      micro, index = xs
      if mesh is not None:
        micro = jax.lax.with_sharding_constraint(micro, data_sharding)
      (loss, aux), grads = grad_fn(state.params, frozen, micro, jax.random.fold_in(key, index))
      aux = dict(aux)
      weight = jax.lax.stop_gradient(aux.pop(LOSS_DENOMINATOR)).astype(jnp.float32)
      grad_sum = jax.tree.map(lambda s, g: s + weight * g.astype(jnp.float32), grad_sum, grads)
      return (constrain_params(grad_sum), loss_sum + weight * loss, weight_sum + weight), aux

    zeros = constrain_params(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grad_sum, loss_sum, weight_sum), aux = jax.lax.scan(
        accumulate, init, (micro_batches, jnp.arange(num_microbatches)))
    # An all-empty batch (no token to score) has weight 0: report loss 0 and take a zero step.
    denom = jnp.where(weight_sum > 0, weight_sum, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, state.params)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    learning_rate = jnp.asarray(learning_rate, jnp.float32)
    updates, opt_state = optimizer.update(grads, with_learning_rate(state.opt_state, learning_rate),
                                          state.params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=jnp.where(finite, state.step + 1, state.step),
        params=keep_old(optax.apply_updates(state.params, updates), state.params),
        opt_state=keep_old(opt_state, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "learning_rate": learning_rate,
               **{k: jnp.mean(v.astype(jnp.float32)) for k, v in aux.items()}}
    return new_state, metrics

  if mesh is None:
    jitted = jax.jit(step, donate_argnames=("state",))
  else:
    rep = replicated(mesh)
    core = state_shardings.replace(frozen=None)
    jitted = jax.jit(step, donate_argnames=("state",),
                     in_shardings=(core, state_shardings.frozen, data_sharding, rep, rep),
                     out_shardings=(core, rep))

  expected_frozen = None if state_shardings is None else sorted(state_shardings.frozen or {})

  def update_step(state: TrainState, batch: dict, rng: jax.Array,
                  learning_rate: float | None = None) -> tuple[TrainState, dict]:
    if learning_rate is None:
      if lr_fn is None:
        raise ValueError("update_step: pass learning_rate (make_update_step got no schedule)")
      learning_rate = lr_fn(int(state.step))
    # A host scalar: the same value on every process, placed replicated.
    learning_rate = np.float32(learning_rate)
    if expected_frozen is not None and sorted(state.frozen or {}) != expected_frozen:
      raise ValueError(f"state.frozen has trees {sorted(state.frozen or {})} but state_shardings "
                       f"were built for {expected_frozen} (state_shardings(frozen_keys=...))")
    # Frozen trees are passed beside the donated state: donating them would free arrays the
    # caller may still hold (the base model it samples from, the reference it scores with).
    if data_sharding is not None:
      # Host arrays are global values: each process places only the rows its devices hold (jit
      # refuses NumPy inputs with a non-replicated sharding when there are several processes).
      batch = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else
                           jax.device_put(x, data_sharding), batch)
    new_state, metrics = jitted(state.replace(frozen=None), state.frozen, batch, rng, learning_rate)
    return new_state.replace(frozen=state.frozen), metrics

  update_step.jitted = jitted
  update_step.trace_count = lambda: traces[0]
  return update_step


def run_step(update_step: Callable, state: TrainState, batch: dict,
             rng: jax.Array | None = None, learning_rate: float | None = None
             ) -> tuple[TrainState, dict[str, float]]:
  """Runs one step, blocks on its metrics and returns them as floats.

  ``rng`` defaults to ``state.rng`` (the step folds in the step number, so every step differs);
  ``learning_rate`` to the step's schedule at ``state.step``.
  Raises ``NonFiniteLossError`` (a ``FloatingPointError``) naming the step when the loss or the
  gradient norm is not finite; the error's ``state`` is the kept pre-step state to continue from.
  """
  step = int(state.step)
  new_state, metrics = update_step(state, batch, state.rng if rng is None else rng,
                                   learning_rate)
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
    raise NonFiniteLossError(step, metrics, new_state)
  return new_state, metrics
