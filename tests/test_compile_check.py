"""Compile-only memory check of real presets on 8 fake CPU devices, with abstract params.

Per-device bytes must follow from the parameter count and dtype: the sharding arithmetic must agree
with the analytic split and with the arguments XLA itself reports for the compiled step, and a
budget below the total must be reported as not fitting (exit status 1 from the CLI).
"""
import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest
from absl import app, flags

from selfimprove_jax import compile_check as cc
from selfimprove_jax import sharding as sh
from selfimprove_jax.models import (count_params, get_preset, param_logical_names,
                                    param_shapes)
from selfimprove_jax.training import make_optimizer, make_schedule, state_shardings

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 1024**3


def _close(got, want, rel):
  assert abs(got / want - 1) <= rel, f"{got:,} vs {want:,} ({got / want - 1:+.3%})"


def test_llama3_1_8b_compiled_on_fsdp_8():
  """One real-size compile, the sample step (~15 s on 2 cores; the update step's takes ~30 s, so
  its XLA cross-check runs at tiny size below): 8.03B bf16 parameters replicated for sampling,
  split 8 ways with their AdamW moments for training."""
  report = cc.check("llama3_1_8b", {"fsdp": 8}, batch=8, seq_len=128, num_samples=2,
                    max_new_tokens=32, dtype="bfloat16", budget_gib=16.0,
                    compile=("sample",), compiler_options=cc.FAST_CPU_COMPILE)
  update, sample = report.steps
  n = count_params(get_preset("llama3_1_8b"))
  assert n == 8_030_261_248
  # Update step: every matrix has the embed axis, split over fsdp=8; only norm scales replicate.
  assert not update.compiled
  _close(update.params, n * 2 / 8, 0.001)
  assert update.params >= n * 2 / 8
  # AdamW: mu and nu in the params' dtype and sharding, plus two int32 step counters.
  _close(update.optimizer, 2 * n * 2 / 8, 0.001)
  assert update.optimizer == 2 * update.params + 8
  # The batch: 8 x 128 tokens (int32) and two bool masks, one row per device; step and key.
  assert update.inputs == 128 * (4 + 1 + 1) + 4 + 8
  assert update.fits is True  # 5.6 GiB of state, no temporaries without a compile
  # Sample step: parameters replicated over fsdp, so every device holds all 8.03B in bf16.
  assert sample.compiled and sample.params == n * 2
  assert sample.argument == sample.params + sample.inputs  # what XLA reports, to the byte
  # KV cache: 16 rows / 8 devices x 8 kv heads x 128 slots (96 prompt + 32 new) x 128 x bf16,
  # k and v of 32 layers, plus int32 slot positions and the write index.
  assert sample.kv_cache == 32 * 2 * 2 * 8 * 128 * 128 * 2 + 2 * 128 * 4 + 4
  assert sample.temp > sample.kv_cache and sample.total > sample.params
  # 15 GiB of weights alone: a 16 GiB budget does not fit once temporaries count, 1 TiB does.
  assert sample.budget == 16 * GIB and sample.fits is False and report.fits is False
  text = cc.format_report(report)
  assert re.search(r"budget .* DOES NOT FIT \(over by [0-9.]+ GiB\)", text), text
  assert "verdict: DOES NOT FIT: sample" in text
  assert re.search(r"params +14\.958 GiB +16,060,522,496 B +=.* / 1\.00", text), text
  assert re.search(r"params +1\.870 GiB +2,008,031,232 B +=.* / 8\.00", text), text
  assert re.search(r"arguments \(XLA\) .* = params \+ inputs", text), text
  roomy = dataclasses.replace(report, steps=tuple(dataclasses.replace(s, budget=1024 * GIB)
                                                  for s in report.steps))
  assert roomy.fits is True and "verdict: every step FITS" in cc.format_report(roomy)


@pytest.mark.parametrize("dtype, itemsize", [("bfloat16", 2), ("float32", 4)])
def test_gemma2_9b_accounting_on_a_3d_mesh(dtype, itemsize):
  """The sharding arithmetic of both steps (no compile) on data=2, fsdp=2, tensor=2."""
  report = cc.check("gemma2_9b", "data=2,fsdp=2,tensor=2", batch=4, seq_len=1024, num_samples=4,
                    max_new_tokens=256, dtype=dtype, budget_gib=16.0, compile=False)
  update, sample = report.steps
  cfg = get_preset("gemma2_9b")
  n = count_params(cfg)
  # Training splits matrices over fsdp x tensor, sampling over tensor only (norms replicated).
  _close(update.params, n * itemsize / 4, 0.002)
  _close(sample.params, n * itemsize / 2, 0.002)
  assert update.optimizer == 2 * update.params + 8
  # KV cache: 16 rows over data x fsdp = 4 per device, 8 kv heads over tensor = 4, 1024 slots,
  # head_dim 256, k and v of 42 layers; slot positions int32.
  kv = 42 * 2 * (16 // 4) * (8 // 2) * 1024 * 256 * itemsize + (16 // 4) * 1024 * 4 + 4
  assert sample.kv_cache == kv
  assert not update.compiled and update.total == update.params + update.optimizer + update.inputs
  assert sample.total == sample.params + sample.inputs + sample.kv_cache
  assert update.fits is (dtype == "bfloat16")  # float32: 3 x 8.6 GiB of state per device
  assert "lower bound: no temporaries" in cc.format_report(report)


@pytest.mark.parametrize("kwargs, message", [
    (dict(preset="llama9_9b"), "preset='llama9_9b': unknown; known presets: ["),
    (dict(mesh="fsdp=3"), "mesh='fsdp=3': mesh shape={'data': 1, 'fsdp': 3, 'tensor': 1} needs 3 "
                          "devices, have 8"),
    (dict(mesh="fsdp:8"), "mesh='fsdp:8': must be comma-separated AXIS=SIZE"),
    (dict(mesh="model=8"), "mesh='model=8': must be comma-separated AXIS=SIZE"),
    (dict(dtype="fp8"), "dtype='fp8': must be one of ('float32', 'bfloat16', 'float16')"),
    (dict(batch=12), "batch=12: must be a multiple of the mesh's 8 batch shards (data x fsdp) "
                     "times num_microbatches=1"),
    (dict(batch=8, num_microbatches=2), "batch=8: must be a multiple of the mesh's 8 batch shards"),
    (dict(steps=("update", "decode")), "steps='update,decode': must be a non-empty list of"),
    (dict(steps=("sample",), batch=1, num_samples=4), "batch=1: times num_samples=4 (4 sampled rows) "
                                                      "must be a multiple of the mesh's 8"),
    (dict(steps=("sample",), max_new_tokens=2048), "max_new_tokens=2048: must be < seq_len=2048"),
    (dict(budget_gib=0.0), "budget_gib=0.0: must be > 0"),
    (dict(remat="some"), "remat='some': must be empty or one of ['dots', 'full']"),
], ids=["preset", "mesh_devices", "mesh_syntax", "mesh_axis", "dtype", "batch", "microbatches",
        "steps", "sample_rows", "prompt_len", "budget", "remat"])
def test_bad_inputs_name_the_flag_and_value(kwargs, message):
  kwargs = {"preset": "llama3_1_8b", "mesh": "fsdp=8", **kwargs}
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    cc.check(kwargs.pop("preset"), kwargs.pop("mesh"), compile=False, **kwargs)


def test_train_state_shardings_are_the_training_modules():
  cfg = get_preset("tiny_gemma2")
  mesh = cc.build_mesh("data=2,fsdp=2,tensor=2")
  optimizer = make_optimizer(make_schedule("constant", 1e-5))
  ours = cc.train_state_shardings(cfg, optimizer, mesh)
  theirs = state_shardings(cfg, optimizer, mesh, sh.TRAIN_RULES)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  assert all(a == b for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)))
  shapes, names = cc.abstract_params(cfg)
  assert shapes == param_shapes(cfg) and names == param_logical_names(cfg)
  assert cc.param_count(cfg) == count_params(cfg)


def test_num_cpu_devices_after_the_backend_started_is_refused(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", ""))
  assert jax.device_count() == 8
  with pytest.raises(ValueError, match=r"^num_cpu_devices=4: JAX's backend was already "
                                       r"initialized with 8 cpu device\(s\)"):
    cc.use_cpu_devices(4)


def test_flags_errors_name_the_flag():
  """The CLI's flags, parsed in-process on their own FlagValues (no compile)."""
  fv = flags.FlagValues()
  holders = cc.define_flags(fv)
  fv(["compile_check", "--preset=llama3_1_8b", "--mesh=fsdp=8", "--batch=6", "--nocompile"])
  values = {name: holder.value for name, holder in holders.items()}
  with pytest.raises(app.UsageError, match=re.escape("--batch=6: must be a multiple of the "
                                                     "mesh's 8 batch shards")) as caught:
    cc.run_flags(values)
  assert caught.value.exitcode == 2
  with pytest.raises(app.UsageError, match=re.escape("--mesh='fsdp=16': mesh shape=")):
    cc.run_flags({**values, "mesh": "fsdp=16"})
  with pytest.raises(app.UsageError, match=re.escape("--preset=None: is required")):
    cc.run_flags({**values, "preset": None})


def test_update_step_arguments_match_the_accounting():
  """The compiled update step (tiny, same code path as a preset) takes exactly the accounted
  params + AdamW state + batch, and aliases the donated state."""
  report = cc.check("tiny_gemma2", "data=2,fsdp=2,tensor=2", steps=("update",), batch=4,
                    seq_len=16, dtype="float32", compiler_options=cc.FAST_CPU_COMPILE)
  (s,) = report.steps
  assert s.compiled and s.argument == s.params + s.optimizer + s.inputs
  _close(s.alias, s.params + s.optimizer, 0.001)
  assert s.optimizer == 2 * s.params + 8
  assert s.fits is True and s.total == s.argument + s.output - s.alias + s.temp


def test_cli_prints_the_table_and_exits_1_when_it_does_not_fit():
  """End to end in a fresh process: --num_cpu_devices=4 wins over the session's XLA_FLAGS (8
  devices); a budget below the total exits with status 1."""
  proc = subprocess.run(
      [sys.executable, "-m", "selfimprove_jax.compile_check", "--preset=tiny_llama3",
       "--mesh=fsdp=-1", "--num_cpu_devices=4", "--batch=4", "--seq_len=16", "--max_new_tokens=4",
       "--budget_gib=0.0001", "--nocompile"], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 1, proc.stderr
  out = proc.stdout
  assert "mesh data=1 fsdp=4 tensor=1 = 4 cpu device(s)" in out, out
  assert re.search(r"^update step: .*\n +params .*\n +optimizer state", out, re.M), out
  assert re.search(r"^sample step: .*\n +params .*\n +inputs .*\n +KV cache", out, re.M), out
  assert re.search(r"budget .* DOES NOT FIT", out), out
  assert "verdict: DOES NOT FIT: update, sample" in out
