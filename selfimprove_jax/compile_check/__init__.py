"""Compile-only memory check: will a preset's update step and sample step fit on a mesh?

Lowers and compiles the real-size sharded steps with *abstract* parameters (``jax.ShapeDtypeStruct``
leaves carrying their ``NamedSharding``: no weight is ever allocated) and reports, per device:

  params           the parameters' shard bytes (update step: ``TRAIN_RULES``; sample step:
                   ``SAMPLE_RULES``, i.e. replicated over data/fsdp, split over tensor only)
  optimizer state  the AdamW moments (same dtype and sharding as the params) and counters
  KV cache         sample step: the cache of R = B * N rows x (P + M) slots that ``generate``
                   allocates inside the step (part of its temporaries)
  inputs           the batch (tokens_BxL, input_mask_BxL, loss_mask_BxL) or the prompts, the
                   sampling parameters, the stop ids, the step counter and keys
  arguments / outputs / aliased / temporaries
                   XLA's own ``compiled.memory_analysis()``; the aliased bytes are the donated
                   train state that the update step writes in place
  total            arguments + outputs - aliased + temporaries, the figure compared to the budget

The first four come from each leaf's ``sharding.shard_shape(global_shape)`` x itemsize (exact,
platform-independent); the arguments XLA reports are checked against them. Temporaries are what
the backend's compiler allocates and depend on the backend: XLA:CPU, for one, converts bfloat16
matmul weights to float32 copies, shows no saving from per-layer remat (see ``training/remat.py``)
and schedules buffers differently from TPU/GPU, so temporaries from fake CPU devices are a rough,
pessimistic stand-in for an accelerator's (llama3_1_8b, batch 8 x 2048 on fsdp=8: 85 GiB).

The same function serves every platform: on a TPU VM the mesh spans the real chips and their
topology; with ``--num_cpu_devices=N`` (or under pytest's 8 fake devices) it spans fake CPU devices.

  python -m selfimprove_jax.compile_check --preset=llama3_1_8b --mesh=fsdp=8 --num_cpu_devices=8 \\
      --batch=8 --seq_len=2048 --dtype=bfloat16 --budget_gib=16

Exit status: 0 when every step fits the budget, 1 when one does not, 2 on bad flags.
"""
from selfimprove_jax.compile_check.command import (define_flags, main, run, run_flags,
                                                   use_cpu_devices)
from selfimprove_jax.compile_check.memory import (GIB, Report, StepMemory, abstract_params,
                                                  batch_shards, format_report, kv_cache_bytes,
                                                  leaf_bytes, param_count, train_state_shardings,
                                                  tree_bytes)
from selfimprove_jax.compile_check.steps import (FAST_CPU_COMPILE, STEPS, build_mesh, check,
                                                 parse_mesh, resolve_preset, sample_step_memory,
                                                 update_step_memory)

__all__ = ["FAST_CPU_COMPILE", "GIB", "Report", "STEPS", "StepMemory", "abstract_params",
           "batch_shards", "build_mesh", "check", "define_flags", "format_report",
           "kv_cache_bytes", "leaf_bytes", "main", "param_count", "parse_mesh", "resolve_preset",
           "run", "run_flags", "sample_step_memory", "train_state_shardings", "tree_bytes",
           "update_step_memory", "use_cpu_devices"]
