"""Model definition: config, presets, layers and the transformer."""
from selfimprove_jax.models.config import FAMILIES, RopeScaling, TransformerConfig
from selfimprove_jax.models.presets import PRESETS, TINY, get_preset, tiny_config
from selfimprove_jax.models.transformer import (KVCache, LoraParams, Transformer, count_params,
                                                init_cache, init_params, param_logical_names,
                                                param_shapes, param_shardings, variables)

__all__ = [
    "FAMILIES", "KVCache", "LoraParams", "PRESETS", "RopeScaling", "TINY", "Transformer", "TransformerConfig",
    "count_params", "get_preset", "init_cache", "init_params", "param_logical_names",
    "param_shapes", "param_shardings", "tiny_config", "variables",
]
