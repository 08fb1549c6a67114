"""Compile-only memory check of real presets on 8 fake CPU devices, with abstract params.

Per-device bytes must follow from the parameter count and dtype: the sharding arithmetic must agree
with the analytic split and with the arguments XLA itself reports for the compiled step, and a
budget below the total must be reported as not fitting (exit status 1 from the CLI).
"""
import dataclasses
import importlib.util
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
  its XLA cross-check runs at tiny size below): 8.03B parameters with float32 master weights
  and AdamW moments for training, a bfloat16 copy for sampling, every one split 8 ways."""
  report = cc.check("llama3_1_8b", {"fsdp": 8}, steps=("update", "sample"), batch=8, seq_len=128,
                    num_samples=2, max_new_tokens=32, dtype="bfloat16", budget_gib=16.0,
                    compile=("sample",), compiler_options=cc.FAST_CPU_COMPILE)
  update, sample = report.steps
  n = count_params(get_preset("llama3_1_8b"))
  assert n == 8_030_261_248
  # Update step: float32 master weights; every matrix has the embed axis, split over fsdp=8.
  assert not update.compiled
  _close(update.params, n * 4 / 8, 0.001)
  assert update.params >= n * 4 / 8
  # AdamW: float32 mu and nu sharded like the params, two int32 step counters and the float32
  # learning rate (a hyperparameter in the state, set by every step).
  assert update.optimizer == 2 * update.params + 8 + 4
  # The batch: 8 x 128 tokens (int32) and two bool masks, one row per device; step, key, lr.
  assert update.inputs == 128 * (4 + 1 + 1) + 4 + 8 + 4
  assert update.fits is True  # 11.2 GiB of state, no temporaries without a compile
  # Sample step: the bfloat16 copy on the sampling mesh (fsdp=8 folded into tensor=8), split 8
  # ways over heads, MLP and vocabulary.
  _close(sample.params, n * 2 / 8, 0.002)
  assert sample.compiled and "mesh data=1 fsdp=1 tensor=8" in sample.description
  assert sample.argument == sample.params + sample.inputs  # what XLA reports, to the byte
  # KV cache: all 16 rows x 8 kv heads / 8 devices x 128 slots (96 prompt + 32 new) x 128 x
  # bf16, k and v of 32 layers, plus int32 slot positions and the write index.
  assert sample.kv_cache == 32 * 2 * 16 * 1 * 128 * 128 * 2 + 16 * 128 * 4 + 4
  assert sample.temp > sample.kv_cache and sample.total > sample.params
  # XLA:CPU's temporaries are a pessimistic stand-in (float32 copies of bfloat16 weights): the
  # verdict follows the numbers whatever they are.
  assert sample.budget == 16 * GIB and sample.fits is (sample.total <= 16 * GIB)
  text = cc.format_report(report)
  assert re.search(r"budget .* FITS \([0-9.]+ GiB, [0-9]+% to spare\)", text), text
  assert re.search(r"params +3\.740 GiB +4,016,0[0-9,]+ B +0\.500 B per model parameter", text), text
  assert re.search(r"params +1\.87[0-9] GiB +2,0[0-9,]+ B +0\.25[0-9] B per model parameter", text), text
  assert re.search(r"arguments \(XLA\) .* = params \+ inputs", text), text
  tight = dataclasses.replace(report, steps=tuple(dataclasses.replace(s, budget=2 * GIB)
                                                  for s in report.steps))
  assert tight.fits is False and "verdict: DOES NOT FIT: update, sample" in cc.format_report(tight)


@pytest.mark.parametrize("dtype, itemsize", [("bfloat16", 2), ("float32", 4)])
def test_gemma2_9b_accounting_on_a_3d_mesh(dtype, itemsize):
  """The sharding arithmetic of every step (no compile) on data=2, fsdp=2, tensor=2, full
  fine-tuning and LoRA."""
  common = dict(batch=4, seq_len=1024, num_samples=4, max_new_tokens=256, dtype=dtype,
                budget_gib=16.0, compile=False)
  report = cc.check("gemma2_9b", "data=2,fsdp=2,tensor=2", **common)
  update, sample, score = report.steps
  cfg = get_preset("gemma2_9b")
  n = count_params(cfg)
  # Training and sampling alike split matrices over fsdp x tensor (norms replicated): float32
  # master weights to train, the compute-dtype copy to sample and score.
  _close(update.params, n * 4 / 4, 0.002)
  _close(sample.params, n * itemsize / 4, 0.002)
  assert score.params == sample.params
  assert update.optimizer == 2 * update.params + 8 + 4
  # KV cache on the sampling mesh (data=2, tensor=4): 16 rows over data = 8 per device, 8 kv
  # heads over tensor = 2, 1024 slots, head_dim 256, k and v of 42 layers; int32 slot positions.
  kv = 42 * 2 * (16 // 2) * (8 // 4) * 1024 * 256 * itemsize + (16 // 2) * 1024 * 4 + 4
  assert sample.kv_cache == kv
  assert not update.compiled and update.total == update.params + update.optimizer + update.inputs
  assert sample.total == sample.params + sample.inputs + sample.kv_cache
  assert update.fits is False  # 3 x 8.6 GiB of float32 state per device
  assert "lower bound: no temporaries" in cc.format_report(report)
  # LoRA: the frozen base in the compute dtype, float32 adapters and moments (a few MiB).
  (lora_update,) = cc.check("gemma2_9b", "data=2,fsdp=2,tensor=2", steps=("update",),
                            lora_rank=16, **common).steps
  adapters = lora_update.params - sample.params
  assert 0 < adapters < 0.01 * sample.params
  assert lora_update.optimizer == 2 * adapters + 8 + 4
  assert lora_update.fits is True


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
    (dict(mesh="data=8", steps=("sample",), batch=1, num_samples=4),
     "batch=1: times num_samples=4 (4 sampled rows) must be a multiple of the mesh's 8"),
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


@pytest.mark.parametrize("recipe", [dict(), dict(loss="policy_gradient", reference=True),
                                    dict(loss="dpo", lora_rank=4)], ids=["sft", "grpo_ref", "dpo_lora"])
def test_update_step_arguments_match_the_accounting(recipe):
  """The compiled update step (tiny, same code path as a preset) takes exactly the accounted
  weights + AdamW state + batch, and aliases the donated state (not the frozen trees)."""
  report = cc.check("tiny_gemma2", "data=2,fsdp=2,tensor=2", steps=("update",), batch=4,
                    seq_len=16, dtype="float32", compiler_options=cc.FAST_CPU_COMPILE, **recipe)
  (s,) = report.steps
  assert s.compiled and s.argument == s.params + s.optimizer + s.inputs
  trainable = (s.optimizer - 12) // 2  # mu and nu are float32 copies of the trainable params
  _close(s.alias, trainable + s.optimizer, 0.001)
  assert s.fits is True and s.total == s.argument + s.output - s.alias + s.temp


def test_cli_prints_the_table_and_exits_1_when_it_does_not_fit():
  """End to end in a fresh process: --num_cpu_devices=4 wins over the session's XLA_FLAGS (8
  devices); a budget below the total exits with status 1."""
  proc = subprocess.run(
      [sys.executable, "-m", "selfimprove_jax.compile_check", "--preset=tiny_llama3",
       "--mesh=fsdp=-1", "--num_cpu_devices=4", "--batch=4", "--seq_len=16", "--max_new_tokens=4",
       "--budget_gib=0.00001", "--nocompile"], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 1, proc.stderr
  out = proc.stdout
  assert "mesh data=1 fsdp=4 tensor=1 = 4 cpu device(s)" in out, out
  assert re.search(r"^update step: .*\n +params .*\n +optimizer state", out, re.M), out
  assert re.search(r"^sample step: .*\n +params .*\n +inputs .*\n +KV cache", out, re.M), out
  assert re.search(r"budget .* DOES NOT FIT", out), out
  assert "verdict: DOES NOT FIT: update, sample, score" in out


# ------------------------------------------------------------------ XLA:TPU on a slice that is not there

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="the TPU compiler needs libtpu: pip install -e '.[aot]'")
V5E_HBM = int(15.75 * GIB)  # what XLA:TPU says a v5e chip has


def test_refusal_numbers_are_read_from_the_compilers_message():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (24.38G) exceeds available HBM (15.75G).")
  assert cc.refusal(message) == {"temp": int(24.38 * GIB), "hbm": V5E_HBM}
  assert cc.refusal("INVALID_ARGUMENT: something else") is None


@needs_libtpu
def test_tpu_compile_of_every_step_on_v5e_2x2():
  """A tiny model's update (LoRA, DPO), sample and score steps compiled by XLA:TPU for a 4-chip
  v5e slice on this CPU-only machine; the budget is the chips' HBM as the compiler reports it."""
  devices = cc.tpu_devices("v5e:2x2")
  assert len(devices) == 4 and cc.hbm_bytes(devices) == V5E_HBM
  report = cc.check("tiny_llama3", "fsdp=4", batch=8, seq_len=64, num_samples=4,
                    max_new_tokens=16, loss="dpo", lora_rank=4, devices=devices)
  assert (report.platform, report.device_kind) == ("tpu", "TPU v5 lite")
  assert [s.step for s in report.steps] == ["update", "sample", "score"]
  assert all(s.compiled and s.budget == V5E_HBM for s in report.steps)
  assert report.fits is True and "4 tpu device(s) [TPU v5 lite]" in cc.format_report(report)


@needs_libtpu
def test_tpu_compiler_refusal_is_reported_as_not_fitting():
  """Full B x L x V float32 logits without remat: XLA:TPU refuses the step, and the check reports
  the compiler's numbers as DOES NOT FIT instead of crashing. The defaults (vocabulary chunks,
  per-layer remat) bring the same step under a v5e chip's HBM."""
  devices = cc.tpu_devices("v5e:2x2")
  config = get_preset("tiny_llama3").replace(vocab_size=65536)
  common = dict(steps=("update",), batch=32, seq_len=4096, devices=devices)
  (refused,) = cc.check(config, "fsdp=4", chunk_size=None, remat=None, **common).steps
  assert refused.refused.startswith("RESOURCE_EXHAUSTED") and refused.fits is False
  assert refused.temp > V5E_HBM and refused.total > refused.temp
  text = cc.format_report(cc.Report("custom", config, {"fsdp": 4}, "tpu", "TPU v5 lite", (refused,)))
  assert "refused by the compiler: RESOURCE_EXHAUSTED" in text and "DOES NOT FIT" in text
  (fits,) = cc.check(config, "fsdp=4", **common).steps
  assert fits.compiled and fits.fits is True and fits.temp < refused.temp / 4


def test_unknown_topology_is_named():
  with pytest.raises(ValueError, match=r"^topology='v9x:1x1': no TPU compiler for it"):
    cc.tpu_devices("v9x:1x1")
