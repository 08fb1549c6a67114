"""Teacher-forced scoring: per-token log-probs, entropies and self-certainty of given sequences.

This is the self-reward's raw material (log pi_base(y|x) is ``sum_logprob_B`` under the base params)
and the one masking convention the training losses reuse.

The batch convention (L = prompt length + completion length):
  tokens_BxL      prompt and completion concatenated; prompts may be left-padded, completions
                  right-padded (``completion_batch`` builds this).
  input_mask_BxL  True for real tokens. Positions are derived from it: the first real token is 0.
  loss_mask_BxL   True where the token is scored: completion tokens, EOS included.
The log-prob at index t is log p(tokens[t] | tokens[<t]), read off the logits at t-1, so index 0
is never scored; every scored token needs a real token before it (a non-empty prompt or a BOS).
A position is scored iff ``scored_mask``: loss_mask & input_mask & t > 0. Everything reported
per token is 0 at unscored positions, so prompt and padding add exactly 0 to every sum.

The vocabulary projection runs in chunks of positions after one forward pass to the final hidden
states, so only B x chunk x V logits exist at a time (a 256k vocabulary times a long sequence does
not fit otherwise), also under autodiff: with more than one chunk, each is rematerialized
rather than saved.

Einsum legend: B batch, L sequence length, P prompt length, C completion length, D embed_dim,
V vocabulary, N chunks, K chunk length (N * K >= L), S sequences in a host-side list.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from selfimprove_jax import multihost
from selfimprove_jax import sharding as sh
from selfimprove_jax.models import longrope
from selfimprove_jax.models.transformer import Transformer, init_cache, positions_from_mask
from selfimprove_jax.models.transformer import variables as model_variables


# Positions projected onto the vocabulary at once by default: B x 512 x V float32 logits at a
# time (0.5 GiB per row of a 256k vocabulary) whatever the sequence length; shorter sequences are
# one chunk, which costs nothing extra.
DEFAULT_CHUNK = 512


@flax.struct.dataclass
class Scores:
  """Teacher-forced scores of a batch; per-token fields are 0 where the token is not scored.

  token_logprobs_BxL: log p(tokens[t] | tokens[<t]) in nats, float32.
  token_entropy_BxL: entropy (nats) of the predictive distribution that scored tokens[t]; None
    when not asked for (``score(..., entropy=False)``).
  sum_logprob_B: sum of token log-probs over scored tokens (log p(completion | prompt)).
  mean_logprob_B: sum_logprob_B / num_tokens_B (0 for a row with no scored token).
  self_certainty_B: mean over scored tokens of KL(U || p) (0 for a row with no scored token);
    None when not asked for.
  num_tokens_B: number of scored tokens, int32.
  """

  token_logprobs_BxL: Any
  token_entropy_BxL: Any
  sum_logprob_B: Any
  mean_logprob_B: Any
  self_certainty_B: Any
  num_tokens_B: Any


# ------------------------------------------------------------------------------ pure functions

def empty_scores(length: int, entropy: bool = True, self_certainty: bool = True) -> Scores:
  """``Scores`` of no sequences (NumPy arrays with leading dimension 0)."""
  per_seq = lambda dtype=np.float32: np.zeros((0,), dtype)
  return Scores(np.zeros((0, length), np.float32),
                np.zeros((0, length), np.float32) if entropy else None, per_seq(), per_seq(),
                per_seq() if self_certainty else None, per_seq(np.int32))


def round_up(n: int, multiple: int) -> int:
  """The least multiple of ``multiple`` >= ``n``: padded lengths and batch sizes."""
  return -(-n // multiple) * multiple


def length_bucket(n: int, minimum: int = 16) -> int:
  """The padded length of ``n`` tokens: the least power of two >= max(n, minimum). Batches of
  any lengths then compile about log2(longest) shapes, and a run whose lengths stay under its
  first bucket compiles one."""
  return 1 << (max(n, minimum, 1) - 1).bit_length()


def _log_softmax(logits_xV: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(logits_xV.astype(jnp.float32), axis=-1)


def _gather(logp_xV: jax.Array, targets_x: jax.Array) -> jax.Array:
  return jnp.take_along_axis(logp_xV, targets_x[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _entropy(logp_xV: jax.Array) -> jax.Array:
  p_xV = jnp.exp(logp_xV)
  # Zero-probability entries (-inf logits) contribute 0; the safe log keeps their gradient finite.
  safe_logp_xV = jnp.where(p_xV > 0, logp_xV, 0.0)
  return -jnp.sum(p_xV * safe_logp_xV, axis=-1)


def _self_certainty(logp_xV: jax.Array) -> jax.Array:
  return -math.log(logp_xV.shape[-1]) - jnp.mean(logp_xV, axis=-1)


def token_logprobs(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """log softmax(logits)[target] in float32; any leading dims: (..., V), (...) int -> (...)."""
  return _gather(_log_softmax(logits_BxTxV), targets_BxT)


def token_entropy(logits_xV: jax.Array) -> jax.Array:
  """Entropy -sum_v p_v log p_v (nats) of softmax(logits) over the last axis: (..., V) -> (...)."""
  return _entropy(_log_softmax(logits_xV))


def token_self_certainty(logits_xV: jax.Array) -> jax.Array:
  """KL(U || p) = -log V - mean_v log p_v (nats, >= 0, 0 iff p is uniform): (..., V) -> (...)."""
  return _self_certainty(_log_softmax(logits_xV))


# ------------------------------------------------------------------------------ batch convention

def scored_mask(input_mask_BxL: jax.Array, loss_mask_BxL: jax.Array) -> jax.Array:
  """bool (B, L): positions whose token is scored (loss_mask & input_mask, never index 0)."""
  not_first_L = jnp.arange(loss_mask_BxL.shape[-1]) > 0
  return loss_mask_BxL.astype(bool) & input_mask_BxL.astype(bool) & not_first_L


def completion_batch(prompt_BxP: jax.Array, prompt_mask_BxP: jax.Array, completion_BxC: jax.Array,
                     completion_lengths_B: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Concatenates left-padded prompts and right-padded completions into the scoring convention.

  Args:
    prompt_BxP: int prompt tokens, left-padded.
    prompt_mask_BxP: True at real prompt tokens.
    completion_BxC: int completion tokens, right-padded; entries past the length are ignored.
    completion_lengths_B: number of real completion tokens per row, EOS included (0 <= len <= C).
  Returns:
    (tokens_BxL int32 with 0 at padding, input_mask_BxL, loss_mask_BxL), L = P + C.
  """
  B, P = prompt_BxP.shape
  if prompt_mask_BxP.shape != (B, P) or completion_BxC.ndim != 2 or completion_BxC.shape[0] != B \
      or jnp.shape(completion_lengths_B) != (B,):
    raise ValueError(f"completion_batch: prompt_BxP={prompt_BxP.shape}, prompt_mask_BxP="
                     f"{prompt_mask_BxP.shape}, completion_BxC={completion_BxC.shape}, "
                     f"completion_lengths_B={jnp.shape(completion_lengths_B)} do not agree")
  C = completion_BxC.shape[1]
  completion_mask_BxC = jnp.arange(C) < jnp.asarray(completion_lengths_B)[:, None]
  input_mask_BxL = jnp.concatenate([prompt_mask_BxP.astype(bool), completion_mask_BxC], axis=1)
  loss_mask_BxL = jnp.concatenate([jnp.zeros((B, P), bool), completion_mask_BxC], axis=1)
  tokens_BxL = jnp.concatenate([prompt_BxP, completion_BxC], axis=1).astype(jnp.int32)
  return jnp.where(input_mask_BxL, tokens_BxL, 0), input_mask_BxL, loss_mask_BxL


def pack_sequences(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                   length: int | None = None, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Host-side training batch of (prompt, completion) id pairs: each row is the prompt then the
  completion, right-padded to ``length`` (default: the longest pair, rounded up to 16), the loss
  on the completion's tokens only; what ``training.make_loss("sft")`` and the update step read.

  Returns:
    {"tokens_BxL" int32, "input_mask_BxL" bool, "loss_mask_BxL" bool}, B = number of pairs.
  Raises:
    ValueError: the counts differ, or a pair is longer than ``length``.
  """
  if len(prompt_ids) != len(completion_ids):
    raise ValueError(f"pack_sequences: {len(prompt_ids)} prompts but {len(completion_ids)} "
                     "completions")
  longest = max((len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)), default=1)
  L = round_up(longest, 16) if length is None else length
  if longest > L:
    raise ValueError(f"pack_sequences: length={L} but a prompt and completion take {longest}")
  B = len(prompt_ids)
  tokens = np.full((B, L), pad_id, np.int32)
  input_mask, loss_mask = np.zeros((B, L), bool), np.zeros((B, L), bool)
  for b, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
    n = len(prompt) + len(completion)
    tokens[b, :n] = list(prompt) + list(completion)
    input_mask[b, :n] = True
    loss_mask[b, len(prompt):n] = True
  return {"tokens_BxL": tokens, "input_mask_BxL": input_mask, "loss_mask_BxL": loss_mask}


# ------------------------------------------------------------------------------ the scorer

def score(model: Transformer, params: Any, tokens_BxL: jax.Array, input_mask_BxL: jax.Array,
          loss_mask_BxL: jax.Array, *, chunk_size: int | None = DEFAULT_CHUNK,
          entropy: bool = True, self_certainty: bool = True) -> Scores:
  """Teacher-forced scores of ``tokens_BxL`` under ``params`` (see the module docstring).

  Args:
    model: the ``Transformer``; its mesh and rules place the activations.
    params: the parameter tree (without the ``{"params": ...}`` wrapper), or a
      ``models.LoraParams``.
    tokens_BxL, input_mask_BxL, loss_mask_BxL: the batch convention of this module.
    chunk_size: positions projected onto the vocabulary at once (None: all L). A size that does
      not divide L is fine: the last chunk is padded with unscored positions.
    entropy, self_certainty: also compute these (each a pass over every vocabulary entry);
      when False their fields are None. A log-prob alone reads one entry per position.
  Returns:
    ``Scores``; per-token fields (B, L), the rest (B,).
  """
  B, L = tokens_BxL.shape
  if input_mask_BxL.shape != (B, L) or loss_mask_BxL.shape != (B, L):
    raise ValueError(f"score: tokens_BxL={tokens_BxL.shape}, input_mask_BxL="
                     f"{input_mask_BxL.shape}, loss_mask_BxL={loss_mask_BxL.shape} must be equal")
  variables = model_variables(params)
  input_mask_BxL = input_mask_BxL.astype(bool)
  # Padding ids may be anything (e.g. -1); the embedding lookup and the gather need valid ones.
  tokens_BxL = jnp.where(input_mask_BxL, tokens_BxL, 0).astype(jnp.int32)
  hidden_BxLxD, _ = model.apply(variables, tokens_BxL, positions_from_mask(input_mask_BxL),
                                input_mask_BxL, return_hidden=True)
  # Shift right by one so that index t holds the state that predicts tokens[t].
  prev_BxLxD = jnp.pad(hidden_BxLxD[:, :-1], ((0, 0), (1, 0), (0, 0)))
  return _scores(model, variables, prev_BxLxD, tokens_BxL, scored_mask(input_mask_BxL, loss_mask_BxL),
                 chunk_size, entropy, self_certainty)


def score_forked(model: Transformer, params: Any, prompt_BxP: jax.Array, prompt_mask_BxP: jax.Array,
                 completion_RxC: jax.Array, completion_lengths_R: jax.Array, *,
                 chunk_size: int | None = DEFAULT_CHUNK, entropy: bool = True,
                 self_certainty: bool = True) -> Scores:
  """``score`` of N = R / B completions per prompt, reading each prompt once, as the sampler does.

  The prompts are prefilled into a KV cache once, the cache is forked to N rows per prompt, and
  the completions run in one cached pass over it; a prompt shared by N samples thus costs one
  forward instead of N, and only completion positions are projected onto the vocabulary. Equal to
  ``score`` on ``completion_batch`` of the repeated prompts (to float rounding), also for a
  longrope model (Phi-3.5) whose prompt fits its original context but whose completion runs past
  it: the prompt is then prefilled with both factor sets (``models.longrope.prefill_forked``).

  Args:
    prompt_BxP, prompt_mask_BxP: left-padded prompts (each with a real token), as for ``generate``.
    completion_RxC: int completions, right-padded, prompt-major (row b * N + j continues prompt b).
    completion_lengths_R: real completion tokens per row, EOS included (0 <= length <= C).
  Returns:
    ``Scores`` with R rows; per-token fields (R, C), aligned with ``completion_RxC``.
  """
  B, P = prompt_BxP.shape
  R, C = completion_RxC.shape
  if prompt_mask_BxP.shape != (B, P) or R % B or jnp.shape(completion_lengths_R) != (R,):
    raise ValueError(f"score_forked: prompt_BxP={prompt_BxP.shape}, prompt_mask_BxP="
                     f"{prompt_mask_BxP.shape}, completion_RxC={completion_RxC.shape}, "
                     f"completion_lengths_R={jnp.shape(completion_lengths_R)}: need equal prompt "
                     "shapes, R a multiple of B and one length per completion")
  N = R // B
  variables = model_variables(params)
  prompt_mask_BxP = prompt_mask_BxP.astype(bool)
  prompt_BxP = jnp.where(prompt_mask_BxP, prompt_BxP, 0).astype(jnp.int32)
  start_R = jnp.repeat(jnp.sum(prompt_mask_BxP, axis=1, dtype=jnp.int32), N)
  long_R = longrope.long_rows(model.config, P + C, start_R + jnp.asarray(completion_lengths_R))
  cache = init_cache(model.config, B, P + C, mesh=model.mesh, rules=model.rules)
  # The prompt's last state predicts the first completion token; each completion state the next.
  first_Rx1xD, cache = longrope.prefill_forked(model, variables, prompt_BxP, prompt_mask_BxP,
                                               cache, N, long_R)
  valid_RxC = jnp.arange(C) < jnp.asarray(completion_lengths_R)[:, None]
  completion_RxC = jnp.where(valid_RxC, completion_RxC, 0).astype(jnp.int32)
  hidden_RxCxD, _ = model.apply(variables, completion_RxC, start_R[:, None] + jnp.arange(C),
                                valid_RxC, cache=cache, return_hidden=True,
                                **longrope.rope_kwargs(long_R))
  prev_RxCxD = jnp.concatenate([first_Rx1xD, hidden_RxCxD[:, :-1]], axis=1)
  return _scores(model, variables, prev_RxCxD, completion_RxC, valid_RxC, chunk_size, entropy,
                 self_certainty)


def _scores(model: Transformer, variables: Any, prev_BxLxD: jax.Array, targets_BxL: jax.Array,
            scored_BxL: jax.Array, chunk_size: int | None, entropy: bool,
            self_certainty: bool) -> Scores:
  """Scores from the states that predict each target (``prev_BxLxD[:, t]`` predicts
  ``targets_BxL[:, t]``), projected onto the vocabulary ``chunk_size`` positions at a time."""
  B, L = targets_BxL.shape
  K = L if chunk_size is None else chunk_size
  if not isinstance(K, (int, np.integer)) or isinstance(K, bool) or K <= 0:
    raise ValueError(f"score: chunk_size={chunk_size!r} must be a positive int or None (L={L})")
  K = min(int(K), L)
  N = -(-L // K)

  def constrain(x, names):
    return sh.constrain(x, names, model.mesh, model.rules)

  # Pad to N * K positions and lay the chunks out along a leading axis.
  prev_BxNKxD = jnp.pad(prev_BxLxD, ((0, 0), (0, N * K - L), (0, 0)))
  targets_BxNK = jnp.pad(targets_BxL, ((0, 0), (0, N * K - L)))
  prev_NxBxKxD = jnp.swapaxes(prev_BxNKxD.reshape(B, N, K, -1), 0, 1)
  targets_NxBxK = jnp.swapaxes(targets_BxNK.reshape(B, N, K), 0, 1)

  def chunk(args):
    prev_BxKxD, targets_BxK = args
    prev_BxKxD = constrain(prev_BxKxD, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
    logits_BxKxV = model.apply(variables, prev_BxKxD, method=Transformer.logits)
    logp_BxKxV = _log_softmax(logits_BxKxV)
    stats = [_gather(logp_BxKxV, targets_BxK)]
    stats += [_entropy(logp_BxKxV)] if entropy else []
    stats += [_self_certainty(logp_BxKxV)] if self_certainty else []
    return tuple(constrain(s, (sh.BATCH, sh.LENGTH)) for s in stats)

  if N == 1:
    # One chunk: rematerializing it would only run the vocabulary matmul again in the backward
    # pass (its logits are needed right away there), saving no memory.
    per_chunk = tuple(s[None] for s in chunk((prev_NxBxKxD[0], targets_NxBxK[0])))
  else:
    per_chunk = jax.lax.map(jax.checkpoint(chunk), (prev_NxBxKxD, targets_NxBxK))
  per_token = [constrain(jnp.swapaxes(s_NxBxK, 0, 1).reshape(B, N * K)[:, :L], (sh.BATCH, sh.LENGTH))
               for s_NxBxK in per_chunk]
  logp_BxL = per_token.pop(0)
  entropy_BxL = per_token.pop(0) if entropy else None
  certainty_BxL = per_token.pop(0) if self_certainty else None

  zero = jnp.zeros((), jnp.float32)
  logp_BxL = jnp.where(scored_BxL, logp_BxL, zero)
  num_tokens_B = jnp.sum(scored_BxL, axis=-1, dtype=jnp.int32)
  denom_B = jnp.maximum(num_tokens_B, 1).astype(jnp.float32)
  sum_logprob_B = jnp.sum(logp_BxL, axis=-1)
  return Scores(
      token_logprobs_BxL=logp_BxL,
      token_entropy_BxL=None if entropy_BxL is None else jnp.where(scored_BxL, entropy_BxL, zero),
      sum_logprob_B=sum_logprob_B,
      mean_logprob_B=sum_logprob_B / denom_B,
      self_certainty_B=None if certainty_BxL is None else
      jnp.sum(jnp.where(scored_BxL, certainty_BxL, zero), axis=-1) / denom_B,
      num_tokens_B=num_tokens_B,
  )


# Linen modules are hashable (by config, mesh and rules), so the model itself is a static argument.
score_jit = jax.jit(score, static_argnames=("model", "chunk_size", "entropy", "self_certainty"))
score_forked_jit = jax.jit(score_forked,
                           static_argnames=("model", "chunk_size", "entropy", "self_certainty"))


def place_rows(model: Transformer, x_BxT: Any) -> Any:
  """A host batch (B, T) put on the model's mesh split over the batch axes (as is without one)."""
  if model.mesh is None:
    return x_BxT
  return jax.device_put(x_BxT, sh.logical_sharding((sh.BATCH, sh.LENGTH), x_BxT.shape, model.mesh,
                                                   model.rules))


def score_in_batches(model: Transformer, params: Any, tokens_SxL: Any, input_mask_SxL: Any,
                     loss_mask_SxL: Any, *, batch_size: int,
                     chunk_size: int | None = DEFAULT_CHUNK, entropy: bool = True,
                     self_certainty: bool = True, progress: bool = False) -> Scores:
  """Scores many sequences with ``score_jit`` in batches of ``batch_size`` (one compilation).

  The last batch is padded with unscored rows. On a mesh each batch is placed split over the batch
  axes by the model's rules. Returns ``Scores`` of NumPy arrays with leading dimension S.
  """
  tokens_SxL, input_mask_SxL, loss_mask_SxL = (
      np.asarray(a) for a in (tokens_SxL, input_mask_SxL, loss_mask_SxL))
  if tokens_SxL.ndim != 2 or input_mask_SxL.shape != tokens_SxL.shape \
      or loss_mask_SxL.shape != tokens_SxL.shape:
    raise ValueError(f"score_in_batches: tokens={tokens_SxL.shape}, input_mask="
                     f"{input_mask_SxL.shape}, loss_mask={loss_mask_SxL.shape} must be equal 2-D")
  if batch_size <= 0:
    raise ValueError(f"score_in_batches: batch_size={batch_size} must be positive")
  n, L = tokens_SxL.shape
  padded = round_up(n, batch_size)
  pad = ((0, padded - n), (0, 0))
  tokens_SxL = np.pad(tokens_SxL.astype(np.int32), pad)
  input_mask_SxL = np.pad(input_mask_SxL.astype(bool), pad)
  loss_mask_SxL = np.pad(loss_mask_SxL.astype(bool), pad)

  place = lambda x_BxL: place_rows(model, x_BxL)
  results = []
  starts = range(0, padded, batch_size)
  for start in tqdm(starts, disable=not progress, desc="scoring", unit="batch"):
    rows = slice(start, start + batch_size)
    out = score_jit(model, params, place(tokens_SxL[rows]), place(input_mask_SxL[rows]),
                    place(loss_mask_SxL[rows]), chunk_size=chunk_size, entropy=entropy,
                    self_certainty=self_certainty)
    results.append(multihost.fetch(out))  # blocks, so fake-device collectives never pile up
  if not results:
    return empty_scores(L, entropy, self_certainty)
  return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *results)
