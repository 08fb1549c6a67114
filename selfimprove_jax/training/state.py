"""Train state, optimizer and schedule, and the state's sharded creation.

The state holds what a step changes (trainable params, optimizer state, step) and the run's key.
Frozen trees ride along in ``frozen`` but are never donated or updated:
  frozen["base"]       the base parameters under LoRA (``params`` are then the adapters)
  frozen["reference"]  reference parameters for losses with reference="params" (full fine-tuning;
                       under LoRA the base is the reference unless one is given)
Checkpoint ``state.replace(frozen=None)``: the frozen trees come from their own checkpoint.

Creation follows eval_shape -> shardings -> jit(out_shardings): every leaf, optimizer moments
included, is created directly in its place on the mesh.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from selfimprove_jax import sharding as sh
from selfimprove_jax.models import (TransformerConfig, init_params, param_logical_names,
                                    param_shapes, param_shardings)
from selfimprove_jax.training import lora
from selfimprove_jax.training.losses import check

SCHEDULES = ("constant", "linear", "cosine")
FROZEN_KEYS = ("base", "reference")


@flax.struct.dataclass
class TrainState:
  """The training state.

  step: () int32, updates applied. params: the trainable tree (full params or LoRA adapters).
  opt_state: the optimizer's state for ``params``. rng: the run's key (``run_step`` passes it to
  the step, which folds in ``step``). frozen: dict of non-trainable trees, or None.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  frozen: Any = None


def make_schedule(kind: str, learning_rate: float, *, total_steps: int | None = None,
                  warmup_steps: int = 0, end_factor: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 over ``warmup_steps``, then constant, linear or cosine decay.

  Decays reach ``end_factor * learning_rate`` at ``total_steps`` (required for them).
  """
  check("schedule", kind, kind in SCHEDULES, f"must be one of {SCHEDULES}")
  check("learning_rate", learning_rate, learning_rate > 0, "must be > 0")
  check("warmup_steps", warmup_steps, isinstance(warmup_steps, int) and warmup_steps >= 0,
        "must be an int >= 0")
  check("end_factor", end_factor, 0 <= end_factor <= 1, "must be in [0, 1]")
  if kind != "constant":
    check("total_steps", total_steps, isinstance(total_steps, int) and total_steps > warmup_steps,
          f"schedule={kind!r} needs an int total_steps > warmup_steps={warmup_steps}")
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps,
                                              end_factor * learning_rate)
  if kind == "constant":
    after = optax.constant_schedule(learning_rate)
  else:
    after = optax.linear_schedule(learning_rate, end_factor * learning_rate,
                                  total_steps - warmup_steps)
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def _clipped_adamw(learning_rate: Any, max_grad_norm: float | None, weight_decay: float,
                   b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if max_grad_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)


def make_optimizer(schedule: float | optax.Schedule, *, max_grad_norm: float | None = 1.0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
  """Global-norm clipping (skipped when ``max_grad_norm`` is None) then AdamW.

  The learning rate is data, not a constant of the compiled step: it is a hyperparameter held in
  the optimizer state (``optax.inject_hyperparams``), which ``make_update_step`` sets on every
  step from the schedule evaluated on the host. One compiled step then serves every schedule and
  every round length. ``schedule`` here only gives the state's initial value.
  """
  check("max_grad_norm", max_grad_norm, max_grad_norm is None or max_grad_norm > 0,
        "must be > 0 or None")
  check("weight_decay", weight_decay, weight_decay >= 0, "must be >= 0")
  initial = float(schedule(0)) if callable(schedule) else float(schedule)
  return optax.inject_hyperparams(
      _clipped_adamw, static_args=("max_grad_norm", "weight_decay", "b1", "b2", "eps"),
      hyperparam_dtype=jnp.float32)(
          learning_rate=initial, max_grad_norm=max_grad_norm, weight_decay=weight_decay, b1=b1,
          b2=b2, eps=eps)


def with_learning_rate(opt_state: Any, learning_rate: jax.Array) -> Any:
  """``opt_state`` of ``make_optimizer`` with its learning rate set to ``learning_rate``."""
  if not isinstance(getattr(opt_state, "hyperparams", None), dict) or \
      "learning_rate" not in opt_state.hyperparams:
    raise ValueError("the optimizer state has no injected learning_rate: build the optimizer "
                     "with training.make_optimizer")
  current = opt_state.hyperparams["learning_rate"]
  hyperparams = {**opt_state.hyperparams,
                 "learning_rate": jnp.asarray(learning_rate, current.dtype)}
  return opt_state._replace(hyperparams=hyperparams)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: sh.Rules = sh.TRAIN_RULES) -> NamedSharding:
  """Leading (batch) dim over the mesh axes the rules give ``BATCH``, other dims replicated.

  One sharding for every batch key, whatever its rank; the batch size must be divisible by the
  product of those axes.
  """
  # A size every axis divides, so the spec names all of BATCH's axes.
  spec = sh.logical_to_spec((sh.BATCH,), (mesh.devices.size,), mesh, rules)
  return NamedSharding(mesh, spec)


def trainable_shapes_and_shardings(config: TransformerConfig, mesh: Mesh, rules: sh.Rules,
                                    lora_config: lora.LoraConfig | None):
  shapes, names = param_shapes(config), param_logical_names(config)
  if lora_config is None:
    return shapes, param_shardings(config, mesh, rules)
  return (lora.adapter_shapes(shapes, names, lora_config),
          lora.adapter_shardings(shapes, names, lora_config, mesh, rules))


def opt_state_shardings(optimizer: optax.GradientTransformation, trainable_shapes: Any,
                        trainable_shardings: Any, mesh: Mesh) -> Any:
  """Param-shaped optimizer leaves (moments) sharded like their params, the rest replicated."""
  abstract = jax.eval_shape(optimizer.init, trainable_shapes)
  return optax.tree_map_params(optimizer, lambda _, s: s, abstract, trainable_shardings,
                               transform_non_params=lambda _: replicated(mesh))


def state_shardings(config: TransformerConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: sh.Rules = sh.TRAIN_RULES, *, lora_config: lora.LoraConfig | None = None,
                    frozen_keys: tuple[str, ...] = ()) -> TrainState:
  """A ``TrainState`` of ``NamedSharding``s; ``frozen_keys`` name frozen (full-params) trees."""
  bad = [k for k in frozen_keys if k not in FROZEN_KEYS]
  check("frozen_keys", frozen_keys, not bad, f"entries must be in {FROZEN_KEYS}")
  shapes, shardings = trainable_shapes_and_shardings(config, mesh, rules, lora_config)
  full = param_shardings(config, mesh, rules)
  return TrainState(step=replicated(mesh), params=shardings,
                    opt_state=opt_state_shardings(optimizer, shapes, shardings, mesh),
                    rng=replicated(mesh),
                    frozen={k: full for k in frozen_keys} if frozen_keys else None)


def create_train_state(config: TransformerConfig, optimizer: optax.GradientTransformation,
                       rng: jax.Array, *, mesh: Mesh | None = None,
                       rules: sh.Rules = sh.TRAIN_RULES, params: Any = None,
                       lora_config: lora.LoraConfig | None = None,
                       reference_params: Any = None) -> TrainState:
  """A fresh ``TrainState`` placed by ``state_shardings`` (on one device when ``mesh`` is None).

  Args:
    config: the model.
    optimizer: e.g. ``make_optimizer(...)``; its state is created for the trainable tree.
    rng: split into the init key (used when ``params`` is None), the LoRA key and ``state.rng``.
    params: starting parameters (e.g. an imported checkpoint); random ``init_params`` if None.
      Full fine-tuning copies them into the state, so the caller's arrays stay valid after the
      step donates the state.
    lora_config: train adapters on top of ``params`` (kept frozen as ``frozen["base"]``).
    reference_params: kept as ``frozen["reference"]`` for losses with reference="params".
  """
  init_rng, lora_rng, state_rng = jax.random.split(rng, 3)
  if params is None:
    params = init_params(config, init_rng, mesh, rules)
  frozen = {}
  if lora_config is not None:
    frozen["base"] = params
  if reference_params is not None:
    frozen["reference"] = reference_params
  make = _compiled_make(config, optimizer, mesh, rules, lora_config)
  if mesh is None:
    return make(params, lora_rng, state_rng).replace(frozen=frozen or None)
  out = state_shardings(config, optimizer, mesh, rules, lora_config=lora_config,
                        frozen_keys=tuple(frozen))
  params = jax.device_put(params, param_shardings(config, mesh, rules))
  state = make(params, lora_rng, state_rng)
  return state.replace(frozen=jax.device_put(frozen, out.frozen) if frozen else None)


@functools.lru_cache(maxsize=32)
def _compiled_make(config: TransformerConfig, optimizer: optax.GradientTransformation,
                   mesh: Mesh | None, rules: sh.Rules, lora_config: lora.LoraConfig | None):
  """The jitted state creation, kept per (model, optimizer, mesh, rules, LoRA): every round of a
  run creates its fresh state without compiling again."""
  names = param_logical_names(config)

  def make(params, lora_rng, state_rng):
    trainable = params
    if lora_config is not None:
      trainable = lora.init_lora(params, lora_config, lora_rng, base_names=names)
    # jit returns fresh buffers (no input forwarding), so donating the state never frees `params`.
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                      opt_state=optimizer.init(trainable), rng=state_rng)

  if mesh is None:
    return jax.jit(make)
  out = state_shardings(config, optimizer, mesh, rules, lora_config=lora_config)
  return jax.jit(make, out_shardings=out.replace(frozen=None))

