"""Per-device memory of compiled steps: the report's types, the sharding arithmetic behind its
parameter / optimizer / input / KV-cache lines, and its text rendering.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from selfimprove_jax import sharding as sh
from selfimprove_jax.models import Transformer, TransformerConfig
from selfimprove_jax.models.transformer import CACHE_KV_AXES, CACHE_POS_AXES, ring_slots
from selfimprove_jax.training.state import (TrainState, batch_sharding, opt_state_shardings,
                                            replicated)

GIB = 1024**3


# ---------------------------------------------------------------------------------- the report

@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Per-device memory of one compiled step (all sizes in bytes, per device).

  ``argument``/``output``/``alias``/``temp`` are XLA's ``memory_analysis()`` (None when the step
  was only accounted, ``compile=False``, or the backend has no analysis). ``kv_cache`` lives
  inside ``temp``; ``params + optimizer + inputs`` should equal ``argument``. ``params`` counts
  every weight the step holds: trainable and frozen (a LoRA base, a reference copy).
  ``refused``: the compiler's own out-of-memory refusal (XLA:TPU's RESOURCE_EXHAUSTED), with
  ``temp`` the temporaries it said it needed: the step does not fit.
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
  refused: str | None = None

  @property
  def compiled(self) -> bool:
    return self.temp is not None and self.refused is None

  @property
  def accounted(self) -> int:
    """Bytes of the step's arguments by the sharding arithmetic."""
    return self.params + self.optimizer + self.inputs

  @property
  def total(self) -> int:
    """Peak estimate: arguments + outputs - aliased + temporaries; without a compile, the
    accounted arguments plus the KV cache (a lower bound)."""
    if self.refused is not None:
      return self.accounted + (self.temp or 0)
    if not self.compiled:
      return self.accounted + self.kv_cache
    return self.argument + self.output - self.alias + self.temp

  @property
  def fits(self) -> bool | None:
    if self.refused is not None:
      return False
    return None if self.budget is None else self.total <= self.budget

  @property
  def headroom(self) -> float | None:
    """The budget's unused fraction (negative when over)."""
    return None if self.budget is None else 1.0 - self.total / self.budget


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


def batch_shards(mesh: Mesh, rules: sh.Rules = sh.TRAIN_RULES) -> int:
  """How many ways the leading batch dim is split (data x fsdp under the default rules)."""
  spec = batch_sharding(mesh, rules).spec
  axes = spec[0] if spec else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def kv_cache_bytes(config: TransformerConfig, rows: int, length: int, mesh: Mesh,
                   rules: sh.Rules = sh.SAMPLE_RULES) -> int:
  """Per-device bytes of ``init_cache(config, rows, length)``: (k, v) of (rows, K, S, F) per layer
  in ``config.dtype`` (S = the window for ringed sliding-window layers) plus int32 slot positions,
  placed as ``init_cache`` places them."""
  window = ring_slots(config, length)

  def kv(S):
    shape = (rows, config.num_kv_heads, S, config.head_dim)
    return leaf_bytes(jax.ShapeDtypeStruct(shape, jnp.dtype(config.dtype), sharding=sh.logical_sharding(
        CACHE_KV_AXES, shape, mesh, rules)))

  def pos(S):
    return leaf_bytes(jax.ShapeDtypeStruct((rows, S), jnp.int32, sharding=sh.logical_sharding(
        CACHE_POS_AXES, (rows, S), mesh, rules)))

  layers = sum(2 * kv(window if window and local else length) for local in config.layer_is_local)
  return layers + pos(length) + (pos(window) if window else 0) + 4


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
  mesh = " ".join(f"{k}={v}" for k, v in report.mesh_shape.items())
  devices = math.prod(report.mesh_shape.values())
  out = [f"compile-only memory check: {report.preset} ({n_params:,} params, computing in "
         f"{cfg.dtype}) on mesh {mesh} = {devices} {report.platform} device(s) "
         f"[{report.device_kind}]", "all sizes are per device"]
  inputs_note = {"update": "batch, step, key, learning rate",
                 "sample": "prompts, sampling params, stop ids, key",
                 "score": "tokens and masks"}
  for s in report.steps:
    timing = ("not compiled: sharding arithmetic only" if s.compile_s is None else
              f"lower {s.lower_s:.1f} s, compile {s.compile_s:.1f} s"
              + ("" if s.compiled or s.refused else "; the backend gave no memory analysis"))
    out += ["", f"{s.step} step: {s.description}  ({timing})"]
    out.append(_line("params", s.params, f"{s.params / n_params:.3f} B per model parameter"))
    if s.step == "update":
      out.append(_line("optimizer state", s.optimizer, "AdamW mu + nu (float32), counters, lr"))
    out.append(_line("inputs", s.inputs, inputs_note[s.step]))
    if s.refused is not None:
      out.append(_line("temporaries (XLA)", s.temp, "the compiler's figure in its refusal"))
      out.append(f"  refused by the compiler: {s.refused}")
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
                     else "params + optimizer + inputs + temporaries (outputs unknown)"
                     if s.refused else "lower bound: no temporaries without a compile"))
    if s.budget is not None:
      margin = s.budget - s.total
      verdict = (f"FITS ({margin / GIB:.2f} GiB, {s.headroom:.0%} to spare)" if s.fits
                 else "DOES NOT FIT" + (f" (over by {-margin / GIB:.2f} GiB)" if margin < 0
                                        else " (refused by the compiler)"))
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

