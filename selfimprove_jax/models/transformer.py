"""The decoder-only transformer: one Linen module for every family, plus its KV cache.

Two call modes share one code path:
  * full sequence (training, teacher-forced scoring): ``cache=None``; padding and positions explicit.
  * incremental decode: pass a ``KVCache``; each layer writes the T new tokens' keys/values at slots
    ``[cache.index, cache.index + T)`` of its own buffers, then the new tokens attend to every
    filled slot (in place inside a decode loop). A prefill is just a decode call with the whole
    (padded) prompt.

Layers are separate submodules (``layers_0`` .. ``layers_{L-1}``) run by a Python loop, not a
``nn.scan`` over stacked weights: under a scan every decode step copies each layer's weights and
cache slice out of the stacked arrays (about a third of a decode step on CPU), whereas separate
per-layer buffers are read in place. It also makes a layer's attention kind (local or global) static,
and maps one-to-one onto checkpoint tensors, so importing streams tensor by tensor.

Cache layout: per layer, k and v are (B, K, S, F), so each (b, k) block of (S, F) is contiguous for
the attention dots; ``pos`` (B, S) holds each slot's token position, -1 for padding and empty slots,
which is all the mask needs. Slots are shared across the batch (one scalar write index), positions
are per row, so left- or right-padded prompts and N samples forked from one prefill all decode with
the same program.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from selfimprove_jax import sharding as sh
from selfimprove_jax.models.config import RopeScaling, TransformerConfig
from selfimprove_jax.models.layers import (NO_WINDOW, Block, RMSNorm, _param, attention_mask, project,
                                           ring_write, rope_sin_cos)

CACHE_KV_AXES = (sh.BATCH, sh.KV_HEADS, sh.CACHE_LENGTH, sh.HEAD_DIM)
CACHE_POS_AXES = (sh.BATCH, sh.CACHE_LENGTH)


def positions_from_mask(input_mask_BxT: jax.Array) -> jax.Array:
  """int32 positions counting the real tokens of each row from 0; padding repeats a neighbour's."""
  return jnp.maximum(jnp.cumsum(input_mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


@flax.struct.dataclass
class KVCache:
  """Keys/values of every layer. k, v: L-tuples of (B, K, S, F); pos: (B, S) int32; index: () int32.

  Sliding-window layers whose window W is shorter than the cache keep a ring of W slots instead
  (k, v (B, K, W, F); token t of a row in slot t mod W), with their own slot positions
  ``ring_pos`` (B, W); None when no layer rings.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  pos: jax.Array
  index: jax.Array
  ring_pos: jax.Array | None = None

  @property
  def max_len(self) -> int:
    return self.pos.shape[1]


def ring_slots(config: TransformerConfig, max_len: int) -> int | None:
  """W when the local layers of a ``max_len``-slot cache keep a ring of W slots, else None."""
  if "local" in config.attention_pattern and config.sliding_window < max_len:
    return config.sliding_window
  return None





@flax.struct.dataclass
class LoraParams:
  """Frozen ``base`` parameters with low-rank ``adapters`` applied beside them.

  ``adapters`` is ``training.lora``'s tree: for every adapted projection {"lora_a": A (*in, r),
  "lora_b": B (r, *out)} at the kernel's path. Each adapted projection computes
  x·W + scale·(x·A)·B (``layers.dense``): no merged copy of the weights exists, and gradients with
  respect to the adapters never form a full-size weight gradient. Accepted wherever parameters
  are (scoring, sampling, judging) through ``variables``.
  """

  base: Any
  adapters: Any
  scale: float = flax.struct.field(pytree_node=False)


def variables(params: Any) -> dict[str, Any]:
  """``model.apply``'s variables for ``params``: a parameter tree, or a ``LoraParams``."""
  if not isinstance(params, LoraParams):
    return {"params": params}
  scaled = jax.tree_util.tree_map_with_path(
      lambda path, x: x * params.scale if getattr(path[-1], "key", None) == "lora_b" else x,
      params.adapters)
  return {"params": params.base, "lora": scaled}


def cast_floats(tree: Any, dtype: Any) -> Any:
  """Every floating leaf of ``tree`` (params, ``LoraParams``) in ``dtype``; others unchanged."""
  dtype = jnp.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def init_cache(config: TransformerConfig, batch: int, max_len: int, dtype: Any = None,
               mesh: Mesh | None = None, rules: sh.Rules = sh.SAMPLE_RULES) -> KVCache:
  """An empty cache, created directly in its sharded layout when a mesh is given. Local layers
  get a ring of ``ring_slots`` slots when their window is shorter than ``max_len``."""
  dtype = jnp.dtype(dtype or config.dtype)
  W = ring_slots(config, max_len)
  lengths = [W if (W and local) else max_len for local in config.layer_is_local]
  kv_shape = lambda S: (batch, config.num_kv_heads, S, config.head_dim)

  def make():
    zeros = lambda: tuple(jnp.zeros(kv_shape(S), dtype) for S in lengths)
    return KVCache(k=zeros(), v=zeros(), pos=jnp.full((batch, max_len), -1, jnp.int32),
                   index=jnp.zeros((), jnp.int32),
                   ring_pos=None if W is None else jnp.full((batch, W), -1, jnp.int32))

  if mesh is None:
    return jax.jit(make)()
  place = lambda names, shape: sh.logical_sharding(names, shape, mesh, rules)
  kv = tuple(place(CACHE_KV_AXES, kv_shape(S)) for S in lengths)
  out = KVCache(k=kv, v=kv, pos=place(CACHE_POS_AXES, (batch, max_len)), index=place((), ()),
                ring_pos=None if W is None else place(CACHE_POS_AXES, (batch, W)))
  return jax.jit(make, out_shardings=out)()


def fork_cache(cache: KVCache, n: int, mesh=None, rules=None) -> KVCache:
  """Each row's cache repeated ``n`` times (row b becomes rows b*n .. b*n+n-1): N samples, or N
  scored completions, continue one prompt's prefill."""
  fork = lambda x, axes: sh.constrain(jnp.repeat(x, n, axis=0), axes, mesh, rules)
  return KVCache(k=tuple(fork(k, CACHE_KV_AXES) for k in cache.k),
                 v=tuple(fork(v, CACHE_KV_AXES) for v in cache.v),
                 pos=fork(cache.pos, CACHE_POS_AXES), index=cache.index,
                 ring_pos=None if cache.ring_pos is None else fork(cache.ring_pos, CACHE_POS_AXES))


class Transformer(nn.Module):
  """Decoder-only transformer.

  Attributes:
    config: the architecture.
    mesh: mesh for activation sharding constraints; None on a single device.
    rules: logical-to-mesh rules for those constraints (``sharding.TRAIN_RULES`` or ``SAMPLE_RULES``).
  """

  config: TransformerConfig
  mesh: Mesh | None = None
  rules: sh.Rules = sh.TRAIN_RULES

  def setup(self):
    cfg = self.config
    self.embedding = _EmbeddingTable(cfg)
    self.layers = [Block(cfg, self.mesh, self.rules) for _ in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = _LMHead(cfg)

  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
               input_mask_BxT: jax.Array | None = None, cache: KVCache | None = None,
               return_hidden: bool = False, prefill: bool = False,
               long_rope_B: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """Runs the model.

    Args:
      tokens_BxT: int token ids.
      positions_BxT: int positions; by default counted over the real tokens of ``input_mask``
        (the first real token is 0), which is right for left- and right-padded rows alike.
      input_mask_BxT: True for real tokens, False for padding (default all True). Padding is never
        attended to; outputs at padding positions are finite but meaningless.
      cache: a ``KVCache`` to write into and attend over; None for the full-sequence mode.
      return_hidden: return the final-normed hidden states (B, T, D) instead of logits, for
        callers that project onto the vocabulary in chunks (see ``logits``).
      prefill: ``cache`` is empty (fresh from ``init_cache``): the tokens attend over themselves
        only, not over every cache slot, while their keys and values are stored.
      long_rope_B: bool (B,), for longrope models only: True to rotate this call's tokens with the
        long-context factors, False with the short ones; None picks long for a row whose positions
        reach ``original_max_len`` (``layers.rope_sin_cos``).
    Returns:
      (logits_BxTxV float32 | hidden_BxTxD, updated cache or None).
    """
    cfg = self.config
    B, T = tokens_BxT.shape
    if input_mask_BxT is None:
      input_mask_BxT = jnp.ones((B, T), bool)
    if positions_BxT is None:
      positions_BxT = positions_from_mask(input_mask_BxT)
    new_pos_BxT = jnp.where(input_mask_BxT, positions_BxT, -1).astype(jnp.int32)

    kinds = ["local" if local else "global" for local in cfg.layer_is_local]
    windows = {"global": NO_WINDOW, "local": cfg.sliding_window}
    rope = {"global": rope_sin_cos(positions_BxT, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                   long_rope_B)}
    rope["local"] = rope["global"]
    if cfg.local_rope_theta is not None:
      rope["local"] = rope_sin_cos(positions_BxT, cfg.head_dim, cfg.local_rope_theta, RopeScaling())
    # Without a cache the keys are the new tokens (S = T). With one they are all cache slots, the
    # new tokens' positions recorded first, as each layer writes its keys/values before attending.
    cache_pos_BxS = ring_pos_BxW = None
    if cache is not None:
      cache_pos_BxS = jax.lax.dynamic_update_slice(cache.pos, new_pos_BxT, (0, cache.index))
    if cache is None or prefill:
      k_pos_BxS, k_slot_S, q_slot_T = new_pos_BxT, jnp.arange(T), jnp.arange(T)
    else:
      k_pos_BxS, k_slot_S = cache_pos_BxS, jnp.arange(cache.max_len)
      q_slot_T = cache.index + jnp.arange(T)
    masks = {kind: attention_mask(positions_BxT, q_slot_T, k_pos_BxS, k_slot_S, windows[kind])
             for kind in dict.fromkeys(kinds)}
    ring = cache is not None and cache.ring_pos is not None
    if ring:
      ring_pos_BxW = ring_write(cache.ring_pos, new_pos_BxT, cache.index, axis=1)
      if not prefill:
        # A ringed layer attends over its ring as it was, then the new tokens: by position, as
        # slot order wraps around.
        keys_BxS = jnp.concatenate([cache.ring_pos, new_pos_BxT], axis=1)
        q, k = positions_BxT[:, :, None], keys_BxS[:, None, :]
        masks["local"] = (k >= 0) & (k <= q) & (q - k < cfg.sliding_window)

    x_BxTxD = self.embedding.encode(tokens_BxT)
    # Identity unless a 'perturbations' collection is passed: lets tests and analyses take
    # gradients with respect to the input embeddings.
    x_BxTxD = self.perturb("embeddings", x_BxTxD)
    x_BxTxD = sh.constrain(x_BxTxD, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED), self.mesh, self.rules)
    new_kv = []
    for i, (layer, kind) in enumerate(zip(self.layers, kinds)):
      cache_kv, index = (None, None) if cache is None else ((cache.k[i], cache.v[i]), cache.index)
      x_BxTxD, kv = layer(x_BxTxD, rope[kind], masks[kind], cache_kv, index, prefill,
                          ring and kind == "local")
      new_kv.append(kv)
    hidden_BxTxD = self.final_norm(x_BxTxD)

    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=tuple(k for k, _ in new_kv), v=tuple(v for _, v in new_kv),
                          pos=cache_pos_BxS, index=cache.index + T, ring_pos=ring_pos_BxW)
    if return_hidden:
      return hidden_BxTxD, new_cache
    return self.logits(hidden_BxTxD), new_cache

  def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
    """Projects final hidden states onto the vocabulary, with the final soft-cap.

    The matmul takes its operands in the compute dtype and accumulates and returns float32: a
    bfloat16 result would round every logit (by ~0.03 at |logit| ~ 20), and a sequence's log-prob,
    the self-reward, sums that error over hundreds of tokens.
    """
    if self.config.tie_embeddings:
      logits_BxTxV = self.embedding.attend(hidden_BxTxD)
    else:
      logits_BxTxV = self.lm_head(hidden_BxTxD)
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    cap = self.config.final_softcap
    if cap is not None:
      logits_BxTxV = cap * jnp.tanh(logits_BxTxV / cap)
    return sh.constrain(logits_BxTxV, (sh.BATCH, sh.LENGTH, sh.VOCAB), self.mesh, self.rules)


class _EmbeddingTable(nn.Module):
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.table = _param(self, "embedding", (cfg.vocab_size, cfg.embed_dim), (sh.VOCAB, sh.EMBED),
                        nn.initializers.normal(stddev=cfg.embed_dim**-0.5))

  def encode(self, tokens_BxT: jax.Array) -> jax.Array:
    dtype = jnp.dtype(self.config.dtype)
    # Clip: an out-of-range id (junk under a padding mask) must not become NaN, which masked
    # attention would spread to the row's real tokens through 0 * NaN.
    x_BxTxD = jnp.take(self.table, tokens_BxT, axis=0, mode="clip").astype(dtype)
    if self.config.embed_scale:
      # Gemma rounds the normalizer to the activation dtype before multiplying.
      x_BxTxD = x_BxTxD * jnp.asarray(self.config.embed_dim**0.5, dtype)
    return x_BxTxD

  def attend(self, hidden_BxTxD: jax.Array) -> jax.Array:
    dtype = jnp.dtype(self.config.dtype)
    return project(hidden_BxTxD.astype(dtype), self.table.astype(dtype).T,
                   preferred_element_type=jnp.float32)


class _LMHead(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, hidden_BxTxD: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    w = _param(self, "kernel", (cfg.embed_dim, cfg.vocab_size), (sh.EMBED, sh.VOCAB),
               nn.initializers.normal(stddev=cfg.embed_dim**-0.5))
    return project(hidden_BxTxD.astype(dtype), w.astype(dtype),
                   preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- param creation

def _boxed_init(model: Transformer):
  def init(rng):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, tokens)["params"]
  return init


def init_params(config: TransformerConfig, rng: jax.Array, mesh: Mesh | None = None,
                rules: sh.Rules = sh.TRAIN_RULES) -> Any:
  """Random parameters (a plain pytree), created directly in their sharded layout on ``mesh``."""
  return _compiled_init(config, mesh, rules)(rng)


@functools.lru_cache(maxsize=64)
def _compiled_init(config: TransformerConfig, mesh: Mesh | None, rules: sh.Rules):
  # Kept per (config, mesh, rules): tracing and compiling the init costs seconds, drawing another
  # seed with it milliseconds.
  return sh.sharded_init_fn(_boxed_init(Transformer(config)), mesh, rules, jax.random.key(0))[0]


def param_logical_names(config: TransformerConfig) -> Any:
  """Tree of logical axis-name tuples matching ``init_params``' output; computes nothing."""
  abstract = jax.eval_shape(_boxed_init(Transformer(config)), jax.random.key(0))
  return sh.logical_names(abstract)


def param_shapes(config: TransformerConfig) -> Any:
  """Tree of ``jax.ShapeDtypeStruct`` of the parameters; allocates nothing."""
  return nn.meta.unbox(jax.eval_shape(_boxed_init(Transformer(config)), jax.random.key(0)))


def param_shardings(config: TransformerConfig, mesh: Mesh, rules: sh.Rules = sh.TRAIN_RULES) -> Any:
  """``NamedSharding`` per parameter under ``rules``."""
  return sh.tree_shardings(param_logical_names(config), param_shapes(config), mesh, rules)


def count_params(config: TransformerConfig) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(param_shapes(config))))
