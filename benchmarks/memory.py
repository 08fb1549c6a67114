"""Memory at scale: the flagship runs' update, sample and score steps compiled by XLA:TPU for the
TPU slices they run on, on this machine (no TPU needed: libtpu compiles for a topology that is
not there), per-chip bytes against the chips' HBM as the compiler reports it.

    python benchmarks/memory.py --json benchmarks/memory_results.json   # ~1 h on 2 cores
    python benchmarks/memory.py --rows qwen_grpo --json R.json --update   # redo one row

Needs libtpu (``pip install -e '.[aot]'``). Every row runs in its own process (a 9B compile holds a
few GiB of host memory). The markdown table for BENCHMARKS.md is printed at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

# name: (what it is, check() arguments). seq 1024 = 512 prompt + 512 new tokens throughout.
ROWS = {
    "llama8b_lora_sft": ("llama3_1_8b, LoRA SFT-sharpening, v5e-8", dict(
        preset="llama3_1_8b", topology="v5e:2x4", mesh="fsdp=8", loss="sft", lora_rank=16,
        batch=16, seq_len=1024, sample_batch=4, num_samples=16, max_new_tokens=512,
        score_batch=64)),
    "llama8b_full_sft": ("llama3_1_8b, full fine-tune SFT (LoRA's comparison), v5e-8", dict(
        preset="llama3_1_8b", topology="v5e:2x4", mesh="fsdp=8", loss="sft", batch=16,
        seq_len=1024, steps=("update",))),
    "qwen_grpo": ("qwen2_5_1_5b, full fine-tune GRPO (8 prompts x group 8, KL to the base), "
                  "v5e-8", dict(
        preset="qwen2_5_1_5b", topology="v5e:2x4", mesh="fsdp=8", loss="policy_gradient",
        reference=True, batch=64, seq_len=1024, sample_batch=8, num_samples=16,
        max_new_tokens=512, score_batch=64)),
    "gemma9b_lora_sft": ("gemma2_9b, LoRA SFT-sharpening, v6e-8", dict(
        preset="gemma2_9b", topology="v6e:2x4", mesh="fsdp=8", loss="sft", lora_rank=16,
        batch=16, seq_len=1024, sample_batch=4, num_samples=16, max_new_tokens=512,
        score_batch=32)),
    "qwen_sft_walkthrough": ("qwen2_5_1_5b, full fine-tune SFT-sharpening (launch/README.md's "
                             "walkthrough: configs/sft_sharpening.py), v5e-8", dict(
        preset="qwen2_5_1_5b", topology="v5e:2x4", mesh="fsdp=8", loss="sft", batch=32,
        seq_len=1024, sample_batch=16, num_samples=8, max_new_tokens=512, score_batch=32)),
}
GIB = 2**30


def run_row(name: str) -> dict:
  """Compiles one row's steps in this process; returns its numbers."""
  from selfimprove_jax import compile_check as cc  # pylint: disable=g-import-not-at-top
  _, kwargs = ROWS[name]
  kwargs = dict(kwargs)
  devices = cc.tpu_devices(kwargs.pop("topology"))
  preset, mesh = kwargs.pop("preset"), kwargs.pop("mesh")
  report = cc.check(preset, mesh, devices=devices, **kwargs)
  print(cc.format_report(report), file=sys.stderr, flush=True)
  return {"device_kind": report.device_kind, "chips": len(devices),
          "steps": [dict(dataclasses.asdict(s), total=s.total, fits=s.fits, headroom=s.headroom)
                    for s in report.steps]}


def table(results: dict) -> str:
  """The markdown table: one line per step, GiB per chip."""
  gib = lambda n: "-" if n is None else f"{n / GIB:.2f}"
  lines = ["| run | step | params | optimizer | KV cache | temporaries | total | HBM | headroom "
           "| verdict | compile |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, (label, _) in ROWS.items():
    if name not in results:
      continue
    for s in results[name]["steps"]:
      verdict = "refused by XLA:TPU" if s["refused"] else "FITS" if s["fits"] else "DOES NOT FIT"
      lines.append(f"| {label} | {s['step']}: {s['description']} | {gib(s['params'])} | "
                   f"{gib(s['optimizer'])} | {gib(s['kv_cache'])} | {gib(s['temp'])} | "
                   f"{gib(s['total'])} | {gib(s['budget'])} | {s['headroom']:.0%} | {verdict} | "
                   f"{s['compile_s']:.0f} s |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
  parser.add_argument("--json", help="write results to this path")
  parser.add_argument("--update", action="store_true", help="keep the --json file's other rows")
  parser.add_argument("--row", help=argparse.SUPPRESS)  # worker: one row, JSON on stdout
  args = parser.parse_args()
  if args.row:
    print("RESULT " + json.dumps(run_row(args.row)), flush=True)
    return
  results = {}
  if args.update and args.json and os.path.exists(args.json):
    with open(args.json) as f:
      results = json.load(f)
  for name in args.rows.split(","):
    start = time.time()
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, __file__, "--row", name], capture_output=True,
                          text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    results[name] = json.loads(lines[-1][len("RESULT "):])
    results[name]["wall_s"] = round(time.time() - start, 1)
    print(f"{name}: {results[name]['wall_s']} s", flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
  print(table(results))


if __name__ == "__main__":
  main()
