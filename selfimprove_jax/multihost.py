"""Multi-process runs (TPU pod slices, several GPU hosts, several CPU processes in tests).

The model is SPMD over global values: every process runs the same program, builds the same
global NumPy inputs (jit and ``device_put`` place only this process's addressable shards) and
gets the same global results back through ``fetch``. Host-side work that is worth splitting --
reading prompts (``data.pipeline.global_batches``) and grading completions (sandboxed code,
sympy) -- runs on each process's contiguous block of the rows (``block``) and is gathered back
in process order with ``allgather_objects``, so every process ends up holding the same table,
identical to the one a single process computes. Only process 0 (``is_writer``) writes files;
checkpoints are written by every process through orbax.

Every function here is a no-op or the identity with one process, and every one that
communicates is a collective: all processes must call it, in the same order.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

T = TypeVar("T")
R = TypeVar("R")

MODES = ("auto", "on", "off")


def initialize(mode: str = "auto", *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts ``jax.distributed`` when this is one process of several; call before any JAX work.

  Args:
    mode: "on" always initializes: with no address, JAX detects the cluster itself (Cloud TPU VM
      workers, Slurm, Open MPI). "auto" initializes only when an address is given here or in
      ``JAX_COORDINATOR_ADDRESS``. "off" never does.
    coordinator_address: "host:port" of process 0's coordinator (e.g. ``localhost:12345``).
    num_processes, process_id: this run's process count and this process's index.
  Returns:
    Whether ``jax.distributed`` was initialized.
  Raises:
    ValueError: a bad ``mode``, or a process layout that cannot be right (values named).
  """
  if mode not in MODES:
    raise ValueError(f"distributed={mode!r}: must be one of {MODES}")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes={num_processes}: must be >= 1")
  if process_id is not None and not (0 <= process_id < (num_processes or process_id + 1)):
    raise ValueError(f"process_id={process_id}: must be in [0, num_processes={num_processes})")
  wanted = mode == "on" or (mode == "auto" and bool(
      coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")))
  if not wanted:
    return False
  # Cross-process collectives of the CPU backend need an implementation; accelerators ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def is_writer() -> bool:
  """Whether this process writes files (reports, metrics, tables): process 0."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across processes (no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def fetch(tree: Any) -> Any:
  """``jax.device_get`` of global arrays: NumPy values of the whole (global) arrays.

  An array split over other processes' devices is gathered first (a collective, so every process
  must fetch the same arrays in the same order); replicated and local arrays are read directly.
  """
  def gather(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.process_allgather(x, tiled=True)
    return x
  return jax.device_get(jax.tree.map(gather, tree))


def block(num_items: int, index: int | None = None, count: int | None = None) -> slice:
  """Process ``index``'s contiguous block of ``range(num_items)`` (sizes differ by at most one;
  blocks are in process order). Defaults: this process, of all processes."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  base, extra = divmod(num_items, count)
  start = index * base + min(index, extra)
  return slice(start, start + base + (index < extra))


def allgather_objects(items: Sequence[Any]) -> list[Any]:
  """Concatenation, in process order, of every process's ``items`` (any picklable values).

  Each process may pass a different number of items. With one process: ``list(items)``.
  """
  if jax.process_count() == 1:
    return list(items)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  payload = np.frombuffer(pickle.dumps(list(items), protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([payload.size], np.int64))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:payload.size] = payload
  gathered = multihost_utils.process_allgather(padded)  # (process_count, longest)
  out = []
  for row, size in zip(gathered, np.asarray(sizes).reshape(-1)):
    out.extend(pickle.loads(row[:int(size)].tobytes()))
  return out


def map_blocks(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
  """``[fn(x) for x in items]`` with each process computing its ``block`` of the items and the
  results gathered to every process in order. ``fn``'s results must be picklable."""
  mine = items[block(len(items))]
  return allgather_objects([fn(x) for x in mine])
