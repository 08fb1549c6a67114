"""Sampling throughput: our ``generate`` vs Tunix's ``Sampler`` vs Hugging Face ``generate``.

    python benchmarks/sampling.py --json results.json            # both sizes, ~9 min on 2 idle cores
    python benchmarks/sampling.py --sizes 4M --quick             # one size, fewer repetitions

Every contestant runs in its own subprocess (its own interpreter and virtualenv, no fake devices, the
same empty ``XLA_FLAGS``), one after the other, on random-weight Llama-style models of the same sizes
and the same workload: 8 prompts x 8 samples, prompt length 128, 128 new tokens, no stop token,
temperature 1, top-p 1 (no truncation).

  ours   ``selfimprove_jax.sampling.generate``: B=8 prompts in, one prefill per prompt, 64 rows out.
  tunix  Tunix 0.1.7 ``Sampler`` over its own ``Llama3`` (flax.nnx), the 8 prompts repeated 8 times
         (64 rows), in a virtualenv created on demand under ``$BENCH_ENVS`` (default ~/.cache/selfimprove_jax/bench_envs)
         with the same jax/jaxlib/flax versions as ours.
  hf     transformers ``LlamaForCausalLM.generate`` on PyTorch CPU, fp32, ``num_return_sequences=8``.

Per contestant: steady-state new tokens/s (median of the timed calls after one warm-up call); compile
time (first call minus the steady median); XLA backend compilations, counted with a ``jax.monitoring``
listener, during a sweep of 5 temperatures x 3 top-p values after warm-up (on 1 prompt x 8 samples x 16
new tokens to keep it cheap: recompiling is a property of the API, not of the sizes); the prefill /
per-decode-step split.
A roofline floor (measured fp32 matmul FLOP/s and read bandwidth) bounds what any sampler can reach
on this machine. The driver waits for other processes to go idle before each contestant, measures how
busy they kept the CPUs during it, and reruns a disturbed measurement; all of it lands in ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata

SIZES = {  # Llama 3 style: SwiGLU, RMSNorm, RoPE, GQA, untied embeddings, fp32.
    "4M": dict(vocab=8192, d=128, layers=6, heads=4, kv_heads=2, head_dim=32, mlp=640),
    "30M": dict(vocab=8192, d=512, layers=6, heads=8, kv_heads=2, head_dim=64, mlp=2048),
}
B, N, P, M = 8, 8, 128, 128  # prompts, samples per prompt, prompt length, new tokens
R = B * N
TEMPERATURES = (0.5, 0.7, 1.0, 1.2, 1.5)
TOP_PS = (1.0, 0.95, 0.8)
SWEEP_PROMPTS, SWEEP_TOKENS = 1, 16  # the sweep's workload: 1 prompt x N samples, 16 new tokens
CONTENDED = 0.25  # cores kept busy by other processes during a measurement above which it is redone
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TUNIX_VERSION = "0.1.7"
BENCH_ENVS = os.environ.get("BENCH_ENVS", os.path.expanduser("~/.cache/selfimprove_jax/bench_envs"))



def _timed(call, seed: int) -> float:
  """Wall seconds of one blocking call at temperature 1, top-p 1."""
  t0 = time.perf_counter()
  call(seed, 1.0, 1.0)
  return time.perf_counter() - t0

def param_count(s: dict) -> int:
  per_layer = (s["d"] * s["heads"] * s["head_dim"] * 2 + s["d"] * s["kv_heads"] * s["head_dim"] * 2
               + 3 * s["d"] * s["mlp"] + 2 * s["d"])
  return s["layers"] * per_layer + 2 * s["vocab"] * s["d"] + s["d"]


def prompts(s: dict):
  import numpy as np
  # Ids in [1, vocab): 0 is the pad id of every contestant and must not appear in a prompt.
  return np.random.default_rng(0).integers(1, s["vocab"], size=(B, P), dtype=np.int32)


# ----------------------------------------------------------------------------------------- workers
# Each worker builds its model, times one warm-up call, `reps` steady calls and the 15-call sweep,
# and returns a dict. They import only their own stack: the Tunix one runs in Tunix's virtualenv.

def _compile_log():
  import jax
  log = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: log.append((kw.get("fun_name", "?"), secs)) if event == COMPILE_EVENT else None)
  return log


def _timed_calls(call, reps: int, log, sweep: bool = True) -> dict:
  """Warm-up call, `reps` timed calls, then the sweep: its own warm-up call on a smaller workload
  (SWEEP_PROMPTS prompts, SWEEP_TOKENS new tokens: whether a new temperature or top-p compiles does not
  depend on the sizes, and the sweep stays cheap) and 15 counted calls."""
  first_s = _timed(call, 0)
  startup_compiles = len(log)  # model init and the first call
  times = [_timed(call, 1 + i) for i in range(reps)]
  steady = statistics.median(times)
  grid = [(t, p) for t in TEMPERATURES for p in TOP_PS] if sweep else []
  if sweep:
    call(99, 1.0, 1.0, SWEEP_TOKENS, SWEEP_PROMPTS)
  del log[:]
  t0 = time.perf_counter()
  for j, (t, p) in enumerate(grid):
    call(100 + j, t, p, SWEEP_TOKENS, SWEEP_PROMPTS)
  sweep_s = time.perf_counter() - t0
  return dict(first_call_s=first_s, startup_compiles=startup_compiles, steady_s=steady, times_s=times,
              tok_s=R * M / steady, compile_s=first_s - steady, sweep_compiles=len(log) if sweep else None,
              sweep_compiled=sorted({name for name, _ in log}), sweep_s=sweep_s,
              sweep_workload=dict(prompts=SWEEP_PROMPTS, samples=N, new_tokens=SWEEP_TOKENS) if sweep else None)


def our_config(s: dict):
  """Our ``TransformerConfig`` of size ``s`` (Llama 3 family, untied, fp32)."""
  from selfimprove_jax.models import TransformerConfig
  return TransformerConfig(family="llama3", vocab_size=s["vocab"], embed_dim=s["d"], num_layers=s["layers"],
                           num_heads=s["heads"], num_kv_heads=s["kv_heads"], head_dim=s["head_dim"],
                           mlp_dim=s["mlp"], tie_embeddings=False, rope_theta=500_000.0, max_len=512)


def worker_ours(s: dict, reps: int, sweep: bool) -> dict:
  import jax
  import jax.numpy as jnp
  from selfimprove_jax.models import Transformer, count_params, init_params
  from selfimprove_jax.sampling import SamplingParams, generate
  log = _compile_log()
  cfg = our_config(s)
  model, params = Transformer(cfg), init_params(cfg, jax.random.key(0))
  prompt = jnp.asarray(prompts(s))
  mask = jnp.ones((B, P), bool)
  no_stop = jnp.zeros((0,), jnp.int32)

  def call(seed, temperature, top_p, max_new_tokens=M, num_prompts=B):
    out = generate(model, params, prompt[:num_prompts], mask[:num_prompts], jax.random.key(seed),
                   SamplingParams.make(num_prompts * N, temperature=temperature, top_p=top_p), no_stop,
                   max_new_tokens=max_new_tokens, num_samples=N)
    jax.block_until_ready(out)
    if out.tokens.shape != (num_prompts * N, max_new_tokens) or int(out.lengths.min()) != max_new_tokens:
      raise RuntimeError(f"ours produced {out.tokens.shape}, min length {int(out.lengths.min())}")
    return out

  res = _timed_calls(call, reps, log, sweep)
  # The prefill alone (max_new_tokens=1: no decode step) separates prefill from per-step cost.
  call(0, 1.0, 1.0, 1)
  t0 = time.perf_counter()
  call(1, 1.0, 1.0, 1)
  res["prefill_s"] = time.perf_counter() - t0
  res["decode_step_ms"] = 1e3 * (res["steady_s"] - res["prefill_s"]) / (M - 1)
  res["params"] = count_params(cfg)
  return res


class _IdTokenizer:
  """Space-separated decimal ids <-> ids; no vocabulary file, no download."""

  def __init__(self, eos: int):
    self._eos = eos

  def encode(self, text, **_):
    return [int(t) for t in text.split()]

  def decode(self, ids, **_):
    return " ".join(map(str, ids))

  def bos_id(self):
    return None  # no BOS is prepended: the prompts are used as given

  def eos_id(self):
    return self._eos

  def pad_id(self):
    return 0


def tunix_llama3(s: dict, is_sampling: bool = True):
  """Tunix's ``Llama3`` (flax.nnx) of size ``s``, every matrix redrawn N(0, 1/fan_in)."""
  import jax
  from flax import nnx
  from tunix.models.llama3 import model as llama3
  config = llama3.ModelConfig(num_layers=s["layers"], vocab_size=s["vocab"], embed_dim=s["d"],
                              hidden_dim=s["mlp"], num_heads=s["heads"], head_dim=s["head_dim"],
                              num_kv_heads=s["kv_heads"], rope_theta=500_000, norm_eps=1e-5,
                              shd_config=llama3.ShardingConfig.get_default_sharding(is_sampling=is_sampling))
  model = llama3.Llama3(config, rngs=nnx.Rngs(0))
  # Tunix initialises the MLP to zeros: give every matrix fan-in scaled random values instead.
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  leaves = [x if x.ndim == 1 else jax.random.normal(k, x.shape, x.dtype) * x.shape[0] ** -0.5
            for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def worker_tunix(s: dict, reps: int, sweep: bool) -> dict:
  import jax
  import numpy as np
  import tunix
  from flax import nnx
  from tunix.generate import sampler as tunix_sampler
  log = _compile_log()
  model = tunix_llama3(s)
  eos = s["vocab"]  # an id the model cannot produce: no row ever stops early
  sampler = tunix_sampler.Sampler(model, _IdTokenizer(eos), tunix_sampler.CacheConfig(
      cache_size=P + M, num_layers=s["layers"], num_kv_heads=s["kv_heads"], head_dim=s["head_dim"]))
  texts = [" ".join(map(str, row)) for row in np.repeat(prompts(s), N, axis=0)]

  phases = {"prefill": 0.0, "decode": 0.0}

  def timed(name, fn):
    def wrapped(*args, **kwargs):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kwargs))
      phases[name] = time.perf_counter() - t0
      return out
    return wrapped

  sampler._compiled_prefill_fn = timed("prefill", sampler._compiled_prefill_fn)
  sampler._compiled_decode_fn = timed("decode", sampler._compiled_decode_fn)

  def call(seed, temperature, top_p, max_new_tokens=M, num_prompts=B):
    out = sampler(texts[:num_prompts * N], max_generation_steps=max_new_tokens, max_prompt_length=P,
                  temperature=temperature, top_p=top_p, eos_tokens=[eos], seed=seed)
    lengths = {len(t) for t in out.tokens}
    if len(out.tokens) != num_prompts * N or lengths != {max_new_tokens}:
      raise RuntimeError(f"tunix produced {len(out.tokens)} rows of lengths {lengths}")
    return out

  res = _timed_calls(call, reps, log, sweep)
  call(1, 1.0, 1.0)
  res["prefill_s"] = phases["prefill"]
  res["decode_step_ms"] = 1e3 * phases["decode"] / M  # Tunix's loop runs M steps after the prefill
  res["params"] = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  res["version"] = tunix.__version__
  return res


def worker_hf(s: dict, reps: int, sweep: bool) -> dict:
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count())
  config = transformers.LlamaConfig(
      vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
      num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
      max_position_embeddings=512, rope_theta=500_000.0, tie_word_embeddings=False,
      bos_token_id=None, eos_token_id=None, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  prompt = torch.from_numpy(prompts(s)).long()

  def call(seed, temperature, top_p):
    torch.manual_seed(seed)
    with torch.inference_mode():
      out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, num_return_sequences=N,
                           max_new_tokens=M, min_new_tokens=M, temperature=temperature, top_p=top_p, top_k=0,
                           eos_token_id=None, pad_token_id=0)
    if tuple(out.shape) != (R, P + M):
      raise RuntimeError(f"hf produced {tuple(out.shape)}")
    return out

  first_s = _timed(call, 0)
  times = [_timed(call, 1 + i) for i in range(reps)]
  steady = statistics.median(times)
  # Eager PyTorch compiles nothing: compile_s and sweep_compiles are None by definition.
  return dict(first_call_s=first_s, steady_s=steady, times_s=times, tok_s=R * M / steady,
              compile_s=None, sweep_compiles=None, params=model.num_parameters(),
              torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads())


def worker_roofline(_: dict, reps: int, sweep: bool) -> dict:
  """Best-of-reps fp32 matmul FLOP/s and read bandwidth (a sum over 512 MiB) in JAX."""
  import jax
  import jax.numpy as jnp
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  big = jnp.ones((128 * 2**20,), jnp.float32)
  total = jax.jit(jnp.sum)

  def best(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(max(reps, 5)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t0)
    return min(times)

  return dict(flops=2 * n**3 / best(matmul, a, a), read_bw=big.nbytes / best(total, big))


WORKERS = dict(ours=worker_ours, tunix=worker_tunix, hf=worker_hf, roofline=worker_roofline)
CONTESTANTS = ("ours", "tunix", "hf")


# ----------------------------------------------------------------------------------------- floor

def floor_seconds(s: dict, flops_per_s: float, bytes_per_s: float) -> dict:
  """Least time for the workload: per pass max(FLOPs / peak, bytes / bandwidth), summed.

  One prefill of B prompts (projecting only each prompt's last position onto the vocabulary), then
  M - 1 decode passes over R rows (the last sampled token is never fed back). A decode pass must read
  every weight but the embedding table, the shared prompt KV once per prompt and each row's own
  generated KV, and write then read the R x V logits. fp32 everywhere.
  """
  D, L, H, K, F, V = s["d"], s["layers"], s["heads"], s["kv_heads"], s["head_dim"], s["vocab"]
  layer_w = 2 * D * H * F + 2 * D * K * F + 3 * D * s["mlp"]
  weights_bytes = 4 * (L * (layer_w + 2 * D) + D * V + D)
  kv_per_token = 4 * 2 * L * K * F
  pre_flops = 2 * B * P * L * layer_w + 2 * B * D * V + 2 * L * B * H * F * P * (P + 1)
  pre_bytes = weights_bytes + B * P * kv_per_token
  prefill = max(pre_flops / flops_per_s, pre_bytes / bytes_per_s)
  decode = []
  for t in range(1, M):
    context = P + t
    flops = 2 * R * (L * layer_w + D * V) + 4 * R * L * H * F * context
    bytes_ = weights_bytes + B * P * kv_per_token + R * t * kv_per_token + 2 * 4 * R * V
    decode.append(max(flops / flops_per_s, bytes_ / bytes_per_s))
  compute_bound = sum(
      1 for t in range(1, M)
      if (2 * R * (L * layer_w + D * V) + 4 * R * L * H * F * (P + t)) / flops_per_s >= decode[t - 1] * 0.999)
  return dict(prefill_s=prefill, decode_s=sum(decode), decode_step_ms=1e3 * sum(decode) / (M - 1),
              total_s=prefill + sum(decode), decode_steps_compute_bound=compute_bound)


# ----------------------------------------------------------------------------------------- driver

def _tunix_python() -> str:
  env = os.path.join(BENCH_ENVS, "tunix")
  python = os.path.join(env, "bin", "python")
  probe = [python, "-c", "import importlib.metadata as m; print(m.version('google-tunix'))"]
  if os.path.exists(python) and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == TUNIX_VERSION:
    return python
  print(f"creating {env} with google-tunix=={TUNIX_VERSION} (a few minutes)", flush=True)
  subprocess.run([sys.executable, "-m", "venv", env], check=True)
  pins = [f"{name}=={metadata.version(name)}" for name in ("jax", "jaxlib", "flax")]  # the same XLA as ours
  subprocess.run([python, "-m", "pip", "install", "-q", f"google-tunix=={TUNIX_VERSION}", *pins], check=True)
  return python


def _cpu_busy_jiffies() -> int:
  with open("/proc/stat") as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def others_busy_cores(seconds: float = 2.0) -> float:
  """CPU cores kept busy by other processes (nothing of ours runs while this samples)."""
  busy0 = _cpu_busy_jiffies()
  time.sleep(seconds)
  return (_cpu_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK") / seconds


def wait_until_quiet(max_wait_s: float, threshold: float = 0.2) -> float:
  """Waits (up to max_wait_s) until other processes use under `threshold` cores; returns the last reading."""
  deadline = time.time() + max_wait_s
  busy = others_busy_cores()
  while busy > threshold and time.time() < deadline:
    print(f"  waiting: other processes keep {busy:.1f} cores busy", flush=True)
    time.sleep(10)
    busy = others_busy_cores()
  return busy


def run_worker(name: str, size: str, reps: int, python: str, sweep: bool = True, max_wait_s: float = 0,
               script: str = __file__) -> dict:
  """Runs one worker of ``script`` (a benchmark with this file's ``--worker`` flags) in a fresh
  interpreter; records the load other processes put on the CPUs."""
  busy_before = wait_until_quiet(max_wait_s)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "PYTHONPATH"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2", TOKENIZERS_PARALLELISM="false")
  load_before = os.getloadavg()
  busy0, child0, t0 = _cpu_busy_jiffies(), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
  command = [python, os.path.abspath(script), "--worker", name, "--size", size, "--reps", str(reps)]
  proc = subprocess.run(command + ([] if sweep else ["--no-sweep"]), capture_output=True, text=True, env=env)
  wall = time.time() - t0
  child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  own_cpu = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
  busy_cpu = (_cpu_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{name} ({size}) failed with exit code {proc.returncode}:\n{proc.stderr[-4000:]}")
  result = json.loads(lines[-1][len("RESULT "):])
  result.update(wall_s=wall, loadavg_before=list(load_before), loadavg_after=list(os.getloadavg()),
                others_busy_cores_before=busy_before, others_busy_cores=max(0.0, (busy_cpu - own_cpu) / wall))
  return result


def run_uncontended(run, retries: int, label: str) -> dict:
  """``run()`` (a ``run_worker`` call), redone up to ``retries`` times while other processes kept
  more than ``CONTENDED`` cores busy; the least disturbed result, marked ``contended`` if even
  that one was."""
  res = run()
  for _ in range(retries):
    if res["others_busy_cores"] <= CONTENDED:
      break
    print(f"{label} rerun: other processes kept {res['others_busy_cores']:.2f} cores busy", flush=True)
    res = min(res, run(), key=lambda r: r["others_busy_cores"])
  res["contended"] = res["others_busy_cores"] > CONTENDED
  return res


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", help="write results to this path")
  parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {list(SIZES)}")
  parser.add_argument("--contestants", default="ours,tunix,hf")
  parser.add_argument("--quick", action="store_true",
                      help="the sweep at the first size only")
  parser.add_argument("--max-wait", type=float, default=300,
                      help="before each contestant, wait up to this many seconds for other processes to go idle")
  parser.add_argument("--retries", type=int, default=1,
                      help="rerun a contestant this many times when other processes disturbed its measurement")
  parser.add_argument("--update", action="store_true",
                      help="start from the existing --json file and replace only what this run measures")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--size", help=argparse.SUPPRESS)
  parser.add_argument("--reps", type=int, default=3, help="timed calls after the warm-up (the median is reported)")
  parser.add_argument("--no-sweep", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print("RESULT " + json.dumps(WORKERS[args.worker](SIZES[args.size], args.reps, not args.no_sweep)), flush=True)
    return

  sizes, contestants = args.sizes.split(","), args.contestants.split(",")
  results = {}
  if args.update:
    with open(args.json) as f:
      results = json.load(f)
  results.pop("_meta", None)
  pythons = dict(ours=sys.executable, hf=sys.executable, roofline=sys.executable)
  if "tunix" in contestants:
    pythons["tunix"] = _tunix_python()
  # The floor uses the best roofline seen (start, end, and an updated file's): a peak, not a typical value.
  roofs = [run_worker("roofline", sizes[0], 5, sys.executable, max_wait_s=args.max_wait)]
  roofs += [row["roofline"] for row in results.values()]
  for size in sizes:
    row = results.setdefault(size, {})
    for name in contestants:
      sweep = not args.quick or size == sizes[0]
      res = run_uncontended(lambda: run_worker(name, size, args.reps, pythons[name], sweep, args.max_wait),
                            args.retries, f"{size:>4} {name:<6}")
      compile_s = "-" if res["compile_s"] is None else f"{res['compile_s']:.1f}"
      print(f"{size:>4} {name:<6} {res['tok_s']:8.0f} tok/s  compile {compile_s:>5} s  "
            f"sweep compiles {res['sweep_compiles']}  (others busy {res['others_busy_cores']:.2f} cores)",
            flush=True)
      row[name] = res
  roofs.append(run_worker("roofline", sizes[0], 5, sys.executable, max_wait_s=args.max_wait))
  roof = dict(flops=max(r["flops"] for r in roofs), read_bw=max(r["read_bw"] for r in roofs))
  print(f"roofline: {roof['flops'] / 1e9:.1f} GFLOP/s fp32 matmul, {roof['read_bw'] / 1e9:.1f} GB/s read", flush=True)
  for size, row in results.items():
    derive(size, row, roof)
  meta = dict(cpu=_cpu_model(), cores=os.cpu_count(), python=sys.version.split()[0],
              versions={p: _version(p) for p in ("jax", "jaxlib", "flax", "torch", "transformers")},
              tunix=TUNIX_VERSION, command=" ".join(sys.argv))
  print_table(results)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({**results, "_meta": meta}, f, indent=1)


def derive(size: str, row: dict, roof: dict) -> None:
  """Fills the floor and the summary fields of one size from its contestants' raw results."""
  s = SIZES[size]
  floor = floor_seconds(s, roof["flops"], roof["read_bw"])
  row.update(params=param_count(s), config=s, floor_tok_s=R * M / floor["total_s"], floor=floor, roofline=roof,
             workload=dict(prompts=B, samples=N, prompt_len=P, new_tokens=M, rows=R))
  for name in CONTESTANTS:
    if name in row:
      row[f"{name}_tok_s"] = row[name]["tok_s"]
      row[f"{name}_sweep_compiles"] = row[name]["sweep_compiles"]
      row[f"{name}_frac_of_floor"] = row[name]["tok_s"] / row["floor_tok_s"]
      row[f"{name}_loadavg"] = row[name]["loadavg_before"]
  for other in ("tunix", "hf"):
    if "ours" in row and other in row:
      row[f"ours_over_{other}"] = row["ours_tok_s"] / row[f"{other}_tok_s"]


def _cpu_model() -> str:
  with open("/proc/cpuinfo") as f:
    return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")


def _version(name: str) -> str:
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return "-"


def print_table(results: dict) -> None:
  names = [c for c in CONTESTANTS if any(c in row for row in results.values())]
  print(f"\n{'size':>5} {'params':>11} {'floor tok/s':>11} | " + " | ".join(
      f"{c + ' tok/s':>11} {'%floor':>6} {'compile s':>9} {'sweep':>5}" for c in names))
  for size, row in results.items():
    cells = []
    for c in names:
      r = row.get(c)
      if r is None:
        cells.append(f"{'-':>11} {'-':>6} {'-':>9} {'-':>5}")
        continue
      compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
      cells.append(f"{r['tok_s']:11.0f} {100 * r['tok_s'] / row['floor_tok_s']:5.1f}% {compile_s:>9} "
                   f"{'-' if r['sweep_compiles'] is None else r['sweep_compiles']:>5}")
    print(f"{size:>5} {row['params']:>11,} {row['floor_tok_s']:11.0f} | " + " | ".join(cells))
  for size, row in results.items():
    ratios = [f"ours/{o} = {row[f'ours_over_{o}']:.2f}x" for o in ("tunix", "hf") if f"ours_over_{o}" in row]
    if ratios:
      print(f"{size}: " + ", ".join(ratios))


if __name__ == "__main__":
  main()
