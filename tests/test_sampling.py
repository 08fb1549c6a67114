"""The sampler: literal behaviour on a counting stub, statistics, and agreement with the model."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfimprove_jax import sharding as sh
from selfimprove_jax.models import TINY, Transformer, init_params, tiny_config
from selfimprove_jax.models.transformer import KVCache, positions_from_mask
from selfimprove_jax.sampling import (FINISH_LENGTH, FINISH_STOP, Sampler, SamplingParams, generate,
                                      sample_tokens, truncate_logits)
from selfimprove_jax.scoring import completion_batch, score
from selfimprove_jax.tokenizer import train_sentencepiece

NO_STOP = jnp.zeros((0,), jnp.int32)
PREFILLS = []  # (batch,) of every prefill the counting stub executed


class CountingStub(nn.Module):
  """Logits put all mass on ``token + 1``: greedy decoding counts upward from the prompt's end.

  Honours the cache protocol (advances ``index``, records positions) and reports every prefill
  (a call with more than one token) it executes, with its batch size.
  """

  config: object = tiny_config("llama3", num_layers=1, num_kv_heads=1, num_heads=1, head_dim=2,
                               vocab_size=32)
  mesh: object = None
  rules: object = sh.SAMPLE_RULES

  def __call__(self, tokens, positions, input_mask, cache, return_hidden=True, prefill=False):
    B, T = tokens.shape
    if positions is None:
      positions = positions_from_mask(input_mask)
    if T > 1:
      jax.debug.callback(lambda b: PREFILLS.append(int(b)), jnp.int32(B))
    pos = jax.lax.dynamic_update_slice(cache.pos, jnp.where(input_mask, positions, -1), (0, cache.index))
    cache = KVCache(k=cache.k, v=cache.v, pos=pos, index=cache.index + T)
    return 10.0 * jax.nn.one_hot((tokens + 1) % self.config.vocab_size, self.config.vocab_size), cache

  def logits(self, hidden):
    return hidden


def _left_pad(prompts, P, pad=0):
  tokens = np.full((len(prompts), P), pad, np.int32)
  mask = np.zeros((len(prompts), P), bool)
  for i, p in enumerate(prompts):
    tokens[i, P - len(p):], mask[i, P - len(p):] = p, True
  return tokens, mask


def _greedy(rows):
  return SamplingParams.make(rows, temperature=0.0)


def test_counting_stub_gives_literal_tokens_and_one_prefill_for_n_samples():
  PREFILLS.clear()
  tokens, mask = _left_pad([[3, 4, 5], [20]], 4)
  out = generate(CountingStub(), {}, tokens, mask, jax.random.key(0), _greedy(2 * 3), NO_STOP,
                 max_new_tokens=5, num_samples=3)
  expected = np.array([[6, 7, 8, 9, 10]] * 3 + [[21, 22, 23, 24, 25]] * 3)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)
  np.testing.assert_array_equal(np.asarray(out.lengths), 5)
  np.testing.assert_array_equal(np.asarray(out.finish_reason), FINISH_LENGTH)
  # One prefill for the 2 prompts, not one per sampled row (6).
  assert PREFILLS == [2]


def test_stop_token_ends_a_row_and_pads_the_rest():
  tokens, mask = _left_pad([[3], [6]], 2)
  out = generate(CountingStub(), {}, tokens, mask, jax.random.key(0), _greedy(2), jnp.array([8, 30]),
                 max_new_tokens=6, num_samples=1, pad_id=0)
  np.testing.assert_array_equal(np.asarray(out.tokens), [[4, 5, 6, 7, 8, 0], [7, 8, 0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(out.lengths), [5, 2])
  np.testing.assert_array_equal(np.asarray(out.finish_reason), [FINISH_STOP, FINISH_STOP])
  assert np.all(np.asarray(out.model_logprobs)[1, 2:] == 0)


def test_truncation_masks_on_literal_logits():
  logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]] * 4))
  top_k = jnp.array([0, 2, 0, 3])
  top_p = jnp.array([1.0, 1.0, 0.65, 0.5])
  kept = np.isfinite(np.asarray(truncate_logits(logits, top_k, top_p)))
  np.testing.assert_array_equal(kept, [
      [1, 1, 1, 1],   # no truncation
      [0, 1, 0, 1],   # top-2: 0.4, 0.3
      [0, 1, 0, 1],   # nucleus 0.65: 0.4 (0 before), 0.3 (0.4 before); 0.2 has 0.7 before
      [0, 1, 0, 1],   # top-3 renormalised {0.4, 0.3, 0.2}/0.9, then p=0.5: 0.444 before 0.333
  ])


def _truncate_reference(logits, top_k, top_p):
  """Keep-mask by sorting, one row at a time: top-k by value (ties kept), then a value stays in
  the nucleus when the renormalised mass strictly above it is below p."""
  keep = np.zeros(logits.shape, bool)
  for r, x in enumerate(logits):
    k = len(x) if top_k[r] == 0 else min(top_k[r], len(x))
    in_k = x >= np.sort(x)[::-1][k - 1]
    z = np.where(in_k, x, -np.inf)
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    keep[r] = in_k & np.array([probs[x > v].sum() < top_p[r] for v in x])
  return keep


def test_truncation_matches_a_sorting_reference_with_ties_and_masked_entries():
  rng = np.random.default_rng(0)
  truncate = jax.jit(truncate_logits)  # one compilation per vocabulary size, not per trial
  for trial in range(40):
    V = (2, 5, 17, 29)[trial % 4]
    logits = rng.normal(size=(4, V)).astype(np.float32)
    if trial % 2:
      logits = np.round(logits, 1)  # ties, and -0.0 next to 0.0
    logits[:, 0] = -np.inf if trial % 3 == 0 else logits[:, 0]
    top_k, top_p = rng.integers(0, V + 2, 4), rng.uniform(0.05, 1.0, 4).astype(np.float32)
    kept = np.isfinite(np.asarray(truncate(jnp.asarray(logits), jnp.asarray(top_k, jnp.int32),
                                           jnp.asarray(top_p))))
    np.testing.assert_array_equal(kept, _truncate_reference(logits, top_k, top_p), err_msg=f"trial {trial}")
  # -0.0 and 0.0 are one value: top-1 keeps both.
  kept = truncate_logits(jnp.array([[-0.0, 0.0, -1.0]]), jnp.array([1]), jnp.array([1.0]))
  np.testing.assert_array_equal(np.isfinite(np.asarray(kept)), [[True, True, False]])


def _chi_square(counts, probs):
  expected = probs * counts.sum()
  return float(np.sum((counts - expected) ** 2 / expected))


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0),
                                                       (1.0, 0, 0.8)])
def test_sample_frequencies_match_softmax(temperature, top_k, top_p):
  logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0])
  draws = 40_000
  params = SamplingParams.make(draws, temperature, top_k, top_p)
  tokens, logp = sample_tokens(jnp.tile(jnp.asarray(logits, jnp.float32), (draws, 1)), params,
                               jax.random.key(7))
  probs = np.exp(logits / temperature)
  order = np.argsort(-logits)
  keep = np.zeros(5, bool)
  if top_k:
    keep[order[:top_k]] = True
  else:
    sorted_p = probs[order] / probs.sum()
    keep[order[(np.cumsum(sorted_p) - sorted_p) < top_p]] = True
  probs = np.where(keep, probs, 0) / np.where(keep, probs, 0).sum()
  counts = np.bincount(np.asarray(tokens), minlength=5)
  assert counts[~keep].sum() == 0
  # Chi-square with (kept - 1) degrees of freedom; 99.9% quantiles for df = 1..4.
  critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}[int(keep.sum()) - 1]
  assert _chi_square(counts[keep], probs[keep]) < critical
  np.testing.assert_allclose(np.asarray(logp), np.log(probs[np.asarray(tokens)]), atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
  cfg = TINY["gemma2"]
  return cfg, Transformer(cfg, None, sh.SAMPLE_RULES), init_params(cfg, jax.random.key(0))


def test_temperature_zero_is_argmax_of_the_full_forward(tiny):
  """Each greedy token is the argmax of an uncached forward pass over everything before it."""
  cfg, model, params = tiny
  tokens, mask = _left_pad([[5, 9, 13, 2], [7, 7]], 6)
  out = generate(model, params, tokens, mask, jax.random.key(0), _greedy(2), NO_STOP,
                 max_new_tokens=6, num_samples=1)
  generated = np.asarray(out.tokens)
  sequence = np.concatenate([tokens, generated], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(generated, bool)], axis=1)
  logits = jax.jit(model.apply)({"params": params}, sequence, None, full_mask)[0]
  P = tokens.shape[1]
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, P - 1:-1], axis=-1)), generated)


def test_t1_logprobs_equal_the_scorer(tiny):
  cfg, model, params = tiny
  tokens, mask = _left_pad([[5, 9, 13, 2], [7, 7], [1, 2, 3, 4, 5, 6]], 8)
  out = generate(model, params, tokens, mask, jax.random.key(3), SamplingParams.make(3 * 2), jnp.array([17]),
                 max_new_tokens=10, num_samples=2)
  prompt, prompt_mask = np.repeat(tokens, 2, axis=0), np.repeat(mask, 2, axis=0)
  seq, input_mask, loss_mask = completion_batch(prompt, prompt_mask, out.tokens, out.lengths)
  scores = score(model, params, seq, input_mask, loss_mask)
  P = tokens.shape[1]
  np.testing.assert_allclose(np.asarray(scores.token_logprobs_BxL)[:, P:], np.asarray(out.model_logprobs),
                             atol=1e-4)
  # At T=1 without truncation the sampling distribution is the model's.
  np.testing.assert_allclose(np.asarray(out.sampler_logprobs), np.asarray(out.model_logprobs), atol=1e-5)


def test_same_key_same_samples_and_sharded_equals_single(tiny):
  cfg, model, params = tiny
  tokens, mask = _left_pad([[5, 9, 13, 2], [7, 7]] * 2, 8)
  args = (tokens, mask, jax.random.key(11), SamplingParams.make(4 * 2, top_p=0.9), NO_STOP)
  kw = dict(max_new_tokens=8, num_samples=2)
  a = generate(model, params, *args, **kw)
  b = generate(model, params, *args, **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  c = generate(model, params, tokens, mask, jax.random.key(12), *args[3:], **kw)
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))

  mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded_params = init_params(cfg, jax.random.key(0), mesh, sh.SAMPLE_RULES)
  s = generate(Transformer(cfg, mesh, sh.SAMPLE_RULES), sharded_params, *args, **kw)
  np.testing.assert_array_equal(np.asarray(s.tokens), np.asarray(a.tokens))
  np.testing.assert_allclose(np.asarray(s.model_logprobs), np.asarray(a.model_logprobs), atol=1e-5)


def test_sweep_over_sampling_parameters_traces_once(tiny):
  cfg, model, params = tiny
  counted = jax.jit(chex.assert_max_traces(generate.__wrapped__, n=1),
                    static_argnames=("model", "max_new_tokens", "num_samples", "pad_id"))
  tokens, mask = _left_pad([[5, 9, 13, 2], [7, 7]], 8)
  for temperature in (0.0, 0.5, 0.7, 1.0, 1.3):
    for top_p in (0.8, 0.95, 1.0):
      out = counted(model, params, tokens, mask, jax.random.key(0),
                    SamplingParams.make(4, temperature=temperature, top_p=top_p), NO_STOP,
                    max_new_tokens=4, num_samples=2)
      out.tokens.block_until_ready()
  chex.clear_trace_counter()


def test_host_sampler_strings_in_completions_out(tiny):
  cfg, model, params = tiny
  tok = train_sentencepiece(["What is 2 + 2? It is 4.", "Count: one two three four."], vocab_size=cfg.vocab_size)
  sampler = Sampler(model, params, tok, max_new_tokens=5, batch_size=2, prompt_buckets=(16, 32))
  prompts = ["What is 2 + 2?", "Count:", "one two"]
  out = sampler(prompts, num_samples=3, rng=1, temperature=[0.0, 1.0, 1.0])
  assert len(out.tokens) == 3 and all(len(s) == 3 for s in out.tokens)
  assert out.tokens[0][0] == out.tokens[0][1] == out.tokens[0][2], "temperature 0 rows are identical"
  for per_prompt, reasons, lps in zip(out.tokens, out.finish_reasons, out.model_logprobs):
    for t, r, lp in zip(per_prompt, reasons, lps):
      assert len(t) == len(lp) and (r == "length") == (len(t) == 5)
  assert isinstance(out.texts[1][0], str)
  with pytest.raises(ValueError, match="prompt length=40 exceeds the largest prompt bucket 32"):
    sampler([list(range(1, 41))])
  with pytest.raises(ValueError, match="top_p=0.0"):
    sampler(prompts, top_p=0.0)
