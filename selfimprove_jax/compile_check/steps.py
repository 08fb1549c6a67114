"""The checked steps: the real sharded update step and sampler, lowered on abstract params and
compiled, with the inputs validated first (a bad value names its flag).
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from selfimprove_jax import sharding as sh
from selfimprove_jax.compile_check.memory import (GIB, Report, StepMemory, abstract_params,
                                                  batch_shards, kv_cache_bytes, leaf_bytes,
                                                  train_state_shardings, tree_bytes)
from selfimprove_jax.models import PRESETS, TINY, Transformer, TransformerConfig, get_preset
from selfimprove_jax.models.config import DTYPES
from selfimprove_jax.sampling import SamplingParams, generate
from selfimprove_jax.training import remat as remat_lib
from selfimprove_jax.training.registry import make_loss
from selfimprove_jax.training.state import TrainState, batch_sharding, make_optimizer, make_schedule
from selfimprove_jax.training.step import COMPUTE_DTYPES, make_update_step

STEPS = ("update", "sample")
# XLA:CPU options that skip LLVM's optimization of the generated code, which a compile-only check
# never runs: up to half the compile time saved, the same memory analysis (buffer
# assignment happens on the HLO, before code generation). The CLI uses them on CPU devices.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# ---------------------------------------------------------------------------------- validation

def fail(name: str, value: Any, why: str) -> None:
  raise ValueError(f"{name}={value!r}: {why}")


def positive_int(name: str, value: Any) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    fail(name, value, "must be a positive int")


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=2,fsdp=2,tensor=2"`` (missing axes are 1, one size may be -1) -> a dict."""
  shape = {}
  for part in filter(None, (p.strip() for p in str(text).split(","))):
    axis, eq, size = part.partition("=")
    axis = axis.strip()
    if not eq or axis not in sh.MESH_AXES or not re.fullmatch(r"-?\d+", size.strip()):
      fail("mesh", text, f"must be comma-separated AXIS=SIZE with AXIS in {sh.MESH_AXES}, "
            "e.g. 'fsdp=8' or 'data=2,fsdp=2,tensor=2'")
    if axis in shape:
      fail("mesh", text, f"names axis {axis!r} twice")
    shape[axis] = int(size)
  if not shape:
    fail("mesh", text, "is empty; e.g. 'fsdp=8'")
  return shape


def resolve_preset(preset: str | TransformerConfig, dtype: str) -> tuple[str, TransformerConfig]:
  """(name, config with parameter and activation dtype ``dtype``), as the loop builds a preset."""
  if dtype not in DTYPES:
    fail("dtype", dtype, f"must be one of {DTYPES}")
  if isinstance(preset, TransformerConfig):
    return "custom", preset.replace(dtype=dtype, param_dtype=dtype)
  known = sorted(PRESETS) + [f"tiny_{f}" for f in TINY]
  if preset not in known:
    fail("preset", preset, f"unknown; known presets: {known}")
  return preset, get_preset(preset).replace(dtype=dtype, param_dtype=dtype)


def build_mesh(mesh: Mesh | dict[str, int] | str, devices: Sequence[Any] | None = None) -> Mesh:
  """A ``Mesh`` as is, or ``sharding.make_mesh`` of a dict / ``parse_mesh`` string; errors name
  the mesh and the device count."""
  if isinstance(mesh, Mesh):
    return mesh
  shape = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
  try:
    return sh.make_mesh(shape, devices)
  except ValueError as e:
    raise ValueError(f"mesh={mesh!r}: {e}") from None


# ---------------------------------------------------------------------------------- the steps

def _compile(lowered, compiler_options: dict[str, Any] | None) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = lowered.compile(compiler_options=compiler_options)
  return compiled, time.perf_counter() - start


def _analysis(compiled) -> dict[str, int | None]:
  stats = compiled.memory_analysis() if compiled is not None else None
  if stats is None:
    return dict(argument=None, output=None, alias=None, temp=None)
  return dict(argument=int(stats.argument_size_in_bytes), output=int(stats.output_size_in_bytes),
              alias=int(stats.alias_size_in_bytes), temp=int(stats.temp_size_in_bytes))


def update_step_memory(config: TransformerConfig, mesh: Mesh, *, batch: int, seq_len: int,
                       num_microbatches: int = 1, compute_dtype: str | None = None,
                       remat: str | None = None, chunk_size: int | None = None,
                       budget: int | None = None, compile: bool = True,
                       compiler_options: dict[str, Any] | None = None) -> StepMemory:
  """Memory of the SFT update step on a (batch, seq_len) batch, full fine-tuning with AdamW.

  Builds ``make_update_step``'s jitted core exactly as the loop does (``TRAIN_RULES``, the state
  donated) and lowers it on abstract inputs:
    state   step () int32, params (each leaf sharded by ``param_shardings``), opt_state (AdamW mu
            and nu like the params, counters replicated), rng key (replicated)
    batch   tokens_BxL int32, input_mask_BxL bool, loss_mask_BxL bool; B split over data x fsdp
  """
  positive_int("batch", batch)
  positive_int("seq_len", seq_len)
  positive_int("num_microbatches", num_microbatches)
  if seq_len < 2:
    fail("seq_len", seq_len, "must be >= 2 (a token is scored given the one before it)")
  shards = batch_shards(mesh)
  if batch % (shards * num_microbatches):
    fail("batch", batch, f"must be a multiple of the mesh's {shards} batch shards (data x fsdp) "
          f"times num_microbatches={num_microbatches}")
  if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
    fail("compute_dtype", compute_dtype, f"must be empty or one of {COMPUTE_DTYPES}")
  if remat is not None and remat not in remat_lib.POLICIES:
    fail("remat", remat, f"must be empty or one of {sorted(remat_lib.POLICIES)}")

  loss = make_loss("sft", chunk_size=chunk_size)  # validates chunk_size, compiled or not
  optimizer = make_optimizer(make_schedule("constant", 1e-5))
  shardings = train_state_shardings(config, optimizer, mesh)
  shapes = jax.eval_shape(
      lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                           rng=jax.random.key(0)), abstract_params(config)[0])
  state = sh.abstract(shapes, shardings)
  data = batch_sharding(mesh, sh.TRAIN_RULES)
  inputs = {"tokens_BxL": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=data),
            "input_mask_BxL": jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_, sharding=data),
            "loss_mask_BxL": jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_, sharding=data)}
  rng = state.rng

  description = (f"SFT, batch {batch} x {seq_len} tokens, {num_microbatches} micro-batch(es), "
                 f"remat={remat or 'none'}, compute in {compute_dtype or config.dtype}")
  report = StepMemory(
      step="update", description=description, params=tree_bytes(state.params),
      optimizer=tree_bytes(state.opt_state), kv_cache=0,
      # state.rng is not read by the step, so jit drops it from the arguments (keep_unused=False).
      inputs=tree_bytes(inputs) + leaf_bytes(state.step) + leaf_bytes(rng), budget=budget)
  if not compile:
    return report
  model = Transformer(config, mesh, sh.TRAIN_RULES)
  update = make_update_step(model, loss, optimizer, schedule=1e-5, state_shardings=shardings,
                            num_microbatches=num_microbatches, compute_dtype=compute_dtype,
                            remat=remat, mesh=mesh)
  start = time.perf_counter()
  lowered = update.jitted.lower(state, None, inputs, rng)
  lower_s = time.perf_counter() - start
  compiled, compile_s = _compile(lowered, compiler_options)
  return dataclasses.replace(report, **_analysis(compiled), lower_s=lower_s, compile_s=compile_s)


def sample_step_memory(config: TransformerConfig, mesh: Mesh, *, batch: int, prompt_len: int,
                       num_samples: int, max_new_tokens: int, budget: int | None = None,
                       compile: bool = True,
                       compiler_options: dict[str, Any] | None = None) -> StepMemory:
  """Memory of ``sampling.generate`` for ``batch`` prompts, as the loop's ``Sampler`` calls it.

  Inputs (abstract): params under ``SAMPLE_RULES``; prompt_BxP int32 and prompt_mask_BxP bool
  (B split over data x fsdp where it divides); rng key; ``SamplingParams`` of R = B * N rows;
  stop_ids_S int32 (S = 2). The step allocates the KV cache of R rows x (P + M) slots itself.
  """
  for name, value in (("batch", batch), ("prompt_len", prompt_len), ("num_samples", num_samples),
                      ("max_new_tokens", max_new_tokens)):
    positive_int(name, value)
  shards = batch_shards(mesh, sh.SAMPLE_RULES)
  rows = batch * num_samples
  if rows % shards:
    fail("batch", batch, f"times num_samples={num_samples} ({rows} sampled rows) must be a "
          f"multiple of the mesh's {shards} batch shards (data x fsdp)")

  shapes, names = abstract_params(config)
  params = sh.abstract(shapes, sh.tree_shardings(names, shapes, mesh, sh.SAMPLE_RULES))
  prompt_sharding = sh.logical_sharding((sh.BATCH, None), (batch, prompt_len), mesh, sh.SAMPLE_RULES)
  rep = NamedSharding(mesh, PartitionSpec())
  row = lambda dtype: jax.ShapeDtypeStruct((rows,), dtype, sharding=rep)
  args = dict(
      prompt_BxP=jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=prompt_sharding),
      prompt_mask_BxP=jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_, sharding=prompt_sharding),
      rng=jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep),
      sampling=SamplingParams(temperature=row(jnp.float32), top_k=row(jnp.int32),
                              top_p=row(jnp.float32)),
      stop_ids_S=jax.ShapeDtypeStruct((2,), jnp.int32, sharding=rep))
  cache_len = prompt_len + max_new_tokens
  description = (f"{batch} prompts x {prompt_len} tokens, {num_samples} samples each, "
                 f"{max_new_tokens} new tokens: KV cache {rows} rows x {cache_len} slots")
  report = StepMemory(step="sample", description=description, params=tree_bytes(params),
                      optimizer=0, kv_cache=kv_cache_bytes(config, rows, cache_len, mesh),
                      inputs=tree_bytes(args), budget=budget)
  if not compile:
    return report
  model = Transformer(config, mesh, sh.SAMPLE_RULES)
  start = time.perf_counter()
  lowered = generate.lower(model, params, args["prompt_BxP"], args["prompt_mask_BxP"], args["rng"],
                           args["sampling"], args["stop_ids_S"], max_new_tokens=max_new_tokens,
                           num_samples=num_samples, pad_id=0)
  lower_s = time.perf_counter() - start
  compiled, compile_s = _compile(lowered, compiler_options)
  return dataclasses.replace(report, **_analysis(compiled), lower_s=lower_s, compile_s=compile_s)


def check(preset: str | TransformerConfig, mesh: Mesh | dict[str, int] | str, *,
          steps: Sequence[str] = STEPS, batch: int = 8, seq_len: int = 2048, num_samples: int = 4,
          max_new_tokens: int = 512, prompt_len: int | None = None, dtype: str = "bfloat16",
          compute_dtype: str | None = None, remat: str | None = None, num_microbatches: int = 1,
          chunk_size: int | None = None, budget_gib: float | None = 16.0,
          compile: bool | Sequence[str] = True,
          compiler_options: dict[str, Any] | None = None) -> Report:
  """Compiles the requested steps of ``preset`` on ``mesh`` with abstract params; no weights.

  Args:
    preset: a ``models.get_preset`` name (or a config); its params and activations get ``dtype``.
    mesh: a ``Mesh``, a dict of axis sizes, or a ``parse_mesh`` string, over ``jax.devices()``.
    steps: any of ``STEPS``.
    batch: update step: sequences per step (B of tokens_BxL); sample step: prompts per call.
    seq_len: update step: L; sample step: the cache length P + M when ``prompt_len`` is None.
    num_samples, max_new_tokens: N and M of the sample step.
    prompt_len: P of the sample step (default ``seq_len - max_new_tokens``).
    compute_dtype, remat, num_microbatches, chunk_size: the update step's options
      (``make_update_step``; ``chunk_size`` is the SFT loss's vocabulary-projection chunk).
    budget_gib: per-device memory budget in GiB (None: no verdict).
    compile: True compiles every step; False (or the steps not named, given a list of step
      names) skips lowering and compiling: only params, optimizer state, inputs and KV cache.
    compiler_options: XLA options for ``compile`` (e.g. ``FAST_CPU_COMPILE``).
  Returns:
    A ``Report``; ``format_report`` renders it.
  """
  bad = [s for s in steps if s not in STEPS]
  if bad or not steps:
    fail("steps", ",".join(steps), f"must be a non-empty list of {STEPS}")
  compiled = set(steps) if compile is True else set() if compile is False else set(compile)
  if compiled - set(steps):
    fail("compile", compile, f"names steps that are not in steps={tuple(steps)}")
  name, config = resolve_preset(preset, dtype)
  mesh = build_mesh(mesh)
  if budget_gib is not None and not budget_gib > 0:
    fail("budget_gib", budget_gib, "must be > 0")
  budget = None if budget_gib is None else int(budget_gib * GIB)
  if "sample" in steps:
    if prompt_len is None:
      prompt_len = seq_len - max_new_tokens
      if prompt_len < 1:
        fail("max_new_tokens", max_new_tokens, f"must be < seq_len={seq_len} when prompt_len is "
              "not given (the prompt gets seq_len - max_new_tokens tokens)")
  reports = []
  for step in STEPS:  # in a fixed order: the train state first
    if step not in steps:
      continue
    if step == "update":
      reports.append(update_step_memory(
          config, mesh, batch=batch, seq_len=seq_len, num_microbatches=num_microbatches,
          compute_dtype=compute_dtype or None, remat=remat or None, chunk_size=chunk_size,
          budget=budget, compile=step in compiled, compiler_options=compiler_options))
    else:
      reports.append(sample_step_memory(
          config, mesh, batch=batch, prompt_len=prompt_len, num_samples=num_samples,
          max_new_tokens=max_new_tokens, budget=budget, compile=step in compiled,
          compiler_options=compiler_options))
  device = mesh.devices.flat[0]
  return Report(preset=name, config=config, mesh_shape=dict(mesh.shape), platform=device.platform,
                device_kind=device.device_kind, steps=tuple(reports))

