"""Command-line entry point. Thin on purpose: every step is a library call a notebook can make too.

  python -m selfimprove_jax.main --config=configs/smoke.py [--config.key=value ...]
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from ml_collections import config_flags

from selfimprove_jax import sharding as sh
from selfimprove_jax.models import Transformer, count_params, get_preset, init_cache, init_params
from selfimprove_jax.tokenizer import render_chat, stop_ids_for_family, train_sentencepiece

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)

_TOKENIZER_TEXT = [
    "What is 12 + 30? The answer is 42.", "Self-improvement: generate, verify, distill.",
    "Sharpening moves probability mass onto the model's own most likely answers.",
]


def smoke(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Builds the configured model on a mesh and decodes greedily from a chat prompt with the KV cache.

  The model has random weights, so the text is noise; the run checks that the pieces fit together on
  the machine's devices and that cached decoding agrees with a full forward pass.
  """
  cfg = get_preset(config.model)
  mesh = sh.make_mesh(dict(config.mesh))
  print(f"model {config.model}: {count_params(cfg):,} parameters; mesh {dict(mesh.shape)} "
        f"on {jax.device_count()} {jax.devices()[0].platform} device(s)")
  params = init_params(cfg, jax.random.key(config.seed), mesh, sh.SAMPLE_RULES)

  tokenizer = train_sentencepiece(_TOKENIZER_TEXT, vocab_size=cfg.vocab_size)
  text = render_chat(cfg.family, [{"role": "user", "content": config.prompt}])
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but model={config.model!r} "
                     f"embeds only vocab_size={cfg.vocab_size}")
  prompt = np.asarray([tokenizer.encode(text, add_bos=True)], np.int32)
  stops = jnp.asarray(stop_ids_for_family(tokenizer, cfg.family))

  model = Transformer(cfg, mesh, sh.SAMPLE_RULES)
  step = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, pos, cache=c))
  full = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
  cache = init_cache(cfg, 1, prompt.shape[1] + config.max_new_tokens, mesh=mesh)

  start = time.perf_counter()
  logits, cache = step(params, prompt, jnp.arange(prompt.shape[1])[None], cache)
  tokens = list(prompt[0])
  for _ in range(config.max_new_tokens):
    next_token = int(jnp.argmax(logits[0, -1]))
    tokens.append(next_token)
    if next_token in stops:
      break
    logits, cache = step(params, jnp.asarray([[next_token]]), jnp.asarray([[len(tokens) - 1]]), cache)
  elapsed = time.perf_counter() - start

  reference = full(params, jnp.asarray([tokens[:-1]]))
  greedy_again = np.asarray(jnp.argmax(reference[0, prompt.shape[1] - 1:], axis=-1))
  agree = float(np.mean(greedy_again == np.asarray(tokens[prompt.shape[1]:])))
  print(f"prompt ({prompt.shape[1]} tokens): {text!r}")
  print(f"greedy continuation: {tokenizer.decode(tokens[prompt.shape[1]:])!r}")
  print(f"{len(tokens) - prompt.shape[1]} new tokens in {elapsed:.2f}s (including compilation); "
        f"cached decode agrees with a full forward on {agree:.0%} of them")
  return {"new_tokens": len(tokens) - prompt.shape[1], "agreement": agree}


def main(argv):
  del argv
  summary = smoke(_CONFIG.value)
  if summary["agreement"] < 1.0:
    raise SystemExit("cached decoding disagreed with the full forward pass")


def run():
  """Console-script entry (``selfimprove``)."""
  app.run(main)


if __name__ == "__main__":
  app.run(main)
