"""LoRA: adapter trees for the decoder layers' projections, and merging them into a base.

A targeted kernel W is read as a matrix from its input dims to its output dims; its adapter is
A (in, rank), B (rank, out), scaled by alpha / rank. Training and sampling never merge: the
model computes x·W + s·(x·A)·B inside each adapted projection (``models.LoraParams``,
``layers.dense``), so no full-size copy of W or of its gradient exists. ``merge`` forms
W' = W + s·A·B for what needs plain parameters: the model a finished round hands to the next
one, and the checkpoint exporter (``merged`` is its ``params -> params`` hook).

Which dims are "in": a kernel whose last axis is ``EMBED`` writes into the residual stream, so
everything before it is input (o_proj (H, F, D): in = H*F; embedding (V, D): in = V); any other
kernel reads the residual stream (or the MLP hidden) through its first axis (q_proj (D, H, F):
in = D, out = H*F; down_proj (M, D): in = M). Adapters keep the unflattened dims, A (*in, r) and
B (r, *out), which is the matrix view reshaped: each adapter dim then inherits the logical name of
the base dim it stands for, so A's input dims are sharded like the kernel's input dims and B's
output dims like its output dims, with no resharding at merge time.

Adapter tree: the base tree's nesting restricted to targeted kernels, each leaf replaced by
``{"lora_a": A, "lora_b": B}``; only this tree is trained, held in the optimizer and checkpointed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from selfimprove_jax import sharding as sh

# Attention projections of every layer: the usual LoRA target (and the paper's SFT-Sharpening).
ATTENTION_TARGETS = r"layers_\d+/attn/(q|k|v|o)_proj"
ALL_LINEAR_TARGETS = r"layers_\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on every kernel whose path ("layers_0/attn/q_proj") matches ``targets``.

  Attributes:
    rank: r, the inner dimension of A @ B.
    alpha: the update is scaled by alpha / rank (so changing rank keeps the update's scale).
    targets: regular expression matched with ``re.fullmatch`` against "/"-joined parameter paths.
    init_scale: A ~ Normal(0, init_scale / sqrt(fan_in)); B = 0, so a fresh adapter is a no-op.
  """

  rank: int = 16
  alpha: float = 32.0
  targets: str = ATTENTION_TARGETS
  init_scale: float = 1.0

  def __post_init__(self):
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
      raise ValueError(f"lora.rank={self.rank!r}: must be a positive int")
    if not self.alpha > 0:
      raise ValueError(f"lora.alpha={self.alpha!r}: must be > 0")
    if not self.init_scale > 0:
      raise ValueError(f"lora.init_scale={self.init_scale!r}: must be > 0")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"lora.targets={self.targets!r}: not a regular expression ({e})") from None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def num_input_dims(names: tuple[str | None, ...]) -> int:
  """How many leading dims of a kernel with these logical names are its input (see module doc)."""
  return len(names) - 1 if names[-1] == sh.EMBED else 1


def _targets(names_tree: Any, config: LoraConfig) -> dict[str, tuple[str | None, ...]]:
  """path -> logical names of every targeted kernel; refuses other parameters and empty matches."""
  is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)
  found = {}
  for path, names in jax.tree_util.tree_flatten_with_path(names_tree, is_leaf=is_names)[0]:
    p = _path_str(path)
    if re.fullmatch(config.targets, p):
      if not re.fullmatch(ALL_LINEAR_TARGETS, p):
        raise ValueError(f"lora.targets={config.targets!r} matches {p}: adapters go on the decoder "
                         "layers' projections only (attn q/k/v/o_proj, mlp gate/up/down_proj), "
                         "where they are applied beside the frozen kernel")
      found[p] = tuple(names)
  if not found:
    raise ValueError(f"lora.targets={config.targets!r} matches no parameter path "
                     "(paths look like 'layers_0/attn/q_proj')")
  return found


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def _flat_adapters(adapters: Any) -> dict[str, dict[str, jax.Array]]:
  flat = {}

  def walk(node, prefix):
    if isinstance(node, Mapping) and set(node) == {"lora_a", "lora_b"}:
      flat[prefix] = node
    elif isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, f"{prefix}/{k}" if prefix else str(k))
    else:
      raise ValueError(f"adapters at {prefix!r}: expected nested dicts ending in lora_a/lora_b")

  walk(adapters, "")
  return flat


def adapter_logical_names(base_names: Any, config: LoraConfig) -> Any:
  """Logical names of the adapter tree: A = (*in names, None), B = (None, *out names)."""
  flat = {}
  for path, names in _targets(base_names, config).items():
    n_in = num_input_dims(names)
    flat[path] = {"lora_a": names[:n_in] + (None,), "lora_b": (None,) + names[n_in:]}
  return _nest(flat)


def adapter_shapes(base_shapes: Any, base_names: Any, config: LoraConfig) -> Any:
  """``jax.ShapeDtypeStruct`` tree of the adapters (float32, whatever the base dtype)."""
  shapes = {_path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(base_shapes)[0]}
  flat = {}
  for path, names in _targets(base_names, config).items():
    shape = tuple(shapes[path].shape)
    n_in = num_input_dims(names)
    flat[path] = {
        "lora_a": jax.ShapeDtypeStruct(shape[:n_in] + (config.rank,), jnp.float32),
        "lora_b": jax.ShapeDtypeStruct((config.rank,) + shape[n_in:], jnp.float32)}
  return _nest(flat)


def adapter_shardings(base_shapes: Any, base_names: Any, config: LoraConfig, mesh: Mesh,
                      rules: sh.Rules = sh.TRAIN_RULES) -> Any:
  """``NamedSharding`` per adapter leaf, following the base kernel's input / output dims."""
  return sh.tree_shardings(adapter_logical_names(base_names, config),
                           adapter_shapes(base_shapes, base_names, config), mesh, rules)


def init_lora(base_params: Any, config: LoraConfig, rng: jax.Array, *, base_names: Any) -> Any:
  """Fresh adapters for ``base_params``: A ~ Normal(0, init_scale^2 / fan_in), B = 0.

  Args:
    base_params: the model's parameter tree (arrays or ``ShapeDtypeStruct``s; only shapes are read).
    base_names: its logical names (``models.param_logical_names(config)``).
    config: which kernels, rank and scale.
    rng: key; one normal draw is cut into every A, in sorted path order (one random-bits
      program for all kernels compiles much faster than one per kernel).
  Returns:
    The adapter tree (float32). Jit it with ``out_shardings=adapter_shardings(...)`` to create it
    sharded (``training.create_train_state`` does).
  """
  flat = _flat_adapters(adapter_shapes(base_params, base_names, config))
  paths = sorted(flat)
  sizes = [math.prod(flat[p]["lora_a"].shape) for p in paths]
  z = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  out, start = {}, 0
  for path, size in zip(paths, sizes):
    a_shape = flat[path]["lora_a"].shape
    fan_in = math.prod(a_shape[:-1])
    a = z[start:start + size].reshape(a_shape) * (config.init_scale / fan_in**0.5)
    start += size
    out[path] = {"lora_a": a, "lora_b": jnp.zeros(flat[path]["lora_b"].shape, jnp.float32)}
  return _nest(out)


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """scale * A @ B with A (*in, r) and B (r, *out): a (*in, *out) array, float32."""
  return scale * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def merge(base: Any, adapters: Any, config: LoraConfig) -> Any:
  """W + (alpha / rank) * A @ B on every adapted kernel; other parameters are passed through.

  Differentiable in ``adapters`` (the update step's forward) and usable on the host (export).
  The sum is formed in float32 and cast back to each kernel's dtype. Adapters and base must come
  from the same config: a kernel path or shape mismatch raises ValueError naming the path.
  """
  flat = _flat_adapters(adapters)
  seen = set()

  def one(path, w):
    p = _path_str(path)
    if p not in flat:
      return w
    seen.add(p)
    a, b = flat[p]["lora_a"], flat[p]["lora_b"]
    if a.shape[:-1] + b.shape[1:] != w.shape or a.shape[-1] != b.shape[0]:
      raise ValueError(f"adapter {p}: lora_a {a.shape} @ lora_b {b.shape} does not fit the "
                       f"kernel {w.shape}")
    return (w.astype(jnp.float32) + delta(a, b, config.scale)).astype(w.dtype)

  merged_params = jax.tree_util.tree_map_with_path(one, base)
  missing = sorted(set(flat) - seen)
  if missing:
    raise ValueError(f"adapters for {missing} have no matching kernel in the base parameters")
  return merged_params


def merged(adapters: Any, config: LoraConfig) -> Callable[[Any], Any]:
  """The ``params -> params`` export hook: ``save_hf(..., merge_fn=merged(adapters, cfg))``."""
  return functools.partial(_merge_jit, adapters=adapters, config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def _merge_jit(base: Any, adapters: Any, config: LoraConfig) -> Any:
  # Jitted so sharded kernels are merged where they live, without a host round trip per tensor.
  return merge(base, adapters, config)
