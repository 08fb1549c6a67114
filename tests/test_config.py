"""Config validation: every check in __post_init__ rejects a bad value and names field and value."""
import dataclasses
import re

import pytest

from selfimprove_jax.models import PRESETS, RopeScaling, tiny_config

LLAMA = tiny_config("llama3")  # heads 4, kv_heads 2, head_dim 16, rope kind "llama3", no local layers
PHI = tiny_config("phi3")      # longrope with 8 factors, all layers local with a window of 6


def _rope(**changes):
  return dataclasses.replace(LLAMA.rope_scaling, **changes)


# (expected start of the message: "field=value as printed:", function building the bad config)
BAD_CONFIGS = {
    "unknown_family": ("family='gpt2':", lambda: LLAMA.replace(family="gpt2")),
    "zero_vocab": ("vocab_size=0:", lambda: LLAMA.replace(vocab_size=0)),
    "negative_embed": ("embed_dim=-64:", lambda: LLAMA.replace(embed_dim=-64)),
    "float_mlp": ("mlp_dim=128.0:", lambda: LLAMA.replace(mlp_dim=128.0)),
    "bool_layers": ("num_layers=True:", lambda: LLAMA.replace(num_layers=True)),
    "str_heads": ("num_heads='4':", lambda: LLAMA.replace(num_heads="4")),
    "zero_kv_heads": ("num_kv_heads=0:", lambda: LLAMA.replace(num_kv_heads=0)),
    "zero_head_dim": ("head_dim=0:", lambda: LLAMA.replace(head_dim=0)),
    "zero_max_len": ("max_len=0:", lambda: LLAMA.replace(max_len=0)),
    "kv_heads_not_dividing": ("num_kv_heads=3: must divide num_heads=4",
                              lambda: LLAMA.replace(num_kv_heads=3)),
    "odd_head_dim": ("head_dim=15:", lambda: LLAMA.replace(head_dim=15)),
    "bad_activation": ("activation='relu':", lambda: LLAMA.replace(activation="relu")),
    "zero_eps": ("norm_eps=0.0:", lambda: LLAMA.replace(norm_eps=0.0)),
    "negative_eps": ("norm_eps=-1e-06:", lambda: LLAMA.replace(norm_eps=-1e-6)),
    "nan_eps": ("norm_eps=nan:", lambda: LLAMA.replace(norm_eps=float("nan"))),
    "negative_query_scale": ("query_scale=-24.0:", lambda: LLAMA.replace(query_scale=-24.0)),
    "negative_attn_softcap": ("attn_softcap=-50.0:", lambda: LLAMA.replace(attn_softcap=-50.0)),
    "zero_final_softcap": ("final_softcap=0.0:", lambda: LLAMA.replace(final_softcap=0.0)),
    "zero_local_rope_theta": ("local_rope_theta=0.0:", lambda: LLAMA.replace(local_rope_theta=0.0)),
    "zero_rope_theta": ("rope_theta=0.0:", lambda: LLAMA.replace(rope_theta=0.0)),
    "nan_rope_factor": ("rope_scaling.factor=nan:", lambda: _rope(kind="linear", factor=float("nan"))),
    "tiny_original_max_len": ("rope_scaling.original_max_len=1:",
                              lambda: _rope(kind="longrope", factor=4.0, original_max_len=1)),
    "negative_attention_factor": ("rope_scaling.attention_factor=-1.0:",
                                  lambda: _rope(attention_factor=-1.0)),
    "float_window": ("sliding_window=2.5:", lambda: PHI.replace(sliding_window=2.5)),
    "bool_window": ("sliding_window=True:", lambda: PHI.replace(sliding_window=True)),
    "rope_scaling_not_dataclass": ("rope_scaling={'kind': 'linear'}:",
                                   lambda: LLAMA.replace(rope_scaling={"kind": "linear"})),
    "bad_rope_kind": ("rope_scaling.kind='yarn':", lambda: _rope(kind="yarn")),
    "zero_rope_factor": ("rope_scaling.factor=0.0:", lambda: _rope(factor=0.0)),
    "llama3_high_equals_low": ("rope_scaling.high_freq_factor=4.0: must exceed low_freq_factor=4.0",
                               lambda: _rope(low_freq_factor=4.0, high_freq_factor=4.0)),
    "llama3_high_below_low": ("rope_scaling.high_freq_factor=1.0: must exceed low_freq_factor=2.0",
                              lambda: _rope(low_freq_factor=2.0, high_freq_factor=1.0)),
    "longrope_long_short_mismatch": (
        "rope_scaling.long_factor='<7 values>':",
        lambda: dataclasses.replace(PHI.rope_scaling, long_factor=PHI.rope_scaling.long_factor[:7])),
    "longrope_factors_vs_head_dim": (
        "rope_scaling.short_factor='<8 values>': longrope needs head_dim // 2 = 12",
        lambda: PHI.replace(head_dim=24)),
    "empty_attention_pattern": ("attention_pattern=():", lambda: LLAMA.replace(attention_pattern=())),
    "unknown_layer_kind": ("attention_pattern=('global', 'sliding'):",
                           lambda: LLAMA.replace(attention_pattern=("global", "sliding"))),
    "local_without_window": ("sliding_window=None: local layers need",
                             lambda: PHI.replace(sliding_window=None)),
    "local_with_zero_window": ("sliding_window=0:", lambda: PHI.replace(sliding_window=0)),
    "window_without_local": ("sliding_window=8: is set but attention_pattern has no 'local'",
                             lambda: LLAMA.replace(sliding_window=8)),
    "bad_dtype": ("dtype='fp16':", lambda: LLAMA.replace(dtype="fp16")),
    "bad_param_dtype": ("param_dtype='bf16':", lambda: LLAMA.replace(param_dtype="bf16")),
}


@pytest.mark.parametrize("expected, build", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_bad_config_raises_naming_field_and_value(expected, build):
  with pytest.raises(ValueError, match="^" + re.escape(expected)):
    build()


L, G = True, False


def test_gemma2_layers_alternate_starting_local():
  assert PRESETS["gemma2_2b"].layer_is_local == (
      L, G, L, G, L, G, L, G, L, G, L, G, L, G, L, G, L, G, L, G, L, G, L, G, L, G)


def test_gemma3_layers_are_five_local_then_one_global():
  assert PRESETS["gemma3_1b"].layer_is_local == (
      L, L, L, L, L, G,
      L, L, L, L, L, G,
      L, L, L, L, L, G,
      L, L, L, L, L, G,
      L, L)
  assert PRESETS["gemma3_4b"].layer_is_local == (
      L, L, L, L, L, G,
      L, L, L, L, L, G,
      L, L, L, L, L, G,
      L, L, L, L, L, G,
      L, L, L, L, L, G,
      L, L, L, L)


def test_phi3_5_longrope_attention_factor():
  # sqrt(1 + ln(32) / ln(4096)) = sqrt(1 + 5/12) = sqrt(17/12)
  rope = PRESETS["phi3_5_mini"].rope_scaling
  assert (rope.kind, rope.factor, rope.original_max_len) == ("longrope", 32.0, 4096)
  assert rope.longrope_attention_factor == pytest.approx(1.1902380714238083, abs=1e-12)


def test_longrope_attention_factor_explicit_value_and_no_scaling():
  assert RopeScaling(kind="longrope", factor=32.0, attention_factor=1.5).longrope_attention_factor == 1.5
  assert RopeScaling(kind="longrope", factor=1.0).longrope_attention_factor == 1.0


def test_attention_pattern_list_is_stored_as_a_tuple():
  cfg = LLAMA.replace(attention_pattern=["global"])
  assert cfg.attention_pattern == ("global",) and hash(cfg)
