"""Training throughput: our SFT ``update_step`` vs Tunix's ``PeftTrainer``, full fine-tuning.

    python benchmarks/training.py --json benchmarks/training_results.json   # ~5 min on 2 idle cores
    python benchmarks/training.py --size 4M --reps 3                        # a quick look

The conventions of ``benchmarks/sampling.py`` (whose helpers this imports): every contestant runs in
its own subprocess (its own interpreter and virtualenv, ``JAX_PLATFORMS=cpu``, empty ``XLA_FLAGS``),
one after the other, on the same random-weight Llama-style model (``SIZES["30M"]`` by default) and
the same fixed batch: 8 sequences x 256 tokens of random ids, every token real, the loss the token-mean
NLL of every token but the first of each row (8 x 255 scored tokens). Optimizer for both: global-norm
clipping at 1.0, then AdamW (lr 1e-4 constant, b1 0.9, b2 0.999, eps 1e-8, no weight decay), fp32
parameters, moments and compute; every parameter is trained (no LoRA).

  ours   ``training.make_update_step(model, make_loss("sft"), make_optimizer(...))`` driven by
         ``training.run_step`` (which blocks on each step's metrics, as our drivers do).
  tunix  Tunix 0.1.7 ``tunix.sft.peft_trainer.PeftTrainer`` (its ``train`` loop and its default loss)
         over its own ``Llama3`` (flax.nnx), fed ``TrainingInput``s of the same batch, with causal
         attention masks and positions built by its ``sft.utils`` helpers inside the jitted step.
         Checkpointing, metric backends, the profiler and the progress bar are off; what stays is
         listed in BENCHMARKS.md.

Per contestant: the time at which each step's result is known on the host (ours: ``run_step``
returns; Tunix: its ``on_train_step_end`` hook, which it calls once the step's loss has been fetched);
step time = difference of consecutive completions; steady step = median over ``--reps`` steps after
2 warm-up steps; tok/s = 8 x 256 / steady step; compile s = first step minus the steady step (and
the XLA backend compile time reported by ``jax.monitoring``). MFU = model FLOPs per step / steady
step / peak, with the PaLM (appendix B) count per token, 6 N + 12 n_layers n_heads head_dim T
(N: every matmul weight, the untied output projection included, the input embedding table and the
norm gains excluded; T = 256), and the peak the best fp32 2048^3 matmul of sampling.py's roofline
worker, run before and after the contestants.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Run as a script, this file's folder (not the repository) is on sys.path; the Tunix virtualenv does
# not have the repository installed either.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.sampling import (COMPILE_EVENT, SIZES, TUNIX_VERSION, _compile_log,  # noqa: E402
                                 _cpu_model, _tunix_python, _version, our_config, param_count,
                                 run_uncontended, run_worker, tunix_llama3, worker_roofline)

BATCH, LENGTH = 8, 256  # sequences x tokens per step: 2048 tokens, ~5 s a step at 30M on 2 cores
WARMUP = 2  # steps before the timed ones (the first compiles)
LR, MAX_GRAD_NORM = 1e-4, 1.0


def batch_tokens(s: dict):
  import numpy as np
  return np.random.default_rng(0).integers(1, s["vocab"], size=(BATCH, LENGTH), dtype=np.int32)


def matmul_params(s: dict) -> int:
  """N of 6N: every weight a matmul reads (the untied output projection included, not the input
  embedding table, whose lookup is a gather, nor the norm gains)."""
  D, H, K, F = s["d"], s["heads"], s["kv_heads"], s["head_dim"]
  return s["layers"] * (2 * D * H * F + 2 * D * K * F + 3 * D * s["mlp"]) + D * s["vocab"]


def flops_per_token(s: dict) -> int:
  """PaLM's model FLOPs per trained token: 6 N + 12 n_layers n_heads head_dim T."""
  return 6 * matmul_params(s) + 12 * s["layers"] * s["heads"] * s["head_dim"] * LENGTH


def _summary(done: list[float], start: float, log: list, compiles_at: list[int], losses: list[float],
             reps: int) -> dict:
  """Step times from completion times ``done`` (step j known complete at ``done[j]``)."""
  if len(done) != WARMUP + reps:
    raise RuntimeError(f"expected {WARMUP + reps} completed steps, saw {len(done)}")
  times = [b - a for a, b in zip(done[WARMUP - 1:], done[WARMUP:])]
  steady = statistics.median(times)
  first = done[0] - start
  return dict(first_step_s=first, steady_s=steady, times_s=times, mean_s=statistics.fmean(times),
              tok_s=BATCH * LENGTH / steady, compile_s=first - steady,
              backend_compiles=len(log), backend_compile_s=sum(secs for _, secs in log),
              compiled=sorted({name for name, _ in log}),
              steady_compiles=compiles_at[-1] - compiles_at[WARMUP - 1],
              loss_first=losses[0], loss_last=losses[-1])


# ----------------------------------------------------------------------------------------- workers

def worker_ours(s: dict, reps: int, sweep: bool) -> dict:
  import jax
  import jax.numpy as jnp
  from selfimprove_jax import training
  from selfimprove_jax.models import Transformer, count_params
  del sweep
  log = _compile_log()
  cfg = our_config(s)
  optimizer = training.make_optimizer(LR, max_grad_norm=MAX_GRAD_NORM)
  state = training.create_train_state(cfg, optimizer, jax.random.key(0))
  step = training.make_update_step(Transformer(cfg), training.make_loss("sft"), optimizer, schedule=LR)
  tokens = jnp.asarray(batch_tokens(s))
  batch = {"tokens_BxL": tokens, "input_mask_BxL": jnp.ones(tokens.shape, bool),
           "loss_mask_BxL": jnp.ones(tokens.shape, bool)}
  del log[:]  # init compiles are not the step's
  done, compiles_at, losses = [], [], []
  start = time.perf_counter()
  for _ in range(WARMUP + reps):
    state, metrics = training.run_step(step, state, batch)
    done.append(time.perf_counter())
    compiles_at.append(len(log))
    losses.append(metrics["loss"])
  res = _summary(done, start, log, compiles_at, losses, reps)
  res.update(params=count_params(cfg), traces=step.trace_count())
  return res


def worker_tunix(s: dict, reps: int, sweep: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  import tunix
  from flax import nnx
  from tunix.sft import hooks, peft_trainer, utils
  del sweep
  log = _compile_log()
  model = tunix_llama3(s, is_sampling=False)
  tokens = jnp.asarray(batch_tokens(s))
  example = peft_trainer.TrainingInput(input_tokens=tokens, input_mask=jnp.ones(tokens.shape, bool))

  def model_input(x):  # traced inside the jitted step, as in Tunix's SFT examples
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": utils.build_positions_from_mask(x.input_mask),
            "attention_mask": utils.make_causal_attn_mask(x.input_mask)}

  done, compiles_at, losses = [], [], []

  class Clock(hooks.TrainingHooks):
    """Records when each step's loss is on the host (Tunix fetches it one step late)."""

    def on_train_step_end(self, train_ctx, train_step, train_loss):
      done.append(time.perf_counter())
      compiles_at.append(len(log))
      losses.append(float(train_loss))

    on_train_start = on_train_end = on_train_step_start = on_eval_step_start = lambda *a: None
    on_eval_step_end = lambda *a: None

  optimizer = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM),
                          optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
  # max_steps=None: no progress bar, the loop ends with the data; no checkpoint directory, metric
  # backends or profiler options: none of them runs.
  config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=None, pbar_description=None)
  trainer = peft_trainer.PeftTrainer(model, optimizer, config).with_gen_model_input_fn(model_input)
  trainer.with_training_hooks(Clock())
  del log[:]
  start = time.perf_counter()
  trainer.train([example] * (WARMUP + reps))
  res = _summary(done, start, log, compiles_at, losses, reps)
  res.update(params=sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
             train_steps=trainer.train_steps, version=tunix.__version__)
  return res


WORKERS = dict(ours=worker_ours, tunix=worker_tunix, roofline=worker_roofline)
CONTESTANTS = ("ours", "tunix")


# ----------------------------------------------------------------------------------------- driver

def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", help="write results to this path")
  parser.add_argument("--size", default="30M", choices=list(SIZES), help="model size (sampling.py's SIZES)")
  parser.add_argument("--contestants", default=",".join(CONTESTANTS))
  parser.add_argument("--max-wait", type=float, default=300,
                      help="before each contestant, wait up to this many seconds for other processes to go idle")
  parser.add_argument("--retries", type=int, default=1,
                      help="rerun a contestant this many times when other processes disturbed its measurement")
  parser.add_argument("--reps", type=int, default=6,
                      help=f"timed steps after {WARMUP} warm-up steps (the median is reported)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--no-sweep", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print("RESULT " + json.dumps(WORKERS[args.worker](SIZES[args.size], args.reps, not args.no_sweep)), flush=True)
    return

  contestants = args.contestants.split(",")
  pythons = dict(ours=sys.executable, roofline=sys.executable)
  if "tunix" in contestants:
    pythons["tunix"] = _tunix_python()
  roof = lambda: run_worker("roofline", args.size, 5, sys.executable, max_wait_s=args.max_wait, script=__file__)
  roofs = [roof()]
  results = {}
  for name in contestants:
    res = run_uncontended(lambda: run_worker(name, args.size, args.reps, pythons[name],
                                             max_wait_s=args.max_wait, script=__file__),
                          args.retries, f"{name:<6}")
    print(f"{name:<6} {res['tok_s']:7.0f} tok/s  step {res['steady_s']:.2f} s  compile {res['compile_s']:.1f} s  "
          f"(others busy {res['others_busy_cores']:.2f} cores)", flush=True)
    results[name] = res
  roofs.append(roof())
  summary = derive(SIZES[args.size], results, max(r["flops"] for r in roofs))
  summary.update(size=args.size, roofline=dict(flops=max(r["flops"] for r in roofs),
                                               read_bw=max(r["read_bw"] for r in roofs), runs=roofs))
  meta = dict(cpu=_cpu_model(), cores=os.cpu_count(), python=sys.version.split()[0],
              versions={p: _version(p) for p in ("jax", "jaxlib", "flax", "optax")},
              tunix=TUNIX_VERSION, command=" ".join(sys.argv), compile_event=COMPILE_EVENT)
  print_table(summary)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({**summary, "_meta": meta}, f, indent=1)


def derive(s: dict, results: dict, peak: float) -> dict:
  """The summary fields: tok/s, MFU against ``peak`` FLOP/s, the ratio; the raw results inside."""
  per_step = flops_per_token(s) * BATCH * LENGTH
  out = dict(params=param_count(s), matmul_params=matmul_params(s), config=s,
             workload=dict(sequences=BATCH, length=LENGTH, tokens_per_step=BATCH * LENGTH,
                           scored_tokens_per_step=BATCH * (LENGTH - 1), warmup_steps=WARMUP),
             flops_per_token=flops_per_token(s), flops_per_step=per_step, peak_flops=peak, **results)
  for name, res in results.items():
    res["mfu"] = per_step / res["steady_s"] / peak
    out[f"{name}_tok_s"] = res["tok_s"]
    out[f"{name}_mfu"] = res["mfu"]
    out[f"{name}_compile_s"] = res["compile_s"]
    out[f"{name}_others_busy_cores"] = res["others_busy_cores"]
  if "ours" in results:
    out["mfu"] = results["ours"]["mfu"]
  if "ours" in results and "tunix" in results:
    out["ours_over_tunix"] = results["ours"]["tok_s"] / results["tunix"]["tok_s"]
  return out


def print_table(summary: dict) -> None:
  print(f"\n{summary['size']}: {summary['params']:,} params, {summary['flops_per_step'] / 1e9:.0f} GFLOP/step, "
        f"peak {summary['peak_flops'] / 1e9:.0f} GFLOP/s")
  print(f"{'':<6} {'tok/s':>7} {'step s':>7} {'MFU':>6} {'first s':>8} {'compile s':>9} {'XLA compile s':>13} "
        f"{'others busy':>11}")
  for name in CONTESTANTS:
    r = summary.get(name)
    if r is not None:
      print(f"{name:<6} {r['tok_s']:7.0f} {r['steady_s']:7.2f} {100 * r['mfu']:5.1f}% {r['first_step_s']:8.1f} "
            f"{r['compile_s']:9.1f} {r['backend_compile_s']:13.1f} {r['others_busy_cores']:11.2f}")
  if "ours_over_tunix" in summary:
    print(f"ours/tunix = {summary['ours_over_tunix']:.2f}x")


if __name__ == "__main__":
  main()
