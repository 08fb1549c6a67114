"""Logical axis names, the rules that map them onto a device mesh, and sharded parameter creation.

Every parameter and the main activations carry *logical* axis names (``EMBED``, ``HEADS``, ...).
A rules table maps each logical name to zero or more *mesh* axes (``data``, ``fsdp``, ``tensor``).
Changing how a model is laid out means changing a table, never model code; the same specs run on
one CPU, 8 fake CPU devices, a GPU or a TPU slice. The mesh is always passed in explicitly.

A mesh axis is dropped from a dimension it does not divide (e.g. a single KV head on a 2-way tensor
axis): the dimension is then replicated over that axis rather than rejected, so one preset runs on
any mesh. ``assert_sharded_as_rules`` applies the same resolution, so it checks exactly this.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Mesh axes.
DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Logical axes of parameters.
VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
NORM = "norm"
# Logical axes of activations and caches.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"  # the residual stream's feature axis: replicated, unlike params' EMBED
CACHE_LENGTH = "cache_length"

LOGICAL_AXES = (VOCAB, EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, NORM, BATCH, LENGTH,
                ACT_EMBED, CACHE_LENGTH)

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Training: batch over data and fsdp, parameters' embed axis fully sharded over fsdp (ZeRO-3 style),
# heads / mlp / vocab over tensor (Megatron style). Unlisted names are replicated.
TRAIN_RULES: Rules = (
    (BATCH, (DATA, FSDP)),
    (EMBED, FSDP),
    (VOCAB, TENSOR),
    (MLP, TENSOR),
    (HEADS, TENSOR),
    (KV_HEADS, TENSOR),
)

# Sampling and scoring: the same table. Every weight stays sharded, so an 8B model samples on
# 16 GiB chips. On a mesh with an fsdp axis, though, XLA hoists the weight all-gathers out of the
# decode loop (the weights do not change between steps) and holds the whole gathered model at
# once; ``sampling_mesh`` folds the fsdp axis into the tensor axis, which splits the weights over
# the same chips and never gathers them. The KV cache follows batch (data x fsdp) and kv_heads
# (tensor).
SAMPLE_RULES: Rules = TRAIN_RULES


def make_mesh(shape: dict[str, int] | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; one entry may be -1, meaning "all remaining devices".

  Args:
    shape: sizes per mesh axis, as a dict keyed by ``MESH_AXES`` (missing axes are 1) or a
      3-sequence in ``MESH_AXES`` order.
    devices: devices to use (default: all of ``jax.devices()``).
  Returns:
    A ``Mesh`` with Auto axis types (classic GSPMD propagation).
  """
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(shape, dict):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"mesh shape has unknown axes {sorted(unknown)}; valid axes are {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"mesh shape={tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}")
  raw = list(shape.values()) if isinstance(shape, dict) else list(shape)
  if any(not isinstance(s, (int, np.integer)) or isinstance(s, bool) for s in raw):
    raise ValueError(f"mesh shape={shape}: sizes must be ints")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh shape={dict(zip(MESH_AXES, sizes))}: sizes must be positive, "
                     "with at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh shape={dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not "
                       f"divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh shape={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  device_grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def sampling_mesh(mesh: Mesh) -> Mesh:
  """``mesh``'s devices with its fsdp axis folded into the tensor axis: (data, 1, fsdp x tensor).

  Under ``SAMPLE_RULES`` the weights are then split over every chip of a data replica (heads,
  MLP and vocabulary over tensor) and never gathered: the layout for decoding, whose steps would
  otherwise gather every layer each step or, hoisted out of the loop, all layers at once.
  """
  d, f, t = (mesh.shape[a] for a in MESH_AXES)
  if f == 1:
    return mesh
  return Mesh(mesh.devices.reshape(d, 1, f * t), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _rules_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
  table: dict[str, tuple[str, ...]] = {}
  for logical, mesh_axes in rules:
    if logical not in LOGICAL_AXES:
      raise ValueError(f"sharding rule for unknown logical axis {logical!r}; known: {LOGICAL_AXES}")
    if mesh_axes is None:
      mesh_axes = ()
    elif isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    bad = [a for a in mesh_axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f"sharding rule {logical!r} -> {bad}: not mesh axes {MESH_AXES}")
    table[logical] = tuple(mesh_axes)
  return table


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> PartitionSpec:
  """Resolves logical axis names of an array of ``shape`` into a ``PartitionSpec`` on ``mesh``.

  A mesh axis is used by at most one dimension (the first that claims it), and axes that do not
  divide a dimension are dropped from it, trailing ones first.
  """
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  table = _rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    if name is not None and name not in LOGICAL_AXES:
      raise ValueError(f"unknown logical axis {name!r}; known: {LOGICAL_AXES}")
    axes = [a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1]
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      axes.pop()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*spec)


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules: Rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None, rules: Rules) -> jax.Array:
  """``with_sharding_constraint`` by logical names; the identity when ``mesh`` is None."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_sharding(names, x.shape, mesh, rules))


def _is_boxed(x: Any) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def logical_names(boxed_tree: Any) -> Any:
  """Tree of logical-name tuples from a tree of ``nn.LogicallyPartitioned`` leaves (e.g. eval_shape of init)."""
  return jax.tree.map(lambda b: tuple(b.names), boxed_tree, is_leaf=_is_boxed)


def tree_shardings(names_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """``NamedSharding`` per leaf, from matching trees of logical names and shaped arrays."""
  is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)
  return jax.tree.map(lambda n, s: logical_sharding(n, s.shape, mesh, rules), names_tree,
                      shapes_tree, is_leaf=is_names)


def abstract(shapes_tree: Any, shardings_tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves carrying the shardings: abstract arrays to lower a step on
  or to restore a checkpoint into."""
  return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes_tree,
                      shardings_tree)


def sharded_init(init_fn, mesh: Mesh | None, rules: Rules, *args) -> tuple[Any, Any]:
  """Creates a parameter tree directly in its sharded layout, never holding an unsharded copy.

  ``init_fn(*args)`` must return a tree of ``nn.LogicallyPartitioned`` boxes (a Linen ``init`` whose
  params use ``nn.with_logical_partitioning``). Follows eval_shape -> specs -> jit(out_shardings).

  Returns:
    (params, names): the unboxed parameter tree and the tree of logical-name tuples.
  """
  jitted, names = sharded_init_fn(init_fn, mesh, rules, *args)
  return jitted(*args), names


def sharded_init_fn(init_fn, mesh: Mesh | None, rules: Rules, *example_args) -> tuple[Any, Any]:
  """``sharded_init`` split in two: (the jitted unboxing init, names), for callers that keep the
  compiled function and call it again. ``example_args`` may be abstract (only shapes are read)."""
  abstract = jax.eval_shape(init_fn, *example_args)
  names = logical_names(abstract)
  unboxed_init = lambda *a: nn.meta.unbox(init_fn(*a))
  if mesh is None:
    return jax.jit(unboxed_init), names
  return jax.jit(unboxed_init, out_shardings=tree_shardings(names, nn.meta.unbox(abstract), mesh, rules)), names


def assert_sharded_as_rules(tree: Any, names_tree: Any, mesh: Mesh, rules: Rules) -> None:
  """Raises AssertionError naming every leaf whose placement differs from what the rules say."""
  expected = tree_shardings(names_tree, tree, mesh, rules)
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  wrong = []
  for (path, leaf), want in zip(leaves, jax.tree.leaves(expected)):
    if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
      wrong.append(f"{jax.tree_util.keystr(path)}: has {leaf.sharding}, rules say {want.spec}")
  if wrong:
    raise AssertionError("parameters placed against the rules:\n  " + "\n  ".join(wrong))


def describe(tree: Any) -> Iterable[str]:
  """One line per leaf: path, shape, dtype and partition spec (for logs and notebooks)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    yield f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {leaf.dtype} {spec}"
