"""The checked steps: the real sharded update step, sampler and scorer, lowered on abstract
inputs (``inputs``) and compiled, with every input validated first (a bad value names its flag).
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
from selfimprove_jax.compile_check import inputs, topology
from selfimprove_jax.compile_check.memory import (GIB, Report, StepMemory, batch_shards,
                                                  kv_cache_bytes, leaf_bytes, tree_bytes)
from selfimprove_jax.models import PRESETS, TINY, Transformer, TransformerConfig, get_preset
from selfimprove_jax.models.config import DTYPES
from selfimprove_jax.sampling import SamplingParams, generate
from selfimprove_jax.scoring import DEFAULT_CHUNK, score_forked_jit
from selfimprove_jax.training import remat as remat_lib
from selfimprove_jax.training.state import make_optimizer, state_shardings
from selfimprove_jax.training.step import make_update_step

STEPS = ("update", "sample", "score")
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
  """(name, config computing in ``dtype``, parameters stored in it: the sampling copy)."""
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

def _lower_and_compile(build, compiler_options: dict[str, Any] | None) -> dict[str, Any]:
  """Lowers ``build()`` and compiles it: XLA's memory analysis and the timings, or the numbers of
  the compiler's out-of-memory refusal (reported as a step that does not fit, not raised)."""
  start = time.perf_counter()
  lowered = build()
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  try:
    compiled = lowered.compile(compiler_options=compiler_options)
  except Exception as e:  # pylint: disable=broad-except
    numbers = topology.refusal(str(e))
    if numbers is None:
      raise
    return dict(temp=numbers["temp"], refused=str(e).strip().splitlines()[0][:300],
                lower_s=lower_s, compile_s=time.perf_counter() - start)
  compile_s = time.perf_counter() - start
  stats = compiled.memory_analysis()
  analysis = dict(argument=None, output=None, alias=None, temp=None) if stats is None else dict(
      argument=int(stats.argument_size_in_bytes), output=int(stats.output_size_in_bytes),
      alias=int(stats.alias_size_in_bytes), temp=int(stats.temp_size_in_bytes))
  return dict(**analysis, lower_s=lower_s, compile_s=compile_s)


def _mesh_text(mesh: Mesh) -> str:
  return "mesh " + " ".join(f"{k}={v}" for k, v in mesh.shape.items())


def _replicated(mesh: Mesh, shape=(), dtype=jnp.float32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def update_step_memory(config: TransformerConfig, mesh: Mesh, recipe: inputs.Recipe, *,
                       batch: int, seq_len: int, budget: int | None = None, compile: bool = True,
                       compiler_options: dict[str, Any] | None = None) -> StepMemory:
  """Memory of the loop's update step for ``recipe`` on ``batch`` rows of ``seq_len`` tokens.

  Builds ``make_update_step``'s jitted core as the loop does (``TRAIN_RULES``, the state donated,
  frozen trees beside it, the learning rate an argument) and lowers it on ``inputs.train_state``
  and ``inputs.update_batch``. ``config.dtype`` is the compute dtype.
  """
  positive_int("batch", batch)
  positive_int("seq_len", seq_len)
  positive_int("num_microbatches", recipe.num_microbatches)
  if seq_len < 2:
    fail("seq_len", seq_len, "must be >= 2 (a token is scored given the one before it)")
  shards = batch_shards(mesh)
  if batch % (shards * recipe.num_microbatches):
    fail("batch", batch, f"must be a multiple of the mesh's {shards} batch shards (data x fsdp) "
          f"times num_microbatches={recipe.num_microbatches}")
  if recipe.loss not in inputs.LOSSES:
    fail("loss", recipe.loss, f"must be one of {inputs.LOSSES}")
  if recipe.reference and recipe.loss != "policy_gradient":
    fail("reference", recipe.reference, "only the policy_gradient loss keeps reference params")
  if recipe.remat is not None and recipe.remat not in remat_lib.POLICIES:
    fail("remat", recipe.remat, f"must be empty or one of {sorted(remat_lib.POLICIES)}")
  if recipe.lora_rank < 0:
    fail("lora_rank", recipe.lora_rank, "must be >= 0 (0 = full fine-tuning)")
  loss = recipe.loss_fn()  # validates chunk_size, compiled or not
  master = config.replace(param_dtype=config.dtype if recipe.lora_rank else "float32")
  optimizer = make_optimizer(1e-5)
  state, frozen = inputs.train_state(master, recipe, optimizer, mesh)
  data = inputs.update_batch(recipe, batch, seq_len, mesh)
  learning_rate = _replicated(mesh)
  report = StepMemory(
      step="update", description=f"{recipe.describe(batch, seq_len)}, compute in {config.dtype}",
      params=tree_bytes(state.params) + tree_bytes(frozen), optimizer=tree_bytes(state.opt_state),
      kv_cache=0, inputs=tree_bytes(data) + leaf_bytes(state.step) + leaf_bytes(state.rng)
      + leaf_bytes(learning_rate), budget=budget)
  if not compile:
    return report
  shardings = state_shardings(master, optimizer, mesh, sh.TRAIN_RULES,
                              lora_config=recipe.lora_config, frozen_keys=tuple(frozen or ()))
  update = make_update_step(
      Transformer(master, mesh, sh.TRAIN_RULES), loss, optimizer, state_shardings=shardings,
      num_microbatches=recipe.num_microbatches, lora_config=recipe.lora_config,
      compute_dtype=config.dtype, remat=recipe.remat, mesh=mesh)
  return dataclasses.replace(report, **_lower_and_compile(
      lambda: update.jitted.lower(state, frozen, data, state.rng, learning_rate), compiler_options))


def sample_step_memory(config: TransformerConfig, mesh: Mesh, *, batch: int, prompt_len: int,
                       num_samples: int, max_new_tokens: int, budget: int | None = None,
                       compile: bool = True,
                       compiler_options: dict[str, Any] | None = None) -> StepMemory:
  """Memory of ``sampling.generate`` for ``batch`` prompts, as the loop's ``Sampler`` calls it.

  Inputs (abstract): the compute-dtype params under ``SAMPLE_RULES``; prompt_BxP int32 and
  prompt_mask_BxP bool; rng key; ``SamplingParams`` of R = B * N rows; stop_ids_S int32 (S = 2).
  The step allocates the KV cache of R rows x (P + M) slots itself.
  """
  for name, value in (("batch", batch), ("prompt_len", prompt_len), ("num_samples", num_samples),
                      ("max_new_tokens", max_new_tokens)):
    positive_int(name, value)
  shards = batch_shards(mesh, sh.SAMPLE_RULES)
  rows = batch * num_samples
  if rows % shards:
    fail("batch", batch, f"times num_samples={num_samples} ({rows} sampled rows) must be a "
          f"multiple of the mesh's {shards} batch shards (data x fsdp)")
  params = inputs.params(config, mesh, config.dtype, sh.SAMPLE_RULES)
  prompt_sharding = sh.logical_sharding((sh.BATCH, None), (batch, prompt_len), mesh, sh.SAMPLE_RULES)
  row = lambda dtype: _replicated(mesh, (rows,), dtype)
  args = dict(
      prompt_BxP=jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=prompt_sharding),
      prompt_mask_BxP=jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_, sharding=prompt_sharding),
      rng=_replicated(mesh, (), jax.eval_shape(lambda: jax.random.key(0)).dtype),
      sampling=SamplingParams(temperature=row(jnp.float32), top_k=row(jnp.int32),
                              top_p=row(jnp.float32)),
      stop_ids_S=_replicated(mesh, (2,), jnp.int32))
  cache_len = prompt_len + max_new_tokens
  description = (f"{batch} prompts x {prompt_len} tokens, {num_samples} samples each, "
                 f"{max_new_tokens} new tokens: KV cache {rows} rows x {cache_len} slots; "
                 f"{_mesh_text(mesh)}")
  report = StepMemory(step="sample", description=description, params=tree_bytes(params),
                      optimizer=0, kv_cache=kv_cache_bytes(config, rows, cache_len, mesh),
                      inputs=tree_bytes(args), budget=budget)
  if not compile:
    return report
  model = Transformer(config, mesh, sh.SAMPLE_RULES)
  return dataclasses.replace(report, **_lower_and_compile(lambda: generate.lower(
      model, params, args["prompt_BxP"], args["prompt_mask_BxP"], args["rng"], args["sampling"],
      args["stop_ids_S"], max_new_tokens=max_new_tokens, num_samples=num_samples, pad_id=0),
      compiler_options))


def score_step_memory(config: TransformerConfig, mesh: Mesh, *, batch: int, prompt_len: int,
                      num_samples: int, completion_len: int,
                      chunk_size: int | None = DEFAULT_CHUNK, budget: int | None = None,
                      compile: bool = True,
                      compiler_options: dict[str, Any] | None = None) -> StepMemory:
  """Memory of ``scoring.score_forked_jit`` (log-probs and self-certainty: the self-rewards) as
  the loop calls it: ``batch`` sequences per call, ``batch // num_samples`` prompts of
  ``prompt_len`` tokens each read once and forked to ``num_samples`` completions of
  ``completion_len`` tokens, under the compute-dtype params. The step allocates the KV cache of
  ``batch`` rows x (P + C) slots itself."""
  for name, value in (("batch", batch), ("prompt_len", prompt_len), ("num_samples", num_samples),
                      ("completion_len", completion_len)):
    positive_int(name, value)
  if batch % num_samples:
    fail("batch", batch, f"must be a multiple of num_samples={num_samples} (whole prompts)")
  shards = batch_shards(mesh, sh.SAMPLE_RULES)
  if batch % shards:
    fail("batch", batch, f"must be a multiple of the mesh's {shards} batch shards (data x fsdp)")
  prompts = batch // num_samples
  params = inputs.params(config, mesh, config.dtype, sh.SAMPLE_RULES)
  place = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh.logical_sharding(
      (sh.BATCH, sh.LENGTH), shape, mesh, sh.SAMPLE_RULES))
  args = dict(prompt_BxP=place((prompts, prompt_len), jnp.int32),
              prompt_mask_BxP=place((prompts, prompt_len), jnp.bool_),
              completion_RxC=place((batch, completion_len), jnp.int32),
              completion_lengths_R=_replicated(mesh, (batch,), jnp.int32))
  cache_len = prompt_len + completion_len
  report = StepMemory(step="score", description=(
      f"{prompts} prompts x {prompt_len} tokens, {num_samples} completions each of "
      f"{completion_len} tokens: KV cache {batch} rows x {cache_len} slots, vocabulary chunk "
      f"{chunk_size or 'none'}; {_mesh_text(mesh)}"),
      params=tree_bytes(params), optimizer=0,
      kv_cache=kv_cache_bytes(config, batch, cache_len, mesh), inputs=tree_bytes(args),
      budget=budget)
  if not compile:
    return report
  model = Transformer(config, mesh, sh.SAMPLE_RULES)
  return dataclasses.replace(report, **_lower_and_compile(lambda: score_forked_jit.lower(
      model, params, *args.values(), chunk_size=chunk_size, entropy=False), compiler_options))


def check(preset: str | TransformerConfig, mesh: Mesh | dict[str, int] | str, *,
          steps: Sequence[str] = STEPS, batch: int = 8, seq_len: int = 2048, num_samples: int = 4,
          max_new_tokens: int = 512, prompt_len: int | None = None,
          sample_batch: int | None = None, score_batch: int | None = None,
          dtype: str = "bfloat16", loss: str = "sft", lora_rank: int = 0,
          lora_targets: str = "attention", reference: bool = False, remat: str | None = "full",
          num_microbatches: int = 1, chunk_size: int | None = DEFAULT_CHUNK,
          sample_mesh: str = "tensor", budget_gib: float | str | None = "hbm",
          devices: Sequence[Any] | None = None,
          compile: bool | Sequence[str] = True,
          compiler_options: dict[str, Any] | None = None) -> Report:
  """Compiles the requested steps of ``preset`` on ``mesh`` with abstract inputs; no weights.

  Args:
    preset: a ``models.get_preset`` name (or a config).
    mesh: a ``Mesh``, a dict of axis sizes, or a ``parse_mesh`` string, over ``devices``.
    steps: any of ``STEPS``.
    batch: update step: sequences (pairs for pair losses) per step.
    seq_len: update step: L; sample and score steps: P + M when ``prompt_len`` is None.
    num_samples, max_new_tokens: N and M of the sample step; the score step reads each prompt
      once for N completions of M tokens.
    prompt_len: P of the sample and score steps (default ``seq_len - max_new_tokens``).
    sample_batch, score_batch: prompts per sampler call (default ``batch``), sequences per
      scorer call (default ``batch * num_samples``, a multiple of N).
    dtype: the compute dtype (``TransformerConfig.dtype``); see ``inputs`` for the precision.
    loss, lora_rank, lora_targets, reference, remat, num_microbatches, chunk_size: the update
      step's ``inputs.Recipe`` (``chunk_size`` is also the scorer's).
    sample_mesh: where the sample and score steps run, as the loop's ``sample.mesh``: "tensor"
      (the fsdp axis folded into tensor, ``sharding.sampling_mesh``) or "train" (``mesh``).
    budget_gib: per-device budget in GiB; "hbm": the chips' HBM as the TPU compiler reports it
      (16 GiB where it reports none); None: no verdict.
    devices: the devices the mesh spans (default ``jax.devices()``), e.g. a TPU topology's
      (``topology.tpu_devices``), which compile with XLA:TPU on any machine.
    compile: True compiles every step; False (or the steps not named, given a list of step
      names) skips lowering and compiling: params, optimizer state, inputs and KV cache only.
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
  mesh = build_mesh(mesh, devices)
  if sample_mesh not in ("tensor", "train"):
    fail("sample_mesh", sample_mesh, "must be 'tensor' or 'train'")
  sampling = sh.sampling_mesh(mesh) if sample_mesh == "tensor" else mesh
  if budget_gib == "hbm":
    hbm = topology.hbm_bytes(list(mesh.devices.flat))
    budget = hbm if hbm is not None else 16 * GIB
  elif budget_gib is not None and not (isinstance(budget_gib, (int, float)) and budget_gib > 0):
    fail("budget_gib", budget_gib, "must be > 0")
  else:
    budget = None if budget_gib is None else int(budget_gib * GIB)
  if ("sample" in steps or "score" in steps) and prompt_len is None:
    prompt_len = seq_len - max_new_tokens
    if prompt_len < 1:
      fail("max_new_tokens", max_new_tokens, f"must be < seq_len={seq_len} when prompt_len is "
            "not given (the prompt gets seq_len - max_new_tokens tokens)")
  recipe = inputs.Recipe(loss=loss, lora_rank=lora_rank, lora_targets=lora_targets,
                         reference=reference, num_microbatches=num_microbatches,
                         remat=remat or None, chunk_size=chunk_size)
  common = dict(budget=budget, compiler_options=compiler_options)
  reports = []
  for step in STEPS:  # in a fixed order: the train state first
    if step not in steps:
      continue
    if step == "update":
      reports.append(update_step_memory(config, mesh, recipe, batch=batch, seq_len=seq_len,
                                        compile=step in compiled, **common))
    elif step == "sample":
      reports.append(sample_step_memory(
          config, sampling, batch=sample_batch or batch, prompt_len=prompt_len,
          num_samples=num_samples, max_new_tokens=max_new_tokens, compile=step in compiled,
          **common))
    else:
      reports.append(score_step_memory(
          config, sampling, batch=score_batch or batch * num_samples, prompt_len=prompt_len,
          num_samples=num_samples, completion_len=max_new_tokens, chunk_size=chunk_size,
          compile=step in compiled, **common))
  device = mesh.devices.flat[0]
  return Report(preset=name, config=config, mesh_shape=dict(mesh.shape), platform=device.platform,
                device_kind=device.device_kind, steps=tuple(reports))
