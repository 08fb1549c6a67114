"""Longrope (Phi-3) sequences that pass ``original_max_len`` O: sampling equals ``transformers``'
generate token for token, and the sampler, the scorer and the forked scorer agree on log-probs.

The tiny models keep a sliding window shorter than the sequences, so local layers decode from a
ring of slots, which the recompute at the crossing has to rebuild too.
"""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from selfimprove_jax import scoring
from selfimprove_jax.checkpoint import load_hf
from selfimprove_jax.models import Transformer, init_params, tiny_config
from selfimprove_jax.sampling import SamplingParams, generate
from tests.test_hf_parity import _ROPE_PHI3, _SIZES, _randomize

O = 8  # original_max_position_embeddings of the HF model
NO_STOP = jnp.zeros((0,), jnp.int32)


@pytest.fixture(scope="module")
def hf_phi3(tmp_path_factory):
  config = transformers.Phi3Config(**_SIZES, sliding_window=6, original_max_position_embeddings=O,
                                   rope_parameters=copy.deepcopy(_ROPE_PHI3), bos_token_id=1,
                                   eos_token_id=2, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  _randomize(model, False, seed=4)
  path = tmp_path_factory.mktemp("hf_phi3_longrope")
  model.save_pretrained(path)
  return model, load_hf(path, with_tokenizer=False)


def test_greedy_generation_across_the_switch_matches_transformers(hf_phi3):
  """A 5-token prompt and 14 new tokens: tokens at indices <= O are drawn with the short factors,
  then the whole sequence turns long; before the fix the first wrong token was index O + 1."""
  model, loaded = hf_phi3
  P, M = 5, 14
  prompt = np.random.default_rng(2).integers(3, _SIZES["vocab_size"], (1, P)).astype(np.int32)
  out = generate(Transformer(loaded.config), loaded.params, jnp.asarray(prompt),
                 jnp.ones((1, P), bool), jax.random.key(0), SamplingParams.make(1, temperature=0.0),
                 NO_STOP, max_new_tokens=M, num_samples=1)
  ours = np.asarray(out.tokens[0]).tolist()
  with torch.no_grad():
    ref = model.generate(torch.from_numpy(prompt.astype(np.int64)),
                         attention_mask=torch.ones(1, P, dtype=torch.long), do_sample=False,
                         max_new_tokens=M, min_new_tokens=M, pad_token_id=0)
  assert ours == ref[0, P:].tolist()
  # The sampler's log-probs of that sequence are the teacher-forced ones: ours and transformers'.
  seq = np.concatenate([prompt, np.asarray(out.tokens)], axis=1)
  L = P + M
  scores = scoring.score_jit(Transformer(loaded.config), loaded.params, seq, np.ones((1, L), bool),
                             np.arange(L)[None] >= P, entropy=False, self_certainty=False)
  with torch.no_grad():
    logits = model(torch.from_numpy(seq.astype(np.int64))).logits[0].float()
  hf_lp = torch.log_softmax(logits, -1).numpy()[np.arange(P - 1, L - 1), seq[0, P:]]
  np.testing.assert_allclose(np.asarray(out.model_logprobs[0]), hf_lp, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out.model_logprobs[0]),
                             np.asarray(scores.token_logprobs_BxL[0, P:]), atol=1e-5)


CFG = tiny_config("phi3")  # O = 12, all layers sliding with a window of 6


@pytest.fixture(scope="module")
def tiny_phi3():
  assert CFG.rope_scaling.original_max_len == 12 and CFG.sliding_window == 6
  return Transformer(CFG), init_params(CFG, jax.random.key(3))


def test_sampled_logprobs_equal_both_scorers_across_the_switch(tiny_phi3):
  """Prompts of 9, 3 and 1 tokens (left-padded), 2 samples each at T=1, 10 new tokens: the first
  prompt's rows cross O mid-way (a decode step feeds position O), the second's end one token past
  O (no step feeds it), the third's stay at or below O."""
  model, params = tiny_phi3
  P, N, M = 9, 2, 10
  rng = np.random.default_rng(0)
  prompt = rng.integers(1, CFG.vocab_size, (3, P)).astype(np.int32)
  mask = np.arange(P)[None] >= np.array([0, 6, 8])[:, None]
  out = generate(model, params, prompt, mask, jax.random.key(1), SamplingParams.make(3 * N), NO_STOP,
                 max_new_tokens=M, num_samples=N)
  assert (np.asarray(out.lengths) == M).all()
  assert (np.repeat(mask.sum(1), N) + M).tolist() == [19, 19, 13, 13, 11, 11]
  forked = scoring.score_forked_jit(model, params, prompt, mask, out.tokens, out.lengths,
                                    entropy=False, self_certainty=False)
  repeat = lambda a: np.repeat(a, N, axis=0)
  full = scoring.score_jit(model, params, *scoring.completion_batch(repeat(prompt), repeat(mask),
                                                                    out.tokens, out.lengths),
                           entropy=False, self_certainty=False)
  got = np.asarray(out.model_logprobs)
  np.testing.assert_allclose(got, np.asarray(full.token_logprobs_BxL[:, P:]), atol=2e-5)
  np.testing.assert_allclose(got, np.asarray(forked.token_logprobs_BxL), atol=2e-5)


def test_forked_scores_equal_full_scores_when_completions_pass_the_switch(tiny_phi3):
  """One prompt of 7 tokens, completions of 3, 5, 6 and 9 tokens padded to 9: two rows end at or
  below O = 12, two past it, and padding alone would reach past it."""
  model, params = tiny_phi3
  rng = np.random.default_rng(1)
  prompt = rng.integers(1, CFG.vocab_size, (1, 8)).astype(np.int32)
  mask = np.arange(8)[None] >= 1
  completion = rng.integers(1, CFG.vocab_size, (4, 9)).astype(np.int32)
  lengths = np.array([3, 5, 6, 9], np.int32)
  forked = scoring.score_forked_jit(model, params, prompt, mask, completion, lengths)
  full = scoring.score_jit(model, params, *scoring.completion_batch(
      np.repeat(prompt, 4, 0), np.repeat(mask, 4, 0), completion, lengths))
  for field in ("token_logprobs_BxL", "token_entropy_BxL"):
    np.testing.assert_allclose(getattr(forked, field), getattr(full, field)[:, 8:], atol=2e-5,
                               err_msg=field)
  np.testing.assert_allclose(forked.self_certainty_B, full.self_certainty_B, atol=2e-5)


def test_rows_crossing_at_different_steps_each_match_transformers_alone(hf_phi3):
  """Prompts of 6, 3 and 8 (= O) tokens, left-padded to 8, 2 greedy samples each, 9 new tokens:
  the rows feed position O at steps 3, 6 and 1, so every recompute must leave its batch-mates
  alone; each row equals ``transformers``' generate on its prompt alone (unpadded)."""
  model, loaded = hf_phi3
  P, N, M = 8, 2, 9
  lengths = np.array([6, 3, 8])
  prompt = np.random.default_rng(5).integers(3, _SIZES["vocab_size"], (3, P)).astype(np.int32)
  mask = np.arange(P)[None] >= (P - lengths)[:, None]
  out = generate(Transformer(loaded.config), loaded.params, jnp.asarray(prompt), jnp.asarray(mask),
                 jax.random.key(0), SamplingParams.make(3 * N, temperature=0.0), NO_STOP,
                 max_new_tokens=M, num_samples=N)
  for b, n in enumerate(lengths):
    alone = torch.from_numpy(prompt[b:b + 1, P - n:].astype(np.int64))
    with torch.no_grad():
      ref = model.generate(alone, attention_mask=torch.ones(1, n, dtype=torch.long),
                           do_sample=False, max_new_tokens=M, min_new_tokens=M, pad_token_id=0)
    for r in (b * N, b * N + 1):
      assert np.asarray(out.tokens[r]).tolist() == ref[0, n:].tolist(), (b, r)


def test_crossed_rows_are_those_whose_prompt_fits_and_whose_end_passes():
  """O = 12: only rows whose prompt fits O and whose end passes it drew tokens with the short
  factors, so only they are rescored after sampling (a prompt already past O is not)."""
  from selfimprove_jax.models import longrope
  start, end = np.array([3, 12, 13, 5, 12]), np.array([12, 13, 20, 13, 12])
  assert longrope.crossed_rows(CFG, start, end).tolist() == [False, True, False, True, False]


def test_rows_whose_prompt_passes_the_switch_keep_their_sampled_logprobs(tiny_phi3):
  """Prompts of 14 (> O = 12) and 4 tokens, 5 new tokens: no row crosses, so no rescoring runs,
  and the sampled model_logprobs still equal the scorer's."""
  model, params = tiny_phi3
  P, N, M = 14, 2, 5
  prompt = np.random.default_rng(6).integers(1, CFG.vocab_size, (2, P)).astype(np.int32)
  mask = np.arange(P)[None] >= np.array([0, 10])[:, None]
  out = generate(model, params, prompt, mask, jax.random.key(2), SamplingParams.make(2 * N),
                 NO_STOP, max_new_tokens=M, num_samples=N)
  repeat = lambda a: np.repeat(a, N, axis=0)
  full = scoring.score_jit(model, params, *scoring.completion_batch(repeat(prompt), repeat(mask),
                                                                    out.tokens, out.lengths),
                           entropy=False, self_certainty=False)
  np.testing.assert_allclose(np.asarray(out.model_logprobs), np.asarray(full.token_logprobs_BxL[:, P:]),
                             atol=2e-5)
