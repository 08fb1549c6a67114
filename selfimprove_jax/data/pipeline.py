"""grain pipelines: examples -> sharded, shuffled, tokenized, left-padded prompt batches.

Shapes: B = ``batch_size``, P = the smallest bucket that holds the longest prompt of the batch.
Each batch is a dict of numpy arrays::

  tokens  (B, P) int32   prompt ids, left-padded with ``pad_id`` (prompts end at column P-1,
                         so every row's first generated token lands at the same position)
  mask    (B, P) bool    True on prompt tokens
  valid   (B,)   bool    False on filler rows (see below); drop their outputs
  index   (B,)   int32   position of the example in ``examples`` (-1 on filler rows)
  ids     (B,)   str     example ids ("" on filler rows)

Filler rows keep shapes fixed and hosts in lockstep: every process gets ceil(N / process_count)
slots (the short shards are topped up) and a final partial batch is filled up to B. A filler
row repeats a real prompt (so no row is ever empty) with ``valid=False``.

Iterators from ``iterator(ds)`` are checkpointable: ``state = it.get_state()`` (a small
JSON-able dict) and ``iterator(ds, state)`` resume exactly where ``it`` was, mid-epoch
included, given the same examples, seed and process layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from selfimprove_jax.data.records import Example
from selfimprove_jax.data.tasks import Task
from selfimprove_jax.tokenizer.base import Tokenizer
from selfimprove_jax.tokenizer.template import ChatTemplate


def prompt_encoder(task: Task, tokenizer: Tokenizer, *, shots: int = 0,
                   chat: str | ChatTemplate | None = None) -> Callable[[Example], list[int]]:
  """``example -> prompt ids`` for ``task.render(example, shots, chat)``. Plain text gets the
  tokenizer's own BOS; a rendered chat carries whatever BOS its format writes, and is encoded
  as it stands (as transformers' ``apply_chat_template(tokenize=True)`` does)."""
  def encode(example: Example) -> list[int]:
    return tokenizer.encode(task.render(example, shots=shots, chat=chat), add_bos=chat is None)
  return encode


def shard_indices(num_examples: int, process_index: int, process_count: int) -> np.ndarray:
  """Example indices of one process, ``(ceil(N / process_count),)`` int64, -1 marking filler.

  Process p takes indices p, p + process_count, ...; the shards are disjoint and cover
  ``range(num_examples)``.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got process_index="
                     f"{process_index}, process_count={process_count}")
  if num_examples < 1:
    raise ValueError(f"need at least one example, got {num_examples}")
  shard = np.arange(process_index, num_examples, process_count, dtype=np.int64)
  size = -(-num_examples // process_count)
  return np.concatenate([shard, np.full(size - len(shard), -1, dtype=np.int64)])


def left_pad(prompts: Sequence[Sequence[int]], *, buckets: Sequence[int], pad_id: int,
             ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads ragged ``prompts`` to the smallest bucket holding the longest.

  Returns:
    tokens (B, P) int32 and mask (B, P) bool.

  Raises:
    ValueError: an empty prompt, or one longer than the largest bucket (naming its id).
  """
  lengths = [len(p) for p in prompts]
  names = ids if ids is not None else [f"row {i}" for i in range(len(prompts))]
  for name, n in zip(names, lengths):
    if n == 0:
      raise ValueError(f"prompt of {name!r} is empty")
    if n > buckets[-1]:
      raise ValueError(f"prompt of {name!r} has {n} tokens, more than the largest bucket "
                       f"{buckets[-1]}; add a larger bucket or use fewer shots")
  width = next(b for b in buckets if b >= max(lengths))
  tokens = np.full((len(prompts), width), pad_id, dtype=np.int32)
  mask = np.zeros((len(prompts), width), dtype=bool)
  for row, (p, n) in enumerate(zip(prompts, lengths)):
    tokens[row, width - n:] = p
    mask[row, width - n:] = True
  return tokens, mask


def prompt_batches(examples: Sequence[Example], encode: Callable[[Example], Sequence[int]], *,
                   batch_size: int, buckets: Sequence[int], pad_id: int, seed: int = 0,
                   shuffle: bool = True, num_epochs: int | None = 1,
                   drop_remainder: bool = False, process_index: int | None = None,
                   process_count: int | None = None) -> grain.MapDataset:
  """A ``grain.MapDataset`` of prompt batches (see the module docstring for the layout).

  Args:
    examples: the full example list (every process passes the same one) or any random-access
      sequence of examples.
    encode: ``example -> prompt ids``, e.g. ``prompt_encoder(task, tokenizer)``.
    batch_size: B, rows per batch on this process.
    buckets: allowed prompt widths P, ascending; a prompt longer than the last is an error.
    pad_id: id written in padded positions (``tokenizer.pad_id``).
    seed: shuffle seed; the order is a pure function of (seed, epoch, shard).
    shuffle: permute each epoch (reseeded per epoch); False keeps shard order.
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop a final partial batch instead of filling it.
    process_index, process_count: this process's shard; default ``jax.process_index()`` and
      ``jax.process_count()``.

  Raises:
    ValueError: bad batch_size, buckets, num_epochs or process layout (value named).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  buckets = tuple(int(b) for b in buckets)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
    raise ValueError(f"buckets must be positive, strictly ascending and non-empty, got "
                     f"{buckets}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  shard = shard_indices(len(examples), process_index, process_count)

  ds = grain.MapDataset.source(shard.tolist())
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)

  def to_row(i: int) -> dict[str, Any]:
    example = examples[i if i >= 0 else 0]
    return {"index": i, "id": example["id"] if i >= 0 else "", "tokens": list(encode(example))}

  def collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    rows = list(rows) + [{**rows[-1], "index": -1, "id": ""}] * (batch_size - len(rows))
    tokens, mask = left_pad([r["tokens"] for r in rows], buckets=buckets, pad_id=pad_id,
                            ids=[r["id"] or "<filler>" for r in rows])
    index = np.array([r["index"] for r in rows], dtype=np.int32)
    return {"tokens": tokens, "mask": mask, "valid": index >= 0, "index": index,
            "ids": np.array([r["id"] for r in rows], dtype=str)}

  return ds.map(to_row).batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)


def global_batches(num_examples: int, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                   num_epochs: int | None = None, process_index: int | None = None,
                   process_count: int | None = None) -> grain.MapDataset:
  """Example indices of this process's block of each global batch: ``ds[b]`` is ``(B / P,)`` int64.

  Unlike ``prompt_batches`` (each process shuffles its own strided shard), the global stream
  here -- example order, batches, epochs -- is a pure function of ``seed`` and does not depend on
  the process layout: global batch ``b`` holds the same ``batch_size`` examples whether one
  process or sixteen read it, and process p reads rows ``[p * B/P, (p + 1) * B/P)`` of it (the
  rows its devices hold under a batch-sharded mesh). So a run gives the same results on any number
  of hosts. Batches may straddle epochs; each epoch is reshuffled.

  Raises:
    ValueError: ``batch_size`` not a positive multiple of ``process_count``, bad layout or epochs.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got process_index="
                     f"{process_index}, process_count={process_count}")
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size}: must be a positive multiple of the "
                     f"{process_count} processes")
  if num_examples < 1:
    raise ValueError(f"need at least one example, got {num_examples}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  ds = grain.MapDataset.range(num_examples)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).batch(batch_size // process_count, drop_remainder=True,
                                   batch_fn=lambda rows: np.asarray(rows, np.int64))
  return ds[process_index::process_count]


def iterator(ds: grain.MapDataset, state: Mapping[str, Any] | None = None, *,
             num_threads: int = 4, prefetch: int = 8) -> grain.DatasetIterator:
  """A checkpointable iterator over ``ds``, positioned at ``state`` when given.

  ``it.get_state()`` returns the position (a JSON-able dict) to store with a checkpoint.
  ``num_threads`` threads tokenize and collate up to ``prefetch`` batches ahead (grain's own
  defaults, 16 threads and 500 elements, are sized for small records, not whole batches).
  """
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  it = iter(ds.to_iter_dataset(options))
  if state is not None:
    it.set_state(dict(state))
  return it
