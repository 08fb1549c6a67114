"""Mixed precision: float32 master weights under bfloat16 compute, and float32 log-probs.

  * one AdamW step at lr 1e-5 moves >= 99% of the float32 master weights (bfloat16 weights with
    bfloat16 updates keep most of them: 1e-5 is below half an ulp of a 0.02 weight);
  * the vocabulary projection accumulates in float32: from the same bfloat16 hidden states and
    the same (bfloat16-valued) weights, a 256-token completion's summed log-prob is within 0.02
    nats of the float32 computation at |logits| ~ 20 (rounding each logit to bfloat16, whose
    spacing there is 0.125, errs by ~0.03 per token).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfimprove_jax import scoring, training
from selfimprove_jax.models import Transformer, init_params, tiny_config

L = 256


def _sft_batch(vocab, B=4, T=32, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (B, T)).astype(np.int32)
  mask = np.ones((B, T), bool)
  return {"tokens_BxL": tokens, "input_mask_BxL": mask, "loss_mask_BxL": mask}


@pytest.mark.parametrize("param_dtype, at_least, at_most", [("float32", 0.99, 1.0),
                                                            ("bfloat16", 0.0, 0.5)])
def test_one_adamw_step_at_1e_5_moves_master_weights(param_dtype, at_least, at_most):
  cfg = tiny_config("llama3", num_layers=2, dtype="bfloat16", param_dtype=param_dtype)
  params = init_params(cfg, jax.random.key(0))
  optimizer = training.make_optimizer(1e-5, max_grad_norm=None)
  state = training.create_train_state(cfg, optimizer, jax.random.key(1), params=params)
  step = training.make_update_step(Transformer(cfg), training.make_loss("sft"), optimizer,
                                   schedule=1e-5, compute_dtype="bfloat16")
  before = jax.device_get(state.params)
  state, metrics = training.run_step(step, state, _sft_batch(cfg.vocab_size))
  assert metrics["learning_rate"] == pytest.approx(1e-5)
  after = jax.device_get(state.params)
  moved = sum(int(np.sum(np.asarray(a) != np.asarray(b)))
              for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
  total = sum(x.size for x in jax.tree.leaves(before))
  assert {x.dtype for x in jax.tree.leaves(after)} == {jnp.dtype(param_dtype)}
  assert at_least <= moved / total <= at_most, f"{param_dtype}: {moved / total:.4f} moved"


def _head(dtype):
  cfg = tiny_config("llama3", num_layers=1, embed_dim=512, vocab_size=8192, tie_embeddings=False,
                    dtype=dtype, param_dtype="float32")
  return cfg, Transformer(cfg)


def test_lm_head_log_probs_accumulate_in_float32():
  cfg, model_bf16 = _head("bfloat16")
  _, model_f32 = _head("float32")
  rng = np.random.default_rng(0)
  # Unit-RMS hidden states (what the final norm hands the head), rounded to bfloat16 once.
  hidden = jnp.asarray(rng.normal(size=(1, L, cfg.embed_dim)), jnp.bfloat16)
  kernel = rng.normal(size=(cfg.embed_dim, cfg.vocab_size)) * 20 / np.sqrt(cfg.embed_dim) / 2
  # Weights as the compute copy holds them: bfloat16 values (stored here in float32), so both
  # paths multiply the same numbers and differ only in how they accumulate and round the result.
  kernel = jnp.asarray(kernel, jnp.bfloat16).astype(jnp.float32)
  params = {"lm_head": {"kernel": kernel}}
  targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, L)), jnp.int32)

  def summed_logprob(model, h):
    logits = model.apply({"params": params}, h, method="logits")
    assert logits.dtype == jnp.float32
    return float(jnp.sum(scoring.token_logprobs(logits, targets))), logits

  got, logits = summed_logprob(model_bf16, hidden)
  want, _ = summed_logprob(model_f32, hidden.astype(jnp.float32))
  assert 10 < float(jnp.max(jnp.abs(logits))) < 60  # |logits| ~ 20
  print(f"summed log-prob over {L} tokens: bf16 compute {got:.4f}, float32 {want:.4f}, "
        f"error {abs(got - want):.4f} nats")
  assert abs(got - want) <= 0.02
  # Rounding the logits themselves to bfloat16 (what a bfloat16 matmul result does) is far off.
  rounded = logits.astype(jnp.bfloat16).astype(jnp.float32)
  assert abs(float(jnp.sum(scoring.token_logprobs(rounded, targets))) - want) > 0.1


def test_whole_bf16_forward_summed_logprob_error_is_reported():
  """No threshold: the whole bfloat16 forward (every layer) against float32, for the note."""
  cfg = tiny_config("llama3", num_layers=4, embed_dim=256, mlp_dim=1024, vocab_size=4096)
  params = init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, cfg.vocab_size, (2, L + 1)), jnp.int32)
  mask = jnp.ones_like(tokens, bool)
  loss_mask = mask.at[:, 0].set(False)
  sums = {}
  for dtype in ("float32", "bfloat16"):
    model = Transformer(cfg.replace(dtype=dtype))
    sums[dtype] = np.asarray(scoring.score(model, params, tokens, mask, loss_mask).sum_logprob_B)
  error = np.abs(sums["bfloat16"] - sums["float32"])
  print(f"whole forward, {L}-token sums: float32 {sums['float32']}, bfloat16 "
        f"{sums['bfloat16']}, error {error} nats")
  assert np.all(np.isfinite(error))
