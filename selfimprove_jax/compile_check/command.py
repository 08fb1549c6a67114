"""``python -m selfimprove_jax.compile_check``: flags, fake CPU devices or a TPU topology, exit
status."""
from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import jax

from selfimprove_jax.compile_check.inputs import LOSSES
from selfimprove_jax.compile_check.memory import format_report
from selfimprove_jax.compile_check.steps import FAST_CPU_COMPILE, STEPS, check, fail, positive_int
from selfimprove_jax.compile_check.topology import tpu_devices
from selfimprove_jax.models.config import DTYPES
from selfimprove_jax.scoring import DEFAULT_CHUNK
from selfimprove_jax.training import remat as remat_lib

_FORCE_DEVICES = "--xla_force_host_platform_device_count"


# ---------------------------------------------------------------------------------- the CLI

def use_cpu_devices(n: int) -> None:
  """Makes JAX use ``n`` fake CPU devices; must run before the backend is first used (the package
  imports jax, but devices are only created on the first device query)."""
  positive_int("num_cpu_devices", n)
  flags_ = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_FORCE_DEVICES)]
  os.environ["XLA_FLAGS"] = " ".join(flags_ + [f"{_FORCE_DEVICES}={n}"])
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")  # the env var alone is read when jax is imported
  have = jax.devices()
  if len(have) != n or have[0].platform != "cpu":
    fail("num_cpu_devices", n, f"JAX's backend was already initialized with {len(have)} "
          f"{have[0].platform} device(s); set it before anything uses a device")


def define_flags(flag_values=None) -> dict:
  """Defines the CLI's flags on ``flag_values`` (default absl's global ``FLAGS``); returns
  name -> ``FlagHolder``."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  on = dict(flag_values=flags.FLAGS if flag_values is None else flag_values)
  return dict(
      preset=flags.DEFINE_string("preset", None, "Model preset (models.get_preset), e.g. "
                                 "llama3_1_8b.", **on),
      topology=flags.DEFINE_string("topology", None, "Compile for this TPU slice with XLA:TPU, "
                                   "on any machine with libtpu (pip install -e '.[aot]'), e.g. "
                                   "v5e:2x4, v5p:2x2x1, v6e:2x4. Default: the real devices.", **on),
      mesh=flags.DEFINE_string("mesh", "fsdp=-1", "Mesh axis sizes, e.g. 'fsdp=8' or "
                               "'data=2,fsdp=2,tensor=2'; missing axes are 1, one may be -1.", **on),
      steps=flags.DEFINE_list("steps", list(STEPS), f"Steps to check: {', '.join(STEPS)}.", **on),
      sample_mesh=flags.DEFINE_enum("sample_mesh", "tensor", ["tensor", "train"], "Sample and "
                                    "score steps: 'tensor' folds --mesh's fsdp axis into tensor "
                                    "(the loop's default), 'train' keeps --mesh.", **on),
      batch=flags.DEFINE_integer("batch", 8, "Update step: sequences (pairs for pair losses) "
                                 "per step; the default for --sample_batch.", **on),
      sample_batch=flags.DEFINE_integer("sample_batch", None, "Sample step: prompts per call.",
                                        **on),
      score_batch=flags.DEFINE_integer("score_batch", None, "Score step: sequences per call, a "
                                       "multiple of --num_samples (default batch x num_samples).",
                                       **on),
      seq_len=flags.DEFINE_integer("seq_len", 2048, "Update step: sequence length L; sample "
                                   "and score steps: prompt + new tokens when --prompt_len is "
                                   "not given.", **on),
      prompt_len=flags.DEFINE_integer("prompt_len", None, "Sample and score steps: padded "
                                      "prompt length P (default seq_len - max_new_tokens).", **on),
      num_samples=flags.DEFINE_integer("num_samples", 4, "Sample and score steps: samples per "
                                       "prompt N.", **on),
      max_new_tokens=flags.DEFINE_integer("max_new_tokens", 512, "Sample and score steps: new "
                                          "tokens M.", **on),
      dtype=flags.DEFINE_string("dtype", "bfloat16", f"Compute dtype {DTYPES} (full fine-tuning "
                                "keeps float32 master weights).", **on),
      loss=flags.DEFINE_enum("loss", "sft", list(LOSSES), "Update step: the loss.", **on),
      lora_rank=flags.DEFINE_integer("lora_rank", 0, "Update step: LoRA rank (0: full "
                                     "fine-tuning).", **on),
      lora_targets=flags.DEFINE_string("lora_targets", "attention", "Update step: 'attention', "
                                       "'all_linear' or a parameter-path regex.", **on),
      reference=flags.DEFINE_boolean("reference", False, "Update step: policy_gradient with a KL "
                                     "to frozen reference params (GRPO, beta > 0).", **on),
      remat=flags.DEFINE_string("remat", "full", "Update step: per-layer remat policy ('', "
                                + ", ".join(sorted(remat_lib.POLICIES)) + ").", **on),
      num_microbatches=flags.DEFINE_integer("num_microbatches", 1, "Update step: gradient "
                                            "accumulation micro-batches.", **on),
      chunk_size=flags.DEFINE_integer("chunk_size", DEFAULT_CHUNK, "Update and score steps: "
                                      "positions projected onto the vocabulary at once.", **on),
      budget_gib=flags.DEFINE_float("budget_gib", None, "Per-device budget in GiB (default: the "
                                    "chip's HBM as the TPU compiler reports it, else 16).", **on),
      num_cpu_devices=flags.DEFINE_integer("num_cpu_devices", None, "Use this many fake CPU "
                                           "devices (sets XLA_FLAGS and JAX_PLATFORMS=cpu); "
                                           "default: the real devices (e.g. a TPU VM's chips).",
                                           **on),
      compile=flags.DEFINE_boolean("compile", True, "Lower and compile; --nocompile only does "
                                   "the sharding arithmetic (no temporaries; seconds).", **on),
      fast_cpu_compile=flags.DEFINE_boolean("fast_cpu_compile", True, "On CPU devices, compile "
                                            "with FAST_CPU_COMPILE (no LLVM optimization of code "
                                            "that never runs; same memory analysis).", **on),
  )


def run_flags(values: dict[str, Any]) -> int:
  """Runs the check for parsed flag ``values`` (name -> value) and prints the report.

  Returns 0 when every step fits (or there is no budget), 1 when one does not; a bad value raises
  ``app.UsageError`` (exit status 2) naming the flag and the value, e.g. "--batch=12: ...".
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  v = values
  try:
    if not v["preset"]:
      fail("preset", v["preset"], "is required, e.g. --preset=llama3_1_8b")
    if v["topology"] and v["num_cpu_devices"] is not None:
      fail("topology", v["topology"], "and --num_cpu_devices exclude each other")
    if v["num_cpu_devices"] is not None:
      use_cpu_devices(v["num_cpu_devices"])
    devices = tpu_devices(v["topology"]) if v["topology"] else jax.devices()
    cpu = devices[0].platform == "cpu"  # a TPU/GPU compile keeps XLA's defaults
    options = FAST_CPU_COMPILE if v["fast_cpu_compile"] and cpu else None
    report = check(v["preset"], v["mesh"], steps=v["steps"], batch=v["batch"],
                   sample_batch=v["sample_batch"], score_batch=v["score_batch"],
                   seq_len=v["seq_len"], num_samples=v["num_samples"],
                   max_new_tokens=v["max_new_tokens"], prompt_len=v["prompt_len"],
                   dtype=v["dtype"], loss=v["loss"], lora_rank=v["lora_rank"],
                   lora_targets=v["lora_targets"], reference=v["reference"],
                   remat=v["remat"] or None, num_microbatches=v["num_microbatches"],
                   chunk_size=v["chunk_size"], sample_mesh=v["sample_mesh"],
                   budget_gib="hbm" if v["budget_gib"] is None else v["budget_gib"],
                   devices=devices, compile=v["compile"], compiler_options=options)
  except ValueError as e:
    message = str(e)
    if message.split("=", 1)[0] in v:  # "batch=12: ..." -> "--batch=12: ..."
      message = "--" + message
    raise app.UsageError(message, exitcode=2) from None
  print(format_report(report), flush=True)
  return 0 if report.fits in (True, None) else 1


def main(argv: Sequence[str]) -> int:
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}", exitcode=2)
  try:
    return run_flags({name: holder.value for name, holder in _FLAGS.items()})
  except app.UsageError as e:  # one line naming the flag, not absl's page of usage text
    print(f"compile_check: error: {e}", file=sys.stderr)
    return e.exitcode


_FLAGS: dict = {}


def run() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  _FLAGS.update(define_flags())
  app.run(main)


if __name__ == "__main__":
  run()
