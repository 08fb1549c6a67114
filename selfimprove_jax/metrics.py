"""Run metrics: an append-only ``metrics.jsonl`` mirrored into TensorBoard event files.

The TensorBoard format is written by hand so neither TensorFlow nor ``tensorboard`` is needed: a
file is a sequence of TFRecords (``uint64`` length, masked CRC-32C of the length, payload, masked
CRC-32C of the payload), each payload an ``Event`` protobuf encoded here in the wire format:

  Event{double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5}
  Summary{repeated Value value = 1}    Value{string tag = 1; float simple_value = 2}

Paths are ``etils.epath`` paths. On local disk (or a FUSE mount) both files are appended to and
flushed after every record. Object stores (``gs://``, any ``scheme://``) have no append -- gcsfs
silently turns append into overwrite -- and show an object only once it is closed, so there both
files are kept in memory and rewritten whole by ``flush()``: at most every ``REMOTE_FLUSH_S``
seconds while writing, on every explicit ``flush()`` (the loop flushes before each checkpoint and
after each stage, so whatever a resumed run keeps is on storage) and on ``close()``.
"""
from __future__ import annotations

import io
import json
import math
import numbers
import os
import socket
import struct
import time
import uuid
from typing import Any, Callable, Iterator, Mapping

from etils import epath

FILE_VERSION = "brain.Event:2"
REMOTE_FLUSH_S = 30.0


def _is_remote(path: str | os.PathLike) -> bool:
  """Whether ``path`` is on an object store (a ``scheme://`` URL): no append, no partial reads."""
  return "://" in os.fspath(path)


def _crc_of_byte(c: int) -> int:
  for _ in range(8):
    c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
  return c


_CRC_TABLE = tuple(_crc_of_byte(i) for i in range(256))


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of ``data``, as an unsigned int."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC-32C rotated right by 15 bits plus a constant, mod 2**32."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """Frames ``data`` as one TFRecord."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64 → ten-byte two's complement, as protobuf does
  out = bytearray()
  while n > 0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _len_field(field: int, data: bytes) -> bytes:
  return _key(field, 2) + _varint(len(data)) + data


def _float32(x: float) -> bytes:
  try:
    return struct.pack("<f", x)
  except OverflowError:  # finite doubles beyond float32 range
    return struct.pack("<f", math.copysign(math.inf, x))


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 values: Mapping[str, float] | None = None) -> bytes:
  """The ``Event`` protobuf bytes; ``values`` (tag → scalar) becomes its ``Summary``."""
  out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
  if file_version is not None:
    out += _len_field(3, file_version.encode())
  if values is not None:
    summary = b"".join(
        _len_field(1, _len_field(1, tag.encode()) + _key(2, 5) + _float32(float(v)))
        for tag, v in values.items())
    out += _len_field(5, summary)
  return out


class EventFileWriter:
  """Writes scalar summaries to a new TensorBoard event file in ``logdir`` (created if missing).

  The file is ``events.out.tfevents.{seconds}.{hostname}.{pid}.selfimprove``; its first record is
  the ``file_version`` event TensorBoard expects.
  """

  def __init__(self, logdir: str | os.PathLike):
    self.logdir = epath.Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.path = self.logdir / (f"events.out.tfevents.{int(now)}.{socket.gethostname()}."
                               f"{os.getpid()}.selfimprove")
    self.remote = _is_remote(self.logdir)
    self._f = io.BytesIO() if self.remote else self.path.open("wb")
    self._f.write(tfrecord(encode_event(now, 0, file_version=FILE_VERSION)))
    self.flush()

  def scalars(self, step: int, values: Mapping[str, float], wall_time: float | None = None):
    """Writes one event at ``step`` holding every ``tag → value``; non-finite values are fine."""
    if self._f is None:
      raise ValueError(f"EventFileWriter for {self.path} is closed")
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
      raise ValueError(f"step must be an int, got {step!r}")
    wall = time.time() if wall_time is None else wall_time
    self._f.write(tfrecord(encode_event(wall, int(step), values=values)))

  def flush(self):
    """Pushes buffered records to the file (rewrites the whole object on an object store)."""
    if self._f is None:
      return
    if self.remote:
      self.path.write_bytes(self._f.getvalue())
    else:
      self._f.flush()

  def close(self):
    """Flushes and closes the file; closing twice is fine."""
    if self._f is not None:
      self.flush()
      self._f.close()
      self._f = None


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  n = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError("truncated varint")
    b = buf[pos]
    n |= (b & 0x7F) << shift
    pos += 1
    shift += 7
    if not b & 0x80:
      return n, pos


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
  """Yields ``(field number, raw value)`` per field: an int for varints, bytes otherwise."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    wire_type = key & 7
    if wire_type == 0:
      val, pos = _read_varint(buf, pos)
      yield key >> 3, val
      continue
    if wire_type == 2:
      size, pos = _read_varint(buf, pos)
    elif wire_type in (1, 5):
      size = 8 if wire_type == 1 else 4
    else:
      raise ValueError(f"unsupported wire type {wire_type} for field {key >> 3}")
    if pos + size > len(buf):
      raise ValueError(f"field {key >> 3} runs past the end of its message")
    yield key >> 3, buf[pos:pos + size]
    pos += size


def _decode_event(data: bytes) -> tuple[int, dict[str, float]] | None:
  step, values = 0, None
  for field, val in _fields(data):
    if field == 2:
      step = val - (1 << 64) if val >= 1 << 63 else val
    elif field == 5:
      values = {}
      for _, value_msg in (f for f in _fields(val) if f[0] == 1):
        tag, simple = "", None
        for vfield, v in _fields(value_msg):
          if vfield == 1:
            tag = v.decode()
          elif vfield == 2:
            simple = struct.unpack("<f", v)[0]
        if simple is not None:
          values[tag] = simple
  return None if values is None else (step, values)


def read_events(path: str | os.PathLike) -> list[tuple[int, dict[str, float]]]:
  """``(step, {tag: simple_value})`` for every summary event in the event file at ``path``.

  Both CRCs of every record are checked; a corrupt or truncated record raises ``ValueError``
  naming the file and the record's byte offset.
  """
  buf = epath.Path(path).read_bytes()
  out, pos = [], 0
  while pos < len(buf):
    try:
      if pos + 12 > len(buf):
        raise ValueError("truncated record header")
      header, (header_crc,) = buf[pos:pos + 8], struct.unpack_from("<I", buf, pos + 8)
      if masked_crc32c(header) != header_crc:
        raise ValueError("length CRC mismatch")
      (size,) = struct.unpack("<Q", header)
      if pos + 16 + size > len(buf):
        raise ValueError(f"truncated record (length {size})")
      data = buf[pos + 12:pos + 12 + size]
      if masked_crc32c(data) != struct.unpack_from("<I", buf, pos + 12 + size)[0]:
        raise ValueError("data CRC mismatch")
      event = _decode_event(data)
    except (ValueError, TypeError, struct.error) as e:  # TypeError: a field of the wrong wire type
      raise ValueError(f"corrupt event file {path} at byte offset {pos}: {e}") from None
    if event is not None:
      out.append(event)
    pos += 16 + size
  return out


def _is_number(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


class MetricsLog:
  """The run's metrics: ``workdir/metrics.jsonl`` plus TensorBoard files in ``workdir/tensorboard``.

  Opening rereads an existing ``metrics.jsonl``, keeps the records for which ``keep(record)`` is
  true (all if ``keep`` is None), rewrites the file atomically and replays the kept records into a
  fresh event file after deleting the old ones; a resumed run passes a ``keep`` that drops records
  past its last checkpoint, so nothing is logged twice. A truncated last line (a killed writer) is
  dropped; any other malformed line raises. ``enabled=False`` (non-zero hosts) touches no file.
  On an object store the files are rewritten by ``flush`` instead (see the module docstring).
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: Callable[[dict], bool] | None = None,
               enabled: bool = True):
    self.enabled = enabled
    self._records: list[dict] = []
    self._f = self._tb = None
    if not enabled:
      return
    self.remote = _is_remote(workdir)
    workdir = epath.Path(workdir)
    self.path = workdir / "metrics.jsonl"
    workdir.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      self._records = [r for r in self._read() if keep is None or keep(r)]
      if self.remote:  # an object appears whole or not at all
        self._write_jsonl()
      else:
        tmp = workdir / f".metrics.jsonl.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(self._jsonl())
        tmp.replace(self.path)
    board = workdir / "tensorboard"
    # iterdir, not glob: fsspec-backed epath globs can mangle scheme:// paths.
    for old in (board.iterdir() if board.exists() else ()):
      if old.name.startswith("events.out.tfevents."):
        old.unlink()
    self._tb = EventFileWriter(workdir / "tensorboard")
    for r in self._records:
      self._write_tb(r)
    self._tb.flush()
    self._f = io.StringIO() if self.remote else self.path.open("a")  # the StringIO marks "open"
    self._flushed = time.monotonic()

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

  def _write_tb(self, record: dict):
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
      raise ValueError(f"metrics record needs an int 'step', got step={step!r} in {record!r}")
    prefix = f"{record['stage']}/" if "stage" in record else ""
    self._tb.scalars(int(step), {prefix + k: v for k, v in record.items()
                                 if k not in ("step", "stage") and _is_number(v)})

  def write(self, record: Mapping[str, Any]):
    """Appends one flat record (needs an int ``"step"``) to the JSONL and to TensorBoard.

    Numeric values become scalars tagged ``"{stage}/{key}"`` (just ``key`` without a ``"stage"``);
    non-finite floats are stored as ``null`` in the JSONL (strict JSON) but as-is in TensorBoard.
    """
    if not self.enabled:
      return
    clean = {k: (v if isinstance(v, bool) or not _is_number(v) else
                 int(v) if isinstance(v, numbers.Integral) else float(v))
             for k, v in record.items()}
    if self._f is None:
      raise ValueError(f"MetricsLog for {self.path} is closed")
    stored = {k: None if isinstance(v, float) and not math.isfinite(v) else v
              for k, v in clean.items()}
    line = json.dumps(stored, allow_nan=False) + "\n"  # fails before anything is written
    self._write_tb(clean)
    self._records.append(stored)
    if not self.remote:
      self._f.write(line)
      self.flush()
    elif time.monotonic() - self._flushed > REMOTE_FLUSH_S:
      self.flush()

  def flush(self):
    """Makes every record written so far durable (a no-op when disabled or closed)."""
    if not self.enabled or self._f is None:
      return
    self._tb.flush()
    if self.remote:
      self._write_jsonl()
      self._flushed = time.monotonic()
    else:
      self._f.flush()

  def records(self) -> list[dict]:
    """The records now in the log, as stored (non-finite floats as None)."""
    return [dict(r) for r in self._records]

  def close(self):
    """Closes both files; closing twice is fine."""
    if self._f is not None:
      self.flush()
      self._f.close()
      self._tb.close()
      self._f = self._tb = None

  def __enter__(self) -> MetricsLog:
    return self

  def __exit__(self, *exc):
    self.close()
