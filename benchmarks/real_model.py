"""Sampling on a real model: our ``generate`` vs Hugging Face ``generate`` on SmolLM2-135M-Instruct.

    SELFIMPROVE_MODELS=/tmp/models python benchmarks/real_model.py --json benchmarks/real_model_results.json
    SELFIMPROVE_MODELS=/tmp/models python benchmarks/real_model.py --quick --max-wait 0   # smoke test

The conventions of ``benchmarks/sampling.py`` (whose helpers this imports): every contestant runs in
its own subprocess (``JAX_PLATFORMS=cpu``, empty ``XLA_FLAGS``), one after the other; the driver waits
for other processes to go idle before each, measures how busy they kept the CPUs during it, and reruns
a disturbed measurement. The model is the real checkpoint that ``checkpoint.fetch`` converts from its
GGUF file (Llama architecture, 30 layers, d 576, 9 / 3 heads, head dim 64, MLP 1536, vocabulary 49152,
tied embeddings, float32 weights dequantized from Q4_1), read from ``$SELFIMPROVE_MODELS`` (fetched
and converted there on first use). Workload: 8 chat prompts (two-digit additions phrased 8 ways,
rendered by the checkpoint's own chat template, 39-53 tokens, left-padded into one batch) x 8 samples
= 64 rows, 64 new tokens, no stop token (every row runs to 64), temperature 1, top-p 1, top-k off,
float32. Both contestants read the same token ids (the driver checks).

  ours   ``selfimprove_jax.sampling.generate`` on ``load_hf``'s params: 8 prompt rows in, one prefill
         per prompt, the KV cache forked to 64 rows.
  hf     transformers ``AutoModelForCausalLM.generate`` on PyTorch CPU, fp32 (its default attention),
         ``num_return_sequences=8``, EOS switched off in its generation config.

Per contestant: steady-state new tokens/s = 64 x 64 / median wall time of ``--reps`` calls after one
warm-up call; compile s (ours: first call minus the steady median); ours' prefill alone (a call with
one new token) and the per-decode-step time derived from it; ours / HF.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# Run as a script, this file's folder (not the repository) is on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.sampling import (_compile_log, _cpu_model, _timed_calls, _version,  # noqa: E402
                                 run_uncontended, run_worker)

MODEL = "smollm2-135m-instruct"
QUESTIONS = (  # one user turn each; the phrasings differ so that the prompts need left padding
    "What is 47 + 38?",
    "What is 16 + 75? Answer with a number.",
    "Add 29 and 64.",
    "Compute 58 + 33 and explain each step.",
    "Tom has 23 apples and buys 59 more. How many apples does he have now?",
    "What is the sum of 81 and 14?",
    "A train travels 45 km, then 37 km more. How far does it travel in total?",
    "What is 66 + 27? Think step by step, then give the final answer.",
)
B, N = len(QUESTIONS), 8  # prompts, samples per prompt
R = B * N
# Workloads by name (the worker's --size): new tokens per row. "quick" is the smoke test.
WORKLOADS = {"full": 64, "quick": 8}
PAD_ID = 0  # <|endoftext|>: never in a rendered prompt; the masks say which slots are padding


def checkpoint_dir():
  """The converted checkpoint directory under ``$SELFIMPROVE_MODELS`` (fetched on first use)."""
  from selfimprove_jax.checkpoint import fetch
  return fetch.fetch(MODEL, log=lambda m: print(m, file=sys.stderr, flush=True))


def prompt_batch(model_dir, tokenizer):
  """The 8 questions as the model reads them: rendered by the checkpoint's chat template (system
  turn, user turn, assistant header), encoded without an added BOS, left-padded with ``PAD_ID``.
  Returns (tokens (B, P) int32, mask (B, P) bool, True on real tokens)."""
  import numpy as np
  from selfimprove_jax.tokenizer.template import ChatTemplate
  template = ChatTemplate.from_model_dir(model_dir)
  ids = [tokenizer.encode(template.render([{"role": "user", "content": q}]), add_bos=False) for q in QUESTIONS]
  P = max(map(len, ids))
  tokens, mask = np.full((B, P), PAD_ID, np.int32), np.zeros((B, P), bool)
  for b, row in enumerate(ids):
    tokens[b, P - len(row):], mask[b, P - len(row):] = row, True
  return tokens, mask


def _measure(call, reps: int, log: list, new_tokens: int) -> dict:
  """sampling.py's warm-up call + ``reps`` timed calls (no temperature / top-p sweep), with tok/s for
  this workload (R rows x ``new_tokens``)."""
  res = _timed_calls(call, reps, log, sweep=False)
  for key in ("sweep_compiles", "sweep_compiled", "sweep_s", "sweep_workload"):
    res.pop(key)
  res["tok_s"] = R * new_tokens / res["steady_s"]
  return res


# ----------------------------------------------------------------------------------------- workers
# Each worker loads the checkpoint, times one warm-up call and `reps` steady calls, and returns a dict
# with the prompt ids it used and one decoded completion (a sanity check that the model speaks).

def worker_ours(new_tokens: int, reps: int) -> dict:
  import jax
  import jax.numpy as jnp
  from selfimprove_jax.checkpoint import load_hf
  from selfimprove_jax.models import Transformer, count_params
  from selfimprove_jax.sampling import SamplingParams, generate
  log = _compile_log()
  model_dir = checkpoint_dir()
  t0 = time.perf_counter()
  loaded = load_hf(model_dir)
  load_s = time.perf_counter() - t0
  model = Transformer(loaded.config)
  tokens, mask = prompt_batch(model_dir, loaded.tokenizer)
  prompt, prompt_mask = jnp.asarray(tokens), jnp.asarray(mask)
  no_stop = jnp.zeros((0,), jnp.int32)
  last = {}

  def call(seed, temperature, top_p, max_new_tokens=new_tokens):
    out = generate(model, loaded.params, prompt, prompt_mask, jax.random.key(seed),
                   SamplingParams.make(R, temperature=temperature, top_p=top_p), no_stop,
                   max_new_tokens=max_new_tokens, num_samples=N, pad_id=PAD_ID)
    jax.block_until_ready(out)
    if out.tokens.shape != (R, max_new_tokens) or int(out.lengths.min()) != max_new_tokens:
      raise RuntimeError(f"ours produced {out.tokens.shape}, min length {int(out.lengths.min())}")
    last["out"] = out
    return out

  del log[:]  # the loader's compiles are not the sampler's
  res = _measure(call, reps, log, new_tokens)
  sample = loaded.tokenizer.decode(jax.device_get(last["out"].tokens[0]).tolist())
  # The prefill alone (max_new_tokens=1: no decode step; its own compile first) separates the
  # prefill from the per-step cost.
  call(0, 1.0, 1.0, 1)
  t0 = time.perf_counter()
  call(1, 1.0, 1.0, 1)
  res["prefill_s"] = time.perf_counter() - t0
  res["decode_step_ms"] = 1e3 * (res["steady_s"] - res["prefill_s"]) / (new_tokens - 1)
  res.update(load_s=load_s, params=count_params(loaded.config), prompt_ids=tokens.tolist(),
             sample=sample, jax=jax.__version__)
  return res


def worker_hf(new_tokens: int, reps: int) -> dict:
  import torch
  import transformers
  from selfimprove_jax.tokenizer import load_tokenizer  # ours, for the same prompt ids (no JAX backend)
  torch.set_num_threads(os.cpu_count())
  model_dir = checkpoint_dir()
  tokenizer = load_tokenizer(os.fspath(model_dir))
  tokens, mask = prompt_batch(model_dir, tokenizer)
  t0 = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  load_s = time.perf_counter() - t0
  # No stop token, so every row runs to new_tokens. (min_new_tokens would instead mask EOS out of
  # every step's distribution: different sampling, and extra work.)
  model.generation_config.eos_token_id = None
  prompt, attention = torch.from_numpy(tokens).long(), torch.from_numpy(mask).long()
  last = {}

  def call(seed, temperature, top_p):
    torch.manual_seed(seed)
    with torch.inference_mode():
      out = model.generate(prompt, attention_mask=attention, do_sample=True, num_return_sequences=N,
                           max_new_tokens=new_tokens, temperature=temperature, top_p=top_p, top_k=0,
                           pad_token_id=PAD_ID)
    if tuple(out.shape) != (R, tokens.shape[1] + new_tokens):
      raise RuntimeError(f"hf produced {tuple(out.shape)}, expected {(R, tokens.shape[1] + new_tokens)}")
    last["out"] = out
    return out

  res = _measure(call, reps, [], new_tokens)
  # Eager PyTorch compiles nothing: compile_s is None by definition.
  res.update(compile_s=None, startup_compiles=None, load_s=load_s, params=model.num_parameters(),
             prompt_ids=tokens.tolist(), sample=tokenizer.decode(last["out"][0, tokens.shape[1]:].tolist()),
             attn_implementation=model.config._attn_implementation, threads=torch.get_num_threads(),
             torch=torch.__version__, transformers=transformers.__version__)
  return res


WORKERS = dict(ours=worker_ours, hf=worker_hf)
CONTESTANTS = ("ours", "hf")


# ----------------------------------------------------------------------------------------- driver

def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "-"
  except OSError:
    return "-"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", help="write results to this path (e.g. benchmarks/real_model_results.json)")
  parser.add_argument("--contestants", default=",".join(CONTESTANTS))
  parser.add_argument("--quick", action="store_true",
                      help=f"smoke test: {WORKLOADS['quick']} new tokens per row, 1 timed call")
  parser.add_argument("--max-wait", type=float, default=300,
                      help="before each contestant, wait up to this many seconds for other processes to go idle")
  parser.add_argument("--retries", type=int, default=1,
                      help="rerun a contestant this many times when other processes disturbed its measurement")
  parser.add_argument("--reps", type=int, default=3, help="timed calls after the warm-up (the median is reported)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--size", help=argparse.SUPPRESS)  # the workload's name: run_worker's --size
  parser.add_argument("--no-sweep", action="store_true", help=argparse.SUPPRESS)  # always: no sweep here
  args = parser.parse_args()
  if args.worker:
    print("RESULT " + json.dumps(WORKERS[args.worker](WORKLOADS[args.size], args.reps)), flush=True)
    return

  workload = "quick" if args.quick else "full"
  reps = 1 if args.quick else args.reps
  new_tokens = WORKLOADS[workload]
  model_dir = checkpoint_dir()  # fetch (and convert) once here, not in each worker
  results = {}
  for name in args.contestants.split(","):
    res = run_uncontended(lambda: run_worker(name, workload, reps, sys.executable, sweep=False,
                                             max_wait_s=args.max_wait, script=__file__),
                          args.retries, f"{name:<4}")
    compile_s = "-" if res["compile_s"] is None else f"{res['compile_s']:.1f}"
    print(f"{name:<4} {res['tok_s']:7.0f} tok/s  call {res['steady_s']:.2f} s  compile {compile_s:>5} s  "
          f"(others busy {res['others_busy_cores']:.2f} cores)", flush=True)
    results[name] = res
  prompts = {json.dumps(r.pop("prompt_ids")) for r in results.values()}
  if len(prompts) != 1:
    raise RuntimeError("the contestants read different prompt ids")
  prompt_ids = json.loads(prompts.pop())
  summary = dict(model=MODEL, model_dir=os.fspath(model_dir),
                 workload=dict(name=workload, prompts=B, samples=N, rows=R, new_tokens=new_tokens,
                               padded_prompt_len=len(prompt_ids[0]),
                               prompt_lens=[sum(t != PAD_ID for t in row) for row in prompt_ids],
                               temperature=1.0, top_p=1.0, top_k=0, stop_ids=[], reps=reps),
                 questions=list(QUESTIONS), prompt_ids=prompt_ids, **results)
  for name, res in results.items():
    summary[f"{name}_tok_s"] = res["tok_s"]
    summary[f"{name}_others_busy_cores"] = res["others_busy_cores"]
  if "ours" in results and "hf" in results:
    summary["ours_over_hf"] = results["ours"]["tok_s"] / results["hf"]["tok_s"]
  meta = dict(cpu=_cpu_model(), cores=os.cpu_count(), python=sys.version.split()[0], commit=_commit(),
              versions={p: _version(p) for p in ("jax", "jaxlib", "flax", "torch", "transformers")},
              command=" ".join(sys.argv))
  print_table(summary)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({**summary, "_meta": meta}, f, indent=1)


def print_table(summary: dict) -> None:
  """The results as the markdown table of BENCHMARKS.md, then the ratio."""
  w = summary["workload"]
  print(f"\n{summary['model']}: {w['prompts']} prompts x {w['samples']} samples x {w['new_tokens']} new tokens, "
        f"prompts padded to {w['padded_prompt_len']}, median of {w['reps']} call(s)\n")
  print("| contestant | tok/s | median call s | first call s | compile s | prefill s | decode step ms "
        "| others busy cores |")
  print("|---|---|---|---|---|---|---|---|")
  fmt = lambda x, spec: "-" if x is None else format(x, spec)
  for name in CONTESTANTS:
    r = summary.get(name)
    if r is not None:
      print(f"| {name} | {r['tok_s']:,.0f} | {r['steady_s']:.2f} | {r['first_call_s']:.2f} | "
            f"{fmt(r['compile_s'], '.1f')} | {fmt(r.get('prefill_s'), '.2f')} | "
            f"{fmt(r.get('decode_step_ms'), '.1f')} | {r['others_busy_cores']:.2f} |")
  if "ours_over_hf" in summary:
    print(f"\nours / HF = {summary['ours_over_hf']:.2f}x")
  for name in CONTESTANTS:
    if name in summary:
      print(f"{name} row 0: {summary[name]['sample']!r}")


if __name__ == "__main__":
  main()
