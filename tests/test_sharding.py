"""Mesh construction, logical-name resolution and sharded parameter creation on 8 fake CPU devices."""
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from selfimprove_jax import sharding as sh


@pytest.fixture(scope="module")
def mesh():
  return sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


# --- make_mesh -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, sizes", [
    ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
    ({"fsdp": 8}, (1, 8, 1)),                 # missing axes are 1
    ((1, 4, 2), (1, 4, 2)),
    ({"data": -1, "tensor": 2}, (4, 1, 2)),   # -1 takes the remaining devices
    ((2, -1, 1), (2, 4, 1)),
    ([-1, 1, 1], (8, 1, 1)),
], ids=["dict", "dict_missing_axes", "tuple", "dict_minus_one", "tuple_minus_one", "list_minus_one"])
def test_make_mesh_sizes_names_and_auto_axes(shape, sizes):
  mesh = sh.make_mesh(shape)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == sizes
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert mesh.devices.size == 8


def test_make_mesh_uses_the_given_devices_in_order():
  devices = jax.devices()[4:]
  mesh = sh.make_mesh({"data": -1, "tensor": 2}, devices=devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  assert list(mesh.devices.flat) == devices


@pytest.mark.parametrize("shape, message", [
    ({"data": -1, "fsdp": -1, "tensor": 2},
     "mesh shape={'data': -1, 'fsdp': -1, 'tensor': 2}: sizes must be positive"),
    ({"data": 0, "fsdp": 8}, "mesh shape={'data': 0, 'fsdp': 8, 'tensor': 1}: sizes must be positive"),
    ((2, -2, 2), "mesh shape={'data': 2, 'fsdp': -2, 'tensor': 2}: sizes must be positive"),
    ({"data": 2, "tensor": 2}, "mesh shape={'data': 2, 'fsdp': 1, 'tensor': 2} needs 4 devices, have 8"),
    ((4, 4, 1), "mesh shape={'data': 4, 'fsdp': 4, 'tensor': 1} needs 16 devices, have 8"),
    ({"data": -1, "tensor": 3},
     "mesh shape={'data': -1, 'fsdp': 1, 'tensor': 3}: 8 devices are not divisible by 3"),
    ({"data": 2, "model": 4}, "mesh shape has unknown axes ['model']"),
    ((2, 4), "mesh shape=(2, 4) must have 3 entries"),
    ((2, 2, 1, 2), "mesh shape=(2, 2, 1, 2) must have 3 entries"),
], ids=["two_minus_one", "zero", "negative", "too_few_devices", "too_many_devices",
        "minus_one_not_divisible", "unknown_axis", "tuple_too_short", "tuple_too_long"])
def test_make_mesh_rejects_bad_shapes_naming_them(shape, message):
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    sh.make_mesh(shape)


# --- logical_to_spec -----------------------------------------------------------------------------

# id: (logical names, shape, rules, expected spec on the 2x2x2 mesh)
SPECS_2X2X2 = {
    # Params: embed over fsdp, vocab over tensor, for training and sampling alike (sampling keeps
    # the training layout: an 8B model's weights stay sharded, nothing is resharded in between).
    "train_vocab_embed": (("vocab", "embed"), (256, 64), sh.TRAIN_RULES, P("tensor", "fsdp")),
    "train_embed_vocab": (("embed", "vocab"), (64, 256), sh.TRAIN_RULES, P("fsdp", "tensor")),
    "sample_vocab_embed": (("vocab", "embed"), (256, 64), sh.SAMPLE_RULES, P("tensor", "fsdp")),
    # Batch claims two mesh axes: a tuple entry.
    "batch_two_axes": (("batch", "length", "act_embed"), (8, 16, 64), sh.TRAIN_RULES,
                       P(("data", "fsdp"), None, None)),
    # A batch of 2 is not divisible by data*fsdp=4: the trailing axis (fsdp) is dropped.
    "batch_2_drops_fsdp": (("batch", "length"), (2, 16), sh.TRAIN_RULES, P("data", None)),
    "batch_3_replicated": (("batch", "length"), (3, 16), sh.TRAIN_RULES, P(None, None)),
    # One KV head cannot be split over tensor=2: replicated there, embed still over fsdp.
    "one_kv_head": (("embed", "kv_heads", "head_dim"), (64, 1, 16), sh.TRAIN_RULES,
                    P("fsdp", None, None)),
    "two_kv_heads": (("embed", "kv_heads", "head_dim"), (64, 2, 16), sh.TRAIN_RULES,
                     P("fsdp", "tensor", None)),
    # heads and mlp both map to tensor: only the first dimension gets it.
    "heads_then_mlp": (("heads", "mlp"), (4, 128), sh.TRAIN_RULES, P("tensor", None)),
    "mlp_then_heads": (("mlp", "heads"), (128, 4), sh.TRAIN_RULES, P("tensor", None)),
    # batch already took data and fsdp, so embed (fsdp) stays replicated here.
    "batch_took_fsdp": (("batch", "embed"), (8, 64), sh.TRAIN_RULES, P(("data", "fsdp"), None)),
    # A dimension that claims (fsdp, tensor) after fsdp is taken keeps only tensor.
    "partly_taken": (("embed", "mlp"), (64, 128), (("embed", "fsdp"), ("mlp", ("fsdp", "tensor"))),
                     P("fsdp", "tensor")),
    # Unnamed dims, unlisted names and rules mapping to None are replicated.
    "unlisted": ((None, "length", "norm"), (8, 4, 64), sh.TRAIN_RULES, P(None, None, None)),
    "rule_to_none": (("vocab",), (256,), (("vocab", None),), P(None)),
}


@pytest.mark.parametrize("names, shape, rules, spec", list(SPECS_2X2X2.values()), ids=list(SPECS_2X2X2))
def test_logical_to_spec_on_2x2x2(mesh, names, shape, rules, spec):
  assert sh.logical_to_spec(names, shape, mesh, rules) == spec


@pytest.mark.parametrize("mesh_shape, names, shape, spec", [
    ({"data": 8}, ("batch", "length"), (8, 16), P("data", None)),
    ({"fsdp": 4, "tensor": 2}, ("batch", "length"), (8, 16), P("fsdp", None)),
    ({"data": 4, "tensor": 2}, ("embed", "vocab"), (64, 256), P(None, "tensor")),
    ({"data": 8}, ("vocab", "embed"), (256, 64), P(None, None)),
], ids=["data_only", "fsdp_without_data", "no_fsdp", "neither_fsdp_nor_tensor"])
def test_logical_to_spec_omits_size_one_mesh_axes(mesh_shape, names, shape, spec):
  assert sh.logical_to_spec(names, shape, sh.make_mesh(mesh_shape), sh.TRAIN_RULES) == spec


@pytest.mark.parametrize("names, shape, rules, message", [
    (("embd",), (64,), sh.TRAIN_RULES, "unknown logical axis 'embd'"),
    (("embed",), (64,), (("embed", "model"),), "sharding rule 'embed' -> ['model']: not mesh axes"),
    (("embed",), (64,), (("embed", ("fsdp", "tensr")),), "sharding rule 'embed' -> ['tensr']"),
    (("embed",), (64,), (("hidden", "fsdp"),), "sharding rule for unknown logical axis 'hidden'"),
    (("embed", "mlp"), (64,), sh.TRAIN_RULES, "logical names ('embed', 'mlp') do not match shape (64,)"),
], ids=["unknown_name", "rule_to_non_mesh_axis", "rule_tuple_with_typo", "rule_unknown_name",
        "rank_mismatch"])
def test_logical_to_spec_rejects_unknown_names_and_axes(mesh, names, shape, rules, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    sh.logical_to_spec(names, shape, mesh, rules)


# --- constrain -----------------------------------------------------------------------------------

def test_constrain_is_identity_without_mesh():
  x = jnp.arange(12.0).reshape(4, 3)
  assert sh.constrain(x, ("batch", "vocab"), None, sh.TRAIN_RULES) is x


def test_constrain_places_jit_output_as_the_rules_say(mesh):
  x = jnp.arange(48.0).reshape(8, 6)
  unconstrained = jax.jit(lambda x: x * 2)(x)
  assert not isinstance(unconstrained.sharding, NamedSharding)  # so the check below means something
  y = jax.jit(lambda x: sh.constrain(x * 2, ("batch", "vocab"), mesh, sh.TRAIN_RULES))(x)
  assert y.sharding == NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
  np.testing.assert_array_equal(y, 2 * np.arange(48.0).reshape(8, 6))


# --- sharded_init / assert_sharded_as_rules ------------------------------------------------------

class TwoParams(nn.Module):
  """Embedding-like table (vocab x embed) and a projection whose mlp width (3) no mesh axis divides."""

  @nn.compact
  def __call__(self, tokens_B):
    table_VxD = self.param("table", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", "embed")), (16, 8))
    proj_DxF = self.param("proj", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("embed", "mlp")), (8, 3))
    return table_VxD[tokens_B] @ proj_DxF


def _init(rng):
  return TwoParams().init(rng, jnp.zeros((2,), jnp.int32))


@pytest.fixture(scope="module")
def sharded_params(mesh):
  return sh.sharded_init(_init, mesh, sh.TRAIN_RULES, jax.random.key(0))


def test_sharded_init_places_params_and_returns_names(mesh, sharded_params):
  params, names = sharded_params
  assert names == {"params": {"table": ("vocab", "embed"), "proj": ("embed", "mlp")}}
  assert params["params"]["table"].sharding == NamedSharding(mesh, P("tensor", "fsdp"))
  assert params["params"]["proj"].sharding == NamedSharding(mesh, P("fsdp", None))
  # Same values as an unsharded init with the same key.
  plain, plain_names = sh.sharded_init(_init, None, sh.TRAIN_RULES, jax.random.key(0))
  assert plain_names == names
  chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(plain))


def test_assert_sharded_as_rules_accepts_rule_placement(mesh, sharded_params):
  params, names = sharded_params
  sh.assert_sharded_as_rules(params, names, mesh, sh.TRAIN_RULES)


def test_assert_sharded_as_rules_names_the_misplaced_leaf(mesh, sharded_params):
  params, names = sharded_params
  moved = jax.device_put(params["params"]["table"], NamedSharding(mesh, P("fsdp", "tensor")))
  bad = {"params": {**params["params"], "table": moved}}
  with pytest.raises(AssertionError, match=re.escape("['params']['table']")) as err:
    sh.assert_sharded_as_rules(bad, names, mesh, sh.TRAIN_RULES)
  assert "['params']['proj']" not in str(err.value)
  # Rules that replicate embed find the rule-placed table misplaced too.
  replicate_embed = tuple(r for r in sh.TRAIN_RULES if r[0] != sh.EMBED)
  with pytest.raises(AssertionError, match=re.escape("['params']['table']")):
    sh.assert_sharded_as_rules(params, names, mesh, replicate_embed)


# --- a sharded jitted step in a Python loop ------------------------------------------------------

def test_sharded_step_loop_blocking_each_iteration(mesh, sharded_params):
  """Least squares on the toy params; blocks every step (unblocked loops can deadlock XLA:CPU)."""
  params, names = sharded_params
  param_sh = sh.tree_shardings(names, params, mesh, sh.TRAIN_RULES)
  batch_sh = sh.logical_sharding(("batch",), (8,), mesh, sh.TRAIN_RULES)
  target_sh = sh.logical_sharding(("batch", None), (8, 3), mesh, sh.TRAIN_RULES)

  @chex.assert_max_traces(n=1)
  def step(params, tokens_B, target_BxF):
    def loss_fn(p):
      out = TwoParams().apply(p, tokens_B)
      out = sh.constrain(out, ("batch", None), mesh, sh.TRAIN_RULES)
      return jnp.mean((out - target_BxF) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree.map(lambda p, g: p - 0.05 * g, params, grads), loss

  step = jax.jit(step, in_shardings=(param_sh, batch_sh, target_sh),
                 out_shardings=(param_sh, None), donate_argnums=0)
  tokens_B = jax.device_put(jnp.arange(8, dtype=jnp.int32), batch_sh)
  target_BxF = jax.device_put(jnp.ones((8, 3)), target_sh)
  params = jax.tree.map(jnp.copy, params)  # the step donates; keep the fixture's arrays alive
  losses = []
  for _ in range(20):
    params, loss = step(params, tokens_B, target_BxF)
    losses.append(float(loss.block_until_ready()))
  assert losses[-1] < 0.5 * losses[0]
  sh.assert_sharded_as_rules(params, names, mesh, sh.TRAIN_RULES)


@pytest.mark.parametrize("shape", [{"data": 2.9, "fsdp": 4}, (True, 4, 2)], ids=["float", "bool"])
def test_make_mesh_rejects_non_int_sizes(shape):
  with pytest.raises(ValueError, match="sizes must be ints"):
    sh.make_mesh(shape)
