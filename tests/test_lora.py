"""LoRA: zero-init is the base model, merged equals x W + s (x A) B, sharding follows the base
kernels, training touches only adapters, and the merge works as an export hook."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfimprove_jax import scoring, training
from selfimprove_jax.checkpoint import load_hf, save_hf
from selfimprove_jax import sharding as sh
from selfimprove_jax.models import (TINY, LoraParams, Transformer, param_logical_names, param_shapes,
                                    tiny_config)
from selfimprove_jax.training import lora
from tests.test_training import random_params

# Tied embeddings and qkv biases: the targets must skip the biases. Training with LoRA (only the
# adapters move) is tested on a mesh in test_training.py.
CFG = tiny_config("qwen2", num_layers=2)
NAMES = param_logical_names(CFG)
ALL = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.ALL_LINEAR_TARGETS)


@pytest.fixture(scope="module")
def base():
  return random_params(CFG, 0)


@pytest.fixture(scope="module")
def adapters(base):
  """Fresh adapters on every linear kernel (B = 0), created in one jitted program."""
  init = functools.partial(lora.init_lora, config=ALL, base_names=NAMES)
  return jax.jit(init)(base, rng=jax.random.key(0))


def _with_random_b(adapters, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.normal(size=x.shape), x.dtype) if "lora_b" in
      jax.tree_util.keystr(p) else x, adapters)


def test_adapter_shapes_names_and_targets(adapters):
  layer = adapters["layers_0"]
  D, H, K, F, M, r = 64, 4, 2, 16, 128, 4
  kernels = {**layer["attn"], **layer["mlp"]}
  shapes = {k: (v["lora_a"].shape, v["lora_b"].shape) for k, v in kernels.items()}
  assert shapes == {"q_proj": ((D, r), (r, H, F)), "k_proj": ((D, r), (r, K, F)),
                    "v_proj": ((D, r), (r, K, F)), "o_proj": ((H, F, r), (r, D)),
                    "gate_proj": ((D, r), (r, M)), "up_proj": ((D, r), (r, M)),
                    "down_proj": ((M, r), (r, D))}
  assert set(adapters) == {f"layers_{i}" for i in range(CFG.num_layers)}  # no embedding, no biases
  names = lora.adapter_logical_names(NAMES, ALL)["layers_0"]["attn"]
  assert names["q_proj"] == {"lora_a": (sh.EMBED, None), "lora_b": (None, sh.HEADS, sh.HEAD_DIM)}
  assert names["o_proj"] == {"lora_a": (sh.HEADS, sh.HEAD_DIM, None), "lora_b": (None, sh.EMBED)}
  for path, x in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    is_b = "lora_b" in jax.tree_util.keystr(path)
    assert (np.asarray(x) == 0).all() == is_b, jax.tree_util.keystr(path)  # B = 0, A random


def test_bad_targets_are_refused_by_name(base):
  with pytest.raises(ValueError, match=re.escape("lora.targets='layers_9/attn/q_proj' matches no")):
    lora.init_lora(base, lora.LoraConfig(targets="layers_9/attn/q_proj"), jax.random.key(0),
                   base_names=NAMES)
  with pytest.raises(ValueError, match="layers_0/attn/q_bias"):
    lora.init_lora(base, lora.LoraConfig(targets=r"layers_0/attn/q_.*"), jax.random.key(0),
                   base_names=NAMES)
  with pytest.raises(ValueError, match="lora.rank=0"):
    lora.LoraConfig(rank=0)
  phi3 = TINY["phi3"]
  other = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), lora.adapter_shapes(
      param_shapes(phi3), param_logical_names(phi3), ALL))
  with pytest.raises(ValueError, match="layers_0/attn/k_proj.*does not fit the kernel"):
    lora.merge(base, other, ALL)  # phi3's tiny variant has 4 kv heads, qwen2's 2


def test_zero_init_reproduces_base_outputs_exactly(base, adapters):
  merged = lora.merge(base, adapters, ALL)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
    np.testing.assert_array_equal(a, b)
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9))
  mask = np.ones((2, 9), bool)
  score = lambda p: np.asarray(scoring.score_jit(Transformer(CFG), p, tokens, mask, mask)
                               .token_logprobs_BxL)
  np.testing.assert_array_equal(score(merged), score(base))


@pytest.mark.parametrize("kernel", ["attn/q_proj", "attn/o_proj", "mlp/down_proj"])
def test_merged_equals_unmerged_for_one_layer(base, adapters, kernel):
  adapters = _with_random_b(adapters)
  group, name = kernel.split("/")
  w = base["layers_1"][group][name]
  ad = adapters["layers_1"][group][name]
  n_in = ad["lora_a"].ndim - 1
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5) + w.shape[:n_in]), jnp.float32)
  contract = lambda x, m: jnp.tensordot(x, m, axes=n_in)
  unmerged = contract(x, w) + ALL.scale * jnp.tensordot(contract(x, ad["lora_a"]), ad["lora_b"], 1)
  merged = contract(x, lora.merge(base, adapters, ALL)["layers_1"][group][name])
  assert float(jnp.abs(unmerged - contract(x, w)).max()) > 0.1  # the adapter matters
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_merged_hook_for_export(base, adapters, tmp_path):
  adapters = _with_random_b(adapters)
  hook = lora.merged(adapters, ALL)
  want = lora.merge(base, adapters, ALL)
  for a, b in zip(jax.tree.leaves(hook(base)), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # Through the Hugging Face export and back: the checkpoint holds the merged weights.
  save_hf(CFG, base, tmp_path / "merged", merge_fn=hook)
  loaded = load_hf(tmp_path / "merged", with_tokenizer=False).params
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(loaded)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_adapters_shard_like_their_base_kernels():
  mesh = sh.make_mesh({"fsdp": 4, "tensor": 2})
  got = lora.adapter_shardings(param_shapes(CFG), NAMES, ALL, mesh)["layers_0"]
  spec = lambda d: d.spec
  assert spec(got["attn"]["q_proj"]["lora_a"]) == jax.sharding.PartitionSpec("fsdp", None)
  assert spec(got["attn"]["q_proj"]["lora_b"]) == jax.sharding.PartitionSpec(None, "tensor", None)
  assert spec(got["attn"]["o_proj"]["lora_a"]) == jax.sharding.PartitionSpec("tensor", None, None)
  assert spec(got["attn"]["o_proj"]["lora_b"]) == jax.sharding.PartitionSpec(None, "fsdp")
  assert spec(got["mlp"]["down_proj"]["lora_a"]) == jax.sharding.PartitionSpec("tensor", None)


def test_lora_state_holds_only_adapters(base):
  cfg = lora.LoraConfig(rank=4, alpha=8.0)  # attention projections only
  opt = training.make_optimizer(1e-2)
  state = training.create_train_state(CFG, opt, jax.random.key(0), params=base, lora_config=cfg)
  assert list(state.frozen) == ["base"]
  assert state.frozen["base"] is base  # the caller's arrays, neither copied nor donated
  assert set(state.params) == {"layers_0", "layers_1"}
  assert set(state.params["layers_0"]) == {"attn"}
  n_adapter_leaves = len(jax.tree.leaves(state.params))
  assert n_adapter_leaves == 2 * 4 * CFG.num_layers
  # Two Adam moments per adapter leaf, plus scalar counts: nothing of the base's size.
  assert sum(x.ndim > 0 for x in jax.tree.leaves(state.opt_state)) == 2 * n_adapter_leaves


def test_lora_params_apply_the_adapters_inside_the_layers(base, adapters):
  """x·W + s·(x·A)·B in every projection equals the merged model, values and adapter gradients."""
  adapters = _with_random_b(adapters)
  tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 9))
  mask = np.ones((2, 9), bool)
  model = Transformer(CFG)

  def total(params):
    return jnp.sum(scoring.score(model, params, tokens, mask, mask).sum_logprob_B)

  merged = lambda ad: lora.merge(base, ad, ALL)
  inside = lambda ad: LoraParams(base=base, adapters=ad, scale=ALL.scale)
  np.testing.assert_allclose(total(inside(adapters)), total(merged(adapters)), rtol=1e-5)
  assert abs(float(total(inside(adapters)) - total(base))) > 0.1  # the adapters matter
  got = jax.grad(lambda ad: total(inside(ad)))(adapters)
  want = jax.grad(lambda ad: total(merged(ad)))(adapters)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=jax.tree_util.keystr(path))


def test_lora_update_step_forms_no_full_size_kernel(base):
  """The LoRA step's program has no matmul whose result is the size of an adapted kernel: no
  merged weight, no full-size weight gradient (only A's and B's)."""
  opt = training.make_optimizer(1e-3)
  state = training.create_train_state(CFG, opt, jax.random.key(0), params=base, lora_config=ALL)
  step = training.make_update_step(Transformer(CFG), training.make_loss("sft"), opt, schedule=1e-3,
                                   lora_config=ALL)
  B, L = 3, 7  # B * L rows match no kernel dim
  tokens = np.random.default_rng(0).integers(1, CFG.vocab_size, (B, L)).astype(np.int32)
  batch = {"tokens_BxL": tokens, "input_mask_BxL": np.ones((B, L), bool),
           "loss_mask_BxL": np.ones((B, L), bool)}
  text = step.jitted.lower(state.replace(frozen=None), state.frozen, batch, state.rng,
                           np.float32(1e-3)).as_text()
  results = {tuple(int(d) for d in m.split("x")[:-1])
             for m in re.findall(r"stablehlo.dot_general.*-> tensor<([0-9x]+[a-z0-9]+)>", text)}
  kernels = set()
  for path, w in jax.tree_util.tree_flatten_with_path(base)[0]:
    if re.fullmatch(ALL.targets, "/".join(k.key for k in path)):
      n_in = lora.num_input_dims(NAMES_BY_PATH["/".join(k.key for k in path)])
      kernels |= {w.shape, (int(np.prod(w.shape[:n_in])), int(np.prod(w.shape[n_in:])))}
  assert results and not results & kernels, sorted(results & kernels)
  _, metrics = training.run_step(step, state, batch)
  assert np.isfinite(metrics["loss"])


NAMES_BY_PATH = {"/".join(k.key for k in p): n for p, n in jax.tree_util.tree_flatten_with_path(
    NAMES, is_leaf=lambda x: isinstance(x, tuple))[0]}
