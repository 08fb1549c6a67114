"""Run metrics: an append-only ``metrics.jsonl``, mirrored into TensorBoard and optionally W&B.

The TensorBoard event files are written by ``tensorboardX`` (no TensorFlow): its synchronous
``EventsWriter`` frames ``Event`` protobufs as TFRecords, one event per record holding every
numeric value as a scalar tagged ``"{stage}/{key}"`` (``key`` alone without a ``"stage"``). Tags
are written as given (``SummaryWriter.add_scalar`` would rewrite e.g. ``bon_logprob@4``).

Resume: ``metrics.jsonl`` is the source of truth. Opening a log keeps the records a resumed run
still owns (``keep``), deletes every old event file and replays the kept records into one new
file, so a resumed run's event files hold each logged step once. (``SummaryWriter``'s
``purge_step`` does not fit: it hides steps >= T when TensorBoard reads the files, but the loop's
``keep`` is no step threshold -- an eval record is logged at an earlier step than the train
steps before it -- and the stale events would stay in the files.)

Paths are ``etils.epath`` paths. On local disk (or a FUSE mount) ``metrics.jsonl`` is appended
to and flushed after every record, and the event file is flushed at most every ``FLUSH_S``
seconds while writing and on every ``flush()`` / ``close()``. Object stores (``gs://``, any
``scheme://``) have no append -- gcsfs silently turns append into overwrite -- and show an object
only once it is closed, so there the records are kept in memory and ``metrics.jsonl`` is
rewritten whole, and the event file is written to a local staging directory and copied whole to
the store, by ``flush()``: at most every ``FLUSH_S`` seconds while writing, on every explicit
``flush()`` (the loop flushes before each checkpoint and after each stage, so whatever a resumed
run keeps is on storage) and on ``close()``. tensorboardX's own ``gs://`` writer (which needs
``google-cloud-storage``) and ``s3://`` writer (``boto3``) are not used: every store etils
reaches works, with the same credentials as the rest of the run. The staging directory is
deleted on ``close()``, at garbage collection or at interpreter exit; a killed process leaves it
in the local temp dir.

W&B (``wandb=`` keyword arguments of ``wandb.init``; the loop's ``metrics.wandb`` config):
``wandb`` is imported only then (it is no dependency). Each record is one ``log`` call whose
scalars, tagged as in TensorBoard, are plotted against its ``"step"`` (``define_metric``), so
records logged at an earlier step than the one before (eval after train) are kept. W&B cannot
drop logged steps: a resumed log starts a new W&B run holding the kept records and what follows;
the interrupted run stays in the project as it was.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import sys
import tempfile
import time
import weakref
from typing import Any, Callable, Mapping

from etils import epath

from selfimprove_jax import tables

# tensorboardX's package imports its SummaryWriter module, which imports torch whenever torch is
# installed (only to accept torch tensors): ~2 s and ~180 MB more per JAX process. A None entry in
# sys.modules makes that import fail, as if torch were absent, while tensorboardX loads; torch
# imports normally afterwards.
_HIDE_TORCH = "torch" not in sys.modules
if _HIDE_TORCH:
  sys.modules["torch"] = None
try:
  from tensorboardX.event_file_writer import EventsWriter
  from tensorboardX.proto.event_pb2 import Event
  from tensorboardX.proto.summary_pb2 import Summary
finally:
  if _HIDE_TORCH:
    del sys.modules["torch"]

FLUSH_S = 30.0
EVENT_PREFIX = "events.out.tfevents."


def _is_remote(path: str | os.PathLike) -> bool:
  """Whether ``path`` is on an object store (a ``scheme://`` URL): no append, no partial reads."""
  return "://" in os.fspath(path)


def _is_number(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _scalars(record: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
  """``(step, {tag: value})``: what TensorBoard and W&B get of one record.

  Tags are ``"{stage}/{key}"`` (``key`` without a ``"stage"``) for every numeric, non-bool value
  but ``step``; raises ``ValueError`` when ``record`` has no int ``"step"``.
  """
  step = record.get("step")
  if isinstance(step, bool) or not isinstance(step, numbers.Integral):
    raise ValueError(f"metrics record needs an int 'step', got step={step!r} in {record!r}")
  prefix = f"{record['stage']}/" if "stage" in record else ""
  return int(step), {prefix + k: float(v) for k, v in record.items()
                     if k not in ("step", "stage") and _is_number(v)}


class MetricsLog:
  """The run's metrics: ``workdir/metrics.jsonl`` plus TensorBoard files in ``workdir/tensorboard``.

  Opening rereads an existing ``metrics.jsonl``, keeps the records for which ``keep(record)`` is
  true (all if ``keep`` is None), rewrites the file atomically and replays the kept records into a
  fresh event file after deleting the old ones; a resumed run passes a ``keep`` that drops records
  past its last checkpoint, so nothing is logged twice. A truncated last line (a killed writer) is
  dropped; any other malformed line raises. ``enabled=False`` (non-zero hosts) touches no file
  and starts no W&B run. ``wandb``: keyword arguments of ``wandb.init`` (None: no W&B run).
  On an object store the files are rewritten by ``flush`` instead (see the module docstring).
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: Callable[[dict], bool] | None = None,
               enabled: bool = True, wandb: Mapping[str, Any] | None = None):
    self.enabled = enabled
    self._records: list[dict] = []
    self._f = self._events = self._wandb = None
    self._open = False
    if not enabled:
      return
    if wandb is not None:
      import wandb as wandb_lib  # only when asked for (no dependency); fails before any write
    self.remote = _is_remote(workdir)
    workdir = epath.Path(workdir)
    self.path = workdir / "metrics.jsonl"
    workdir.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      self._records = [r for r in self._read() if keep is None or keep(r)]
      if self.remote:  # an object appears whole or not at all
        self._write_jsonl()
      else:  # a fixed temporary name: one left by a killed resume is overwritten by the next
        tables.atomic_write(self.path, self._jsonl())
    self.board = workdir / "tensorboard"
    # iterdir, not glob: fsspec-backed epath globs can mangle scheme:// paths.
    for old in (self.board.iterdir() if self.board.exists() else ()):
      if old.name.startswith(EVENT_PREFIX):
        old.unlink()
    if self.remote:
      self._staging = tempfile.mkdtemp(prefix="selfimprove-tensorboard-")
      weakref.finalize(self, shutil.rmtree, self._staging, ignore_errors=True)
    else:
      self.board.mkdir(parents=True, exist_ok=True)
    local = self._staging if self.remote else os.fspath(self.board)
    self._events = EventsWriter(os.path.join(local, "events"), f".{os.getpid()}.selfimprove")
    if wandb is not None:
      self._wandb, self._wandb_tags = wandb_lib.init(**wandb), set()
    for r in self._records:
      self._emit(*_scalars(r))
    self._flush_events()
    if not self.remote:
      self._f = self.path.open("a")
    self._open, self._flushed = True, time.monotonic()

  def _jsonl(self) -> str:
    return "".join(json.dumps(r, allow_nan=False) + "\n" for r in self._records)

  def _write_jsonl(self) -> None:
    self.path.write_text(self._jsonl())

  def _read(self) -> list[dict]:
    lines = self.path.read_bytes().split(b"\n")
    records = []
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        record = json.loads(line.decode())
        if not isinstance(record, dict):
          raise ValueError(f"expected a JSON object, got {type(record).__name__}")
      except ValueError as e:
        if i == len(lines) - 1:  # no trailing newline: the writer died mid-line
          continue
        raise ValueError(f"malformed record in {self.path} line {i + 1}: {e}") from None
      records.append(record)
    return records

  def _emit(self, step: int, values: dict[str, float]) -> None:
    """One TensorBoard event (and one W&B ``log`` call) at ``step``."""
    summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values.items()])
    self._events.write_event(Event(wall_time=time.time(), step=step, summary=summary))
    if self._wandb is not None:
      for tag in values.keys() - self._wandb_tags:
        self._wandb.define_metric(tag, step_metric="step")
        self._wandb_tags.add(tag)
      self._wandb.log({**values, "step": step})

  def _flush_events(self) -> None:
    """Flushes the event file; on an object store copies it whole from the staging directory."""
    self._events.flush()
    if self.remote:
      for name in os.listdir(self._staging):
        with open(os.path.join(self._staging, name), "rb") as f:
          (self.board / name).write_bytes(f.read())

  def write(self, record: Mapping[str, Any]):
    """Appends one flat record (needs an int ``"step"``) to the JSONL, TensorBoard and W&B.

    Numeric values become scalars tagged ``"{stage}/{key}"`` (just ``key`` without a ``"stage"``);
    non-finite floats are stored as ``null`` in the JSONL (strict JSON) but as-is elsewhere.
    """
    if not self.enabled:
      return
    clean = {k: (v if isinstance(v, bool) or not _is_number(v) else
                 int(v) if isinstance(v, numbers.Integral) else float(v))
             for k, v in record.items()}
    if not self._open:
      raise ValueError(f"MetricsLog for {self.path} is closed")
    stored = {k: None if isinstance(v, float) and not math.isfinite(v) else v
              for k, v in clean.items()}
    line = json.dumps(stored, allow_nan=False) + "\n"  # fails before anything is written
    self._emit(*_scalars(clean))  # so does a record without an int step
    self._records.append(stored)
    if not self.remote:
      self._f.write(line)
      self._f.flush()
    if time.monotonic() - self._flushed > FLUSH_S:
      self.flush()

  def flush(self):
    """Makes every record written so far durable (a no-op when disabled or closed)."""
    if not self._open:
      return
    self._flush_events()
    if self.remote:
      self._write_jsonl()
    else:
      self._f.flush()
    self._flushed = time.monotonic()

  def records(self) -> list[dict]:
    """The records now in the log, as stored (non-finite floats as None)."""
    return [dict(r) for r in self._records]

  def close(self):
    """Closes the files and finishes the W&B run; closing twice is fine."""
    if not self._open:
      return
    self.flush()
    self._events.close()
    if self.remote:
      shutil.rmtree(self._staging, ignore_errors=True)
    else:
      self._f.close()
    if self._wandb is not None:
      self._wandb.finish()
    self._open, self._f, self._events, self._wandb = False, None, None, None

  def __enter__(self) -> MetricsLog:
    return self

  def __exit__(self, *exc):
    self.close()
