"""Hand-written TensorBoard event files and the JSONL metrics log."""
import json
import math
import struct

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from selfimprove_jax import metrics


def _event_class():
  """An ``Event`` message class built by protobuf itself, as an independent codec."""
  F = descriptor_pb2.FieldDescriptorProto
  fdp = descriptor_pb2.FileDescriptorProto(name="event_test.proto", package="t", syntax="proto3")
  value = fdp.message_type.add(name="Value")
  value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
  value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
  summary = fdp.message_type.add(name="Summary")
  summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, type_name=".t.Value",
                    label=F.LABEL_REPEATED)
  event = fdp.message_type.add(name="Event")
  event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
  event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
  event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
  event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, type_name=".t.Summary",
                  label=F.LABEL_OPTIONAL)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Event"))


def _payloads(path):
  """The record payloads of an event file, framing checked only by read_events elsewhere."""
  raw, out, pos = path.read_bytes(), [], 0
  while pos < len(raw):
    (size,) = struct.unpack_from("<Q", raw, pos)
    out.append(raw[pos + 12:pos + 12 + size])
    pos += 16 + size
  return out


def test_crc32c_known_values():
  assert metrics.crc32c(b"123456789") == 0xE3069283
  # RFC 3720 (iSCSI) B.4 test vectors.
  assert metrics.crc32c(bytes(32)) == 0x8A9136AA
  assert metrics.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert metrics.crc32c(bytes(range(32))) == 0x46DD794E
  assert metrics.masked_crc32c(b"") == 0xA282EAD8  # crc32c(b"") == 0


def test_record_bytes_literal():
  data = metrics.encode_event(1.0, 3, values={"a": 2.0})
  assert data == bytes.fromhex(
      "09 000000000000f03f"  # wall_time: field 1, fixed64 double 1.0
      "10 03"  # step: field 2, varint 3
      "2a 0a"  # summary: field 5, 10 bytes
      "0a 08"  # value: field 1, 8 bytes
      "0a 01 61"  # tag "a"
      "15 00000040")  # simple_value: field 2, fixed32 float 2.0
  assert metrics.tfrecord(data) == bytes.fromhex(
      "1700000000000000" "e7cef81e" + data.hex() + "b20c7b47")


def test_encoding_agrees_with_protobuf():
  Event = _event_class()
  ev = Event.FromString(metrics.encode_event(12.5, -7, values={"loss": 0.25, "x/y": -3.0}))
  assert (ev.wall_time, ev.step) == (12.5, -7)
  assert [(v.tag, v.simple_value) for v in ev.summary.value] == [("loss", 0.25), ("x/y", -3.0)]
  assert Event.FromString(metrics.encode_event(0.0, 0, file_version="brain.Event:2")
                          ).file_version == "brain.Event:2"


def test_reads_protobuf_written_file(tmp_path):
  Event = _event_class()
  path = tmp_path / "events.out.tfevents.1.h"
  evs = [Event(wall_time=1.0, file_version="brain.Event:2"), Event(wall_time=2.0, step=5)]
  evs[1].summary.value.add(tag="acc", simple_value=0.5)
  evs[1].summary.value.add(tag="n", simple_value=3.0)
  evs.append(Event(step=2**40))
  evs[2].summary.value.add(tag="big", simple_value=1.0)
  path.write_bytes(b"".join(metrics.tfrecord(e.SerializeToString()) for e in evs))
  assert metrics.read_events(path) == [(5, {"acc": 0.5, "n": 3.0}), (2**40, {"big": 1.0})]


def test_writer_round_trip(tmp_path):
  w = metrics.EventFileWriter(tmp_path / "tb")
  w.scalars(0, {"loss": 1.5, "acc": 0.25})
  w.scalars(1, {"loss": math.nan, "acc": 0.5, "train/grad_norm": math.inf}, wall_time=3.0)
  w.scalars(10, {"loss": -2.0, "huge": 1e300})
  w.close()
  w.close()
  assert w.path.name.startswith("events.out.tfevents.")
  assert w.path.name.endswith(".selfimprove")
  events = metrics.read_events(w.path)
  assert [s for s, _ in events] == [0, 1, 10]
  assert events[0][1] == {"loss": 1.5, "acc": 0.25}
  assert math.isnan(events[1][1]["loss"])
  assert events[1][1]["acc"] == 0.5 and events[1][1]["train/grad_norm"] == math.inf
  assert events[2][1] == {"loss": -2.0, "huge": math.inf}
  first = _event_class().FromString(_payloads(w.path)[0])
  assert first.file_version == "brain.Event:2" and not first.HasField("summary")


@pytest.mark.parametrize("where", ["header", "header_crc", "data", "data_crc"])
def test_corrupted_byte_names_file_and_offset(tmp_path, where):
  w = metrics.EventFileWriter(tmp_path)
  w.scalars(1, {"a": 1.0})
  w.close()
  raw = bytearray(w.path.read_bytes())
  second = 16 + len(_payloads(w.path)[0])
  size = len(raw) - second - 16
  raw[second + {"header": 0, "header_crc": 9, "data": 12 + size // 2,
                "data_crc": 13 + size}[where]] ^= 0x10
  w.path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=rf"{w.path.name} at byte offset {second}: .*CRC"):
    metrics.read_events(w.path)


def test_truncated_event_file_raises(tmp_path):
  w = metrics.EventFileWriter(tmp_path)
  w.scalars(1, {"a": 1.0})
  w.close()
  w.path.write_bytes(w.path.read_bytes()[:-3])
  with pytest.raises(ValueError, match="byte offset .*truncated"):
    metrics.read_events(w.path)


def _tb_files(workdir):
  return sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_metrics_log_writes_jsonl_and_tensorboard(tmp_path):
  with metrics.MetricsLog(tmp_path) as log:
    log.write({"step": 1, "stage": "sft", "round": 0, "loss": 0.5, "ok": True, "name": "x"})
    log.write({"step": 2, "loss": math.nan, "n": 4})
    with pytest.raises(ValueError, match="int 'step'.*step=None"):
      log.write({"loss": 1.0})
    with pytest.raises(ValueError, match=r"step='3'"):
      log.write({"step": "3", "loss": 1.0})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in lines] == log.records() == [
      {"step": 1, "stage": "sft", "round": 0, "loss": 0.5, "ok": True, "name": "x"},
      {"step": 2, "loss": None, "n": 4}]
  [tb] = _tb_files(tmp_path)
  events = metrics.read_events(tb)
  assert events[0] == (1, {"sft/round": 0.0, "sft/loss": 0.5})
  assert events[1][0] == 2 and events[1][1]["n"] == 4.0 and math.isnan(events[1][1]["loss"])
  assert len(events) == 2


def test_metrics_log_resume_keeps_filtered_records(tmp_path):
  with metrics.MetricsLog(tmp_path) as log:
    for step in range(1, 6):
      log.write({"step": step, "stage": "train", "loss": step / 4})
  [old_tb] = _tb_files(tmp_path)
  old_tb.rename(old_tb.with_name("events.out.tfevents.0.stale.1.selfimprove"))  # distinct name
  with metrics.MetricsLog(tmp_path, keep=lambda r: r["step"] <= 3) as log:
    assert [r["step"] for r in log.records()] == [1, 2, 3]
    log.write({"step": 4, "stage": "train", "loss": 9.0})
  expected = [{"step": s, "stage": "train", "loss": s / 4} for s in (1, 2, 3)]
  expected.append({"step": 4, "stage": "train", "loss": 9.0})
  jsonl = tmp_path / "metrics.jsonl"
  assert [json.loads(l) for l in jsonl.read_text().splitlines()] == expected
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".metrics")]
  [tb] = _tb_files(tmp_path)
  assert "stale" not in tb.name
  assert metrics.read_events(tb) == [(r["step"], {"train/loss": r["loss"]}) for r in expected]
  assert metrics.MetricsLog(tmp_path, keep=lambda r: False).records() == []
  assert jsonl.read_text() == "" and metrics.read_events(_tb_files(tmp_path)[0]) == []


def test_truncated_last_line_is_dropped(tmp_path):
  with metrics.MetricsLog(tmp_path) as log:
    log.write({"step": 1, "loss": 1.0})
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 2, "lo')
  with metrics.MetricsLog(tmp_path) as log:
    assert log.records() == [{"step": 1, "loss": 1.0}]
    log.write({"step": 2, "loss": 2.0})
  assert (tmp_path / "metrics.jsonl").read_text() == (
      '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n')


@pytest.mark.parametrize("bad", ['{"step": 2, "lo', "[1, 2]"])
def test_malformed_middle_line_raises(tmp_path, bad):
  content = f'{{"step": 1}}\n{bad}\n{{"step": 3}}\n'
  (tmp_path / "metrics.jsonl").write_text(content)
  with pytest.raises(ValueError, match=r"metrics.jsonl line 2"):
    metrics.MetricsLog(tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text() == content  # left untouched


def test_disabled_touches_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricsLog(workdir, enabled=False) as log:
    log.write({"step": 1, "loss": 1.0})
    assert log.records() == []
  assert not workdir.exists()


@pytest.fixture
def object_store(monkeypatch):
  """``s3://`` served by fsspec's in-memory filesystem, made to behave like an object store:
  opening for append fails (gcsfs silently overwrites instead), and an object opened for
  writing appears only when it is closed."""
  import fsspec
  from etils import epath
  from etils.epath import gpath
  from fsspec.implementations.memory import MemoryFileSystem

  class ObjectStore(MemoryFileSystem):
    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode:
        raise NotImplementedError(f"no append on an object store (mode={mode!r})")
      return super()._open(path, mode, **kwargs)

  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  fsspec.register_implementation("s3", ObjectStore, clobber=True)
  root = epath.Path("s3://selfimprove-metrics-test/run")
  yield root
  root.rmtree(missing_ok=True)
  fsspec.register_implementation("s3", MemoryFileSystem, clobber=True)


def test_metrics_log_on_an_object_store_rewrites_on_flush_and_keeps_records_on_resume(
    object_store, monkeypatch):
  records = [{"step": s, "stage": "train", "loss": s / 4} for s in range(1, 6)]
  log = metrics.MetricsLog(object_store)
  for r in records[:3]:
    log.write(r)
  assert not (object_store / "metrics.jsonl").exists()  # buffered: no flush is due yet
  log.flush()
  assert [json.loads(l) for l in (object_store / "metrics.jsonl").read_text().splitlines()] == \
      records[:3]
  monkeypatch.setattr(metrics, "REMOTE_FLUSH_S", 0.0)  # a flush is due on every write now
  log.write(records[3])
  assert len((object_store / "metrics.jsonl").read_text().splitlines()) == 4
  log.write(records[4])
  del log  # a killed writer: never closed

  with metrics.MetricsLog(object_store, keep=lambda r: r["step"] <= 4) as log:
    log.write({"step": 5, "stage": "train", "loss": 9.0})
  expected = records[:4] + [{"step": 5, "stage": "train", "loss": 9.0}]
  assert [json.loads(l) for l in (object_store / "metrics.jsonl").read_text().splitlines()] == \
      expected
  [tb] = [p for p in (object_store / "tensorboard").iterdir() if p.name.startswith("events.")]
  assert metrics.read_events(tb) == [(r["step"], {"train/loss": r["loss"]}) for r in expected]
