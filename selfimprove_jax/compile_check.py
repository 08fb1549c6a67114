"""Compile-only memory check: will a preset's update step and sample step fit on a mesh?

Lowers and compiles the real-size sharded steps with *abstract* parameters (``jax.ShapeDtypeStruct``
leaves carrying their ``NamedSharding``: no weight is ever allocated) and reports, per device:

  params           the parameters' shard bytes (update step: ``TRAIN_RULES``; sample step:
                   ``SAMPLE_RULES``, i.e. replicated over data/fsdp, split over tensor only)
  optimizer state  the AdamW moments (same dtype and sharding as the params) and counters
  KV cache         sample step: the cache of R = B * N rows x (P + M) slots that ``generate``
                   allocates inside the step (part of its temporaries)
  inputs           the batch (tokens_BxL, input_mask_BxL, loss_mask_BxL) or the prompts, the
                   sampling parameters, the stop ids, the step counter and keys
  arguments / outputs / aliased / temporaries
                   XLA's own ``compiled.memory_analysis()``; the aliased bytes are the donated
                   train state that the update step writes in place
  total            arguments + outputs - aliased + temporaries, the figure compared to the budget

The first four come from each leaf's ``sharding.shard_shape(global_shape)`` x itemsize (exact,
platform-independent); the arguments XLA reports are checked against them. Temporaries are what
the backend's compiler allocates and depend on the backend: XLA:CPU, for one, converts bfloat16
matmul weights to float32 copies, shows no saving from per-layer remat (see ``training/remat.py``)
and schedules buffers differently from TPU/GPU, so temporaries from fake CPU devices are a rough,
pessimistic stand-in for an accelerator's (llama3_1_8b, batch 8 x 2048 on fsdp=8: 85 GiB).

The same function serves every platform: on a TPU VM the mesh spans the real chips and their
topology; with ``--num_cpu_devices=N`` (or under pytest's 8 fake devices) it spans fake CPU devices.

  python -m selfimprove_jax.compile_check --preset=llama3_1_8b --mesh=fsdp=8 --num_cpu_devices=8 \\
      --batch=8 --seq_len=2048 --dtype=bfloat16 --budget_gib=16

Exit status: 0 when every step fits the budget, 1 when one does not, 2 on bad flags.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from selfimprove_jax import sharding as sh
from selfimprove_jax.models import PRESETS, TINY, Transformer, TransformerConfig, get_preset
from selfimprove_jax.models.config import DTYPES
from selfimprove_jax.models.transformer import CACHE_KV_AXES, CACHE_POS_AXES
from selfimprove_jax.sampling import SamplingParams, generate
from selfimprove_jax.training import remat as remat_lib
from selfimprove_jax.training.registry import make_loss
from selfimprove_jax.training.state import (TrainState, batch_sharding, make_optimizer,
                                            make_schedule, opt_state_shardings, replicated)
from selfimprove_jax.training.step import COMPUTE_DTYPES, make_update_step

STEPS = ("update", "sample")
GIB = 1024**3
_FORCE_DEVICES = "--xla_force_host_platform_device_count"
# XLA:CPU options that skip LLVM's optimization of the generated code, which a compile-only check
# never runs: up to half the compile time saved, the same memory analysis (buffer
# assignment happens on the HLO, before code generation). The CLI uses them on CPU devices.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# ---------------------------------------------------------------------------------- the report

@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Per-device memory of one compiled step (all sizes in bytes, per device).

  ``argument``/``output``/``alias``/``temp`` are XLA's ``memory_analysis()`` (None when the step
  was only accounted, ``compile=False``, or the backend has no analysis). ``kv_cache`` lives
  inside ``temp``; ``params + optimizer + inputs`` should equal ``argument``.
  """

  step: str
  description: str
  params: int
  optimizer: int
  kv_cache: int
  inputs: int
  argument: int | None = None
  output: int | None = None
  alias: int | None = None
  temp: int | None = None
  budget: int | None = None
  lower_s: float | None = None
  compile_s: float | None = None

  @property
  def compiled(self) -> bool:
    return self.temp is not None

  @property
  def accounted(self) -> int:
    """Bytes of the step's arguments by the sharding arithmetic."""
    return self.params + self.optimizer + self.inputs

  @property
  def total(self) -> int:
    """Peak estimate: arguments + outputs - aliased + temporaries; without a compile, the
    accounted arguments plus the KV cache (a lower bound)."""
    if not self.compiled:
      return self.accounted + self.kv_cache
    return self.argument + self.output - self.alias + self.temp

  @property
  def fits(self) -> bool | None:
    return None if self.budget is None else self.total <= self.budget


@dataclasses.dataclass(frozen=True)
class Report:
  """The steps of one check plus what they ran on."""

  preset: str
  config: TransformerConfig
  mesh_shape: dict[str, int]
  platform: str
  device_kind: str
  steps: tuple[StepMemory, ...]

  @property
  def fits(self) -> bool | None:
    verdicts = [s.fits for s in self.steps]
    return None if None in verdicts else all(verdicts)


# ---------------------------------------------------------------------------------- accounting

def leaf_bytes(leaf: Any, sharding: NamedSharding | None = None) -> int:
  """Bytes one device holds of ``leaf`` (an array or ``ShapeDtypeStruct``, typed keys included)."""
  sharding = sharding if sharding is not None else getattr(leaf, "sharding", None)
  shape = tuple(leaf.shape) if sharding is None else sharding.shard_shape(tuple(leaf.shape))
  return math.prod(shape) * leaf.dtype.itemsize


def tree_bytes(tree: Any) -> int:
  """Per-device bytes of a tree of arrays / ``ShapeDtypeStruct`` leaves carrying shardings."""
  return sum(leaf_bytes(x) for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=16)
def abstract_params(config: TransformerConfig) -> tuple[Any, Any]:
  """(``param_shapes(config)``, ``param_logical_names(config)``) from one abstract trace of the
  init instead of two: that trace is most of the cost of a check without a compile (about a
  second for 42 layers)."""
  init = lambda rng: Transformer(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
  boxed = jax.eval_shape(init, jax.random.key(0))
  return nn.meta.unbox(boxed), sh.logical_names(boxed)


def param_count(config: TransformerConfig) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)[0])))


def train_state_shardings(config: TransformerConfig, optimizer, mesh: Mesh) -> TrainState:
  """``training.state_shardings(config, optimizer, mesh, TRAIN_RULES)`` (full fine-tuning, no
  frozen trees), from the cached ``abstract_params`` instead of four more traces of the init."""
  shapes, names = abstract_params(config)
  params = sh.tree_shardings(names, shapes, mesh, sh.TRAIN_RULES)
  return TrainState(step=replicated(mesh), params=params,
                    opt_state=opt_state_shardings(optimizer, shapes, params, mesh),
                    rng=replicated(mesh), frozen=None)


def _abstract(shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes,
                      shardings)


def batch_shards(mesh: Mesh, rules: sh.Rules = sh.TRAIN_RULES) -> int:
  """How many ways the leading batch dim is split (data x fsdp under the default rules)."""
  spec = batch_sharding(mesh, rules).spec
  axes = spec[0] if spec else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def kv_cache_bytes(config: TransformerConfig, rows: int, length: int, mesh: Mesh,
                   rules: sh.Rules = sh.SAMPLE_RULES) -> int:
  """Per-device bytes of ``init_cache(config, rows, length)``: L x (k, v) of (rows, K, S, F) in
  ``config.dtype`` plus pos (rows, S) int32, placed as ``init_cache`` places them."""
  kv_shape = (rows, config.num_kv_heads, length, config.head_dim)
  kv = jax.ShapeDtypeStruct(kv_shape, jnp.dtype(config.dtype),
                            sharding=sh.logical_sharding(CACHE_KV_AXES, kv_shape, mesh, rules))
  pos = jax.ShapeDtypeStruct((rows, length), jnp.int32,
                             sharding=sh.logical_sharding(CACHE_POS_AXES, (rows, length), mesh, rules))
  return 2 * config.num_layers * leaf_bytes(kv) + leaf_bytes(pos) + 4


# ---------------------------------------------------------------------------------- validation

def _fail(name: str, value: Any, why: str) -> None:
  raise ValueError(f"{name}={value!r}: {why}")


def _positive_int(name: str, value: Any) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    _fail(name, value, "must be a positive int")


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=2,fsdp=2,tensor=2"`` (missing axes are 1, one size may be -1) -> a dict."""
  shape = {}
  for part in filter(None, (p.strip() for p in str(text).split(","))):
    axis, eq, size = part.partition("=")
    axis = axis.strip()
    if not eq or axis not in sh.MESH_AXES or not re.fullmatch(r"-?\d+", size.strip()):
      _fail("mesh", text, f"must be comma-separated AXIS=SIZE with AXIS in {sh.MESH_AXES}, "
            "e.g. 'fsdp=8' or 'data=2,fsdp=2,tensor=2'")
    if axis in shape:
      _fail("mesh", text, f"names axis {axis!r} twice")
    shape[axis] = int(size)
  if not shape:
    _fail("mesh", text, "is empty; e.g. 'fsdp=8'")
  return shape


def resolve_preset(preset: str | TransformerConfig, dtype: str) -> tuple[str, TransformerConfig]:
  """(name, config with parameter and activation dtype ``dtype``), as the loop builds a preset."""
  if dtype not in DTYPES:
    _fail("dtype", dtype, f"must be one of {DTYPES}")
  if isinstance(preset, TransformerConfig):
    return "custom", preset.replace(dtype=dtype, param_dtype=dtype)
  known = sorted(PRESETS) + [f"tiny_{f}" for f in TINY]
  if preset not in known:
    _fail("preset", preset, f"unknown; known presets: {known}")
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
  _positive_int("batch", batch)
  _positive_int("seq_len", seq_len)
  _positive_int("num_microbatches", num_microbatches)
  if seq_len < 2:
    _fail("seq_len", seq_len, "must be >= 2 (a token is scored given the one before it)")
  shards = batch_shards(mesh)
  if batch % (shards * num_microbatches):
    _fail("batch", batch, f"must be a multiple of the mesh's {shards} batch shards (data x fsdp) "
          f"times num_microbatches={num_microbatches}")
  if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
    _fail("compute_dtype", compute_dtype, f"must be empty or one of {COMPUTE_DTYPES}")
  if remat is not None and remat not in remat_lib.POLICIES:
    _fail("remat", remat, f"must be empty or one of {sorted(remat_lib.POLICIES)}")

  loss = make_loss("sft", chunk_size=chunk_size)  # validates chunk_size, compiled or not
  optimizer = make_optimizer(make_schedule("constant", 1e-5))
  shardings = train_state_shardings(config, optimizer, mesh)
  shapes = jax.eval_shape(
      lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                           rng=jax.random.key(0)), abstract_params(config)[0])
  state = _abstract(shapes, shardings)
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
    _positive_int(name, value)
  shards = batch_shards(mesh, sh.SAMPLE_RULES)
  rows = batch * num_samples
  if rows % shards:
    _fail("batch", batch, f"times num_samples={num_samples} ({rows} sampled rows) must be a "
          f"multiple of the mesh's {shards} batch shards (data x fsdp)")

  shapes, names = abstract_params(config)
  params = _abstract(shapes, sh.tree_shardings(names, shapes, mesh, sh.SAMPLE_RULES))
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
    _fail("steps", ",".join(steps), f"must be a non-empty list of {STEPS}")
  compiled = set(steps) if compile is True else set() if compile is False else set(compile)
  if compiled - set(steps):
    _fail("compile", compile, f"names steps that are not in steps={tuple(steps)}")
  name, config = resolve_preset(preset, dtype)
  mesh = build_mesh(mesh)
  if budget_gib is not None and not budget_gib > 0:
    _fail("budget_gib", budget_gib, "must be > 0")
  budget = None if budget_gib is None else int(budget_gib * GIB)
  if "sample" in steps:
    if prompt_len is None:
      prompt_len = seq_len - max_new_tokens
      if prompt_len < 1:
        _fail("max_new_tokens", max_new_tokens, f"must be < seq_len={seq_len} when prompt_len is "
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


# ---------------------------------------------------------------------------------- rendering

def _gib(n: int | None) -> str:
  return "-" if n is None else f"{n / GIB:10.3f} GiB"


def _line(label: str, n: int | None, note: str = "") -> str:
  bytes_ = "" if n is None else f"{n:>18,d} B"
  return f"  {label:<26}{_gib(n):>14}{bytes_:>22}  {note}".rstrip()


def format_report(report: Report) -> str:
  """The per-device table of every step, with the budget verdict."""
  cfg = report.config
  n_params = param_count(cfg)
  itemsize = jnp.dtype(cfg.param_dtype).itemsize
  mesh = " ".join(f"{k}={v}" for k, v in report.mesh_shape.items())
  devices = math.prod(report.mesh_shape.values())
  out = [f"compile-only memory check: {report.preset} ({n_params:,} params, {cfg.param_dtype}) on "
         f"mesh {mesh} = {devices} {report.platform} device(s) [{report.device_kind}]",
         "all sizes are per device"]
  for s in report.steps:
    timing = ("not compiled: sharding arithmetic only" if s.compile_s is None else
              f"lower {s.lower_s:.1f} s, compile {s.compile_s:.1f} s"
              + ("" if s.compiled else "; the backend gave no memory analysis"))
    out += ["", f"{s.step} step: {s.description}  ({timing})"]
    split = n_params * itemsize / s.params if s.params else float("nan")
    out.append(_line("params", s.params, f"= {n_params:,} x {itemsize} B / {split:.2f}"))
    if s.step == "update":
      out.append(_line("optimizer state", s.optimizer, "AdamW mu + nu, in the params' dtype"))
    out.append(_line("inputs", s.inputs, "batch" if s.step == "update" else
                     "prompts, sampling params, stop ids, key"))
    if s.compiled:
      parts = "params + optimizer + inputs" if s.step == "update" else "params + inputs"
      check_note = (f"= {parts}" if abs(s.argument - s.accounted) <= 0.01 * s.accounted
                    else f"!= {parts} ({s.accounted:,} B)")
      out.append(_line("arguments (XLA)", s.argument, check_note))
      out.append(_line("outputs (XLA)", s.output))
      out.append(_line("aliased (XLA)", s.alias, "donated inputs reused for outputs"))
      out.append(_line("temporaries (XLA)", s.temp))
    if s.step == "sample":
      out.append(_line("  of which KV cache" if s.compiled else "KV cache", s.kv_cache,
                       "k, v of every layer + slot positions"))
    out.append(_line("total", s.total, "arguments + outputs - aliased + temporaries" if s.compiled
                     else "lower bound: no temporaries without a compile"))
    if s.budget is not None:
      margin = s.budget - s.total
      verdict = (f"FITS ({margin / GIB:.2f} GiB to spare)" if s.fits
                 else f"DOES NOT FIT (over by {-margin / GIB:.2f} GiB)")
      out.append(_line("budget", s.budget, verdict))
  if report.platform == "cpu" and any(s.compiled for s in report.steps):
    out += ["", "note: temporaries come from XLA:CPU, which converts bfloat16 matmul weights to "
            "float32 copies, shows no saving from --remat and schedules buffers unlike TPU/GPU: "
            "a pessimistic stand-in for an accelerator's. Params, optimizer state, inputs and KV "
            "cache are exact on any platform."]
  if report.fits is not None:
    out += ["", "verdict: " + ("every step FITS" if report.fits else
                               "DOES NOT FIT: " + ", ".join(s.step for s in report.steps
                                                            if not s.fits))]
  return "\n".join(out)


# ---------------------------------------------------------------------------------- the CLI

def use_cpu_devices(n: int) -> None:
  """Makes JAX use ``n`` fake CPU devices; must run before the backend is first used (the package
  imports jax, but devices are only created on the first device query)."""
  _positive_int("num_cpu_devices", n)
  flags_ = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_FORCE_DEVICES)]
  os.environ["XLA_FLAGS"] = " ".join(flags_ + [f"{_FORCE_DEVICES}={n}"])
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")  # the env var alone is read when jax is imported
  have = jax.devices()
  if len(have) != n or have[0].platform != "cpu":
    _fail("num_cpu_devices", n, f"JAX's backend was already initialized with {len(have)} "
          f"{have[0].platform} device(s); set it before anything uses a device")


def define_flags(flag_values=None) -> dict:
  """Defines the CLI's flags on ``flag_values`` (default absl's global ``FLAGS``); returns
  name -> ``FlagHolder``."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  on = dict(flag_values=flags.FLAGS if flag_values is None else flag_values)
  return dict(
      preset=flags.DEFINE_string("preset", None, "Model preset (models.get_preset), e.g. "
                                 "llama3_1_8b.", **on),
      mesh=flags.DEFINE_string("mesh", "fsdp=-1", "Mesh axis sizes, e.g. 'fsdp=8' or "
                               "'data=2,fsdp=2,tensor=2'; missing axes are 1, one may be -1.", **on),
      steps=flags.DEFINE_list("steps", list(STEPS), "Steps to check: update, sample.", **on),
      batch=flags.DEFINE_integer("batch", 8, "Update step: sequences per step; sample step: "
                                 "prompts per generate call.", **on),
      seq_len=flags.DEFINE_integer("seq_len", 2048, "Update step: sequence length L; sample "
                                   "step: prompt + new tokens when --prompt_len is not given.", **on),
      prompt_len=flags.DEFINE_integer("prompt_len", None, "Sample step: padded prompt length P "
                                      "(default seq_len - max_new_tokens).", **on),
      num_samples=flags.DEFINE_integer("num_samples", 4, "Sample step: samples per prompt N.",
                                       **on),
      max_new_tokens=flags.DEFINE_integer("max_new_tokens", 512, "Sample step: new tokens M.",
                                          **on),
      dtype=flags.DEFINE_string("dtype", "bfloat16", f"Parameter and activation dtype {DTYPES}.",
                                **on),
      compute_dtype=flags.DEFINE_string("compute_dtype", "", "Update step: cast params to this "
                                        "dtype for the forward ('' keeps --dtype).", **on),
      remat=flags.DEFINE_string("remat", "", "Update step: per-layer remat policy ('', "
                                + ", ".join(sorted(remat_lib.POLICIES)) + ").", **on),
      num_microbatches=flags.DEFINE_integer("num_microbatches", 1, "Update step: gradient "
                                            "accumulation micro-batches.", **on),
      chunk_size=flags.DEFINE_integer("chunk_size", None, "Update step: positions the SFT loss "
                                      "projects onto the vocabulary at once (default: all).", **on),
      budget_gib=flags.DEFINE_float("budget_gib", 16.0, "Per-device memory budget in GiB.", **on),
      num_cpu_devices=flags.DEFINE_integer("num_cpu_devices", None, "Use this many fake CPU "
                                           "devices (sets XLA_FLAGS and JAX_PLATFORMS=cpu); "
                                           "default: the real devices (e.g. a TPU VM's chips).",
                                           **on),
      compile=flags.DEFINE_boolean("compile", True, "Lower and compile; --nocompile only does "
                                   "the sharding arithmetic (no temporaries; seconds).", **on),
      fast_cpu_compile=flags.DEFINE_boolean("fast_cpu_compile", True, "On CPU devices, compile "
                                            "with FAST_CPU_COMPILE (no LLVM optimization of code "
                                            "that never runs; same memory analysis).", **on),
  )


def run_flags(values: dict[str, Any]) -> int:
  """Runs the check for parsed flag ``values`` (name -> value) and prints the report.

  Returns 0 when every step fits (or there is no budget), 1 when one does not; a bad value raises
  ``app.UsageError`` (exit status 2) naming the flag and the value, e.g. "--batch=12: ...".
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  v = values
  try:
    if not v["preset"]:
      _fail("preset", v["preset"], "is required, e.g. --preset=llama3_1_8b")
    if v["num_cpu_devices"] is not None:
      use_cpu_devices(v["num_cpu_devices"])
    cpu = jax.devices()[0].platform == "cpu"  # a TPU/GPU compile keeps XLA's defaults
    options = FAST_CPU_COMPILE if v["fast_cpu_compile"] and cpu else None
    report = check(v["preset"], v["mesh"], steps=v["steps"], batch=v["batch"],
                   seq_len=v["seq_len"], num_samples=v["num_samples"],
                   max_new_tokens=v["max_new_tokens"], prompt_len=v["prompt_len"],
                   dtype=v["dtype"], compute_dtype=v["compute_dtype"] or None,
                   remat=v["remat"] or None, num_microbatches=v["num_microbatches"],
                   chunk_size=v["chunk_size"], budget_gib=v["budget_gib"], compile=v["compile"],
                   compiler_options=options)
  except ValueError as e:
    message = str(e)
    if message.split("=", 1)[0] in v:  # "batch=12: ..." -> "--batch=12: ..."
      message = "--" + message
    raise app.UsageError(message, exitcode=2) from None
  print(format_report(report), flush=True)
  return 0 if report.fits in (True, None) else 1


def main(argv: Sequence[str]) -> int:
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}", exitcode=2)
  try:
    return run_flags({name: holder.value for name, holder in _FLAGS.items()})
  except app.UsageError as e:  # one line naming the flag, not absl's page of usage text
    print(f"compile_check: error: {e}", file=sys.stderr)
    return e.exitcode


_FLAGS: dict = {}


def run() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  _FLAGS.update(define_flags())
  app.run(main)


if __name__ == "__main__":
  run()
