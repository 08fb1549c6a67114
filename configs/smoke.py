"""Smoke run: a tiny model of one family, sharded on whatever devices exist, prompted through its chat format.

Run:
  python -m selfimprove_jax.main --config=configs/smoke.py
  python -m selfimprove_jax.main --config=configs/smoke.py --config.model=tiny_qwen3 --config.mesh.tensor=2
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "tiny_gemma2"  # any name from selfimprove_jax.models.get_preset
  config.seed = 0
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  config.prompt = "What is 12 + 30?"
  config.max_new_tokens = 16
  config.lock()
  return config
