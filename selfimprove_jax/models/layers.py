"""The transformer's building blocks, written once and shared by every family.

Einsum legend: B batch, T query length, S key length (cache slots), D embed_dim, H query heads,
K kv heads, G = H // K query heads per kv head, F head_dim, M mlp_dim, R = F // 2 rotary pairs.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from selfimprove_jax import sharding as sh
from selfimprove_jax.models.config import RopeScaling, TransformerConfig

# Masked attention logits get this instead of -inf so a fully masked row (a padding query) does not
# produce NaN; its probabilities are then zeroed, so it attends to nothing (not uniformly to all).
_MASKED = float(np.finfo(np.float32).min)
# Window used for global layers: larger than any sequence.
NO_WINDOW = 2**30


def _param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str, ...], init) -> jax.Array:
  dtype = jnp.dtype(module.config.param_dtype)
  return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def project(x: jax.Array, w: jax.Array, num_in: int = 1,
            preferred_element_type: jnp.dtype | None = None) -> jax.Array:
  """Contracts the last ``num_in`` axes of ``x`` (..., *in) with the first of ``w`` (*in, *out).

  Computed as one 2-D matmul over flattened rows: on XLA:CPU the backward pass of a batched
  einsum such as ``btd,dm->btm`` transposed its activations for the weight gradient and ran about
  2x slower than the same product on (B*T, D) rows. Merging a sharded major axis with unsharded
  minor ones keeps every sharding, so the mesh layout is unchanged. ``preferred_element_type``:
  the accumulation and result dtype (e.g. float32 logits from bfloat16 operands).
  """
  lead, contract, out = x.shape[:x.ndim - num_in], w.shape[:num_in], w.shape[num_in:]
  rows = x.reshape(int(np.prod(lead)), int(np.prod(contract)))
  w2 = w.reshape(int(np.prod(contract)), int(np.prod(out)))
  if preferred_element_type is None or jnp.dtype(preferred_element_type) == rows.dtype:
    y = rows @ w2
  else:
    y = _accumulating_matmul(rows, w2, jnp.dtype(preferred_element_type))
  return y.reshape(*lead, *out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _accumulating_matmul(x_NxI: jax.Array, w_IxO: jax.Array, out_dtype) -> jax.Array:
  """x @ w accumulated and returned in ``out_dtype``; the backward pass multiplies in the
  operands' dtype too (the incoming gradient cast down, products accumulated in ``out_dtype``),
  so a bfloat16 model never runs a float32 matmul."""
  return jnp.matmul(x_NxI, w_IxO, preferred_element_type=out_dtype)


def _accumulating_matmul_fwd(x_NxI, w_IxO, out_dtype):
  return _accumulating_matmul(x_NxI, w_IxO, out_dtype), (x_NxI, w_IxO)


def _accumulating_matmul_bwd(out_dtype, residuals, g_NxO):
  x_NxI, w_IxO = residuals
  g_NxO = g_NxO.astype(x_NxI.dtype)
  dx = jnp.matmul(g_NxO, w_IxO.T, preferred_element_type=out_dtype).astype(x_NxI.dtype)
  dw = jnp.matmul(x_NxI.T, g_NxO, preferred_element_type=out_dtype).astype(w_IxO.dtype)
  return dx, dw


_accumulating_matmul.defvjp(_accumulating_matmul_fwd, _accumulating_matmul_bwd)


def dense(module: nn.Module, x: jax.Array, w: jax.Array, name: str, num_in: int = 1) -> jax.Array:
  """``project(x, w)`` plus, when the ``lora`` collection holds an adapter for ``name``, its
  low-rank term (x·A)·B computed beside the frozen kernel: no merged copy of W, and the backward
  pass forms only the small gradients of A and B. A and B arrive already scaled (see
  ``transformer.variables``)."""
  y = project(x, w, num_in)
  if module.has_variable("lora", name):
    adapter = module.get_variable("lora", name)
    h = project(x, adapter["lora_a"].astype(x.dtype), num_in)
    y = y + project(h, adapter["lora_b"].astype(x.dtype))
  return y


def _fan_in_init(fan_in: int):
  return nn.initializers.normal(stddev=fan_in**-0.5)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, computed in float32; scale is ``w`` or ``1 + w`` (Gemma)."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    plus_one = self.config.norm_plus_one
    init = nn.initializers.zeros if plus_one else nn.initializers.ones
    scale = _param(self, "scale", (x.shape[-1],), (sh.NORM,), init).astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps)
    return (normed * (1.0 + scale if plus_one else scale)).astype(x.dtype)


# ----------------------------------------------------------------------------------------- RoPE

def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[np.ndarray, np.ndarray]:
  """Inverse frequencies (R,) for short and long contexts (equal unless scaling is longrope)."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
  inv = 1.0 / theta**exponents
  if scaling.kind == "linear":
    inv = inv / scaling.factor
  elif scaling.kind == "llama3":
    wavelen = 2 * np.pi / inv
    low_wavelen = scaling.original_max_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_len / scaling.high_freq_factor
    smooth = ((scaling.original_max_len / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    ramp = (1 - smooth) * inv / scaling.factor + smooth * inv
    inv = np.where(wavelen > low_wavelen, inv / scaling.factor,
                   np.where(wavelen < high_wavelen, inv, ramp))
  elif scaling.kind == "longrope":
    return (inv / np.asarray(scaling.short_factor)).astype(np.float32), (
        inv / np.asarray(scaling.long_factor)).astype(np.float32)
  inv = inv.astype(np.float32)
  return inv, inv


def rope_sin_cos(positions_BxT: jax.Array, head_dim: int, theta: float, scaling: RopeScaling,
                 long_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """sin and cos tables (B, T, R) in float32 for the given positions.

  For longrope a row uses the long-context frequencies at every position of the call when
  ``long_B`` (bool (B,)) says so, or, with ``long_B`` None, when any of its positions reaches
  ``original_max_len`` (its length passes it, the rule ``transformers`` applies to the whole
  batch). Decided on device per call and per row, so a row's scores do not depend on its
  batch-mates, and a decode step crossing the boundary switches without recompiling; keys cached
  by earlier calls keep their rotation (``models.longrope`` recomputes them at a crossing).
  ``long_B`` is ignored by the other kinds.
  """
  short, long = rope_inv_freq(head_dim, theta, scaling)
  inv_Bx1xR = jnp.asarray(short)[None, None, :]
  scale = 1.0
  if scaling.kind == "longrope":
    if long_B is None:
      long_B = jnp.max(positions_BxT, axis=-1) + 1 > scaling.original_max_len
    use_long_Bx1x1 = jnp.asarray(long_B, bool)[:, None, None]
    inv_Bx1xR = jnp.where(use_long_Bx1x1, jnp.asarray(long), inv_Bx1xR)
    scale = scaling.longrope_attention_factor
  angles_BxTxR = positions_BxT.astype(jnp.float32)[..., None] * inv_Bx1xR
  return jnp.sin(angles_BxTxR) * scale, jnp.cos(angles_BxTxR) * scale


def apply_rope(x_BxTxNxF: jax.Array, sin_BxTxR: jax.Array, cos_BxTxR: jax.Array) -> jax.Array:
  """Rotates the two halves of the feature axis (the Hugging Face / Gemma layout)."""
  x1, x2 = jnp.split(x_BxTxNxF.astype(jnp.float32), 2, axis=-1)
  sin, cos = sin_BxTxR[:, :, None, :], cos_BxTxR[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxF.dtype)


# ---------------------------------------------------------------------------------------- masks

def attention_mask(q_pos_BxT: jax.Array, q_slot_T: jax.Array, k_pos_BxS: jax.Array,
                   k_slot_S: jax.Array, window: int | jax.Array) -> jax.Array:
  """Boolean (B, T, S): which key slots each query may attend to.

  A key is visible when it holds a real token (``k_pos >= 0``; padding and empty cache slots carry
  -1), is not in the query's future (by slot, so causality holds whatever the positions), and lies
  within the window by position: ``q_pos - k_pos < window``.
  """
  valid = (k_pos_BxS >= 0)[:, None, :]
  causal = (k_slot_S[None, :] <= q_slot_T[:, None])[None]
  in_window = (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]) < window
  return valid & causal & in_window


# ------------------------------------------------------------------------------------ attention

def ring_write(buf: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
  """Writes the T entries of ``new`` (along ``axis``) for tokens ``index .. index + T - 1`` into
  the ring ``buf`` of W slots, token t in slot t mod W; of more than W tokens, the last W."""
  T, W = new.shape[axis], buf.shape[axis]
  keep = min(T, W)
  new = jax.lax.slice_in_dim(new, T - keep, T, axis=axis)
  slots = (index + (T - keep) + jnp.arange(keep)) % W
  return buf.at[(slice(None),) * axis + (slots,)].set(new.astype(buf.dtype))


def attend(q_BxTxKxGxF: jax.Array, k_BxKxSxF: jax.Array, v_BxKxSxF: jax.Array,
           mask_BxTxS: jax.Array, *, softcap: float | None, block: int) -> jax.Array:
  """Softmax attention of T queries over S keys, ``block`` queries at a time: (B, T, K, G, F).

  The softmax runs in float32; only one block's (B, K, G, block, S) logits and probabilities
  exist at a time. Each block is rematerialized in the backward
  pass, so training keeps no probabilities either. Query rows are independent, so blocking
  changes no value. Masked keys get probability 0 (a fully masked query attends to nothing).
  """
  B, T, K, G, F = q_BxTxKxGxF.shape
  dtype = q_BxTxKxGxF.dtype

  def one(args):
    q_BxCxKxGxF, mask_BxCxS = args
    logits_BxKxGxCxS = jnp.einsum("bckgf,bksf->bkgcs", q_BxCxKxGxF,
                                  k_BxKxSxF).astype(jnp.float32)
    if softcap is not None:
      logits_BxKxGxCxS = softcap * jnp.tanh(logits_BxKxGxCxS / softcap)
    mask = mask_BxCxS[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, logits_BxKxGxCxS, _MASKED), axis=-1)
    probs = jnp.where(mask, probs, 0.0).astype(dtype)
    # Batch dims (b, k) lead in operands and output: XLA:CPU then uses its fast batched-matmul
    # kernel (an output of "bckgf" made it fall back to a generic dot, ~8x slower when decoding).
    out_BxKxGxCxF = jnp.einsum("bkgcs,bksf->bkgcf", probs, v_BxKxSxF)
    return jnp.transpose(out_BxKxGxCxF, (0, 3, 1, 2, 4))

  if T <= block:
    return one((q_BxTxKxGxF, mask_BxTxS))
  n = -(-T // block)
  pad = n * block - T
  q = jnp.pad(q_BxTxKxGxF, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
  mask = jnp.pad(mask_BxTxS, ((0, 0), (0, pad), (0, 0)))
  q_NxBxCxKxGxF = jnp.moveaxis(q.reshape(B, n, block, K, G, F), 1, 0)
  mask_NxBxCxS = jnp.moveaxis(mask.reshape(B, n, block, -1), 1, 0)
  out = jax.lax.map(jax.checkpoint(one), (q_NxBxCxKxGxF, mask_NxBxCxS))
  return jnp.moveaxis(out, 0, 1).reshape(B, n * block, K, G, F)[:, :T]


class Attention(nn.Module):
  """Grouped-query attention with optional qkv bias, QK-norm, query scaling and logit soft-cap."""

  config: TransformerConfig
  mesh: Mesh | None
  rules: sh.Rules

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, sin_cos: tuple[jax.Array, jax.Array], mask_BxTxS: jax.Array,
               cache_kv: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | None = None,
               prefill: bool = False, ring: bool = False):
    """Attends from the T new tokens to the S visible keys.

    Without a cache the keys are the new tokens themselves (S = T). With a cache, this layer's
    buffers ``cache_kv`` (each (B, K, S, F), S the cache length) first receive the new keys and
    values at slots ``[cache_index, cache_index + T)``, then the new tokens attend over the whole
    buffer. Writing before reading leaves the old buffer with no other reader, so inside a decode
    loop XLA updates it in place instead of copying it every step. ``prefill``: the cache was empty,
    so the new tokens attend over themselves only (S = T) while their keys and values are stored.
    ``ring``: the buffers are a sliding window's ring of W slots (``transformer.ring_write``); the
    new tokens attend over the ring as it was plus themselves (S = W + T), then are written.

    Returns:
      (out_BxTxD, updated (k, v) buffers, or None without a cache).
    """
    cfg = self.config
    D, H, K, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    B, T, _ = x_BxTxD.shape
    dtype = jnp.dtype(cfg.dtype)
    init = _fan_in_init(D)
    w_q = _param(self, "q_proj", (D, H, F), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), init)
    w_k = _param(self, "k_proj", (D, K, F), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), init)
    w_v = _param(self, "v_proj", (D, K, F), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), init)
    w_o = _param(self, "o_proj", (H, F, D), (sh.HEADS, sh.HEAD_DIM, sh.EMBED), _fan_in_init(H * F))
    x = x_BxTxD.astype(dtype)
    q_BxTxHxF = dense(self, x, w_q.astype(dtype), "q_proj")
    k_BxTxKxF = dense(self, x, w_k.astype(dtype), "k_proj")
    v_BxTxKxF = dense(self, x, w_v.astype(dtype), "v_proj")
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q_BxTxHxF += _param(self, "q_bias", (H, F), (sh.HEADS, sh.HEAD_DIM), zeros).astype(dtype)
      k_BxTxKxF += _param(self, "k_bias", (K, F), (sh.KV_HEADS, sh.HEAD_DIM), zeros).astype(dtype)
      v_BxTxKxF += _param(self, "v_bias", (K, F), (sh.KV_HEADS, sh.HEAD_DIM), zeros).astype(dtype)
    if cfg.qk_norm:
      q_BxTxHxF = RMSNorm(cfg, name="q_norm")(q_BxTxHxF)
      k_BxTxKxF = RMSNorm(cfg, name="k_norm")(k_BxTxKxF)
    q_BxTxHxF = apply_rope(q_BxTxHxF, *sin_cos)
    k_BxTxKxF = apply_rope(k_BxTxKxF, *sin_cos)
    q_BxTxHxF = q_BxTxHxF * jnp.asarray((cfg.query_scale or F) ** -0.5, dtype)
    q_BxTxHxF = sh.constrain(q_BxTxHxF, (sh.BATCH, sh.LENGTH, sh.HEADS, sh.HEAD_DIM), self.mesh, self.rules)
    q_BxTxKxGxF = q_BxTxHxF.reshape(B, T, K, H // K, F)

    # Keys and values as (B, K, S, F): each (b, k) block is contiguous, so the dots read a cache
    # buffer in place.
    k_BxKxSxF, v_BxKxSxF = jnp.swapaxes(k_BxTxKxF, 1, 2), jnp.swapaxes(v_BxTxKxF, 1, 2)
    new_cache = None
    if cache_kv is not None and ring:
      new_cache = tuple(ring_write(buf, new, cache_index, axis=2)
                        for buf, new in zip(cache_kv, (k_BxKxSxF, v_BxKxSxF)))
      if not prefill:
        k_BxKxSxF, v_BxKxSxF = (jnp.concatenate([buf.astype(dtype), new], axis=2)
                                for buf, new in zip(cache_kv, (k_BxKxSxF, v_BxKxSxF)))
    elif cache_kv is not None:
      at = (0, 0, cache_index, 0)
      new_cache = tuple(jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), at)
                        for buf, new in zip(cache_kv, (k_BxKxSxF, v_BxKxSxF)))
      if not prefill:
        k_BxKxSxF, v_BxKxSxF = (buf.astype(dtype) for buf in new_cache)

    out_BxTxKxGxF = attend(q_BxTxKxGxF, k_BxKxSxF, v_BxKxSxF, mask_BxTxS,
                           softcap=cfg.attn_softcap, block=cfg.attention_block)
    out_BxTxHxF = out_BxTxKxGxF.reshape(B, T, H, F)
    return dense(self, out_BxTxHxF, w_o.astype(dtype), "o_proj", num_in=2), new_cache


class GatedMLP(nn.Module):
  """``down(act(gate(x)) * up(x))``: SwiGLU with silu, GeGLU with tanh-approximated gelu."""

  config: TransformerConfig
  mesh: Mesh | None
  rules: sh.Rules

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.config
    D, M = cfg.embed_dim, cfg.mlp_dim
    dtype = jnp.dtype(cfg.dtype)
    w_gate = _param(self, "gate_proj", (D, M), (sh.EMBED, sh.MLP), _fan_in_init(D))
    w_up = _param(self, "up_proj", (D, M), (sh.EMBED, sh.MLP), _fan_in_init(D))
    w_down = _param(self, "down_proj", (M, D), (sh.MLP, sh.EMBED), _fan_in_init(M))
    x = x_BxTxD.astype(dtype)
    gate_BxTxM = dense(self, x, w_gate.astype(dtype), "gate_proj")
    up_BxTxM = dense(self, x, w_up.astype(dtype), "up_proj")
    act = jax.nn.silu if cfg.activation == "silu" else lambda z: jax.nn.gelu(z, approximate=True)
    hidden_BxTxM = sh.constrain(act(gate_BxTxM) * up_BxTxM, (sh.BATCH, sh.LENGTH, sh.MLP),
                                self.mesh, self.rules)
    return dense(self, hidden_BxTxM, w_down.astype(dtype), "down_proj")


class Block(nn.Module):
  """Pre-norm decoder layer, with Gemma's extra post-norms when ``sandwich_norm``.

  The caller passes the rope tables and mask of this layer's attention kind (local or global)
  and, with a cache, this layer's (k, v) buffers. Returns the new hidden states and the updated
  buffers (None without a cache).
  """

  config: TransformerConfig
  mesh: Mesh | None
  rules: sh.Rules

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, sin_cos: tuple[jax.Array, jax.Array], mask_BxTxS: jax.Array,
               cache_kv: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | None = None,
               prefill: bool = False, ring: bool = False):
    cfg = self.config
    h = RMSNorm(cfg, name="pre_attn_norm")(x_BxTxD)
    h, new_kv = Attention(cfg, self.mesh, self.rules, name="attn")(h, sin_cos, mask_BxTxS, cache_kv,
                                                                   cache_index, prefill, ring)
    if cfg.sandwich_norm:
      h = RMSNorm(cfg, name="post_attn_norm")(h)
    x_BxTxD = x_BxTxD + h.astype(x_BxTxD.dtype)

    h = RMSNorm(cfg, name="pre_ffw_norm")(x_BxTxD)
    h = GatedMLP(cfg, self.mesh, self.rules, name="mlp")(h)
    if cfg.sandwich_norm:
      h = RMSNorm(cfg, name="post_ffw_norm")(h)
    x_BxTxD = x_BxTxD + h.astype(x_BxTxD.dtype)
    x_BxTxD = sh.constrain(x_BxTxD, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED), self.mesh, self.rules)
    return x_BxTxD, new_kv
