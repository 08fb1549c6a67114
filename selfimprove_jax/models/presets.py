"""Named model sizes: the published architectures as data, plus a tiny variant of each family.

Sizes come from each model's ``config.json`` on its Hugging Face model page (the path is given per
preset); ``tests/test_presets.py`` checks the resulting parameter counts against the published totals.
Presets are text-only (Gemma 3 4B's vision tower is not part of this model).
"""
from __future__ import annotations

from selfimprove_jax.models.config import RopeScaling, TransformerConfig

# Phi-3.5-mini's longrope factors, from microsoft/Phi-3.5-mini-instruct config.json (rope_scaling).
_PHI35_SHORT = (
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842,
    1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094,
    1.1599998474121094, 1.1699998378753662, 1.2899998426437378, 1.339999794960022,
    1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533,
    2.729999542236328, 2.749999523162842, 2.8399994373321533)
_PHI35_LONG = (
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601,
    1.5899999141693115, 1.600000023841858, 1.6200000047683716, 2.620000123977661,
    3.2300000190734863, 3.2300000190734863, 4.789999961853027, 7.400000095367432,
    7.700000286102295, 9.09000015258789, 12.199999809265137, 17.670000076293945,
    24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992,
    50.340003967285156, 50.45000457763672, 57.55000305175781, 57.93000411987305,
    58.21000289916992, 60.1400032043457, 62.61000442504883, 62.62000274658203,
    62.71000289916992, 63.1400032043457, 63.1400032043457, 63.77000427246094,
    63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938,
    64.4800033569336, 64.51000213623047, 64.52999877929688, 64.83999633789062)

# Knobs shared by every size of a family (everything except the sizes).
_FAMILY_KNOBS = {
    "gemma2": dict(activation="gelu_tanh", norm_plus_one=True, sandwich_norm=True, embed_scale=True,
                   attn_softcap=50.0, final_softcap=30.0, query_scale=256.0, norm_eps=1e-6,
                   rope_theta=10_000.0, sliding_window=4096, attention_pattern=("local", "global"),
                   tie_embeddings=True, max_len=8192),
    "gemma3": dict(activation="gelu_tanh", norm_plus_one=True, sandwich_norm=True, embed_scale=True,
                   qk_norm=True, query_scale=256.0, norm_eps=1e-6, rope_theta=1_000_000.0,
                   local_rope_theta=10_000.0, attention_pattern=("local",) * 5 + ("global",),
                   tie_embeddings=True),
    "llama3": dict(norm_eps=1e-5, rope_theta=500_000.0, max_len=131_072),
    "mistral": dict(norm_eps=1e-5, rope_theta=1_000_000.0, max_len=32_768),
    "phi3": dict(norm_eps=1e-5, rope_theta=10_000.0),
    "qwen2": dict(qkv_bias=True, norm_eps=1e-6, rope_theta=1_000_000.0, max_len=32_768),
    "qwen3": dict(qk_norm=True, norm_eps=1e-6, rope_theta=1_000_000.0, max_len=40_960),
}


def _llama3_rope(factor: float) -> RopeScaling:
  return RopeScaling(kind="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_len=8192)


def _make(family: str, **sizes) -> TransformerConfig:
  return TransformerConfig(family=family, **{**_FAMILY_KNOBS[family], **sizes})


# name -> (config, Hugging Face repo whose config.json gives the sizes)
_TABLE: dict[str, tuple[TransformerConfig, str]] = {
    "gemma2_2b": (_make("gemma2", vocab_size=256_000, embed_dim=2304, num_layers=26, num_heads=8,
                        num_kv_heads=4, head_dim=256, mlp_dim=9216), "google/gemma-2-2b"),
    "gemma2_9b": (_make("gemma2", vocab_size=256_000, embed_dim=3584, num_layers=42, num_heads=16,
                        num_kv_heads=8, head_dim=256, mlp_dim=14_336), "google/gemma-2-9b"),
    "gemma3_1b": (_make("gemma3", vocab_size=262_144, embed_dim=1152, num_layers=26, num_heads=4,
                        num_kv_heads=1, head_dim=256, mlp_dim=6912, sliding_window=512,
                        max_len=32_768), "google/gemma-3-1b-pt"),
    "gemma3_4b": (_make("gemma3", vocab_size=262_208, embed_dim=2560, num_layers=34, num_heads=8,
                        num_kv_heads=4, head_dim=256, mlp_dim=10_240, sliding_window=1024,
                        rope_scaling=RopeScaling(kind="linear", factor=8.0), max_len=131_072),
                  "google/gemma-3-4b-pt (text_config)"),
    "llama3_2_1b": (_make("llama3", vocab_size=128_256, embed_dim=2048, num_layers=16, num_heads=32,
                          num_kv_heads=8, head_dim=64, mlp_dim=8192, tie_embeddings=True,
                          rope_scaling=_llama3_rope(32.0)), "meta-llama/Llama-3.2-1B"),
    "llama3_2_3b": (_make("llama3", vocab_size=128_256, embed_dim=3072, num_layers=28, num_heads=24,
                          num_kv_heads=8, head_dim=128, mlp_dim=8192, tie_embeddings=True,
                          rope_scaling=_llama3_rope(32.0)), "meta-llama/Llama-3.2-3B"),
    "llama3_1_8b": (_make("llama3", vocab_size=128_256, embed_dim=4096, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128, mlp_dim=14_336,
                          rope_scaling=_llama3_rope(8.0)), "meta-llama/Llama-3.1-8B"),
    "mistral_7b_v0_3": (_make("mistral", vocab_size=32_768, embed_dim=4096, num_layers=32,
                              num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14_336),
                        "mistralai/Mistral-7B-v0.3"),
    "phi3_mini": (_make("phi3", vocab_size=32_064, embed_dim=3072, num_layers=32, num_heads=32,
                        num_kv_heads=32, head_dim=96, mlp_dim=8192, sliding_window=2047,
                        attention_pattern=("local",), max_len=4096),
                  "microsoft/Phi-3-mini-4k-instruct"),
    "phi3_5_mini": (_make("phi3", vocab_size=32_064, embed_dim=3072, num_layers=32, num_heads=32,
                          num_kv_heads=32, head_dim=96, mlp_dim=8192, sliding_window=262_144,
                          attention_pattern=("local",), max_len=131_072,
                          rope_scaling=RopeScaling(kind="longrope", factor=32.0,
                                                   original_max_len=4096, short_factor=_PHI35_SHORT,
                                                   long_factor=_PHI35_LONG)),
                    "microsoft/Phi-3.5-mini-instruct"),
    "qwen2_5_0_5b": (_make("qwen2", vocab_size=151_936, embed_dim=896, num_layers=24, num_heads=14,
                           num_kv_heads=2, head_dim=64, mlp_dim=4864, tie_embeddings=True),
                     "Qwen/Qwen2.5-0.5B"),
    "qwen2_5_1_5b": (_make("qwen2", vocab_size=151_936, embed_dim=1536, num_layers=28, num_heads=12,
                           num_kv_heads=2, head_dim=128, mlp_dim=8960, tie_embeddings=True),
                     "Qwen/Qwen2.5-1.5B"),
    "qwen2_5_7b": (_make("qwen2", vocab_size=152_064, embed_dim=3584, num_layers=28, num_heads=28,
                         num_kv_heads=4, head_dim=128, mlp_dim=18_944), "Qwen/Qwen2.5-7B"),
    "qwen3_0_6b": (_make("qwen3", vocab_size=151_936, embed_dim=1024, num_layers=28, num_heads=16,
                         num_kv_heads=8, head_dim=128, mlp_dim=3072, tie_embeddings=True),
                   "Qwen/Qwen3-0.6B"),
    "qwen3_1_7b": (_make("qwen3", vocab_size=151_936, embed_dim=2048, num_layers=28, num_heads=16,
                         num_kv_heads=8, head_dim=128, mlp_dim=6144, tie_embeddings=True),
                   "Qwen/Qwen3-1.7B"),
    "qwen3_8b": (_make("qwen3", vocab_size=151_936, embed_dim=4096, num_layers=36, num_heads=32,
                       num_kv_heads=8, head_dim=128, mlp_dim=12_288), "Qwen/Qwen3-8B"),
}

PRESETS: dict[str, TransformerConfig] = {name: cfg for name, (cfg, _) in _TABLE.items()}
PRESET_SOURCES: dict[str, str] = {name: src for name, (_, src) in _TABLE.items()}

# Tiny variants keep every family knob but shrink sizes so a forward pass takes milliseconds. Windows,
# soft-caps, query scale and rope-scaling lengths are shrunk too, so each knob visibly changes the
# output of a 16-token test sequence (a cap of 50 would be inert on random tiny logits).
_TINY_SIZES = dict(vocab_size=512, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                   max_len=64)
_TINY_OVERRIDES = {
    "gemma2": dict(num_layers=4, sliding_window=4, attn_softcap=1.0, final_softcap=2.0,
                   query_scale=24.0),
    "gemma3": dict(num_layers=6, sliding_window=4, query_scale=24.0,
                   rope_scaling=RopeScaling(kind="linear", factor=8.0)),
    "llama3": dict(num_layers=3, tie_embeddings=True,
                   rope_scaling=RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_len=64)),
    "mistral": dict(num_layers=3),
    "phi3": dict(num_layers=3, num_kv_heads=4, sliding_window=6, attention_pattern=("local",),
                 rope_scaling=RopeScaling(kind="longrope", factor=4.0, original_max_len=12,
                                          short_factor=tuple(1.0 + 0.1 * i for i in range(8)),
                                          long_factor=tuple(1.0 + 2.0 * i for i in range(8)))),
    "qwen2": dict(num_layers=3, tie_embeddings=True),
    "qwen3": dict(num_layers=3),
}
TINY: dict[str, TransformerConfig] = {
    family: _make(family, **{**_TINY_SIZES, **_TINY_OVERRIDES[family]}) for family in _TINY_OVERRIDES
}


def get_preset(name: str) -> TransformerConfig:
  """A published architecture by name (see ``PRESETS``), or ``tiny_<family>``."""
  if name.startswith("tiny_") and name[5:] in TINY:
    return TINY[name[5:]]
  if name not in PRESETS:
    known = sorted(PRESETS) + [f"tiny_{f}" for f in TINY]
    raise ValueError(f"model preset={name!r} is unknown; known presets: {known}")
  return PRESETS[name]


def tiny_config(family: str, **overrides) -> TransformerConfig:
  """The tiny test-sized variant of ``family``, optionally with some fields replaced."""
  if family not in TINY:
    raise ValueError(f"family={family!r} is unknown; known: {sorted(TINY)}")
  return TINY[family].replace(**overrides)
