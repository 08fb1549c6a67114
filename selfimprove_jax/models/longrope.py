"""Longrope (Phi-3/3.5) sequences that pass ``original_max_len``: one definition for all callers.

Longrope rotates with ``short_factor`` while a sequence is at most ``original_max_len`` (O) tokens
long and with ``long_factor`` once it is longer, at every position. A cached key keeps the rotation
of the call that wrote it, and a later layer's keys depend on every earlier rotation through the
attention, so crossing O cannot be fixed by re-rotating cached keys: everything before the crossing
is computed again. What each caller does, following ``transformers`` 5.x:

  * teacher-forced scoring (``scoring.score``, one full forward): a row longer than O uses the
    long factors at every position, else the short ones. ``transformers`` decides by the largest
    position in the batch; here each row decides for itself (equal for a batch of one).
  * forked scoring (``scoring.score_forked``): each prompt is prefilled with the factors of the
    whole row it is forked into (``prefill_forked``), so it equals ``scoring.score``.
  * sampling (``sampling.generate``): the token at index t (0-based, prompt included) is drawn
    from the model run on tokens[:t], with the long factors iff t > O. When a row first feeds the
    token at position O, its cache is computed again from scratch with the long factors
    (``recompute_at_crossing``), as ``transformers``' Phi-3 ``prepare_inputs_for_generation``
    drops its cache once the input reaches O + 1 tokens; greedy decoding then gives the tokens of
    ``transformers``' ``generate`` for an unpadded prompt. (Batched, ``transformers`` counts left
    padding in that length and picks the factors by the batch's largest position; here each row
    by its own tokens.)

So for a finished sequence longer than O, ``transformers``' ``generate`` drew (and its output
scores give) the tokens at indices <= O under the short factors, while its teacher-forced forward
of the same sequence scores every token under the long ones. ``generate`` here draws as
``transformers`` does but reports the teacher-forced log-probs (``SampleOutput.model_logprobs``),
so that the sampler's self-reward equals the scorer's.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from selfimprove_jax import sharding as sh
from selfimprove_jax.models.config import TransformerConfig
from selfimprove_jax.models.transformer import CACHE_KV_AXES, CACHE_POS_AXES, KVCache, fork_cache


def may_cross(config: TransformerConfig, slots: int) -> bool:
  """Static: whether a row of ``slots`` tokens can be longer than a longrope model's
  ``original_max_len`` (always False for the other rope kinds)."""
  scaling = config.rope_scaling
  return scaling.kind == "longrope" and slots > scaling.original_max_len


def long_rows(config: TransformerConfig, slots: int, lengths_R: jax.Array) -> jax.Array | None:
  """bool (R,): rows of ``lengths_R`` real tokens that use the long factors; None when no row of
  ``slots`` tokens can (then every call's own positions decide, which give the same answer)."""
  if not may_cross(config, slots):
    return None
  return jnp.asarray(lengths_R) > config.rope_scaling.original_max_len


def crossed_rows(config: TransformerConfig, start_R: jax.Array, end_R: jax.Array) -> jax.Array:
  """bool (R,): rows whose sampled log-probs differ from the teacher-forced ones, i.e. rows of
  ``end_R`` tokens whose prompt of ``start_R`` tokens fits ``original_max_len`` O but whose end
  passes it (they drew tokens at indices <= O with the short factors). A row whose prompt is
  already longer than O was prefilled and decoded with the long factors throughout: not crossed."""
  O = config.rope_scaling.original_max_len
  return (jnp.asarray(start_R) <= O) & (jnp.asarray(end_R) > O)


def rope_kwargs(long_R: jax.Array | None) -> dict[str, Any]:
  """``model.apply`` keywords forcing each row's factors; none for None, so a module with the
  plain call signature (a test stub) still serves every model that cannot cross."""
  return {} if long_R is None else {"long_rope_B": long_R}


def prefill_forked(model, variables: Any, prompt_BxP: jax.Array, prompt_mask_BxP: jax.Array,
                   cache: KVCache, n: int, long_R: jax.Array | None) -> tuple[jax.Array, KVCache]:
  """Prefills the prompts into the empty ``cache`` and forks each to ``n`` rows (R = B * n).

  ``long_R``: per forked row, whether its whole sequence uses the long factors (``long_rows``);
  then one prefill of 2B rows runs each prompt with the short and the long factors, and every
  forked row gathers its own (peak: 2B prompt caches besides the R forked rows, not two forked
  caches). None: one prefill of B rows, each prompt's own length deciding.
  Returns:
    (the state of each prompt's last slot, which predicts the first forked token (R, 1, D),
    the forked cache).
  """
  mesh, rules = model.mesh, model.rules
  if long_R is None:
    hidden_BxPxD, filled = model.apply(variables, prompt_BxP, None, prompt_mask_BxP, cache=cache,
                                       return_hidden=True, prefill=True)
    return jnp.repeat(hidden_BxPxD[:, -1:], n, axis=0), fork_cache(filled, n, mesh, rules)
  B = prompt_BxP.shape[0]
  twice = lambda x: x if x.ndim == 0 else jnp.concatenate([x, x])  # rows B.. 2B-1: long factors
  hidden_2BxPxD, filled = model.apply(variables, twice(prompt_BxP), None, twice(prompt_mask_BxP),
                                      cache=jax.tree.map(twice, cache), return_hidden=True,
                                      prefill=True, long_rope_B=jnp.arange(2 * B) >= B)
  source_R = jnp.repeat(jnp.arange(B), n) + B * jnp.asarray(long_R, jnp.int32)
  take = lambda x, axes: sh.constrain(jnp.take(x, source_R, axis=0), axes, mesh, rules)
  forked = KVCache(k=tuple(take(k, CACHE_KV_AXES) for k in filled.k),
                   v=tuple(take(v, CACHE_KV_AXES) for v in filled.v),
                   pos=take(filled.pos, CACHE_POS_AXES), index=filled.index,
                   ring_pos=None if filled.ring_pos is None else take(filled.ring_pos, CACHE_POS_AXES))
  return jnp.take(hidden_2BxPxD[:, -1:], source_R, axis=0), forked


def _ring_sources(index: jax.Array, slots: int) -> jax.Array:
  """int (W,): the full-cache slot each of a ring's W slots holds after the tokens before
  ``index`` (``transformer.ring_write`` keeps token t in ring slot t mod W); < 0 where none."""
  return (index - 1) - jnp.mod(index - 1 - jnp.arange(slots), slots)


def recompute_at_crossing(model, variables: Any, tokens_RxS: jax.Array, mask_RxS: jax.Array,
                          fed_pos_R: jax.Array, live_R: jax.Array, hidden_Rx1xD: jax.Array,
                          cache: KVCache) -> tuple[jax.Array, KVCache]:
  """One decode step's (state, cache), with rows that just fed position O computed from scratch.

  Args:
    tokens_RxS, mask_RxS: each row's tokens by cache slot (S = ``cache.max_len``), True on the
      real ones written so far (the fed token included), as the cache holds them.
    fed_pos_R: position of the token each row fed this step; live_R: rows still generating.
    hidden_Rx1xD, cache: the step's output state and cache (index past the fed token).
  Returns:
    (state, cache) where every live row with ``fed_pos_R == original_max_len`` has the state and
    keys/values of one forward over its whole sequence with the long factors, other rows as given.
    The crossing rows are recomputed one at a time (a ``lax.while_loop``; steps where no row
    crosses run no iteration) and written into the cache in place, so the
    extra memory is one row's cache and activations, not a second cache for all R rows; each
    crossing row runs one forward of S slots in all, as with a batched recompute.
  """
  cfg = model.config
  R, S = tokens_RxS.shape
  cross_R = live_R & (fed_pos_R == cfg.rope_scaling.original_max_len)

  def redo_row(carry):
    hidden_Rx1xD, cache, todo_R = carry
    r = jnp.argmax(todo_R)
    row = lambda x: jax.lax.dynamic_slice_in_dim(x, r, 1, axis=0)
    kv = lambda: tuple(jnp.zeros((1, cfg.num_kv_heads, S, cfg.head_dim), k.dtype) for k in cache.k)
    empty = KVCache(k=kv(), v=kv(), pos=jnp.full((1, S), -1, jnp.int32),
                    index=jnp.zeros((), jnp.int32))
    hidden_1xSxD, full = model.apply(variables, row(tokens_RxS), None, row(mask_RxS), cache=empty,
                                     return_hidden=True, prefill=True,
                                     long_rope_B=jnp.ones((1,), bool))
    fed_1x1xD = jax.lax.dynamic_slice_in_dim(hidden_1xSxD, cache.index - 1, 1, axis=1)
    # A ringed layer (fewer slots than S) keeps the last W tokens; their positions: ring_pos.
    ring = lambda x, W, axis: jnp.take(x, jnp.maximum(_ring_sources(cache.index, W), 0), axis=axis)
    as_kept = lambda new, old: new if old.shape[2] == S else ring(new, old.shape[2], 2)
    put = lambda new, old: jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), r, 0)
    ring_pos = None
    if cache.ring_pos is not None:
      W = cache.ring_pos.shape[1]
      ring_pos = put(jnp.where(_ring_sources(cache.index, W) >= 0, ring(full.pos, W, 1), -1),
                     cache.ring_pos)
    redone = KVCache(k=tuple(put(as_kept(n, o), o) for n, o in zip(full.k, cache.k)),
                     v=tuple(put(as_kept(n, o), o) for n, o in zip(full.v, cache.v)),
                     pos=put(full.pos, cache.pos), index=cache.index, ring_pos=ring_pos)
    return put(fed_1x1xD, hidden_Rx1xD), redone, todo_R.at[r].set(False)

  return jax.lax.while_loop(lambda c: jnp.any(c[2]), redo_row, (hidden_Rx1xD, cache, cross_R))[:2]
