"""Behaviour of the transformer for the tiny variant of every family (8 fake CPU devices)."""
import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfimprove_jax import sharding as sh
from selfimprove_jax.models import (TINY, Transformer, init_cache, init_params, param_logical_names,
                                    tiny_config)
from selfimprove_jax.models.layers import attention_mask
from tests import reference_numpy

FAMILIES = sorted(TINY)
B, T = 3, 16


@pytest.fixture(scope="module")
def mesh():
  return sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request):
  cfg = TINY[request.param]
  params = init_params(cfg, jax.random.key(0))
  return cfg, params


def _batch(cfg, seed=1):
  """Row 0 full, row 1 left-padded by 3, row 2 right-padded by 5; positions start at the first real token."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  mask = np.ones((B, T), bool)
  mask[1, :3] = False
  mask[2, T - 5:] = False
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, positions, mask


def _forward(cfg, params, tokens, positions, mask, mesh=None):
  model = Transformer(cfg, mesh)
  return jax.jit(model.apply)({"params": params}, tokens, positions, mask)[0]


def test_forward_matches_numpy_reference(family_setup):
  cfg, params = family_setup
  tokens, positions, mask = _batch(cfg)
  ours = np.asarray(_forward(cfg, params, tokens, positions, mask))
  ref = reference_numpy.forward(cfg, jax.device_get(params), tokens, positions, mask)
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=1e-4)
  assert np.isfinite(ours).all(), "padding positions must stay finite"


def test_longrope_switches_to_long_factors_past_original_length():
  cfg = TINY["phi3"]
  assert cfg.rope_scaling.original_max_len < T  # rows of _batch reach past it, exercising "long"
  params = init_params(cfg, jax.random.key(0))
  tokens, positions, mask = _batch(cfg)
  short = positions[:, :8], tokens[:, :8], mask[:, :8]
  ours = np.asarray(_forward(cfg, params, short[1], short[0], short[2]))
  ref = reference_numpy.forward(cfg, jax.device_get(params), short[1], short[0], short[2])
  np.testing.assert_allclose(ours[short[2]], ref[short[2]], atol=1e-4, rtol=1e-4)


def test_sharded_forward_equals_single_device(family_setup, mesh):
  cfg, params = family_setup
  params8 = init_params(cfg, jax.random.key(0), mesh)
  sh.assert_sharded_as_rules(params8, param_logical_names(cfg), mesh, sh.TRAIN_RULES)
  tokens, positions, mask = _batch(cfg)
  tokens, positions, mask = (np.concatenate([a, a[::-1], a[:2]]) for a in (tokens, positions, mask))
  single = _forward(cfg, params, tokens, positions, mask)
  sharded = _forward(cfg, params8, tokens, positions, mask, mesh)
  assert sharded.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=0)


def test_param_shardings_follow_rules_literally(mesh):
  params = init_params(TINY["gemma2"], jax.random.key(0), mesh)
  P = jax.sharding.PartitionSpec
  assert params["embedding"]["embedding"].sharding.spec == P("tensor", "fsdp")
  layer = params["layers_1"]
  assert layer["attn"]["q_proj"].sharding.spec == P("fsdp", "tensor", None)
  assert layer["attn"]["o_proj"].sharding.spec == P("tensor", None, "fsdp")
  assert layer["mlp"]["down_proj"].sharding.spec == P("tensor", "fsdp")
  assert layer["pre_attn_norm"]["scale"].sharding.spec == P(None)
  # A placement that disagrees with the rules is reported by name.
  bad = dict(params, final_norm={"scale": jax.device_put(params["final_norm"]["scale"],
                                                          sh.logical_sharding(("embed",), (64,), mesh, sh.TRAIN_RULES))})
  with pytest.raises(AssertionError, match="final_norm"):
    sh.assert_sharded_as_rules(bad, param_logical_names(TINY["gemma2"]), mesh, sh.TRAIN_RULES)


@pytest.mark.parametrize("use_mesh", [False, True], ids=["single", "mesh"])
@pytest.mark.parametrize("prefill_flag", [False, True], ids=["prefill_over_cache", "prefill_only"])
def test_cached_decode_matches_full_sequence(family_setup, mesh, use_mesh, prefill_flag):
  cfg, params = family_setup
  if cfg.rope_scaling.kind == "longrope":
    # Crossing longrope's switch point re-rotates every position in a full forward but not the keys
    # already cached (the reference implementation recomputes its cache there); stay below it.
    cfg = cfg.replace(rope_scaling=dataclasses.replace(cfg.rope_scaling, original_max_len=4 * T))
  m = mesh if use_mesh else None
  if use_mesh:
    params = init_params(cfg, jax.random.key(0), mesh, sh.SAMPLE_RULES)
  tokens, positions, mask = _batch(cfg)
  tokens, positions, mask = (np.concatenate([a, a, a[:2]]) for a in (tokens, positions, mask))
  full = np.asarray(_forward(cfg, params, tokens, positions, mask))

  model = Transformer(cfg, m, sh.SAMPLE_RULES)
  step = jax.jit(lambda p, t, pos, msk, c, first=False: model.apply(
      {"params": p}, t, pos, msk, cache=c, prefill=first), static_argnames="first")
  cache = init_cache(cfg, len(tokens), T + 4, mesh=m)
  P = jax.sharding.PartitionSpec
  kv_spec = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "tensor", None, None))
  if use_mesh:
    assert all(k.sharding.is_equivalent_to(kv_spec, 4) for k in cache.k + cache.v)
    assert cache.pos.sharding.spec == P(("data", "fsdp"), None)
  prefill = 6
  # The first call fills an empty cache: with prefill=True its tokens attend over themselves only.
  logits, cache = step(params, tokens[:, :prefill], positions[:, :prefill], mask[:, :prefill], cache,
                       first=prefill_flag)
  chunks = [np.asarray(logits)]
  for t in range(prefill, T):
    logits, cache = step(params, tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
    chunks.append(np.asarray(logits))
  assert int(cache.index) == T
  if use_mesh:
    assert all(k.sharding.is_equivalent_to(kv_spec, 4) for k in cache.k + cache.v), "decoding moved the cache"
  decoded = np.concatenate(chunks, axis=1)
  np.testing.assert_allclose(decoded[mask], full[mask], atol=1e-5, rtol=0)


def test_sliding_window_layers_keep_a_ring_of_window_slots():
  """Gemma 3's five local layers in six hold a window (4 slots here), not the whole cache: with
  64 slots the cache takes (5 x 4 + 64) / (6 x 64) of the memory. Decoding past the window
  through the ring matches a full forward (``test_cached_decode_matches_full_sequence``)."""
  cfg = TINY["gemma3"]
  cache = init_cache(cfg, 2, 64)
  lengths = [k.shape[2] for k in cache.k]
  assert lengths == [4, 4, 4, 4, 4, 64] and [v.shape[2] for v in cache.v] == lengths
  assert cache.ring_pos.shape == (2, 4)
  assert init_cache(cfg, 2, 4).ring_pos is None  # the window covers the cache: no ring
  assert init_cache(TINY["llama3"], 2, 64).ring_pos is None  # no local layer


def test_prefill_attends_over_the_prompt_slots_only():
  """A prefill of 6 tokens into a 40-slot cache multiplies over its 6 keys, not all 40 slots."""
  cfg = TINY["llama3"]
  params = init_params(cfg, jax.random.key(0))
  model = Transformer(cfg)
  tokens = jnp.ones((2, 6), jnp.int32)
  over_all_slots = {}
  for prefill in (False, True):
    text = jax.jit(lambda p, c: model.apply({"params": p}, tokens, cache=c, prefill=prefill)).lower(
        params, init_cache(cfg, 2, 40)).as_text()
    dims = [[int(d) for d in s.split("x")] for s in
            re.findall(r"stablehlo.dot_general.*-> tensor<([0-9x]+)x[a-z]+[0-9]*>", text)]
    over_all_slots[prefill] = any(40 in d for d in dims)
  assert over_all_slots == {False: True, True: False}


@pytest.mark.parametrize("family", ["llama3", "gemma2"])  # plain; soft-capped with local layers
def test_attention_in_query_blocks_equals_one_block(family):
  """Blocks of 5 queries (T = 16: the last block padded) give the values and gradients of one
  block of all 16: blocking bounds memory without changing a number."""
  cfg = TINY[family]
  params = init_params(cfg, jax.random.key(0))
  tokens, positions, mask = _batch(cfg)

  def run(block):
    model = Transformer(cfg.replace(attention_block=block))
    f = lambda p: model.apply({"params": p}, tokens, positions, mask)[0]
    loss = lambda p: jnp.sum(jnp.where(mask[..., None], f(p), 0.0) ** 2) * 1e-3
    return jax.jit(f)(params), jax.jit(jax.grad(loss))(params)

  (one, grad_one), (blocked, grad_blocked) = run(T), run(5)
  np.testing.assert_allclose(np.asarray(blocked)[mask], np.asarray(one)[mask], atol=1e-5, rtol=0)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grad_blocked)[0],
                          jax.tree.leaves(grad_one)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_causality_by_gradient(family_setup):
  cfg, params = family_setup
  tokens, positions, mask = _batch(cfg)
  model = Transformer(cfg)
  perturb = {"embeddings": jnp.zeros((B, T, cfg.embed_dim), jnp.dtype(cfg.dtype))}

  def logits_at(delta, t):
    out, _ = model.apply({"params": params, "perturbations": {"embeddings": delta}}, tokens,
                         positions, mask)
    return jax.lax.dynamic_index_in_dim(out, t, axis=1).sum()

  grad_fn = jax.jit(jax.grad(logits_at))
  for t in (0, 7, T - 1):
    grad = np.asarray(grad_fn(perturb["embeddings"], t))
    assert np.all(grad[:, t + 1:] == 0), f"logits at {t} depend on later inputs"
    assert np.abs(grad[0, t]).max() > 0, "the gradient path through the embeddings is broken"


def test_sliding_window_mask_literal():
  q_pos = jnp.arange(6)[None]
  got = np.asarray(attention_mask(q_pos, jnp.arange(6), q_pos, jnp.arange(6), 3)[0]).astype(int)
  expected = np.array([
      [1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0],
      [0, 1, 1, 1, 0, 0],
      [0, 0, 1, 1, 1, 0],
      [0, 0, 0, 1, 1, 1],
  ])
  np.testing.assert_array_equal(got, expected)
  # Left padding by two: padded keys are never visible, and the window counts positions, not slots.
  k_pos = jnp.array([[-1, -1, 0, 1, 2, 3]])
  got = np.asarray(attention_mask(k_pos, jnp.arange(6), k_pos, jnp.arange(6), 2)[0]).astype(int)
  expected = np.array([
      [0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0],
      [0, 0, 1, 0, 0, 0],
      [0, 0, 1, 1, 0, 0],
      [0, 0, 0, 1, 1, 0],
      [0, 0, 0, 0, 1, 1],
  ])
  np.testing.assert_array_equal(got, expected)


def test_gemma_local_layers_see_only_the_window():
  """Changing a token outside every local window moves only global-layer paths."""
  cfg = tiny_config("gemma2", attention_pattern=("local",), sliding_window=3)
  params = init_params(cfg, jax.random.key(0))
  tokens, positions, mask = (np.ones((1, 8), np.int32), np.arange(8)[None], np.ones((1, 8), bool))
  changed = tokens.copy()
  changed[0, 0] = 7
  a = np.asarray(_forward(cfg, params, tokens, positions, mask))
  b = np.asarray(_forward(cfg, params, changed, positions, mask))
  # With 4 local layers of window 3, information travels at most 4 * 2 positions.
  assert not np.allclose(a[0, 2], b[0, 2])
  np.testing.assert_array_equal(a[0, :1] != b[0, :1], True)
  cfg1 = cfg.replace(num_layers=1)
  params1 = init_params(cfg1, jax.random.key(0))
  a = np.asarray(_forward(cfg1, params1, tokens, positions, mask))
  b = np.asarray(_forward(cfg1, params1, changed, positions, mask))
  np.testing.assert_array_equal(a[0, 3:], b[0, 3:])


def test_forward_traces_once_for_repeated_shapes():
  cfg = TINY["qwen3"]
  params = init_params(cfg, jax.random.key(0))
  model = Transformer(cfg)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(p, tokens):
    return model.apply({"params": p}, tokens)[0]

  for seed in range(3):
    tokens = jax.random.randint(jax.random.key(seed), (2, 8), 0, cfg.vocab_size)
    forward(params, tokens).block_until_ready()
  # Sampling parameters never reach the model; positions and masks are data, so new values of
  # them do not retrace either.
  chex.clear_trace_counter()


def test_padding_ids_and_default_positions():
  """Junk ids under the padding mask change nothing; default positions count real tokens only."""
  cfg = TINY["mistral"]
  params = init_params(cfg, jax.random.key(0))
  tokens, positions, mask = _batch(cfg)
  reference = np.asarray(_forward(cfg, params, tokens, positions, mask))
  junk = np.where(mask, tokens, 10 * cfg.vocab_size)
  model = Transformer(cfg)
  defaulted = np.asarray(jax.jit(model.apply)({"params": params}, junk, None, mask)[0])
  assert np.isfinite(defaulted).all()
  np.testing.assert_allclose(defaulted[mask], reference[mask], atol=1e-6)
