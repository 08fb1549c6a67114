"""Hugging Face ``config.json`` <-> ``TransformerConfig``, one entry per supported architecture.

Import reads what ``transformers`` itself would read for the architecture: keys missing from the
file take the HF config class's default (``save_pretrained`` may drop keys equal to a default), RoPE
comes from ``rope_parameters`` (transformers 5) or the older ``rope_theta`` / ``rope_scaling`` /
``rope_local_base_freq`` keys. Anything the model cannot reproduce exactly (an unknown architecture,
yarn RoPE, biased output projections, partial rotary, bidirectional attention, quantized weights)
raises ``ValueError`` naming the key and its value, never a silent approximation.

Export writes every key explicitly in the transformers 5 layout, special token ids included
(``hf_special``), so the result does not depend on the reader's defaults.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from selfimprove_jax.checkpoint import hf_special
from selfimprove_jax.models.config import RopeScaling, TransformerConfig


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How one HF architecture is laid out.

  family: our family name. model_type / hf_class: what config.json names it. defaults: the HF config
  class's defaults for the keys we read. knobs: the architecture's fixed TransformerConfig knobs.
  """

  family: str
  model_type: str
  hf_class: str
  defaults: dict[str, Any]
  knobs: dict[str, Any]


_PLAIN = dict(activation="silu", norm_plus_one=False, sandwich_norm=False, embed_scale=False,
              qkv_bias=False, qk_norm=False, attn_softcap=None, final_softcap=None,
              local_rope_theta=None)
_GEMMA = dict(activation="gelu_tanh", norm_plus_one=True, sandwich_norm=True, embed_scale=True,
              qkv_bias=False)

# Defaults are copied from each HF config class (transformers 5.23), only for the keys read here.
ARCHITECTURES: dict[str, Architecture] = {a.family: a for a in (
    Architecture("llama3", "llama", "LlamaForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10_000.0, attention_bias=False, mlp_bias=False), _PLAIN),
    Architecture("mistral", "mistral", "MistralForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
        max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10_000.0, sliding_window=4096), _PLAIN),
    Architecture("phi3", "phi3", "Phi3ForCausalLM", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
        max_position_embeddings=4096, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_theta=10_000.0, sliding_window=None), _PLAIN),
    Architecture("qwen2", "qwen2", "Qwen2ForCausalLM", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=None, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10_000.0, use_sliding_window=False, sliding_window=4096, max_window_layers=28),
        {**_PLAIN, "qkv_bias": True}),
    Architecture("qwen3", "qwen3", "Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10_000.0, attention_bias=False, use_sliding_window=False, sliding_window=4096,
        max_window_layers=28), {**_PLAIN, "qk_norm": True}),
    Architecture("gemma2", "gemma2", "Gemma2ForCausalLM", dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_theta=10_000.0, attention_bias=False,
        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, use_bidirectional_attention=None, sliding_window_pattern=2),
        {**_GEMMA, "qk_norm": False, "local_rope_theta": None}),
    Architecture("gemma3", "gemma3_text", "Gemma3ForCausalLM", dict(
        vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=None, attn_logit_softcapping=None,
        use_bidirectional_attention=False, sliding_window_pattern=6),
        {**_GEMMA, "qk_norm": True}),
)}
_BY_CLASS = {a.hf_class: a for a in ARCHITECTURES.values()}
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}
# The multimodal Gemma 3 checkpoint: its text model is read, the vision tower is ignored.
MULTIMODAL_GEMMA3 = ("Gemma3ForConditionalGeneration", "gemma3")
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")
_SILU = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class HFLayout:
  """What import needs besides the config: where the text model's tensors live in the file."""

  architecture: Architecture
  multimodal: bool = False


def _bad(key: str, value: Any, why: str) -> ValueError:
  return ValueError(f"config.json {key}={value!r}: {why}")


def _architecture(hf: dict[str, Any]) -> tuple[Architecture, bool]:
  archs = hf.get("architectures") or []
  model_type = hf.get("model_type")
  names = list(archs) + [model_type]
  if MULTIMODAL_GEMMA3[0] in archs or (not archs and model_type == MULTIMODAL_GEMMA3[1]):
    return ARCHITECTURES["gemma3"], True
  for name in names:
    arch = _BY_CLASS.get(name) or _BY_MODEL_TYPE.get(name)
    if arch is not None:
      return arch, False
  supported = sorted(_BY_CLASS) + [MULTIMODAL_GEMMA3[0]]
  raise ValueError(f"config.json architectures={archs!r} (model_type={model_type!r}) is not a "
                   f"supported architecture; supported: {supported}")


def _rope_from_dict(rope: dict[str, Any], key: str, hf: dict[str, Any], max_len: int,
                    head_dim: int) -> RopeScaling:
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind in ("su", "yarn") and hf.get("model_type") == "phi3":
    kind = "longrope"  # transformers' own backward-compatible reading of old Phi-3 configs
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise _bad(f"{key}.partial_rotary_factor", rope["partial_rotary_factor"],
               "partial rotary embeddings are not supported")
  if kind == "default":
    return RopeScaling()
  if kind == "linear":
    return RopeScaling(kind="linear", factor=float(rope["factor"]))
  if kind == "llama3":
    return RopeScaling(kind="llama3", factor=float(rope["factor"]),
                       low_freq_factor=float(rope["low_freq_factor"]),
                       high_freq_factor=float(rope["high_freq_factor"]),
                       original_max_len=int(rope.get("original_max_position_embeddings", max_len)))
  if kind == "longrope":
    # Phi-3 keeps the pretraining length at top level, and transformers lets that one win.
    original = int(hf.get("original_max_position_embeddings")
                   or rope.get("original_max_position_embeddings") or max_len)
    factor = rope.get("factor") or max_len / original
    short, long = tuple(map(float, rope["short_factor"])), tuple(map(float, rope["long_factor"]))
    if len(short) != head_dim // 2:
      raise _bad(f"{key}.short_factor", f"<{len(short)} values>", f"needs head_dim // 2 = {head_dim // 2}")
    attention = rope.get("attention_factor")
    return RopeScaling(kind="longrope", factor=float(factor), original_max_len=original,
                       short_factor=short, long_factor=long,
                       attention_factor=None if attention is None else float(attention))
  raise _bad(f"{key}.rope_type", kind, "supported RoPE types are default, linear, llama3, longrope")


def _rope(hf: dict[str, Any], get, arch: Architecture, max_len: int, head_dim: int):
  """(rope_theta, rope_scaling, local_rope_theta) from either the new or the old key layout."""
  params = hf.get("rope_parameters")
  legacy = hf.get("rope_scaling")
  if arch.family == "gemma3":
    params = dict(params or {})
    nested = "full_attention" in params or "sliding_attention" in params
    full = dict(params.get("full_attention") or {}) if nested else dict(params)
    local = dict(params.get("sliding_attention") or {}) if nested else {}
    full.update(legacy or {})
    if full.get("rope_theta") is None:
      full["rope_theta"] = get("rope_theta") or arch.defaults["rope_theta"]
    if local.get("rope_theta") is None:
      local["rope_theta"] = get("rope_local_base_freq") or arch.defaults["rope_local_base_freq"]
    if local.get("rope_type", local.get("type", "default")) != "default":
      raise _bad("rope_parameters.sliding_attention.rope_type", local.get("rope_type"),
                 "local layers must use plain RoPE")
    return (float(full["rope_theta"]),
            _rope_from_dict(full, "rope_parameters.full_attention", hf, max_len, head_dim),
            float(local["rope_theta"]))
  rope = dict(legacy or params or {})
  if rope.get("rope_theta") is None:
    rope["rope_theta"] = (params or {}).get("rope_theta") or get("rope_theta") or arch.defaults["rope_theta"]
  key = "rope_scaling" if legacy else "rope_parameters"
  return float(rope["rope_theta"]), _rope_from_dict(rope, key, hf, max_len, head_dim), None


def _compress(kinds: list[str]) -> tuple[str, ...]:
  """The shortest pattern whose cycle reproduces ``kinds`` layer by layer."""
  for period in range(1, len(kinds) + 1):
    if all(kinds[i] == kinds[i % period] for i in range(len(kinds))):
      return tuple(kinds[:period])
  raise AssertionError("unreachable: the full list is its own period")


def _layer_kinds(hf: dict[str, Any], get, arch: Architecture,
                 num_layers: int) -> tuple[list[str], int | None]:
  """Per-layer "local"/"global" kinds and the sliding window (None when no layer slides)."""
  window = get("sliding_window")
  if arch.family in ("qwen2", "qwen3") and not get("use_sliding_window"):
    window = None
  if arch.family in ("mistral", "phi3", "llama3"):
    if arch.family == "llama3" and hf.get("sliding_window"):
      raise _bad("sliding_window", hf["sliding_window"], "Llama has no sliding-window attention")
    return (["local" if window else "global"] * num_layers), window
  types = hf.get("layer_types")
  if types is None:
    if arch.family in ("qwen2", "qwen3"):
      first = get("max_window_layers")
      types = ["sliding_attention" if window is not None and i >= first else "full_attention"
               for i in range(num_layers)]
    else:
      period = int(get("sliding_window_pattern"))
      types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]
  if len(types) != num_layers:
    raise _bad("layer_types", types, f"needs one entry per layer (num_hidden_layers={num_layers})")
  kinds = []
  for i, t in enumerate(types):
    if t not in ("sliding_attention", "full_attention"):
      raise _bad(f"layer_types[{i}]", t, "must be 'sliding_attention' or 'full_attention'")
    kinds.append("local" if t == "sliding_attention" else "global")
  if "local" in kinds and not window:
    raise _bad("sliding_window", window, "sliding_attention layers need a positive window")
  return kinds, window if "local" in kinds else None


def config_from_hf(hf: dict[str, Any], *, dtype: str = "float32") -> tuple[TransformerConfig, HFLayout]:
  """Builds our config from a parsed HF ``config.json``.

  Args:
    hf: the parsed file.
    dtype: parameter and activation dtype of the result ("float32" or "bfloat16").
  Returns:
    (config, layout).
  Raises:
    ValueError: unsupported architecture or field, naming the key and value.
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: must be 'float32' or 'bfloat16'")
  arch, multimodal = _architecture(hf)
  top = hf
  if multimodal:
    if not isinstance(hf.get("text_config"), dict):
      raise _bad("text_config", hf.get("text_config"), "a Gemma 3 multimodal config needs a text_config dict")
    hf = dict(hf["text_config"])
    hf.setdefault("model_type", arch.model_type)
    if "tie_word_embeddings" in top:
      hf["tie_word_embeddings"] = top["tie_word_embeddings"]
  if hf.get("quantization_config"):
    raise _bad("quantization_config", hf["quantization_config"], "quantized checkpoints are not supported")

  def get(key):
    # An explicit null is meaningful (no sliding window, no soft-cap); only a missing key defaults.
    return hf[key] if key in hf else arch.defaults.get(key)

  for key in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
    if key in arch.defaults and get(key):
      raise _bad(key, hf[key], f"not supported for {arch.hf_class}")
  act_key = "hidden_activation" if arch.family.startswith("gemma") else "hidden_act"
  allowed = _GELU_TANH if arch.family.startswith("gemma") else _SILU
  if get(act_key) not in allowed:
    raise _bad(act_key, get(act_key), f"{arch.hf_class} import supports {allowed}")

  num_layers, num_heads = int(get("num_hidden_layers")), int(get("num_attention_heads"))
  head_dim = int(get("head_dim") or get("hidden_size") // num_heads)
  max_len = int(get("max_position_embeddings"))
  rope_theta, rope_scaling, local_theta = _rope(hf, get, arch, max_len, head_dim)
  kinds, window = _layer_kinds(hf, get, arch, num_layers)
  knobs = dict(arch.knobs)
  if arch.family.startswith("gemma"):
    knobs.update(query_scale=float(get("query_pre_attn_scalar")),
                 attn_softcap=get("attn_logit_softcapping"), final_softcap=get("final_logit_softcapping"))
  if arch.family == "gemma3":
    knobs["local_rope_theta"] = local_theta
  config = TransformerConfig(
      family=arch.family, vocab_size=int(get("vocab_size")), embed_dim=int(get("hidden_size")),
      num_layers=num_layers, num_heads=num_heads,
      num_kv_heads=int(get("num_key_value_heads") or num_heads), head_dim=head_dim,
      mlp_dim=int(get("intermediate_size")), norm_eps=float(get("rms_norm_eps")),
      rope_theta=rope_theta, rope_scaling=rope_scaling, sliding_window=window,
      attention_pattern=_compress(kinds), tie_embeddings=bool(get("tie_word_embeddings")),
      max_len=max_len, dtype=dtype, param_dtype=dtype, **knobs)
  return config, HFLayout(architecture=arch, multimodal=multimodal)


def _rope_to_dict(theta: float, scaling: RopeScaling) -> dict[str, Any]:
  out: dict[str, Any] = {"rope_type": "default" if scaling.kind == "none" else scaling.kind,
                         "rope_theta": theta}
  if scaling.kind == "linear":
    out["factor"] = scaling.factor
  elif scaling.kind == "llama3":
    out.update(factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
               high_freq_factor=scaling.high_freq_factor,
               original_max_position_embeddings=scaling.original_max_len)
  elif scaling.kind == "longrope":
    out.update(factor=scaling.factor, short_factor=list(scaling.short_factor),
               long_factor=list(scaling.long_factor),
               original_max_position_embeddings=scaling.original_max_len)
    if scaling.attention_factor is not None:
      out["attention_factor"] = scaling.attention_factor
  return out


def config_to_hf(config: TransformerConfig, *, dtype: str | None = None,
                 special_ids: dict[str, Any] | None = None) -> dict[str, Any]:
  """The ``config.json`` dict that makes ``transformers`` build this model as its original family.

  Args:
    config: the model.
    dtype: the stored weights' dtype name (default ``config.param_dtype``).
    special_ids: the ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` entries; None writes
      the family's published ids that fit the vocabulary (``hf_special.from_family``).
  Raises:
    ValueError: a knob the family's HF architecture cannot express, naming the field.
  """
  arch = ARCHITECTURES[config.family]
  for knob, expected in arch.knobs.items():
    if knob == "local_rope_theta" and arch.family == "gemma3":
      continue
    if getattr(config, knob) != expected:
      raise ValueError(f"config.{knob}={getattr(config, knob)!r} cannot be written as "
                       f"{arch.hf_class}, which has {knob}={expected!r}")
  if not config.family.startswith("gemma") and config.query_scale not in (None, config.head_dim):
    raise ValueError(f"config.query_scale={config.query_scale!r} cannot be written as {arch.hf_class}, "
                     f"which scales queries by head_dim={config.head_dim}")
  kinds = ["local" if local else "global" for local in config.layer_is_local]
  out: dict[str, Any] = {
      "architectures": [arch.hf_class], "model_type": arch.model_type,
      "vocab_size": config.vocab_size, "hidden_size": config.embed_dim,
      "intermediate_size": config.mlp_dim, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "rms_norm_eps": config.norm_eps,
      "max_position_embeddings": config.max_len, "tie_word_embeddings": config.tie_embeddings,
      "dtype": dtype or config.param_dtype,
  }
  out.update(hf_special.from_family(config.family, config.vocab_size) if special_ids is None
             else special_ids)
  rope = _rope_to_dict(config.rope_theta, config.rope_scaling)
  if config.family in ("llama3", "mistral", "phi3"):
    if len(set(kinds)) > 1 or (config.family == "llama3" and "local" in kinds):
      raise ValueError(f"config.attention_pattern={config.attention_pattern!r} cannot be written as "
                       f"{arch.hf_class}: it needs every layer "
                       f"{'global' if config.family == 'llama3' else 'local, or every layer global'}")
    out.update(hidden_act="silu", rope_parameters=rope)
    if config.family == "llama3":
      out.update(attention_bias=False, mlp_bias=False)
    else:
      out["sliding_window"] = config.sliding_window
    if config.family == "phi3":
      out["rope_parameters"]["partial_rotary_factor"] = 1.0
      if config.rope_scaling.kind == "longrope":
        out["original_max_position_embeddings"] = config.rope_scaling.original_max_len
    return out
  layer_types = ["sliding_attention" if k == "local" else "full_attention" for k in kinds]
  out.update(layer_types=layer_types, sliding_window=config.sliding_window)
  if config.family in ("qwen2", "qwen3"):
    out.update(hidden_act="silu", rope_parameters=rope, use_sliding_window="local" in kinds,
               max_window_layers=kinds.index("local") if "local" in kinds else config.num_layers)
    if config.family == "qwen3":
      out["attention_bias"] = False
    return out
  out.update(hidden_activation="gelu_pytorch_tanh",
             query_pre_attn_scalar=_int_if_whole(config.query_scale or config.head_dim),
             attn_logit_softcapping=config.attn_softcap, final_logit_softcapping=config.final_softcap,
             attention_bias=False, use_bidirectional_attention=False)
  if config.family == "gemma2":
    out["rope_parameters"] = rope
  else:
    # Without a separate local theta our local layers share the global rope, scaling included.
    local = rope if config.local_rope_theta is None else _rope_to_dict(config.local_rope_theta, RopeScaling())
    out["rope_parameters"] = {"full_attention": rope, "sliding_attention": dict(local)}
  return out


def _int_if_whole(x: float) -> int | float:
  # HF declares query_pre_attn_scalar an int and validates types strictly on load.
  return int(x) if float(x).is_integer() else x
