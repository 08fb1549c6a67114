"""Command-line entry point. Thin on purpose: every step is a library call a notebook can make too.

  python -m selfimprove_jax.main --config=configs/sft_sharpening.py --workdir=DIR [--config.a.b=v ...]
  python -m selfimprove_jax.main --config=configs/star.py:smoke --workdir=DIR --stop_after=sample
  python -m selfimprove_jax.main --config=configs/smoke.py      # model smoke check, no workdir

A loop config (one with a ``loop`` section) runs ``loop.Loop``: rerunning the same command resumes
where the previous run stopped. ``--stop_after`` ends after the next pending stage of that name
(sample, score, select, train, eval), for partial reruns and research scripts that take over.
A config with ``study.arms`` runs each arm in WORKDIR/ARM (``loop.run_study``), then one report.

Several processes (a TPU pod slice, GPU hosts) run the same command each; ``--distributed=on`` makes
them find each other (on Cloud TPU VMs, Slurm and Open MPI with no other flag), or name process 0's
coordinator on every process:

  python -m selfimprove_jax.main ... --coordinator_address=host0:12345 --num_processes=2 --process_id=I
"""
from __future__ import annotations

import time

_STARTED = time.time()  # before the heavy imports: summary.json's runtime counts them

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from selfimprove_jax import loop
from selfimprove_jax import multihost
from selfimprove_jax import sharding as sh
from selfimprove_jax.models import Transformer, count_params, get_preset, init_params
from selfimprove_jax.sampling import Sampler
from selfimprove_jax.tokenizer import render_chat, train_sentencepiece

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file "
                                          "(PATH or PATH:variant).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://) for a loop config.")
_STOP_AFTER = flags.DEFINE_enum("stop_after", None, list(loop.OFFLINE_STAGES),
                                "Stop after the next pending stage of this name.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", list(multihost.MODES),
    "jax.distributed.initialize: 'on' always (a TPU VM slice, Slurm, Open MPI find the other "
    "processes themselves), 'auto' when a coordinator address is given (flag or "
    "JAX_COORDINATOR_ADDRESS), 'off' never.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")

_TOKENIZER_TEXT = [
    "What is 12 + 30? The answer is 42.", "Self-improvement: generate, verify, distill.",
    "Sharpening moves probability mass onto the model's own most likely answers.",
]


def smoke(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Builds the configured model on a mesh and samples greedily from a chat prompt with the sampler.

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

  model = Transformer(cfg, mesh, sh.SAMPLE_RULES)
  sampler = Sampler(model, params, tokenizer, max_new_tokens=config.max_new_tokens, batch_size=1)
  start = time.perf_counter()
  completion = sampler([text], rng=config.seed, temperature=0.0)
  elapsed = time.perf_counter() - start
  new_tokens = completion.tokens[0][0]

  # Greedy decoding through the KV cache must pick the argmax of a full, uncached forward pass.
  prompt = tokenizer.encode(text, add_bos=True)
  sequence = jnp.asarray([prompt + new_tokens[:-1]])
  reference = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(params, sequence)
  logits = np.array(reference[0, len(prompt) - 1:])
  logits[:, tokenizer.vocab_size:] = -np.inf  # the sampler never emits ids the tokenizer lacks
  agree = float(np.mean(logits.argmax(-1) == np.asarray(new_tokens)))
  print(f"prompt ({len(prompt)} tokens): {text!r}")
  print(f"greedy continuation: {completion.texts[0][0]!r} ({completion.finish_reasons[0][0]})")
  print(f"{len(new_tokens)} new tokens in {elapsed:.2f}s (including compilation); "
        f"cached decode agrees with a full forward on {agree:.0%} of them")
  return {"new_tokens": len(new_tokens), "agreement": agree}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every file at INFO
  multihost.initialize(_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                       num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  config = _CONFIG.value
  if "loop" in config:
    if not _WORKDIR.value:
      raise app.UsageError("--workdir is required for a loop config")
    run = loop.run_study if config.study.arms else loop.run
    run(config, _WORKDIR.value, stop_after=_STOP_AFTER.value, started=_STARTED)
    return
  summary = smoke(config)
  if summary["agreement"] < 1.0:
    raise SystemExit("cached decoding disagreed with the full forward pass")


def run():
  """Console-script entry (``selfimprove``)."""
  app.run(main)


if __name__ == "__main__":
  app.run(main)
