"""Checkpoints in and out: Hugging Face safetensors directories and the native orbax format; and
``trees``, the loop's CheckpointManager checkpoints of any pytree (train states, round params).

  load_hf(dir, mesh=..., dtype=...) -> LoadedModel(config, params, tokenizer, chat_template)
  save_hf(config, params, out_dir, tokenizer=..., source_dir=..., merge_fn=...)  (states its special ids)
  save_native(config, params, out_dir, ...) / load_native(dir, mesh=..., ...)
  python -m selfimprove_jax.checkpoint.convert --from hf --to native SRC DST
  python -m selfimprove_jax.checkpoint.convert --from gguf --to hf MODEL.gguf DST
  python -m selfimprove_jax.checkpoint.fetch smollm2-135m-instruct   (two real models, cached)
"""
from selfimprove_jax.checkpoint.fetch import resolve
from selfimprove_jax.checkpoint.files import LoadedModel
from selfimprove_jax.checkpoint.hf import load_hf, save_hf
from selfimprove_jax.checkpoint.hf_config import config_from_hf, config_to_hf
from selfimprove_jax.checkpoint.native import load_native, read_config, save_native

__all__ = ["LoadedModel", "config_from_hf", "config_to_hf", "load_hf", "load_native", "read_config",
           "resolve", "save_hf", "save_native"]
