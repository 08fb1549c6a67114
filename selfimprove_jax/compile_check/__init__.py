"""Compile-only memory check: will a preset's update, sample and score steps fit on a mesh?

Lowers and compiles the real-size sharded steps on *abstract* inputs (``jax.ShapeDtypeStruct``
leaves carrying their ``NamedSharding``: no weight is ever allocated), built as the loop builds
the real ones (``inputs``), and reports, per device:

  params           every weight the step holds: float32 master weights (full fine-tuning), or a
                   frozen compute-dtype base plus float32 adapters (LoRA), plus a frozen
                   reference copy (GRPO with a KL); the sampler and scorer hold the compute-dtype
                   copy. Sampling keeps the training layout (``sharding.SAMPLE_RULES``).
  optimizer state  AdamW moments (float32, sharded like their params), counters, learning rate
  KV cache         sample step: the cache of R = B * N rows x (P + M) slots that ``generate``
                   allocates inside the step (part of its temporaries)
  inputs           the batch of the loss, or the prompts and sampling parameters, or the tokens
  arguments / outputs / aliased / temporaries
                   XLA's own ``compiled.memory_analysis()``; the aliased bytes are the donated
                   train state that the update step writes in place
  total            arguments + outputs - aliased + temporaries, the figure compared to the budget

The first four come from each leaf's ``sharding.shard_shape(global_shape)`` x itemsize (exact,
platform-independent); the arguments XLA reports are checked against them. Temporaries are the
backend compiler's own. The figures that count come from XLA:TPU itself, which runs on any
machine: ``--topology=v5e:2x4`` compiles for a slice that is not there (``topology``, the way
MaxText's train_compile works; libtpu from ``pip install -e '.[aot]'``). The budget is then the
chips' HBM as that compiler reports it, and a step it refuses (RESOURCE_EXHAUSTED) is reported
as DOES NOT FIT with the compiler's numbers. On a TPU VM or GPU machine the mesh spans the real
devices; ``--num_cpu_devices=N`` uses fake CPU devices, whose XLA:CPU temporaries are only a
pessimistic stand-in (it keeps float32 copies of bfloat16 weights and shows no remat savings).

  python -m selfimprove_jax.compile_check --preset=llama3_1_8b --topology=v5e:2x4 --mesh=fsdp=8 \\
      --lora_rank=16 --batch=16 --seq_len=1024 --num_samples=16 --max_new_tokens=512

Exit status: 0 when every step fits the budget, 1 when one does not, 2 on bad flags.
"""
from selfimprove_jax.compile_check.command import (define_flags, main, run, run_flags,
                                                   use_cpu_devices)
from selfimprove_jax.compile_check.memory import (GIB, Report, StepMemory, abstract_params,
                                                  batch_shards, format_report, kv_cache_bytes,
                                                  leaf_bytes, param_count, train_state_shardings,
                                                  tree_bytes)
from selfimprove_jax.compile_check.inputs import LOSSES, Recipe
from selfimprove_jax.compile_check.steps import (FAST_CPU_COMPILE, STEPS, build_mesh, check,
                                                 parse_mesh, resolve_preset, sample_step_memory,
                                                 score_step_memory, update_step_memory)
from selfimprove_jax.compile_check.topology import hbm_bytes, refusal, tpu_devices

__all__ = ["FAST_CPU_COMPILE", "GIB", "LOSSES", "Recipe", "Report", "STEPS", "StepMemory", "abstract_params",
           "batch_shards", "build_mesh", "check", "define_flags", "format_report",
           "kv_cache_bytes", "leaf_bytes", "main", "param_count", "parse_mesh", "resolve_preset",
           "run", "run_flags", "sample_step_memory", "score_step_memory", "train_state_shardings",
           "tree_bytes", "update_step_memory", "use_cpu_devices", "hbm_bytes", "refusal",
           "tpu_devices"]
