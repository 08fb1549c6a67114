"""Teacher-forced scoring: per-token statistics against NumPy, the shift and masking convention,
chunked vs unchunked projection, sharded vs single-device, and one trace per shape."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfimprove_jax import scoring
from selfimprove_jax import sharding as sh
from selfimprove_jax.models import TINY, Transformer, init_params, param_shapes, tiny_config

# gemma2: tied embeddings and a final soft-cap; mistral: separate lm_head; qwen2: qkv bias, tied.
FAMILIES = ("gemma2", "mistral", "qwen2")
P, C = 6, 7
L = P + C  # 13 is prime, so chunk sizes 4 and 5 leave a ragged last chunk


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_entropy(x):
  logp = np_log_softmax(x)
  return -(np.exp(logp) * logp).sum(-1)


def np_self_certainty(x):
  """Literally SHARPENING.md's form: -(1/V) sum_v log(V p_v)."""
  logp = np_log_softmax(x)
  return -np.mean(np.log(x.shape[-1]) + logp, axis=-1)


@pytest.fixture(scope="module")
def models():
  return {f: (Transformer(TINY[f]), init_params(TINY[f], jax.random.key(0))) for f in FAMILIES}


def _raw_batch(vocab, seed=0):
  """B=4 rows: prompts left-padded by 0/2/5/3, completions of length 7/4/1/0, junk as padding."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(1, vocab, (4, P))
  prompt_mask = np.arange(P)[None] >= np.array([0, 2, 5, 3])[:, None]
  completion = rng.integers(1, vocab, (4, C))
  lengths = np.array([7, 4, 1, 0])
  prompt[~prompt_mask] = -1
  return prompt, prompt_mask, completion, lengths


def _batch(vocab, seed=0):
  return tuple(np.asarray(a) for a in scoring.completion_batch(*_raw_batch(vocab, seed)))


def _reference_from_full_logits(model, params, tokens, input_mask, loss_mask):
  """Explicit loops over the full (B, L, V) logits of an ordinary forward: no shifting tricks."""
  positions = np.maximum(np.cumsum(input_mask, axis=1) - 1, 0)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, tokens, positions, input_mask)[0])
  logp = np.zeros(tokens.shape)
  ent = np.zeros(tokens.shape)
  cert = np.zeros(tokens.shape)
  n = np.zeros(tokens.shape[0])
  for b in range(tokens.shape[0]):
    for t in range(1, tokens.shape[1]):
      if loss_mask[b, t] and input_mask[b, t]:
        logp[b, t] = np_log_softmax(logits[b, t - 1])[tokens[b, t]]
        ent[b, t] = np_entropy(logits[b, t - 1])
        cert[b, t] = np_self_certainty(logits[b, t - 1])
        n[b] += 1
  return dict(token_logprobs_BxL=logp, token_entropy_BxL=ent, sum_logprob_B=logp.sum(1),
              mean_logprob_B=logp.sum(1) / np.maximum(n, 1),
              self_certainty_B=cert.sum(1) / np.maximum(n, 1), num_tokens_B=n)


def _assert_scores_close(got, want, atol):
  for name, value in want.items():
    np.testing.assert_allclose(np.asarray(getattr(got, name)), value, atol=atol, rtol=1e-5,
                               err_msg=name)


# ------------------------------------------------------------------------------ pure functions

def test_entropy_and_self_certainty_of_literal_logits():
  logits = jnp.array([[0.0, 0.0, 0.0, 0.0],
                      [0.0, math.log(3.0), -1e9, -1e9],  # p = (1/4, 3/4, 0, 0)
                      [5.0, 5.0, 5.0, 5.0]])
  h = (0.25 * math.log(4) + 0.75 * math.log(4 / 3))
  np.testing.assert_allclose(scoring.token_entropy(logits), [math.log(4), h, math.log(4)],
                             rtol=1e-6)
  certainty = np.asarray(scoring.token_self_certainty(logits))
  np.testing.assert_allclose(certainty[[0, 2]], [0.0, 0.0], atol=1e-6)
  assert certainty[1] > 1e8  # KL(U || p) is huge with two (near-)zero-probability entries
  # p = (1/4, 3/4): KL(U || p) = -log 2 - (log 1/4 + log 3/4) / 2.
  two = jnp.array([0.0, math.log(3.0)])
  np.testing.assert_allclose(scoring.token_self_certainty(two),
                             -math.log(2) - (math.log(0.25) + math.log(0.75)) / 2, rtol=1e-6)


def test_entropy_is_finite_with_minus_inf_logits():
  logits = jnp.array([0.0, -jnp.inf, 0.0])
  np.testing.assert_allclose(scoring.token_entropy(logits), math.log(2), rtol=1e-6)
  grad = jax.grad(lambda x: scoring.token_entropy(x))(jnp.array([1.0, -jnp.inf, 0.0]))
  assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("vocab", [2, 7, 50])
def test_per_token_statistics_match_numpy_on_random_logits(vocab):
  rng = np.random.default_rng(vocab)
  logits = (rng.normal(size=(2, 3, 5, vocab)) * 4).astype(np.float32)  # any leading dims
  targets = rng.integers(0, vocab, (2, 3, 5))
  want_logp = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
  close = lambda got, want: np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  close(scoring.token_logprobs(logits, targets), want_logp)
  close(scoring.token_entropy(logits), np_entropy(logits))
  close(scoring.token_self_certainty(logits), np_self_certainty(logits))


def test_token_logprobs_stable_for_huge_logits():
  logits = jnp.array([[1e4, 1e4 - 1.0, -1e4]], jnp.bfloat16).astype(jnp.float32)
  got = scoring.token_logprobs(logits, jnp.array([1]))
  want = np_log_softmax(np.asarray(logits))[0, 1]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, [want], rtol=1e-5)


# ------------------------------------------------------------------------------ batch convention

def test_completion_batch_literal():
  tokens, input_mask, loss_mask = scoring.completion_batch(
      np.array([[-1, 5, 6], [7, 8, 9]]), np.array([[0, 1, 1], [1, 1, 1]], bool),
      np.array([[10, 11], [12, 13]]), np.array([1, 2]))
  np.testing.assert_array_equal(tokens, [[0, 5, 6, 10, 0], [7, 8, 9, 12, 13]])
  np.testing.assert_array_equal(input_mask, [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(loss_mask, [[0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
  np.testing.assert_array_equal(scoring.positions_from_mask(input_mask)[0], [0, 0, 1, 2, 2])
  with pytest.raises(ValueError, match="completion_lengths_B"):
    scoring.completion_batch(np.zeros((2, 3)), np.ones((2, 3), bool), np.zeros((2, 2)), np.ones(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_score_equals_direct_computation_from_full_logits(models, family):
  model, params = models[family]
  tokens, input_mask, loss_mask = _batch(TINY[family].vocab_size)
  got = scoring.score_jit(model, params, tokens, input_mask, loss_mask, chunk_size=4)
  want = _reference_from_full_logits(model, params, tokens, input_mask, loss_mask)
  np.testing.assert_array_equal(got.num_tokens_B, [7, 4, 1, 0])
  _assert_scores_close(got, want, atol=2e-5)


def test_padding_and_prompt_contribute_exactly_zero(models):
  model, params = models["mistral"]
  tokens, input_mask, loss_mask = _batch(TINY["mistral"].vocab_size)
  base = scoring.score_jit(model, params, tokens, input_mask, loss_mask, chunk_size=4)
  scored = np.asarray(scoring.scored_mask(input_mask, loss_mask))
  assert (np.asarray(base.token_logprobs_BxL)[~scored] == 0).all()
  assert (np.asarray(base.token_entropy_BxL)[~scored] == 0).all()
  assert (np.asarray(base.token_logprobs_BxL)[scored] < 0).all()
  per_token = np.asarray(base.token_logprobs_BxL)
  completion_sums = [per_token[b][loss_mask[b]].sum() for b in range(4)]
  np.testing.assert_allclose(base.sum_logprob_B, completion_sums, rtol=1e-6)
  # Garbage (negative, out-of-vocabulary) ids at padding change nothing at all.
  junk_ids = np.random.default_rng(1).choice([-1, 99_999, 3], tokens.shape)
  junk = np.where(input_mask, tokens, junk_ids).astype(tokens.dtype)
  again = scoring.score_jit(model, params, junk, input_mask, loss_mask, chunk_size=4)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("chunk_size", [2, 4, 5, 64])
def test_chunked_equals_unchunked(models, chunk_size):
  model, params = models["gemma2"]  # its final soft-cap must apply inside every chunk
  tokens, input_mask, loss_mask = _batch(TINY["gemma2"].vocab_size)
  whole = scoring.score_jit(model, params, tokens, input_mask, loss_mask)
  chunked = scoring.score_jit(model, params, tokens, input_mask, loss_mask, chunk_size=chunk_size)
  for name in whole.__dataclass_fields__:
    np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), atol=1e-5, rtol=0,
                               err_msg=name)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5])
def test_bad_chunk_size_is_refused(models, chunk_size):
  model, params = models["gemma2"]
  tokens, input_mask, loss_mask = _batch(TINY["gemma2"].vocab_size)
  with pytest.raises(ValueError, match=rf"chunk_size={chunk_size}.*L=13"):
    scoring.score(model, params, tokens, input_mask, loss_mask, chunk_size=chunk_size)


def test_chunked_gradient_equals_unchunked(models):
  # Gradients w.r.t. the final norm and the lm_head cross every step of the chunked projection
  # (shift, chunk transpose, remat, map); the layers below add compile time, not coverage.
  model, params = models["mistral"]
  tokens, input_mask, loss_mask = _batch(TINY["mistral"].vocab_size)
  top = {k: params[k] for k in ("final_norm", "lm_head")}

  def loss(top, chunk_size):
    out = scoring.score(model, {**params, **top}, tokens, input_mask, loss_mask,
                        chunk_size=chunk_size)
    return jnp.sum(out.sum_logprob_B) + jnp.sum(out.token_entropy_BxL)

  whole, chunked = jax.jit(lambda t: (jax.grad(loss)(t, None), jax.grad(loss)(t, 3)))(top)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
    assert np.abs(np.asarray(a)).max() > 0
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)


def test_chunking_keeps_the_full_logits_out_of_memory():
  """Compile-only: with chunks, neither the forward nor the backward holds B x L x V logits."""
  cfg = tiny_config("mistral", vocab_size=65_536)
  model, shapes = Transformer(cfg), param_shapes(cfg)
  tokens = jax.ShapeDtypeStruct((2, 128), jnp.int32)
  mask = jax.ShapeDtypeStruct((2, 128), jnp.bool_)
  full_logits_bytes = 2 * 128 * cfg.vocab_size * 4

  def temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

  def total(top, rest, *batch):
    return jnp.sum(scoring.score(model, {**rest, **top}, *batch, chunk_size=8).sum_logprob_B)

  forward = lambda p, *batch: scoring.score(model, p, *batch, chunk_size=8)
  assert temp_bytes(forward, shapes, tokens, mask, mask) < full_logits_bytes / 2
  # Without rematerialization the backward pass keeps every chunk's logits (~4x the full size).
  top = {k: shapes.pop(k) for k in ("final_norm", "lm_head")}
  assert temp_bytes(jax.grad(total), top, shapes, tokens, mask, mask) < full_logits_bytes


# ------------------------------------------------------------------------------ sharding, tracing

@pytest.fixture(scope="module")
def sharded_gemma2():
  mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg = TINY["gemma2"]
  return mesh, Transformer(cfg, mesh, sh.SAMPLE_RULES), init_params(cfg, jax.random.key(0), mesh,
                                                                    sh.SAMPLE_RULES)


def test_sharded_equals_single_device(models, sharded_gemma2):
  mesh, model8, params8 = sharded_gemma2
  model, params = models["gemma2"]
  batch = _batch(TINY["gemma2"].vocab_size)
  placed = [jax.device_put(a, sh.logical_sharding((sh.BATCH, sh.LENGTH), a.shape, mesh,
                                                  sh.SAMPLE_RULES)) for a in batch]
  single = scoring.score_jit(model, params, *batch, chunk_size=5)
  sharded = scoring.score_jit(model8, params8, *placed, chunk_size=5)
  batch_split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  assert sharded.token_logprobs_BxL.sharding.is_equivalent_to(batch_split, 2)
  assert sharded.sum_logprob_B.sharding.is_equivalent_to(batch_split, 1)
  for name in single.__dataclass_fields__:
    np.testing.assert_allclose(getattr(sharded, name), getattr(single, name), atol=1e-5, rtol=0,
                               err_msg=name)


def test_score_in_batches_on_mesh_equals_one_batch_at_a_time(models, sharded_gemma2):
  _, model8, params8 = sharded_gemma2
  model, params = models["gemma2"]
  halves = [_batch(TINY["gemma2"].vocab_size, seed) for seed in (0, 1)]
  want = [scoring.score_jit(model, params, *half, chunk_size=5) for half in halves]
  want = jax.tree.map(lambda a, b: np.concatenate([a, b])[:7], *want)
  rows = [np.concatenate([a, b])[:7] for a, b in zip(*halves)]  # 7 rows: the last batch is padded
  got = scoring.score_in_batches(model8, params8, *rows, batch_size=4, chunk_size=5, progress=True)
  for name in want.__dataclass_fields__:
    value = getattr(got, name)
    assert isinstance(value, np.ndarray) and value.shape[0] == 7, name
    np.testing.assert_allclose(value, getattr(want, name), atol=1e-5, rtol=0, err_msg=name)


def test_jitted_score_traces_once_per_shape(models):
  chex.clear_trace_counter()
  cfg = TINY["mistral"]
  _, params = models["mistral"]
  counted = jax.jit(chex.assert_max_traces(scoring.score, n=1),
                    static_argnames=("model", "chunk_size"))
  for seed in range(3):  # new values and a new (equal) model object each call
    out = counted(Transformer(cfg), params, *_batch(cfg.vocab_size, seed), chunk_size=4)
    out.sum_logprob_B.block_until_ready()


# ------------------------------------------------------------- N completions per prompt, forked

def _forked_batch(vocab, N=3, seed=0):
  """B=3 prompts left-padded by 0/2/5 with N completions each, of lengths 0..C (one empty)."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(1, vocab, (3, P))
  prompt_mask = np.arange(P)[None] >= np.array([0, 2, 5])[:, None]
  completion = rng.integers(1, vocab, (3 * N, C))
  lengths = rng.integers(0, C + 1, 3 * N)
  lengths[:2] = (C, 0)
  return prompt, prompt_mask, completion, lengths


# Every family, and local layers whose window (3) is shorter than the cache (a ring of slots).
# phi3 at its tiny original_max_len (12): some rows end past it, where both scorers switch that
# row to the long-context factors (tests/test_longrope.py has the switch itself).
FORKED = {f: tiny_config(f) for f in ("gemma2", "mistral", "qwen2", "llama3", "qwen3", "phi3")}
FORKED["gemma3_ring"] = tiny_config("gemma3", sliding_window=3)


@pytest.mark.parametrize("name", sorted(FORKED))
def test_forked_scores_equal_scores_of_the_repeated_prompts(name):
  cfg = FORKED[name]
  model, params = Transformer(cfg), init_params(cfg, jax.random.key(1))
  prompt, prompt_mask, completion, lengths = _forked_batch(cfg.vocab_size)
  got = scoring.score_forked_jit(model, params, prompt, prompt_mask, completion, lengths,
                                 chunk_size=4)
  repeat = lambda a: np.repeat(a, 3, axis=0)
  tokens, input_mask, loss_mask = scoring.completion_batch(repeat(prompt), repeat(prompt_mask),
                                                           completion, lengths)
  want = scoring.score_jit(model, params, tokens, input_mask, loss_mask, chunk_size=4)
  np.testing.assert_array_equal(got.num_tokens_B, lengths)
  for field in ("sum_logprob_B", "mean_logprob_B", "self_certainty_B"):
    np.testing.assert_allclose(getattr(got, field), getattr(want, field), atol=2e-5, err_msg=field)
  for field in ("token_logprobs_BxL", "token_entropy_BxL"):  # completion positions of want
    np.testing.assert_allclose(getattr(got, field), getattr(want, field)[:, P:], atol=2e-5,
                               err_msg=field)


def test_forked_shapes_are_checked(models):
  model, params = models["mistral"]
  prompt, prompt_mask, completion, lengths = _forked_batch(TINY["mistral"].vocab_size)
  with pytest.raises(ValueError, match=r"R a multiple of B"):
    scoring.score_forked(model, params, prompt, prompt_mask, completion[:-1], lengths[:-1])
