"""Sampling: one prefill per prompt, N continuations sharing it, decoded by a ``lax.while_loop`` in jit.

Row legend: B prompts, N samples per prompt, R = B * N sampled rows, P padded prompt length,
M max new tokens, V vocabulary, S stop ids.

Sampling parameters (temperature, top-k, top-p) are traced arrays with one value per row, so a sweep
over them never recompiles; temperature 0 is greedy. Prompts are left-padded, which puts every
prompt's last token in the same cache slot: the prefill's last position gives each prompt's
next-token logits, and all rows then decode in lock-step while positions stay per row.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from selfimprove_jax import multihost
from selfimprove_jax.models import longrope
from selfimprove_jax.models.transformer import KVCache, fork_cache, init_cache
from selfimprove_jax.models.transformer import variables as model_variables
from selfimprove_jax.scoring import score_forked, token_logprobs
from selfimprove_jax.tokenizer.chat import render_chat

FINISH_STOP = 0  # a stop token was generated (it is included in the completion)
FINISH_LENGTH = 1  # max_new_tokens reached


@flax.struct.dataclass
class SamplingParams:
  """Per-row sampling parameters: temperature (R,) f32, 0 = greedy; top_k (R,) i32, 0 = off;
  top_p (R,) f32, 1 = off. Top-k is applied first, top-p on the renormalised survivors."""

  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array

  @classmethod
  def make(cls, rows: int, temperature: Any = 1.0, top_k: Any = 0, top_p: Any = 1.0) -> "SamplingParams":
    """Broadcasts scalars or per-row values to ``rows`` rows, validating each value."""
    def prep(name, value, dtype, ok, why):
      arr = np.broadcast_to(np.asarray(value, dtype), (rows,))
      bad = arr[~ok(arr)]
      if bad.size:
        raise ValueError(f"{name}={bad[0].item()!r}: {why}")
      return jnp.asarray(arr)
    return cls(temperature=prep("temperature", temperature, np.float32, lambda a: a >= 0, "must be >= 0"),
               top_k=prep("top_k", top_k, np.int32, lambda a: a >= 0, "must be >= 0 (0 disables)"),
               top_p=prep("top_p", top_p, np.float32, lambda a: (a > 0) & (a <= 1), "must be in (0, 1]"))


@flax.struct.dataclass
class SampleOutput:
  """Completions of R rows, grouped by prompt (rows b*N .. b*N+N-1 belong to prompt b).

  tokens: (R, M) int32, ``pad_id`` after the end. lengths: (R,) generated tokens, stop token
  included. finish_reason: (R,) ``FINISH_STOP`` or ``FINISH_LENGTH``. sampler_logprobs: (R, M) log-prob
  under the distribution actually sampled (temperature, top-k/p; 0 for greedy). model_logprobs: (R, M)
  under the unmodified model (T=1, no truncation): the self-reward's raw material. Both 0 past the end.
  A longrope row longer than its ``original_max_len`` O draws the tokens at positions <= O with the
  short factors (as ``transformers`` does), but its model_logprobs are all the teacher-forced
  scorer's, long factors throughout (``models.longrope``); its sampler_logprobs stay those drawn.
  """

  tokens: jax.Array
  lengths: jax.Array
  finish_reason: jax.Array
  sampler_logprobs: jax.Array
  model_logprobs: jax.Array


def _cumsum(x_RxV: jax.Array) -> jax.Array:
  # A parallel prefix sum: XLA:CPU lowers jnp.cumsum to a reduce-window about 4x slower at V = 8k.
  return jax.lax.associative_scan(jnp.add, x_RxV, axis=-1)


def _sortable_key(x: jax.Array) -> jax.Array:
  """uint32 keys ordered like the float32 values (-inf first); equal values give equal keys."""
  x = jnp.where(x == 0, 0.0, x.astype(jnp.float32))  # -0.0 and 0.0 are one value
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  negative = bits >= jnp.uint32(0x80000000)
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _largest_key_where(holds, num_rows: int) -> jax.Array:
  """Per row, the largest uint32 ``t`` with ``holds(t_R)`` True, for a predicate that is True up
  to some key and False above it (and True at 0). 32 halvings of the key range: exact."""
  def halve(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2 + (hi - lo) % 2  # rounds up, so lo always moves when it can
    ok = holds(mid)
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
  lo = jnp.zeros((num_rows,), jnp.uint32)
  hi = jnp.full((num_rows,), 0xFFFFFFFF, jnp.uint32)
  return jax.lax.fori_loop(0, 32, halve, (lo, hi))[0]


def truncate_logits(logits_RxV: jax.Array, top_k_R: jax.Array, top_p_R: jax.Array) -> jax.Array:
  """Masks (to -inf) logits outside each row's top-k, then outside its top-p nucleus.

  Top-k keeps the values at or above the k-th largest; top-p then keeps, on the renormalised
  survivors, each value whose strictly larger values hold less than p of the mass. Ties at a
  threshold are all kept. Both thresholds are found by bisection over the float bit patterns
  (32 counting passes over the row each), not by sorting: a sort of R x V dominated a decode
  step on CPU.
  """
  R, V = logits_RxV.shape
  key_RxV = _sortable_key(logits_RxV)
  k_R = jnp.where(top_k_R > 0, jnp.minimum(top_k_R, V), V)
  # The k-th largest value: the largest key with at least k values at or above it.
  kth_R = _largest_key_where(lambda t: jnp.sum(key_RxV >= t[:, None], axis=-1) >= k_R, R)
  in_k_RxV = key_RxV >= kth_R[:, None]
  probs_RxV = jax.nn.softmax(jnp.where(in_k_RxV, logits_RxV, -jnp.inf), axis=-1)
  # The nucleus ends at the first value (from the top) whose cumulative mass reaches p: the
  # largest t with mass(>= t) >= p. Its larger values hold less than p, the next one does not.
  mass_above = lambda t: jnp.sum(jnp.where(key_RxV >= t[:, None], probs_RxV, 0.0), axis=-1)
  nucleus_R = _largest_key_where(lambda t: (t == 0) | (mass_above(t) >= top_p_R), R)
  keep_RxV = in_k_RxV & (key_RxV >= nucleus_R[:, None])
  return jnp.where(keep_RxV, logits_RxV, -jnp.inf)


def _inverse_cdf_sample(logits_RxV: jax.Array, key: jax.Array) -> jax.Array:
  """Exact categorical draws from one uniform per row (the Gumbel trick needs one per token,
  which dominates a decode step on CPU). Masked (-inf) tokens have zero width and are never hit."""
  cdf_RxV = _cumsum(jax.nn.softmax(logits_RxV, axis=-1))
  # 1 - U lies in (0, 1]: a draw is never 0, so a zero-width token at index 0 cannot be chosen.
  u_Rx1 = (1.0 - jax.random.uniform(key, (logits_RxV.shape[0], 1))) * cdf_RxV[:, -1:]
  return jnp.minimum(jnp.sum(cdf_RxV < u_Rx1, axis=-1), logits_RxV.shape[-1] - 1)


def sample_tokens(logits_RxV: jax.Array, params: SamplingParams, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row; returns (tokens (R,), log-prob under the sampled distribution (R,))."""
  greedy_R = params.temperature <= 0
  scaled_RxV = logits_RxV / jnp.where(greedy_R, 1.0, params.temperature)[:, None]
  needs_truncation = jnp.any((params.top_k > 0) | (params.top_p < 1))
  scaled_RxV = jax.lax.cond(needs_truncation, truncate_logits, lambda x, *_: x, scaled_RxV,
                            params.top_k, params.top_p)
  drawn_R = _inverse_cdf_sample(scaled_RxV, key)
  tokens_R = jnp.where(greedy_R, jnp.argmax(logits_RxV, axis=-1), drawn_R).astype(jnp.int32)
  logp_R = jnp.where(greedy_R, 0.0, token_logprobs(scaled_RxV, tokens_R))
  return tokens_R, logp_R


@flax.struct.dataclass
class _LoopState:
  step: jax.Array  # index of the token sampled last
  token_R: jax.Array
  done_R: jax.Array
  cache: KVCache
  out: SampleOutput


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "num_samples", "pad_id"))
def generate(model, params: Any, prompt_BxP: jax.Array, prompt_mask_BxP: jax.Array, rng: jax.Array,
             sampling: SamplingParams, stop_ids_S: jax.Array, *, max_new_tokens: int, num_samples: int,
             pad_id: int = 0, vocab_limit: jax.Array | int | None = None) -> SampleOutput:
  """Samples ``num_samples`` continuations of each left-padded prompt.

  Args:
    model: a ``Transformer`` (or any module with its call signature, ``logits`` method and
      ``config``/``mesh``/``rules`` attributes); static.
    params: the model's parameters.
    prompt_BxP: int32 prompts, left-padded; prompt_mask_BxP: True on real tokens (each row needs one).
    rng: a PRNG key; the same key gives the same samples.
    sampling: per-row parameters for R = B * num_samples rows.
    stop_ids_S: int32 ids that end a row (may be empty).
    vocab_limit: ids at or above it are never sampled (embedding tables are often padded past the
      tokenizer's vocabulary); traced, so changing it does not recompile. ``model_logprobs`` still
      use the unmodified distribution.
  Returns:
    ``SampleOutput`` with R rows.

  A longrope model (Phi-3/3.5) whose rows can pass ``original_max_len`` (P + M larger) also traces
  a recompute of a row's cache when it crosses, and a rescoring of the rows whose prompt fits it
  but whose end passes it (``models.longrope.crossed_rows``); each runs only when some row needs it.
  """
  B, P = prompt_BxP.shape
  N, M = num_samples, max_new_tokens
  R = B * N
  mesh, rules = model.mesh, model.rules
  variables = model_variables(params)

  cache = init_cache(model.config, B, P + M, mesh=mesh, rules=rules)
  # Positions default to counting the real tokens of the mask, i.e. 0 at each prompt's first token.
  # The prefill attends over the prompt's P slots only, not the whole cache.
  hidden_BxPxD, cache = model.apply(variables, prompt_BxP, None, prompt_mask_BxP,
                                    cache=cache, return_hidden=True, prefill=True)
  # Only the last position's logits are needed: never project the whole prompt onto the vocab.
  logits_BxV = model.apply(variables, hidden_BxPxD[:, -1:], method="logits")[:, 0]
  logits_RxV = jnp.repeat(logits_BxV, N, axis=0)
  cache = fork_cache(cache, N, mesh, rules)
  next_pos_R = jnp.repeat(jnp.sum(prompt_mask_BxP, axis=1).astype(jnp.int32), N)
  crossing = longrope.may_cross(model.config, P + M)
  if crossing:
    prompt_RxP, prompt_mask_RxP = (jnp.repeat(a, N, axis=0) for a in (prompt_BxP, prompt_mask_BxP))

  V = model.config.vocab_size
  in_vocab_V = jnp.arange(V) < (V if vocab_limit is None else vocab_limit)

  def emit(state_out: SampleOutput, step, logits_RxV, done_R, key):
    token_R, sampler_lp_R = sample_tokens(jnp.where(in_vocab_V, logits_RxV, -jnp.inf), sampling, key)
    model_lp_R = token_logprobs(logits_RxV, token_R)
    live_R = ~done_R
    stopped_R = live_R & jnp.isin(token_R, stop_ids_S)
    put = lambda buf, val, fill: buf.at[:, step].set(jnp.where(live_R, val, fill))
    out = state_out.replace(
        tokens=put(state_out.tokens, token_R, pad_id),
        sampler_logprobs=put(state_out.sampler_logprobs, sampler_lp_R, 0.0),
        model_logprobs=put(state_out.model_logprobs, model_lp_R, 0.0),
        lengths=state_out.lengths + live_R,
        finish_reason=jnp.where(stopped_R, FINISH_STOP, state_out.finish_reason))
    return token_R, done_R | stopped_R, out

  empty = SampleOutput(tokens=jnp.full((R, M), pad_id, jnp.int32), lengths=jnp.zeros((R,), jnp.int32),
                       finish_reason=jnp.full((R,), FINISH_LENGTH, jnp.int32),
                       sampler_logprobs=jnp.zeros((R, M), jnp.float32),
                       model_logprobs=jnp.zeros((R, M), jnp.float32))
  token_R, done_R, out = emit(empty, 0, logits_RxV, jnp.zeros((R,), bool), jax.random.fold_in(rng, 0))

  def cond(state: _LoopState):
    return (state.step < M - 1) & ~jnp.all(state.done_R)

  def body(state: _LoopState):
    step = state.step + 1
    pos_Rx1 = (next_pos_R + step - 1)[:, None]
    hidden_Rx1xD, cache = model.apply(variables, state.token_R[:, None], pos_Rx1,
                                      jnp.ones((R, 1), bool), cache=state.cache, return_hidden=True)
    if crossing:  # a longrope row feeding position O: its cache is computed again, long factors
      tokens_RxS = jnp.concatenate([prompt_RxP, state.out.tokens], axis=1)
      mask_RxS = jnp.concatenate([prompt_mask_RxP, jnp.broadcast_to(jnp.arange(M) < step, (R, M))], 1)
      hidden_Rx1xD, cache = longrope.recompute_at_crossing(
          model, variables, tokens_RxS, mask_RxS, pos_Rx1[:, 0], ~state.done_R, hidden_Rx1xD, cache)
    logits_RxV = model.apply(variables, hidden_Rx1xD, method="logits")[:, 0]
    token_R, done_R, out = emit(state.out, step, logits_RxV, state.done_R, jax.random.fold_in(rng, step))
    return _LoopState(step=step, token_R=token_R, done_R=done_R, cache=cache, out=out)

  state = _LoopState(step=jnp.zeros((), jnp.int32), token_R=token_R, done_R=done_R, cache=cache, out=out)
  out = jax.lax.while_loop(cond, body, state).out
  if not crossing:
    return out
  # Rows that crossed O: the scorer's log-probs (long factors for every token, also those drawn
  # with the short ones before the crossing). A prompt already past O was long throughout.
  crossed_R = longrope.crossed_rows(model.config, next_pos_R, next_pos_R + out.lengths)
  rescore = lambda o: o.replace(model_logprobs=jnp.where(crossed_R[:, None], score_forked(
      model, params, prompt_BxP, prompt_mask_BxP, o.tokens, o.lengths, entropy=False,
      self_certainty=False).token_logprobs_BxL, o.model_logprobs))
  return jax.lax.cond(jnp.any(crossed_R), rescore, lambda o: o, out)


# ------------------------------------------------------------------------------------- host API

DEFAULT_PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@flax.struct.dataclass
class Completions:
  """Host-side results, indexed [prompt][sample]: ``tokens`` lists of ids (stop token included),
  ``texts`` (None without a tokenizer), ``finish_reasons`` ("stop" / "length"), and numpy arrays of
  per-token ``model_logprobs`` and ``sampler_logprobs`` aligned with ``tokens``. ``prompt_ids``:
  each prompt's ids as the model read them, indexed [prompt] (what a scorer needs beside
  ``tokens``: ``verifiers.score_sampled``)."""

  tokens: list
  texts: list | None
  finish_reasons: list
  model_logprobs: list
  sampler_logprobs: list
  prompt_ids: list


class Sampler:
  """Prompts in, completions out; every call reuses a handful of compiled programs.

  A prompt is a string (encoded with the tokenizer's own BOS), a list of token ids, or, with
  ``chat`` set (a family name or a checkpoint's ``tokenizer.template.ChatTemplate``), a
  conversation (a list of ``{"role", "content"}`` messages) rendered with its generation prompt.

  Prompts are processed in groups of ``batch_size`` (the last group padded), each left-padded to the
  smallest of ``prompt_buckets`` that fits, so only (bucket, num_samples) pairs ever compile; the
  sampling parameters never do.
  """

  def __init__(self, model, params, tokenizer=None, *, max_new_tokens: int, batch_size: int = 8,
               stop_ids: tuple[int, ...] | None = None, pad_id: int | None = None,
               prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS, chat: Any = None):
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be >= 1")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
    self.model, self.params, self.tokenizer, self.chat = model, params, tokenizer, chat
    self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
    if stop_ids is None:
      stop_ids = tuple(tokenizer.stop_ids) if tokenizer is not None else ()
    self.stop_ids = jnp.asarray(stop_ids, jnp.int32).reshape(-1)
    self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer is not None else 0)
    self.prompt_buckets = tuple(sorted(prompt_buckets))
    self.vocab_limit = None if tokenizer is None else jnp.int32(tokenizer.vocab_size)

  def _encode(self, prompts) -> list[list[int]]:
    conversations = bool(prompts) and isinstance(prompts[0], (list, tuple)) and bool(prompts[0]) \
        and isinstance(prompts[0][0], Mapping)
    if conversations or (prompts and isinstance(prompts[0], str)):
      if self.tokenizer is None:
        raise ValueError("prompts are text but the Sampler has no tokenizer; pass token ids")
      if not conversations:
        return self.tokenizer.encode_batch(list(prompts), add_bos=True)
      if self.chat is None:
        raise ValueError("prompts are conversations but the Sampler has no chat format; pass "
                         "chat= (a family name or a checkpoint's ChatTemplate)")
      # A rendered chat carries the BOS its format writes, as apply_chat_template's ids do.
      return self.tokenizer.encode_batch([render_chat(self.chat, m) for m in prompts],
                                         add_bos=False)
    return [list(map(int, p)) for p in prompts]

  def _bucket(self, length: int) -> int:
    for bucket in self.prompt_buckets:
      if bucket >= length:
        return bucket
    raise ValueError(f"prompt length={length} exceeds the largest prompt bucket "
                     f"{self.prompt_buckets[-1]}; pass longer prompt_buckets")

  def __call__(self, prompts, num_samples: int = 1, *, rng: jax.Array | int = 0,
               temperature: Any = 1.0, top_k: Any = 0, top_p: Any = 1.0) -> Completions:
    """Samples ``num_samples`` completions per prompt.

    ``temperature``, ``top_k`` and ``top_p`` are scalars or one value per prompt.
    """
    ids = self._encode(prompts)
    if not ids or any(len(p) == 0 for p in ids):
      raise ValueError("every prompt needs at least one token")
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    per_prompt = {name: np.broadcast_to(np.asarray(v), (len(ids),))
                  for name, v in dict(temperature=temperature, top_k=top_k, top_p=top_p).items()}
    results = []
    for group, start in enumerate(range(0, len(ids), self.batch_size)):
      chunk = ids[start:start + self.batch_size]
      real = len(chunk)
      chunk = chunk + [chunk[0]] * (self.batch_size - real)
      P = self._bucket(max(len(p) for p in chunk))
      prompt = np.full((self.batch_size, P), self.pad_id, np.int32)
      mask = np.zeros((self.batch_size, P), bool)
      for row, p in enumerate(chunk):
        prompt[row, P - len(p):], mask[row, P - len(p):] = p, True
      rows = lambda a: np.repeat(np.concatenate([a[start:start + real],
                                                 np.repeat(a[start:start + 1], self.batch_size - real)]),
                                 num_samples)
      sampling = SamplingParams.make(self.batch_size * num_samples, rows(per_prompt["temperature"]),
                                     rows(per_prompt["top_k"]), rows(per_prompt["top_p"]))
      out = generate(self.model, self.params, prompt, mask, jax.random.fold_in(key, group), sampling,
                     self.stop_ids, max_new_tokens=self.max_new_tokens, num_samples=num_samples,
                     pad_id=self.pad_id, vocab_limit=self.vocab_limit)
      results.append((real, multihost.fetch(out)))
    return self._to_host(results, num_samples, ids)

  def _to_host(self, results, num_samples: int, prompt_ids: list[list[int]]) -> Completions:
    tokens, reasons, model_lp, sampler_lp = [], [], [], []
    for real, out in results:
      for b in range(real):
        rows = range(b * num_samples, (b + 1) * num_samples)
        tokens.append([out.tokens[r, :out.lengths[r]].tolist() for r in rows])
        reasons.append(["stop" if out.finish_reason[r] == FINISH_STOP else "length" for r in rows])
        model_lp.append([out.model_logprobs[r, :out.lengths[r]] for r in rows])
        sampler_lp.append([out.sampler_logprobs[r, :out.lengths[r]] for r in rows])
    texts = None
    if self.tokenizer is not None:
      texts = [[self.tokenizer.decode(t, skip_special=True) for t in per_prompt] for per_prompt in tokens]
    return Completions(tokens=tokens, texts=texts, finish_reasons=reasons, model_logprobs=model_lp,
                       sampler_logprobs=sampler_lp, prompt_ids=prompt_ids)
