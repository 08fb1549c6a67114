"""One frozen config whose knobs span Gemma 2/3, Llama 3.x, Mistral, Phi-3/3.5 and Qwen 2.5/3.

Every field is validated at construction, and a bad value raises ``ValueError`` naming the field and
the value, so a typo in a preset or a checkpoint's config.json fails at load time, not inside jit.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from selfimprove_jax.families import FAMILIES

ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_KINDS = ("global", "local")
ROPE_KINDS = ("none", "linear", "llama3", "longrope")
DTYPES = ("float32", "bfloat16", "float16")


def _fail(field: str, value: Any, why: str) -> None:
  raise ValueError(f"{field}={value!r}: {why}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How rotary frequencies are rescaled for long context.

  kind:
    "none"     - plain RoPE.
    "linear"   - inverse frequencies divided by ``factor`` (Gemma 3 global layers).
    "llama3"   - Llama 3.1+ band-wise scaling: low frequencies divided by ``factor``, high ones kept,
                 a smooth ramp between ``low_freq_factor`` and ``high_freq_factor``.
    "longrope" - Phi-3/3.5 per-frequency factors: ``short_factor`` while every position is below
                 ``original_max_len``, ``long_factor`` beyond; cos/sin multiplied by
                 ``attention_factor`` (default sqrt(1 + ln(factor) / ln(original_max_len))).
  """

  kind: str = "none"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192
  short_factor: tuple[float, ...] = ()
  long_factor: tuple[float, ...] = ()
  attention_factor: float | None = None

  def __post_init__(self):
    if self.kind not in ROPE_KINDS:
      _fail("rope_scaling.kind", self.kind, f"must be one of {ROPE_KINDS}")
    if not self.factor > 0:
      _fail("rope_scaling.factor", self.factor, "must be > 0")
    if not isinstance(self.original_max_len, int) or self.original_max_len < 2:
      _fail("rope_scaling.original_max_len", self.original_max_len, "must be an int >= 2")
    if self.attention_factor is not None and not self.attention_factor > 0:
      _fail("rope_scaling.attention_factor", self.attention_factor, "must be > 0 or None")
    if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      _fail("rope_scaling.high_freq_factor", self.high_freq_factor,
            f"must exceed low_freq_factor={self.low_freq_factor}")
    if self.kind == "longrope" and len(self.short_factor) != len(self.long_factor):
      _fail("rope_scaling.long_factor", f"<{len(self.long_factor)} values>",
            f"must have as many values as short_factor ({len(self.short_factor)})")

  @property
  def longrope_attention_factor(self) -> float:
    if self.attention_factor is not None:
      return self.attention_factor
    if self.factor <= 1.0:
      return 1.0
    return math.sqrt(1.0 + math.log(self.factor) / math.log(self.original_max_len))


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Decoder-only transformer hyper-parameters.

  Attributes:
    family: one of ``FAMILIES``; picks tokenizer/chat format and checkpoint mapping, never math.
    vocab_size, embed_dim, num_layers, num_heads, num_kv_heads, head_dim, mlp_dim: sizes.
    activation: gate activation of the gated MLP ("silu" = SwiGLU, "gelu_tanh" = GeGLU).
    norm_eps: RMSNorm epsilon.
    norm_plus_one: RMSNorm multiplies by (1 + w) with w initialised to 0 (Gemma) instead of w.
    sandwich_norm: extra RMSNorm on the attention and MLP outputs before the residual add (Gemma 2/3).
    embed_scale: multiply token embeddings by sqrt(embed_dim) (Gemma).
    qkv_bias: bias on the q/k/v projections (Qwen 2.5).
    qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Gemma 3, Qwen 3).
    query_scale: queries are multiplied by query_scale**-0.5; None means head_dim (Gemma 2/3 set
      ``query_pre_attn_scalar`` here).
    attn_softcap, final_softcap: ``cap * tanh(x / cap)`` on attention / output logits (Gemma 2).
    rope_theta, rope_scaling: RoPE base and long-context scaling of global layers.
    local_rope_theta: RoPE base of sliding-window layers, which then use no scaling (Gemma 3); None
      means local layers share the global rope.
    sliding_window: keys further than this many positions back (query included) are masked on
      "local" layers: a query at position q sees keys k with 0 <= q - k < sliding_window.
    attention_pattern: layer kinds, cycled over the depth ("local"/"global"); Gemma 2 is
      ("local", "global"), Gemma 3 five locals then a global.
    tie_embeddings: output projection is the transposed input embedding.
    max_len: longest sequence the model was trained for (default KV-cache length).
    attention_block: queries per attention block in full-sequence and prefill calls: attention
      logits and probabilities exist for one block at a time (``layers.attend``); no effect on
      values. Not a checkpoint property.
    dtype: activation (compute) dtype; param_dtype: parameter storage dtype.
  """

  family: str
  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  activation: str = "silu"
  norm_eps: float = 1e-6
  norm_plus_one: bool = False
  sandwich_norm: bool = False
  embed_scale: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  query_scale: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling = RopeScaling()
  local_rope_theta: float | None = None
  sliding_window: int | None = None
  attention_pattern: tuple[str, ...] = ("global",)
  tie_embeddings: bool = False
  max_len: int = 8192
  attention_block: int = 512
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.family not in FAMILIES:
      _fail("family", self.family, f"must be one of {FAMILIES}")
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "mlp_dim", "max_len", "attention_block"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(name, value, "must be a positive int")
    if self.num_heads % self.num_kv_heads:
      _fail("num_kv_heads", self.num_kv_heads,
            f"must divide num_heads={self.num_heads} (grouped-query attention)")
    if self.head_dim % 2:
      _fail("head_dim", self.head_dim, "must be even (RoPE rotates pairs)")
    if self.activation not in ACTIVATIONS:
      _fail("activation", self.activation, f"must be one of {ACTIVATIONS}")
    if not self.norm_eps > 0:
      _fail("norm_eps", self.norm_eps, "must be > 0")
    for name in ("query_scale", "attn_softcap", "final_softcap", "local_rope_theta"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        _fail(name, value, "must be > 0 or None")
    if not self.rope_theta > 0:
      _fail("rope_theta", self.rope_theta, "must be > 0")
    if not isinstance(self.rope_scaling, RopeScaling):
      _fail("rope_scaling", self.rope_scaling, "must be a RopeScaling")
    if self.rope_scaling.kind == "longrope" and len(self.rope_scaling.short_factor) != self.head_dim // 2:
      _fail("rope_scaling.short_factor", f"<{len(self.rope_scaling.short_factor)} values>",
            f"longrope needs head_dim // 2 = {self.head_dim // 2} factors")
    if isinstance(self.attention_pattern, list):  # keep the frozen config hashable
      object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern))
    if not self.attention_pattern or any(k not in LAYER_KINDS for k in self.attention_pattern):
      _fail("attention_pattern", self.attention_pattern, f"must be a non-empty tuple of {LAYER_KINDS}")
    if "local" in self.attention_pattern:
      window = self.sliding_window
      if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        _fail("sliding_window", window, "local layers need a positive int window")
    elif self.sliding_window is not None:
      _fail("sliding_window", self.sliding_window,
            "is set but attention_pattern has no 'local' layer; use ('local',) for all-sliding models")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        _fail(name, getattr(self, name), f"must be one of {DTYPES}")

  @property
  def layer_is_local(self) -> tuple[bool, ...]:
    """Per layer: True where attention is sliding-window."""
    pattern = self.attention_pattern
    return tuple(pattern[i % len(pattern)] == "local" for i in range(self.num_layers))

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)
